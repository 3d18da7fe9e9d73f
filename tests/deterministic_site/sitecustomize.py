"""Deterministic kernels in every Python process that has this folder on its PYTHONPATH.

Python imports `sitecustomize` at start-up, so `train`, and each worker that torch's
launcher spawns in a fresh interpreter, runs with deterministic algorithms: what exact
resumes on a GPU need (tests/test_gpu.py). cuBLAS needs CUBLAS_WORKSPACE_CONFIG as well,
which the tests set. warn_only: adaptive average pooling's backward is flagged although
its 1x1 output takes the kernel without atomics; the tests compare bit for bit.
"""

import torch

torch.use_deterministic_algorithms(True, warn_only=True)

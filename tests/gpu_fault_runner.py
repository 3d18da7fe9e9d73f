"""`train` or `serve` with a GPU failure simulated on the CPU, as the real entry point runs.

Run as `python gpu_fault_runner.py train|serve` with GPU_FAULT set:
- `oom` (train): every fold's training raises torch.OutOfMemoryError, as CUDA's allocator does;
- `sticky` (serve): every prediction after the start-up warm-up raises the RuntimeError that
  torch raises after an illegal memory access, which leaves the CUDA context unusable.
"""

import os
import sys

import torch
from species_classifier import predictor, trainer

FAULT = os.environ["GPU_FAULT"]


def _out_of_memory(*_args, **_kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


_probabilities = predictor.Predictor.probabilities


def _broken_after_warm_up(self, images):
    if any(image.any() for image in images):  # the warm-up photo is all zeros
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    return _probabilities(self, images)


if FAULT == "oom":
    trainer.FoldTrainer.run = _out_of_memory
elif FAULT == "sticky":
    predictor.Predictor.probabilities = _broken_after_warm_up
else:
    raise SystemExit(f"GPU_FAULT={FAULT!r}: use oom or sticky")

if __name__ == "__main__":
    command = sys.argv[1]
    if command == "train":
        from species_classifier.train import main
    else:
        from species_classifier.serve import main
    sys.exit(main())

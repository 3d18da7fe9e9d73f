"""model.onnx: its contract (what goes in, what comes out) and how it is run.

The graph is the served ensemble whole (onnx_export.py writes it): uint8 RGB photos in,
N x img_size x img_size x 3 (NHWC, values 0-255, resized as model.json's `resize` says; the
ImageNet normalisation is inside the graph), and two float32 outputs: `probabilities`
(N x classes, the mean over the members, what `predicted_species` is chosen from) and
`member_probabilities` (members x N x classes, each member's softmax(logits / temperature),
what `fold_details` reports). Classes are in model.json's order.

Used by the CPU serving engine (engine.py) and the offline `species-classify`
(classify.py). Torch-free; onnxruntime is imported when a session is opened.
"""

from __future__ import annotations

import os
from pathlib import Path

ONNX_FILE = "model.onnx"
INPUT = "pixels"
MEAN_OUTPUT = "probabilities"
MEMBERS_OUTPUT = "member_probabilities"


def contract(img_size: int, resize: str) -> dict:
    """model.json's "onnx" entry, less the check: enough to use the file without this code."""
    return {
        "file": ONNX_FILE,
        "input": {
            "name": INPUT,
            "shape": ["batch", img_size, img_size, 3],
            "dtype": "uint8",
            "layout": "NHWC, RGB, values 0-255; the graph normalises",
            "resize": resize,
        },
        "outputs": [
            {
                "name": MEAN_OUTPUT,
                "shape": ["batch", "classes"],
                "dtype": "float32",
                "meaning": "mean of the members' probabilities; classes in model.json's order",
            },
            {
                "name": MEMBERS_OUTPUT,
                "shape": ["members", "batch", "classes"],
                "dtype": "float32",
                "meaning": "each member's softmax(logits / temperature), members in model.json's order",
            },
        ],
    }


def open_session(path: Path, threads: int):
    """An ONNX Runtime CPU session for model.onnx with `threads` threads for each call.

    Tuned for gunicorn workers sharing a small instance: one call at a time per worker (the
    batcher's), so no inter-op pool; and the intra-op threads sleep rather than spin between
    calls where OMP_WAIT_POLICY=PASSIVE asks the same of torch (container/serve sets it):
    spinning threads starve the request threads that decode photos on the same cores.
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    passive = os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE"
    options.add_session_config_entry("session.intra_op.allow_spinning", "0" if passive else "1")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

"""The bundle's members as one forward function, built for the device it serves on.

`Ensemble` is the whole model as one module: uint8 photos in (N x H x W x 3), every
member's softmax(logits / temperature) out (members x N x classes, float32), with the
normalisation inside, so a batch is one call and, on a GPU, one captured graph.

`build_forward` makes it fast where it runs:
- weights cast once to the serving dtype (no autocast: autocast re-casts every weight on
  every call, which made bf16 slower than fp32 at small batches), in channels_last;
- CUDA: graphs captured at start-up for the padded batch sizes in PADDED_SIZES, a batch
  running through the smallest one that holds it, so a batch costs a few launches instead
  of hundreds; `torch.compile` first when asked (minutes of compiling per size); if any of
  it fails, eager with one log line: a slower endpoint, never a dead one;
- CPU: eager, a frozen TorchScript graph (batch norm folded into the convolutions) and,
  where the bundle has a checked model.onnx, ONNX Runtime: whichever measures fastest on
  this machine at start-up; torch.compile (inductor) joins the measurement when asked.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from species_classifier.gpu import serving_half_dtype
from species_classifier.onnx_runtime import INPUT, MEMBERS_OUTPUT, open_session

_log = logging.getLogger(__name__)

# Batch sizes captured as CUDA graphs; a batch is padded to the next one.
PADDED_SIZES = (1, 2, 4, 8, 16, 32, 64)
# Start-up measurement: warm-up calls (TorchScript profiles a graph on its first call and
# optimises it on the second), then the best of MEASURE_REPEATS.
MEASURE_WARM_UP_CALLS = 2
MEASURE_REPEATS = 3
# The CPU candidates are timed at this batch size (or the max batch, when smaller): under
# load a CPU worker's batches are a few photos each.
CPU_MEASURE_BATCH = 4

Forward = Callable[[torch.Tensor], torch.Tensor]


class Ensemble(nn.Module):
    """uint8 photos (N x H x W x 3) -> members x N x classes probabilities, float32."""

    def __init__(
        self,
        members: Sequence[nn.Module],
        mean: Sequence[float],
        std: Sequence[float],
        temperature: float = 1.0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        # imaging.normalize's arithmetic, with the constants on the device once: a graph
        # capture cannot copy them from the host on every call.
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1) * 255.0)
        self.temperature = float(temperature)
        self.dtype = dtype

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        batch = (pixels.permute(0, 3, 1, 2).float() - self.mean) / self.std
        batch = batch.to(self.dtype).contiguous(memory_format=torch.channels_last)
        # Softmax in float32 whatever the weights' dtype: the answer's probabilities must sum
        # to 1 to float32 precision.
        return torch.stack(
            [
                torch.softmax(member(batch).float() / self.temperature, dim=1)
                for member in self.members
            ]
        )


@dataclass(frozen=True)
class BuiltForward:
    """The forward function a worker serves with, and what it is, for the log."""

    forward: Forward
    dtype: torch.dtype
    engine: str


def build_forward(
    ensemble: Ensemble,
    device: torch.device,
    img_size: int,
    max_batch: int,
    *,
    dtype: torch.dtype | None = None,
    engine: str = "auto",
    compile_model: bool = False,
    onnx_file: Path | None = None,
) -> BuiltForward:
    """The ensemble on `device` in its fastest form (see the module docstring).

    `dtype` None measures the candidates (CUDA: bf16 or fp16 against fp32; CPU: fp32 only,
    as reduced precision is slower on most CPUs). `engine`: "auto", "eager", "graph"
    (CUDA graphs on a GPU, the frozen TorchScript graph on a CPU) or "onnx" (ONNX Runtime
    running `onnx_file`, the bundle's checked model.onnx; CPU only).
    """
    candidates = [dtype] if dtype else _dtype_candidates(device)
    chosen = candidates[0]
    if len(candidates) > 1:
        chosen = _fastest_dtype(ensemble, device, img_size, max_batch, candidates)
    model = _cast(ensemble, device, chosen)
    if device.type == "cuda":
        return BuiltForward(
            *cuda_graph_forward(model, device, img_size, max_batch, engine, compile_model)
        )
    return BuiltForward(
        *cpu_forward(model, img_size, max_batch, engine, compile_model, onnx_file=onnx_file)
    )


def _fastest_dtype(
    ensemble: Ensemble,
    device: torch.device,
    img_size: int,
    max_batch: int,
    candidates: list[torch.dtype],
) -> torch.dtype:
    """The candidate with the fastest eager call; float32 when the measurement itself fails
    (out of memory, a kernel missing for this GPU): a slower worker, never one that dies at
    start and is respawned in a loop."""
    try:
        example = _example(device, img_size, max_batch)
        timings = {
            # A copy per candidate: casting the weights to bf16 and back would round them.
            candidate: _seconds_per_call(
                _eager(_cast(copy.deepcopy(ensemble), device, candidate)), example
            )
            for candidate in candidates
        }
    except Exception as error:  # noqa: BLE001 - any measurement failure: serve float32
        _log.warning(
            "dtype measurement failed, serving float32: %s: %s",
            type(error).__name__,
            str(error).splitlines()[0][:200] if str(error) else "",
        )
        return torch.float32
    _log.info("dtype measured at batch %d: %s", max_batch, _format_timings(timings))
    return min(timings, key=timings.get)


def _dtype_candidates(device: torch.device) -> list[torch.dtype]:
    """float32 on a CPU; on a GPU its reduced precision by generation (bf16 from Ampere on,
    fp16 on a T4: torch.cuda.is_bf16_supported() also counts emulated bf16) against float32."""
    if device.type != "cuda":
        return [torch.float32]
    half = serving_half_dtype(torch.cuda.get_device_capability(device))
    return [getattr(torch, half), torch.float32]


def _cast(ensemble: Ensemble, device: torch.device, dtype: torch.dtype) -> Ensemble:
    """The members in `dtype` and channels_last on `device`; the normalisation stays float32."""
    ensemble.to(device)
    ensemble.members.to(dtype=dtype, memory_format=torch.channels_last)
    ensemble.dtype = dtype
    return ensemble.eval()


def _eager(model: nn.Module) -> Forward:
    def forward(pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(pixels)

    return forward


def cuda_graph_forward(
    model: Ensemble,
    device: torch.device,
    img_size: int,
    max_batch: int,
    engine: str,
    compile_model: bool,
) -> tuple[Forward, torch.dtype, str]:
    """CUDA graphs of `model` (compiled first if asked) for the padded batch sizes up to
    max_batch; eager when `engine` says so or when anything in the capture fails."""
    eager = _eager(model)
    if engine == "eager":
        return eager, model.dtype, "eager"
    # Fixed shapes: let cuDNN pick the fastest algorithm per shape once, at capture.
    torch.backends.cudnn.benchmark = True
    try:
        forward = _eager(torch.compile(model)) if compile_model else eager
        sizes = padded_sizes(max_batch)
        padded = PaddedBatches(forward, sizes, (img_size, img_size, 3), CudaGraphs(device), device)
    except Exception as error:  # noqa: BLE001 - any capture failure: serve eager, still serve
        # Eager batches come in every size: benchmarking would search algorithms per size.
        torch.backends.cudnn.benchmark = False
        _log.warning(
            "CUDA graph capture failed, serving eager (slower): %s: %s",
            type(error).__name__,
            str(error).splitlines()[0][:200] if str(error) else "",
        )
        return eager, model.dtype, "eager (graph capture failed)"
    what = "torch.compile + CUDA graphs" if compile_model else "CUDA graphs"
    return padded, model.dtype, f"{what} for batch sizes {', '.join(map(str, sizes))}"


def cpu_forward(
    model: Ensemble,
    img_size: int,
    max_batch: int,
    engine: str,
    compile_model: bool,
    *,
    onnx_file: Path | None = None,
) -> tuple[Forward, torch.dtype, str]:
    """The fastest of the candidates that `engine` and `compile_model` allow, timed here;
    a candidate that fails to build or run is left out with a warning."""
    example = _example(torch.device("cpu"), img_size, min(max_batch, CPU_MEASURE_BATCH))
    candidates: dict[str, Forward] = {}
    if engine in ("auto", "eager"):
        candidates["eager"] = _eager(model)
    if engine in ("auto", "graph"):
        try:
            candidates["frozen graph"] = frozen_graph(model, example)
        except Exception as error:  # noqa: BLE001 - e.g. TorchScript gone from a newer torch
            _log.warning("no frozen graph (%s: %s), serving eager", type(error).__name__, error)
            candidates.setdefault("eager", _eager(model))
    if engine == "onnx" or (engine == "auto" and onnx_file is not None):
        try:
            if onnx_file is None:
                raise FileNotFoundError(
                    "the bundle has no checked model.onnx (its export failed, see the training log)"
                )
            candidates["onnx runtime"] = onnx_runtime_forward(onnx_file, torch.get_num_threads())
        except Exception as error:  # noqa: BLE001 - e.g. a damaged file: serve the torch model
            _log.warning("ONNX Runtime left out: %s: %s", type(error).__name__, error)
            candidates.setdefault("eager", _eager(model))
    if compile_model:
        candidates["torch.compile"] = _eager(torch.compile(model))
    if len(candidates) == 1:
        ((name, forward),) = candidates.items()
        return forward, model.dtype, name
    timings = {}
    for name, forward in candidates.items():
        try:
            timings[name] = _seconds_per_call(forward, example)
        except Exception as error:  # noqa: BLE001 - e.g. inductor without a C++ compiler
            if name == "eager":
                raise
            _log.warning("%s left out: %s: %s", name, type(error).__name__, error)
    if not timings:
        return _eager(model), model.dtype, "eager (no other form ran)"
    best = min(timings, key=timings.get)
    measured = f"measured at batch {len(example)}: {_format_timings(timings)}"
    return candidates[best], model.dtype, f"{best} ({measured})"


def frozen_graph(model: Ensemble, example: torch.Tensor) -> Forward:
    """The ensemble traced and frozen: weights become constants and batch norm is folded
    into the convolutions. The same answers as eager within float noise.

    Not `optimize_for_inference` on top: its mkldnn layout conversions made each batch
    slower than the frozen graph alone on the 2-core AVX2 machine this was measured on.
    """
    with warnings.catch_warnings():
        # TorchScript is deprecated in favour of torch.compile, which takes many minutes to
        # compile this model on a small CPU; while it is here, it is the fast start-up.
        warnings.simplefilter("ignore", FutureWarning)
        with torch.no_grad():
            traced = torch.jit.trace(model, example, check_trace=False)
        graph = torch.jit.freeze(traced)
    return _eager(graph)


def onnx_runtime_forward(onnx_file: Path, threads: int) -> Forward:
    """The bundle's model.onnx in ONNX Runtime, as a forward function of the same shape:
    uint8 photos in, members x N x classes probabilities out."""
    session = open_session(onnx_file, threads)

    def forward(pixels: torch.Tensor) -> torch.Tensor:
        (members,) = session.run([MEMBERS_OUTPUT], {INPUT: pixels.numpy()})
        return torch.from_numpy(members)

    return forward


def padded_sizes(max_batch: int) -> tuple[int, ...]:
    """The PADDED_SIZES up to max_batch, and max_batch itself, so every batch has one."""
    return tuple(sorted({size for size in PADDED_SIZES if size < max_batch} | {max_batch}))


class PaddedBatches:
    """A forward function run only at fixed batch sizes: each batch goes through the
    smallest size that holds it, its rows first, the rest of the rows left as they were
    (every row is computed on its own in eval mode, so the padding cannot change them).

    `capture(forward, static_input)` returns a function that runs `forward` on that very
    input tensor and returns the output: a CUDA graph replay on a GPU, a plain call in tests.
    The output of one call is valid until the next call (the graphs share one memory pool).
    """

    def __init__(
        self,
        forward: Forward,
        sizes: Sequence[int],
        image_shape: tuple[int, int, int],
        capture: Callable[[Forward, torch.Tensor], Callable[[], torch.Tensor]],
        device: torch.device,
    ) -> None:
        self.sizes = tuple(sorted(sizes))
        self._slots: dict[int, tuple[torch.Tensor, Callable[[], torch.Tensor]]] = {}
        # Largest first: the smaller graphs then fit in the memory the largest one reserved.
        for size in reversed(self.sizes):
            static_input = torch.zeros((size, *image_shape), dtype=torch.uint8, device=device)
            self._slots[size] = (static_input, capture(forward, static_input))

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        count = len(pixels)
        size = next((size for size in self.sizes if size >= count), None)
        if size is None:
            raise ValueError(f"a batch of {count} is over the largest padded size {self.sizes[-1]}")
        static_input, run = self._slots[size]
        static_input[:count].copy_(pixels)
        return run()[:, :count]


class CudaGraphs:
    """`PaddedBatches`' capture on a GPU: one CUDA graph per batch size, one memory pool."""

    WARM_UP_CALLS = 2

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._pool = torch.cuda.graph_pool_handle()

    def __call__(self, forward: Forward, static_input: torch.Tensor) -> Callable[[], torch.Tensor]:
        # Warm up on a side stream, as torch.cuda.graph requires: lazy initialisation,
        # cuDNN's algorithm search and torch.compile's compiling must not be captured.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(self.WARM_UP_CALLS):
                forward(static_input)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            static_output = forward(static_input)

        def replay() -> torch.Tensor:
            graph.replay()
            return static_output

        return replay


def _example(device: torch.device, img_size: int, batch: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (batch, img_size, img_size, 3), generator=generator)
    return pixels.to(torch.uint8).to(device)


def _seconds_per_call(forward: Forward, example: torch.Tensor) -> float:
    for _ in range(MEASURE_WARM_UP_CALLS):
        forward(example)
    best = float("inf")
    for _ in range(MEASURE_REPEATS):
        started = time.perf_counter()
        forward(example)
        if example.device.type == "cuda":
            torch.cuda.synchronize(example.device)
        best = min(best, time.perf_counter() - started)
    return best


def _format_timings(timings: dict) -> str:
    return ", ".join(
        f"{str(name).removeprefix('torch.')} {seconds * 1000:.1f} ms"
        for name, seconds in timings.items()
    )

"""What the image does with the GPUs of the machine it runs on: every GPU decision, as pure
functions of plain facts (compute capability, driver version, visible GPUs, free memory).

The image's torch is 2.14.1+cu130: CUDA 13.0, kernels for sm_75 (T4) and newer. CUDA 13.0
needs NVIDIA driver 580 or newer; an older driver runs it only through NVIDIA's forward-
compatibility libraries (data-centre GPUs, driver 535 or newer), which since NVIDIA Container
Toolkit 1.17.4 a container must bring and enable itself. SageMaker's hosts run 470, 535, 550
or 580 depending on the instance and the AMI version asked for; docs/sagemaker.md ("GPUs and
drivers") has the table and the sources. So:

- `train` and `serve` stop at start, in one line, when GPUs are visible but CUDA is unusable
  (`cuda_problem`), naming the driver found, the one the image needs and the AMI to ask for;
- the container's entry points put the forward-compatibility libraries first on the library
  path when the image carries them and the driver is older than the image needs
  (`compat_library_path`);
- the launcher asks for the AMI whose driver runs the image (`endpoint_ami`, `transform_ami`)
  and refuses instance types whose GPU the image has no kernels for (`unsupported_instance`);
- precision follows the GPU generation, not `torch.cuda.is_bf16_supported()`, which counts
  bf16 emulated on a T4 (`training_precision`, `serving_half_dtype`).

Nothing here imports torch at module level: the launcher imports this module, and the entry
points call it before torch loads.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

IMAGE_TORCH = "2.14.1+cu130"
IMAGE_CUDA = "13.0"
# CUDA 13.0 runs natively on driver branch R580 and newer (NVIDIA's CUDA and driver support
# matrix); older data-centre drivers from R535 on run it with the forward-compatibility libraries.
DRIVER_FLOOR = 580
COMPAT_DRIVER_FLOOR = 535
# torch's CUDA 13 builds carry kernels from sm_75 (Turing) on: no V100 (sm_70, ml.p3).
MIN_CAPABILITY = (7, 5)
# bf16 tensor cores from Ampere (sm_80) on; a T4 or V100 trains in fp16 with a gradient scaler.
BF16_CAPABILITY = (8, 0)

# SageMaker AMI versions with a driver the image runs on (botocore's sagemaker service model:
# ProductionVariantInferenceAmiVersion and TransformAmiVersion).
ENDPOINT_AMI = "al2023-ami-sagemaker-inference-gpu-4-1"  # driver 580, CUDA 13.0
TRANSFORM_AMI = "al2-ami-sagemaker-batch-gpu-535"  # driver 535: forward compatibility needed
# Instance families whose GPU the image has no kernels for, and the GPU's name.
UNSUPPORTED_FAMILIES = {"ml.p2": "K80 (sm_37)", "ml.p3": "V100 (sm_70)", "ml.p3dn": "V100 (sm_70)"}
# ml.<family>.<size> with an NVIDIA GPU, as SageMaker names them.
GPU_FAMILY = re.compile(r"^ml\.(g4dn|g5|g6|g6e|gr6|p2|p3|p3dn|p4d|p4de|p5|p5e|p5en|p6)\.")

COMPAT_DIR = Path("/usr/local/cuda/compat")
DRIVER_VERSION_FILE = Path("/proc/driver/nvidia/version")
DEVICE_DIR = Path("/dev")
# Set by the entry point once it has decided about the compatibility libraries, so the
# process it re-executes with the new library path does not decide again.
COMPAT_DECIDED_ENV = "SPECIES_CUDA_COMPAT_DECIDED"

# Driver versions as NVIDIA writes them ("535.54.03"): compared through `version_key`.
Version = str


class GpuUnusableError(RuntimeError):
    """GPUs are there, but this image cannot use them: the message says why and what to do."""


def version_key(version: Version) -> tuple[int, ...]:
    """'535.54.03' -> (535, 54, 3), for comparing."""
    return tuple(int(part) for part in version.split("."))


def format_version(version: Version | None) -> str:
    return version or "none"


def driver_from_proc(text: str) -> Version | None:
    """The kernel module's version from /proc/driver/nvidia/version's first line."""
    found = re.search(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)", text)
    return found.group(1) if found else None


def count_gpu_devices(names: list[str], cuda_visible_devices: str | None = None) -> int:
    """GPUs this process may use: the container runtime's /dev/nvidia0, /dev/nvidia1, ...,
    fewer where CUDA_VISIBLE_DEVICES names fewer, none where it hides them all ("" or -1: a
    deliberate CPU run on a GPU machine, which is no problem to report)."""
    nodes = sum(1 for name in names if re.fullmatch(r"nvidia\d+", name))
    if cuda_visible_devices is None:
        return nodes
    entries = [entry.strip() for entry in cuda_visible_devices.split(",") if entry.strip()]
    if not entries or entries[0].startswith("-"):
        return 0
    return min(nodes, len(entries))


def compat_driver(names: list[str]) -> Version | None:
    """The driver version the forward-compatibility libraries carry (libcuda.so.580.65.06)."""
    versions = [
        found.group(1)
        for name in names
        if (found := re.fullmatch(r"libcuda\.so\.(\d+(?:\.\d+)+)", name))
    ]
    return max(versions, key=version_key, default=None)


def needs_compat(driver: Version | None, compat: Version | None) -> bool:
    """Whether to load the forward-compatibility libraries: only for an older driver that
    they support, and only when the image carries libraries newer than that driver."""
    if driver is None or compat is None:
        return False
    major = version_key(driver)[0]
    if major >= DRIVER_FLOOR or major < COMPAT_DRIVER_FLOOR:
        return False
    return version_key(compat) > version_key(driver)


def compat_library_path(
    driver: Version | None, compat: Version | None, library_path: str, compat_dir: str
) -> str | None:
    """LD_LIBRARY_PATH with the compatibility libraries first, or None to leave it as it is."""
    if not needs_compat(driver, compat):
        return None
    rest = [part for part in library_path.split(":") if part and part != compat_dir]
    return ":".join([compat_dir, *rest])


def enable_cuda_compat(argv: list[str]) -> None:
    """Entry points call this before torch loads. The dynamic loader reads LD_LIBRARY_PATH
    once, at process start, so when the libraries are needed the process starts again with it."""
    if os.environ.get(COMPAT_DECIDED_ENV):
        return
    os.environ[COMPAT_DECIDED_ENV] = "1"
    driver = read_driver_version()
    compat = compat_driver(_names(COMPAT_DIR))
    path = compat_library_path(
        driver, compat, os.environ.get("LD_LIBRARY_PATH", ""), str(COMPAT_DIR)
    )
    if path is None:
        return
    # Logging is not set up yet: the job's log is the container's standard output.
    sys.stdout.write(
        f"NVIDIA driver {format_version(driver)} is older than the {DRIVER_FLOOR} that CUDA "
        f"{IMAGE_CUDA} needs: using the forward-compatibility libraries of "
        f"{format_version(compat)} in {COMPAT_DIR}\n"
    )
    sys.stdout.flush()
    os.environ["LD_LIBRARY_PATH"] = path
    os.execv(sys.executable, [sys.executable, *argv])


def read_driver_version() -> Version | None:
    try:
        return driver_from_proc(DRIVER_VERSION_FILE.read_text())
    except OSError:
        return None


def _names(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


@dataclass(frozen=True)
class CudaFacts:
    """What torch's CUDA runtime says, asked in a child process (see `probe_cuda`)."""

    available: bool
    capabilities: tuple[tuple[int, int], ...] = ()
    names: tuple[str, ...] = ()
    arch_list: tuple[str, ...] = ()
    error: str = ""


def cuda_problem(
    visible_gpus: int, driver: Version | None, cuda: CudaFacts | None, what: str
) -> str | None:
    """One line saying why `what` ("train", "serve") cannot use the visible GPUs, or None
    when it can (or when there are none: a CPU host)."""
    if visible_gpus == 0:
        return None
    needs = (
        f"this image's torch {IMAGE_TORCH} needs NVIDIA driver {DRIVER_FLOOR} or newer "
        f"(CUDA {IMAGE_CUDA}), or {COMPAT_DRIVER_FLOOR} or newer with the CUDA forward-"
        f"compatibility libraries in {COMPAT_DIR}"
    )
    fix = (
        f"deploy endpoints with InferenceAmiVersion {ENDPOINT_AMI} (run_job.py deploy does), "
        f"batch transform with TransformAmiVersion {TRANSFORM_AMI} and an image that carries "
        "the compatibility libraries, or use a CPU instance type"
    )
    if cuda is None or not cuda.available:
        reason = f" ({cuda.error})" if cuda is not None and cuda.error else ""
        return (
            f"{what}: {visible_gpus} GPU(s) visible but CUDA is unusable{reason}: NVIDIA driver "
            f"{format_version(driver)} found; {needs}: {fix}"
        )
    for name, capability in zip(cuda.names, cuda.capabilities, strict=True):
        if not has_kernels(capability, cuda.arch_list):
            return (
                f"{what}: the {name} (sm_{capability[0]}{capability[1]}) is too old for this "
                f"image's torch {IMAGE_TORCH}, whose kernels start at "
                f"sm_{MIN_CAPABILITY[0]}{MIN_CAPABILITY[1]}: use ml.g4dn, ml.g5, ml.g6, ml.p4d "
                "or ml.p5 (not ml.p3)"
            )
    return None


def has_kernels(capability: tuple[int, int], arch_list: tuple[str, ...]) -> bool:
    """Whether torch's kernels run on a GPU of `capability`: a binary for its major version
    at or below its own, or PTX at or below it (compiled by the driver)."""
    major, minor = capability
    for arch in arch_list:
        found = re.fullmatch(r"(sm|compute)_(\d+)(\d)[af]?", arch)
        if not found:
            continue
        kind, arch_major, arch_minor = found.group(1), int(found.group(2)), int(found.group(3))
        if kind == "sm" and arch_major == major and arch_minor <= minor:
            return True
        if kind == "compute" and (arch_major, arch_minor) <= capability:
            return True
    return False


def training_precision(requested: str, capability: tuple[int, int] | None) -> str:
    """`precision=auto`: bf16 from Ampere on, fp16 with a gradient scaler before, fp32 on a
    CPU (capability None). A forced precision is kept on a GPU; a CPU always trains fp32."""
    if capability is None:
        return "fp32"
    if requested != "auto":
        return requested
    return "bf16" if capability >= BF16_CAPABILITY else "fp16"


def serving_half_dtype(capability: tuple[int, int]) -> str:
    """The reduced precision `serve` measures against fp32 on this GPU."""
    return "bfloat16" if capability >= BF16_CAPABILITY else "float16"


def workers_for_host(requested: int, gpus: int) -> int:
    """Training workers on one host: `workers_per_host`, or one per GPU (1 on a CPU). More
    workers than GPUs would ask for a device that is not there."""
    if requested and gpus and requested > gpus:
        raise ValueError(
            f"workers_per_host={requested} but this instance has {gpus} GPU(s): set it to at "
            f"most {gpus}, or 0 for one worker per GPU"
        )
    return requested or max(gpus, 1)


def out_of_memory_message(stage: str, batch_size: int, cache_on_gpu: bool) -> str:
    """One line for a GPU out-of-memory error: which setting to lower first."""
    lower = f"lower batch_size (now {batch_size}; validation uses 4x)"
    if cache_on_gpu:
        lower += ", or keep the photo cache in host memory with cache_device=cpu"
    return f"GPU out of memory during {stage}: {lower}"


# CUDA errors after which the context is lost: every later call in the process fails too.
STICKY_CUDA_ERRORS = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "misaligned address",
    "illegal instruction",
    "hardware stack error",
    "uncorrectable ecc error",
    "launch timed out",
)


def is_sticky_cuda_error(error: BaseException) -> bool:
    """Whether `error` leaves the process's CUDA context unusable (only a new process helps)."""
    text = str(error).lower()
    return "cuda" in text and any(marker in text for marker in STICKY_CUDA_ERRORS)


def unsupported_instance(instance_type: str) -> str | None:
    """Why the image cannot run on `instance_type`, or None."""
    family = instance_type.rsplit(".", 1)[0]
    gpu = UNSUPPORTED_FAMILIES.get(family)
    if gpu is None:
        return None
    return (
        f"{instance_type} has an NVIDIA {gpu}, for which this image's torch {IMAGE_TORCH} has no "
        f"kernels (they start at sm_{MIN_CAPABILITY[0]}{MIN_CAPABILITY[1]}): use ml.g4dn, "
        "ml.g5, ml.g6, ml.p4d or ml.p5"
    )


def is_gpu_instance(instance_type: str) -> bool:
    return GPU_FAMILY.match(instance_type) is not None


def endpoint_ami(instance_type: str) -> str | None:
    """InferenceAmiVersion for a real-time or asynchronous endpoint: driver 580 on a GPU."""
    return ENDPOINT_AMI if is_gpu_instance(instance_type) else None


def transform_ami(instance_type: str) -> str | None:
    """TransformAmiVersion for batch transform: the newest driver it offers (535) on a GPU."""
    return TRANSFORM_AMI if is_gpu_instance(instance_type) else None


def visible_gpus() -> int:
    return count_gpu_devices(_names(DEVICE_DIR), os.environ.get("CUDA_VISIBLE_DEVICES"))


def probe_cuda(timeout_s: float = 120.0) -> CudaFacts:
    """Ask torch about CUDA in a child process: the gunicorn master must not initialise CUDA
    before it forks its workers, and a broken driver must not take the caller down."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "species_classifier.gpu"],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        facts = json.loads(done.stdout.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError) as error:
        return CudaFacts(available=False, error=f"the CUDA probe failed: {type(error).__name__}")
    return CudaFacts(
        available=facts["available"],
        capabilities=tuple(tuple(c) for c in facts["capabilities"]),
        names=tuple(facts["names"]),
        arch_list=tuple(facts["arch_list"]),
        error=facts["error"],
    )


def check_host(what: str) -> None:
    """Raise GpuUnusableError when GPUs are visible here and this image cannot use them."""
    gpus = visible_gpus()
    if gpus == 0:
        return
    problem = cuda_problem(gpus, read_driver_version(), probe_cuda(), what)
    if problem is not None:
        raise GpuUnusableError(problem)


def _probe_here() -> dict:
    import warnings

    import torch

    facts = {"available": False, "capabilities": [], "names": [], "arch_list": [], "error": ""}
    try:
        # An old driver is a warning from is_available(), not an error: keep its text.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            facts["available"] = torch.cuda.is_available()
        if caught and not facts["available"]:
            facts["error"] = str(caught[0].message).splitlines()[0][:200]
        count = torch.cuda.device_count() if facts["available"] else 0
        facts["capabilities"] = [torch.cuda.get_device_capability(i) for i in range(count)]
        facts["names"] = [torch.cuda.get_device_name(i) for i in range(count)]
        facts["arch_list"] = torch.cuda.get_arch_list() if count else []
    except Exception as error:  # noqa: BLE001 - the probe reports whatever CUDA says
        facts["available"] = False
        facts["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    return facts


if __name__ == "__main__":
    sys.stdout.write(json.dumps(_probe_here()) + "\n")

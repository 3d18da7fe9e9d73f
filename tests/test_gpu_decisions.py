"""Every GPU decision of gpu.py, for the GPUs SageMaker gives, with the facts as arguments:
no GPU is needed to run these, and each would fail if its decision changed."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from local_servers import free_port
from species_classifier import gpu

REPO = Path(__file__).resolve().parents[1]

# The GPUs of the instance types the README lists, as torch names their compute capability.
T4, V100, A10G, L4, A100, H100 = (7, 5), (7, 0), (8, 6), (8, 9), (8, 0), (9, 0)
# The pinned torch's kernels: torch._C._cuda_getArchFlags() of 2.14.1+cu130.
CU130_ARCHS = ("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120")


def facts(name: str, capability: tuple[int, int]) -> gpu.CudaFacts:
    return gpu.CudaFacts(
        available=True, capabilities=(capability,), names=(name,), arch_list=CU130_ARCHS
    )


def test_the_pinned_torch_is_the_one_the_decisions_are_made_for():
    pins = (REPO / "requirements-torch.txt").read_text()
    assert f"torch=={gpu.IMAGE_TORCH.split('+')[0]}\n" in pins
    assert torch.version.cuda == gpu.IMAGE_CUDA
    assert tuple(torch._C._cuda_getArchFlags().split()) == CU130_ARCHS


@pytest.mark.parametrize(
    ("capability", "expected"),
    [(T4, "fp16"), (V100, "fp16"), (A10G, "bf16"), (L4, "bf16"), (A100, "bf16"), (H100, "bf16")],
)
def test_auto_precision_follows_the_generation_not_emulated_bf16(capability, expected):
    assert gpu.training_precision("auto", capability) == expected


def test_a_forced_precision_is_kept_on_a_gpu_and_a_cpu_trains_fp32():
    assert gpu.training_precision("bf16", T4) == "bf16"
    assert gpu.training_precision("fp16", H100) == "fp16"
    assert gpu.training_precision("bf16", None) == "fp32"


@pytest.mark.parametrize(
    ("capability", "expected"),
    [(T4, "float16"), (A10G, "bfloat16"), (L4, "bfloat16"), (A100, "bfloat16"), (H100, "bfloat16")],
)
def test_serving_tries_fp16_on_a_t4_and_bf16_from_ampere_on(capability, expected):
    assert gpu.serving_half_dtype(capability) == expected


@pytest.mark.parametrize("capability", [T4, A10G, L4, A100, H100])
def test_the_image_has_kernels_for_every_supported_gpu(capability):
    assert gpu.has_kernels(capability, CU130_ARCHS)


def test_a_v100_has_no_kernels_and_stops_start_up_in_one_line():
    assert not gpu.has_kernels(V100, CU130_ARCHS)
    problem = gpu.cuda_problem(1, "580.65.06", facts("Tesla V100-SXM2-16GB", V100), "train")
    assert problem.startswith("train: the Tesla V100-SXM2-16GB (sm_70) is too old")
    assert "not ml.p3" in problem and "\n" not in problem


def test_ptx_runs_on_newer_gpus_only():
    assert gpu.has_kernels(H100, ("sm_80", "compute_80"))
    assert not gpu.has_kernels(T4, ("sm_80", "compute_80"))


@pytest.mark.parametrize(
    ("name", "capability"),
    [("Tesla T4", T4), ("NVIDIA A10G", A10G), ("NVIDIA L4", L4), ("A100", A100), ("H100", H100)],
)
def test_a_usable_gpu_with_a_new_driver_starts(name, capability):
    assert gpu.cuda_problem(1, "580.65.06", facts(name, capability), "serve") is None


def test_no_gpu_is_a_cpu_host_not_a_problem():
    assert gpu.cuda_problem(0, None, None, "serve") is None


@pytest.mark.parametrize(
    ("driver", "ami"),
    [("470.57.02", "al2023-ami-sagemaker-inference-gpu-4-1"), ("535.54.03", "TransformAmiVersion")],
)
def test_visible_gpus_with_unusable_cuda_stop_in_one_line_naming_driver_need_and_ami(driver, ami):
    broken = gpu.CudaFacts(available=False, error="The NVIDIA driver on your system is too old")
    problem = gpu.cuda_problem(4, driver, broken, "serve")
    assert problem.startswith("serve: 4 GPU(s) visible but CUDA is unusable (The NVIDIA driver")
    assert f"NVIDIA driver {gpu.format_version(driver)} found" in problem
    assert "needs NVIDIA driver 580 or newer (CUDA 13.0)" in problem
    assert ami in problem and "\n" not in problem


def test_the_driver_is_read_from_procfs():
    line = (
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.54.03  Tue Jun  6 22:20:39 UTC 2023\n"
        "GCC version:  gcc version 10.2.1\n"
    )
    assert gpu.driver_from_proc(line) == "535.54.03"
    open_line = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build"
    assert gpu.driver_from_proc(open_line) == "580.65.06"
    assert gpu.driver_from_proc("") is None


def test_visible_gpus_are_the_numbered_device_nodes():
    names = ["nvidia0", "nvidia3", "nvidiactl", "nvidia-uvm", "nvidia-uvm-tools", "null"]
    assert gpu.count_gpu_devices(names) == 2


@pytest.mark.parametrize(("setting", "expected"), [("", 0), ("-1", 0), ("1", 1), ("0,1,2", 2)])
def test_cuda_visible_devices_hides_gpus_on_purpose(setting, expected):
    """A CPU run on a GPU machine (CUDA_VISIBLE_DEVICES="") has no GPU to complain about."""
    assert gpu.count_gpu_devices(["nvidia0", "nvidia1"], setting) == expected


@pytest.mark.parametrize(
    ("driver", "enabled"),
    [
        ("470.57.02", False),  # below what CUDA 13's compatibility libraries support
        ("535.54.03", True),
        ("550.144.03", True),
        ("580.65.06", False),  # new enough: the driver's own libcuda
        (None, False),  # no driver: a CPU host
    ],
)
def test_compat_libraries_only_for_an_older_driver_they_support(driver, enabled):
    compat = gpu.compat_driver(["libcuda.so", "libcuda.so.1", "libcuda.so.580.65.06"])
    assert compat == "580.65.06"
    path = gpu.compat_library_path(driver, compat, "/opt/lib:/usr/local/cuda/compat", "/compat")
    assert path == ("/compat:/opt/lib:/usr/local/cuda/compat" if enabled else None)
    assert gpu.compat_library_path(driver, None, "", "/compat") is None


def test_the_entry_point_restarts_itself_with_the_compat_path_only_when_needed(tmp_path):
    """The loader reads LD_LIBRARY_PATH at process start: a real re-exec, seen from outside."""
    proc = tmp_path / "version"
    compat = tmp_path / "compat"
    compat.mkdir()
    (compat / "libcuda.so.580.65.06").touch()
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from species_classifier import gpu\n"
        f"gpu.DRIVER_VERSION_FILE = Path({str(proc)!r})\n"
        f"gpu.COMPAT_DIR = Path({str(compat)!r})\n"
        "gpu.enable_cuda_compat(sys.argv)\n"
        "print('LD_LIBRARY_PATH=' + os.environ.get('LD_LIBRARY_PATH', ''))\n"
    )
    runner = tmp_path / "entry.py"
    runner.write_text(script)
    env = {**os.environ, "LD_LIBRARY_PATH": "/opt/lib"}
    env.pop(gpu.COMPAT_DECIDED_ENV, None)

    def run(driver: str) -> str:
        proc.write_text(f"NVRM version: NVIDIA UNIX x86_64 Kernel Module  {driver}  Build\n")
        done = subprocess.run(
            [sys.executable, str(runner)], env=env, capture_output=True, text=True, check=True
        )
        return done.stdout

    old = run("535.54.03")
    assert "using the forward-compatibility libraries of 580.65.06" in old
    assert old.strip().endswith(f"LD_LIBRARY_PATH={compat}:/opt/lib")
    assert run("580.65.06").strip() == "LD_LIBRARY_PATH=/opt/lib"


def test_more_workers_than_gpus_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^workers_per_host=4 but this instance has 1 GPU"):
        gpu.workers_for_host(4, 1)
    assert gpu.workers_for_host(0, 8) == 8
    assert gpu.workers_for_host(2, 8) == 2
    assert gpu.workers_for_host(3, 0) == 3  # a CPU host runs as many as asked
    assert gpu.workers_for_host(0, 0) == 1


def test_out_of_memory_names_the_setting_to_lower():
    on_gpu = gpu.out_of_memory_message("training", 256, cache_on_gpu=True)
    assert on_gpu == (
        "GPU out of memory during training: lower batch_size (now 256; validation uses 4x), "
        "or keep the photo cache in host memory with cache_device=cpu"
    )
    assert "cache_device" not in gpu.out_of_memory_message("training", 64, cache_on_gpu=False)


@pytest.mark.parametrize(
    ("message", "sticky"),
    [
        ("CUDA error: an illegal memory access was encountered", True),
        ("CUDA error: device-side assert triggered", True),
        ("CUDA error: unspecified launch failure", True),
        ("CUDA out of memory. Tried to allocate 2.00 GiB", False),
        ("illegal memory access", False),  # not from CUDA
    ],
)
def test_sticky_cuda_errors_are_told_from_passing_ones(message, sticky):
    assert gpu.is_sticky_cuda_error(RuntimeError(message)) is sticky


@pytest.mark.parametrize(
    ("instance_type", "endpoint", "transform"),
    [
        ("ml.g4dn.xlarge", gpu.ENDPOINT_AMI, gpu.TRANSFORM_AMI),
        ("ml.g5.2xlarge", gpu.ENDPOINT_AMI, gpu.TRANSFORM_AMI),
        ("ml.g6.xlarge", gpu.ENDPOINT_AMI, gpu.TRANSFORM_AMI),
        ("ml.p4d.24xlarge", gpu.ENDPOINT_AMI, gpu.TRANSFORM_AMI),
        ("ml.p5.48xlarge", gpu.ENDPOINT_AMI, gpu.TRANSFORM_AMI),
        ("ml.m5.xlarge", None, None),
        ("ml.c7i.2xlarge", None, None),
    ],
)
def test_the_launcher_asks_gpu_instances_for_a_driver_that_runs_the_image(
    instance_type, endpoint, transform
):
    assert gpu.endpoint_ami(instance_type) == endpoint
    assert gpu.transform_ami(instance_type) == transform


@pytest.mark.parametrize("instance_type", ["ml.p3.2xlarge", "ml.p3.16xlarge", "ml.p3dn.24xlarge"])
def test_v100_instances_are_refused(instance_type):
    reason = gpu.unsupported_instance(instance_type)
    assert reason.startswith(f"{instance_type} has an NVIDIA V100 (sm_70)")


@pytest.mark.parametrize("instance_type", ["ml.g4dn.xlarge", "ml.g5.xlarge", "ml.m5.large"])
def test_other_instances_are_not_refused(instance_type):
    assert gpu.unsupported_instance(instance_type) is None


def test_the_cuda_probe_answers_on_a_cpu_host_without_initialising_cuda_here():
    probed = gpu.probe_cuda()
    assert probed.available is torch.cuda.is_available()
    assert probed.capabilities == ()


def test_gloo_waits_have_the_jobs_deadline_not_gloos_30_minutes(tmp_path):
    """One worker joins a real gloo group as the launcher starts it; its object group must
    outlast a fold (gloo's own default is 30 minutes)."""
    script = (
        "import os\n"
        "from species_classifier import distributed\n"
        "import torch\n"
        "workers = distributed.join_process_group()\n"
        "backend = workers.object_group._get_backend(torch.device('cpu'))\n"
        "print(backend.options._timeout.total_seconds())\n"
    )
    env = {
        **os.environ,
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    seconds = float(done.stdout.strip().splitlines()[-1])
    assert seconds == datetime.timedelta(days=28).total_seconds()

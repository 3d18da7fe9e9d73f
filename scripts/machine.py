"""What a benchmark ran on, in one line: CPU, cores, GPU, torch, Python and the load."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def describe() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    return (
        f"CPU: {cpu}, {cores} cores; GPU: {gpu}; torch {torch.__version__}; "
        f"Python {platform.python_version()}; load average at the end: {load}"
    )

"""What a benchmark ran on, in one line (CPU, cores, GPU, torch, Python and the load), and
its table published: printed, and written as a markdown page where asked."""

from __future__ import annotations

import os
import platform
import time
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


def publish(
    lines: list[str], output: Path | None, title: str, script: str, echo: bool = True
) -> None:
    """Print the table (unless `echo` is False: a page written row by row, as measured) and,
    where `output` is given, write it there as a page: the title, when and by which script
    (a path) it was measured, the table."""
    table = "\n".join(lines)
    if echo:
        print(table)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        output.write_text(
            f"# {title}\n\nMeasured {when} with `scripts/{Path(script).name}`.\n\n{table}\n"
        )

#!/usr/bin/env python3
"""`make gpu-check`: every GPU claim of this project proven in one prepared run.

On a machine with an NVIDIA GPU, a CUDA build of torch and no package index, it installs
the packages that machine lacks from a wheel folder prepared here (`make gpu-wheels`), then
runs, each stage under its own time limit so the whole fits in 8 minutes:
  gpu-tests   pytest -m gpu tests/test_gpu.py (real `train` and `serve` on CUDA)
  multi-gpu   the multi-worker job on NCCL, where the machine has two GPUs or more
  training    scripts/bench_training.py at 240 px: ceiling and our loop, eager and compiled
  job         a 3-fold `train` job sized to fit, projected to 20,000 photos x 20 epochs
  serving     scripts/bench_serving.py, naive handler and ours, at concurrency 1, 8 and 64
It writes its logs and Markdown tables under one folder ($OUT when set) and prints a
summary table last. `--dry-run` runs the same path on a CPU with tiny sizes, in minutes.

    python3 scripts/gpu_check.py [--dry-run] [--out DIR] [--only gpu-tests,training]
    python3 scripts/gpu_check.py --prepare-wheels .whl      # here, with the project's venv
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
WHEELS = REPO / ".whl"
BUDGET_S = 8 * 60

# The GPU machine this check is for: Linux on x86-64, Python 3.12, a CUDA build of torch
# and torchvision with numpy, Pillow, scikit-learn, matplotlib, requests and pytest, and no
# package index. What our code imports (train, serve, tests) beyond that travels as wheels:
# Flask and what it needs beyond click, jinja2 and markupsafe; gunicorn; the SageMaker
# training toolkit and the boto3 that its `environment` module imports. Werkzeug travels
# too, at our pin, whatever version the machine has.
GPU_MACHINE_LACKS = (
    "flask",
    "werkzeug",
    "blinker",
    "itsdangerous",
    "gunicorn",
    "sagemaker-training",
    "boto3",
    "botocore",
    "jmespath",
    "s3transfer",
)
# What the carried packages import and the GPU machine's image already holds.
GPU_MACHINE_HAS = ("click", "jinja2", "markupsafe", "packaging", "dateutil", "six", "urllib3")
# Published as source only; its one C extension serves the toolkit's own MPI launcher, which
# we never use, so its pure Python package is unpacked instead of compiled there.
SOURCE_ONLY = ("sagemaker-training",)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


@dataclass(frozen=True)
class Sizes:
    """GPU sizes, or tiny CPU ones for the dry run: the benchmark scripts' arguments."""

    training: str
    job: str
    stores: str
    serving: str
    concurrency: tuple[int, ...]


GPU_SIZES = Sizes(
    training="--img-size 240 --batch-size 256 --photos 4096 --epochs 3 --seed-photos 1024",
    job="--img-size 240 --batch-size 256 --job-photos 6000 --job-folds 3 --job-epochs 3",
    stores="--epochs-only --epoch-photos 1024 --unique 300 --img-size 240 --batch-size 256",
    serving="--requests 200 --members 3 --img-size 240 --photo-size 500 --engines auto",
    concurrency=(1, 8, 64),
)
DRY_SIZES = Sizes(
    training="--img-size 32 --batch-size 4 --photos 8 --epochs 1 --steps 1 --seed-photos 8 "
    "--compile-backend eager",
    job="--img-size 32 --batch-size 8 --job-photos 35 --job-folds 2 --job-epochs 1",
    stores="--epochs-only --epoch-photos 16 --unique 8 --img-size 32 --batch-size 8",
    serving="--requests 4 --members 1 --img-size 32 --photo-size 100 --engines auto",
    concurrency=(1, 2),
)
# Seconds per stage on the GPU: together they keep the run within BUDGET_S. The dry run
# gets more, for a loaded CPU.
GPU_LIMITS = {
    "gpu-tests": 170,
    "multi-gpu": 60,
    "training": 130,
    "job": 60,
    "stores": 40,
    "serving": 80,
}
DRY_LIMIT_S = 900


@dataclass
class Stage:
    name: str
    status: str = "not run"
    seconds: float = 0.0
    headline: str = ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--out", type=Path, help="where logs and tables go (default: $OUT)")
    parser.add_argument("--wheels", type=Path, default=WHEELS, help="the wheel folder")
    parser.add_argument("--only", help="comma-separated stages to run (default: all)")
    parser.add_argument("--prepare-wheels", type=Path, metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.prepare_wheels:
        prepare_wheels(args.prepare_wheels)
        return 0
    out = args.out or Path(os.environ.get("OUT") or REPO / "local" / "gpu-check")
    out.mkdir(parents=True, exist_ok=True)
    return Check(out, args.wheels, args.dry_run, args.only).run()


def prepare_wheels(folder: Path) -> None:
    """Download, for CPython 3.12 on x86-64 Linux, the pinned versions (as installed in this
    environment) of what the GPU machine lacks: wheels, or the source of SOURCE_ONLY."""
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.iterdir():
        stale.unlink()
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in GPU_MACHINE_LACKS]
    binary = [pin for pin in pins if pin.split("==")[0] not in SOURCE_ONLY]
    source = [pin for pin in pins if pin.split("==")[0] in SOURCE_ONLY]
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(folder)]
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    target = ["--python-version", "3.12", "--implementation", "cp", *platforms]
    subprocess.run([*pip, "--only-binary=:all:", *target, *binary], check=True)
    subprocess.run([*pip, "--no-binary=:all:", *source], check=True)
    files = sorted(p.name for p in folder.iterdir())
    size = sum(p.stat().st_size for p in folder.iterdir()) / 1e6
    print(f"{len(files)} files, {size:.1f} MB in {folder}: {', '.join(files)}")


def install_wheels(folder: Path, site: Path) -> str:
    """Install the wheel folder into `site` with no index; unpack the source-only packages."""
    wheels = sorted(folder.glob("*.whl"))
    sources = sorted(folder.glob("*.tar.gz"))
    if not wheels and not sources:
        return f"no wheel folder at {folder}: this machine's own packages are used"
    site.mkdir(parents=True, exist_ok=True)
    if wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps"]
            + ["--no-compile", "--disable-pip-version-check", "--target", str(site)]
            + [str(w) for w in wheels],
            check=True,
        )
    for source in sources:
        unpack_source(source, site)
    return f"{len(wheels)} wheels and {len(sources)} source package(s) from {folder} in {site}"


def unpack_source(archive: Path, site: Path) -> None:
    """The pure Python packages under an sdist's src/ folder, as an install would lay them."""
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            parts = Path(member.name).parts
            if len(parts) > 3 and parts[1] == "src" and member.isfile() and parts[-1][-3:] == ".py":
                member.name = str(Path(*parts[2:]))
                tar.extract(member, site, filter="data")


class Check:
    def __init__(self, out: Path, wheels: Path, dry_run: bool, only: str | None) -> None:
        self.out = out
        self.wheels = wheels
        self.dry_run = dry_run
        self.sizes = DRY_SIZES if dry_run else GPU_SIZES
        self.only = set(only.split(",")) if only else None
        self.log_path = out / "check.log"
        self.stages: list[Stage] = []
        self.setup_text = "setting up"
        self.env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.started = time.monotonic()

    def run(self) -> int:
        self.log_path.write_text("")
        scratch = Path(tempfile.mkdtemp(prefix="gpu-check-"))
        try:
            setup = self.setup(scratch / "site")
            gpus = self.gpu_count()
            self.stage("gpu-tests", self.pytest_command("not nccl"))
            if gpus >= 2:
                self.stage("multi-gpu", self.pytest_command("nccl"))
            else:
                self.skip("multi-gpu", f"this machine has {gpus} GPU(s): NCCL needs two or more")
            self.stage(
                "training", self.bench("training.md", "--skip-job", *self.sizes.training.split())
            )
            self.stage("job", self.bench("job.md", "--skip-loops", *self.sizes.job.split()))
            self.stage("stores", self.stores_command())
            self.serving()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        summary = self.summary(setup)
        self.save_summary()
        print(summary, flush=True)
        return 0 if all(s.status in ("passed", "skipped") for s in self.stages) else 1

    # --- setting up ---

    def setup(self, site: Path) -> str:
        wheels = install_wheels(self.wheels, site)
        paths = [site, REPO / "container" / "code", REPO / "tools", SCRIPTS]
        self.env["PYTHONPATH"] = os.pathsep.join(
            [*(str(p) for p in paths), self.env.get("PYTHONPATH", "")]
        ).rstrip(os.pathsep)
        self.env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{self.env['PATH']}"
        if self.dry_run:
            self.env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, even on a machine with a GPU
        probe = self.python(
            "import torch, platform; print(f'torch {torch.__version__}, CUDA "
            "{torch.version.cuda}, Python {platform.python_version()}, '"
            "f'{torch.cuda.device_count()} GPU(s): '"
            "+ ', '.join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())))"
        )
        smi = shutil.which("nvidia-smi")
        driver = self.capture([smi, "-L"]) if smi and not self.dry_run else "no nvidia-smi run"
        mode = (
            "DRY RUN on the CPU (tiny sizes; no figure is a GPU figure)" if self.dry_run else "GPU"
        )
        text = f"mode: {mode}\n{probe}\n{driver}\nwheels: {wheels}"
        self.setup_text = text
        self.append_log("setup", text)
        print(text, flush=True)
        return text

    def gpu_count(self) -> int:
        return int(self.python("import torch; print(torch.cuda.device_count())").split()[-1])

    def python(self, code: str) -> str:
        return self.capture([sys.executable, "-c", code])

    def capture(self, command: list[str]) -> str:
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, cwd=REPO)
        if result.returncode:
            raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout}{result.stderr}")
        return result.stdout.strip()

    # --- stages ---

    def pytest_command(self, selection: str) -> list[str]:
        return [
            sys.executable, "-m", "pytest", "-m", "gpu", "-k", selection, "-v", "-rs",
            "-p", "no:cacheprovider", "tests/test_gpu.py",
        ]  # fmt: skip

    def bench(self, table: str, *arguments: str) -> list[str]:
        script = SCRIPTS / "bench_training.py"
        return [sys.executable, str(script), "--output", str(self.out / table), *arguments]

    def stores_command(self) -> list[str]:
        """bench_stores.py's epoch comparison: the uint8 store in GPU memory against JPEG slots
        decoded by nvJPEG per batch (#22 asks for at least 90%)."""
        script = SCRIPTS / "bench_stores.py"
        return [sys.executable, str(script), "--output", str(self.out / "stores.md"),
                *self.sizes.stores.split()]  # fmt: skip

    def serving(self) -> None:
        """bench_serving.py once per concurrency; its tables joined into serving.md."""
        if not self.wanted("serving"):
            return
        tables = []
        started = time.monotonic()
        stage = Stage("serving")
        self.stages.append(stage)
        for concurrency in self.sizes.concurrency:
            part = self.out / f"serving-{concurrency}.md"
            command = [
                sys.executable, str(SCRIPTS / "bench_serving.py"), *self.sizes.serving.split(),
                "--concurrency", str(concurrency), "--output", str(part),
            ]  # fmt: skip
            limit = self.limit("serving") - (time.monotonic() - started)
            status = self.execute(f"serving, concurrency {concurrency}", command, limit)
            if part.is_file():
                tables.append(f"## Concurrency {concurrency}\n\n{part.read_text()}")
                part.unlink()
            if status != "passed":
                stage.status = status
                break
        else:
            stage.status = "passed"
        stage.seconds = time.monotonic() - started
        (self.out / "serving.md").write_text("# Serving\n\n" + "\n".join(tables))
        stage.headline = serving_headline(tables)
        self.save_summary()

    def stage(self, name: str, command: list[str]) -> None:
        if not self.wanted(name):
            return
        started = time.monotonic()
        offset = self.log_path.stat().st_size
        status = self.execute(name, command, self.limit(name))
        with self.log_path.open("rb") as log:
            log.seek(offset)
            output = log.read().decode(errors="replace")
        self.stages.append(
            Stage(name, status, time.monotonic() - started, headline(name, output, status))
        )
        self.save_summary()

    def skip(self, name: str, reason: str) -> None:
        if self.wanted(name):
            self.stages.append(Stage(name, "skipped", 0.0, reason))
            self.save_summary()

    def save_summary(self) -> None:
        """summary.md as it stands, after every stage: a check stopped from outside (the
        device tool's time limit) still leaves the rows it finished."""
        (self.out / "summary.md").write_text(self.summary(self.setup_text) + "\n")

    def wanted(self, name: str) -> bool:
        return self.only is None or name in self.only

    def limit(self, name: str) -> float:
        return DRY_LIMIT_S if self.dry_run else GPU_LIMITS[name]

    def execute(self, name: str, command: list[str], limit: float) -> str:
        """Run one stage's command, its output into check.log; 'passed', 'failed' or 'timed out'."""
        print(f"--- {name} (limit {limit:.0f} s) ---", flush=True)
        with self.log_path.open("a") as log:
            log.write(f"\n===== {name}: {' '.join(command)}\n")
            log.flush()
            process = subprocess.Popen(
                command, env=self.env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            try:
                code = process.wait(timeout=max(limit, 1))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait()
                log.write(f"\n===== {name}: killed after {limit:.0f} s\n")
                return "timed out"
            log.write(f"\n===== {name}: exit code {code}\n")
        return "passed" if code == 0 else "failed"

    def append_log(self, name: str, text: str) -> None:
        with self.log_path.open("a") as log:
            log.write(f"===== {name}\n{text}\n")

    # --- the summary ---

    def summary(self, setup: str) -> str:
        total = time.monotonic() - self.started
        rows = [
            "# GPU check" + (" (dry run on the CPU: no GPU figures)" if self.dry_run else ""),
            "",
            *(f"    {line}" for line in setup.splitlines()),
            "",
            "| stage | result | seconds | what it showed |",
            "|---|---|---|---|",
            *(f"| {s.name} | {s.status} | {s.seconds:.0f} | {s.headline} |" for s in self.stages),
            f"| total | | {total:.0f} | budget {BUDGET_S} s on a GPU |",
            "",
            f"Logs: {self.log_path}; tables: "
            + ", ".join(str(p) for p in sorted(self.out.glob("*.md")) if p.name != "summary.md"),
        ]
        return "\n".join(rows)


def headline(name: str, output: str, status: str) -> str:
    """One line per stage for the summary, taken from what the stage printed."""
    if name in ("gpu-tests", "multi-gpu"):
        found = re.findall(r"=+ (.*(?:passed|failed|skipped|deselected|error).*?) =+", output)
        reasons = re.findall(r"SKIPPED \[\d+\] [^:]+:\d+: (.*)", output)
        return "; ".join([*found[-1:], *sorted(set(reasons))]) or status
    if name == "training":
        rows = re.findall(r"\| ([^|]+) \| ([^|]+) \| ([\d,.]+) \| (\d+%) \| ([\d.]+x) \|", output)
        return "; ".join(f"{w.strip()} {m.strip()}: {r} img/s ({c})" for w, m, r, c, _ in rows)
    if name == "stores":
        rows = dict(re.findall(r"^\| (uint8|jpeg) \| ([\d.]+) images/s \|", output, re.M))
        percent = re.search(r"^\| jpeg \|[^\n]*\| (\d+)% \|", output, re.M)
        if len(rows) == 2 and percent:
            return (
                f"jpeg epochs at {percent[1]}% of uint8 ({rows['jpeg']} vs {rows['uint8']} "
                "images/s)"
            )
        return status
    if name == "job":
        measured = re.search(r"\| measured \| (\d+) \| ([^|]+) \| (\d+) \|", output)
        projected = re.search(r"\| projected \| (\d+) \| ([^|]+) \| ([^|]+) \|", output)
        if measured and projected:
            return (
                f"{measured[1]} photos, {measured[2].strip()}: {measured[3]} s; projected "
                f"{projected[1]} photos, {projected[2].strip()}: {projected[3].strip()}"
            )
    return status


def serving_headline(tables: list[str]) -> str:
    """Ours at each concurrency, from bench_serving's row for it: | label | cold start |
    req/s | p50 | p95 | x naive's best |."""
    parts = []
    for table in tables:
        concurrency = re.search(r"## Concurrency (\d+)", table)
        ours = re.search(
            r"^\| ours[^|]*\| ([\d.]+) \| ([\d.]+) \| (\d+) \| (\d+) \| \**([\d.]+)?x?\**",
            table,
            re.M,
        )
        if concurrency and ours:
            cold, rps, p50, p95, ratio = ours.groups()
            parts.append(
                f"c={concurrency[1]}: ours {rps} req/s, p50 {p50} ms, p95 {p95} ms"
                + (f", {ratio}x naive's best" if ratio else "")
                + f", cold start {cold} s"
            )
    return "; ".join(parts)


if __name__ == "__main__":
    sys.exit(main())

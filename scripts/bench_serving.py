#!/usr/bin/env python3
"""Load benchmark: our `serve` with each CPU engine against the seed's way of serving.

One run makes a model bundle (efficientnet_b1, random weights, 3 members by default) with its
checked model.onnx, as training writes it, and ~500 px JPEG photos, then, in turn, starts
  * naive: the seed's handler, one request at a time in a single-threaded http.server:
    PIL decode, torchvision Resize + ToTensor + Normalize, the members one after another
    in fp32 at batch 1, run twice: under torch's default OpenMP wait policy and under
    OMP_WAIT_POLICY=PASSIVE. Which one is faster depends on the machine and its load
    (PASSIVE halves it on a quiet machine, spinning collapses it on a busy one), so the
    ratio is taken against the naive server's better figure at each concurrency;
  * ours: the real container/serve once per engine (SPECIES_SERVE_ENGINE: eager, graph,
    onnx, and auto, the start-up measurement that picks the fastest), with its own defaults
    otherwise (it sets OMP_WAIT_POLICY=PASSIVE),
and times each server's cold start (from starting it to its first /ping 200), then sends each
the same requests from 1 and from 8 concurrent connections. It prints a markdown table
(cold start, requests/s, p50 latency and the ratio to the naive server's best at each
concurrency) with the machine it ran on and `uptime` at the start and the end, and can
write it to a file. It runs unchanged on a GPU machine (ours with `auto` alone there, unless
--engines names others: every engine but eager means CUDA graphs on a GPU).

    .venv/bin/python scripts/bench_serving.py --requests 120 \
        --output docs/benchmarks/serving-cpu-run.md
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import numpy as np
import requests
import torch
from machine import describe
from species_classifier.bundle import load_members, read_description
from species_classifier.demo_data import make_demo_dataset, make_random_bundle
from species_classifier.onnx_export import export_onnx

REPO = Path(__file__).resolve().parents[1]
# The serving tests' helpers for local servers: one home for free ports and waiting for a 200.
sys.path.append(str(REPO / "tests"))
from local_servers import free_port, wait_for_200  # noqa: E402

SERVE = REPO / "container" / "serve"
NAIVE = {
    "naive-default": "naive (seed's handler), OpenMP's default wait policy",
    "naive-passive": "naive (seed's handler), OMP_WAIT_POLICY=PASSIVE",
}
ENGINES = ("eager", "graph", "onnx", "auto")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--requests", type=int, default=120, help="per server, per concurrency, per round"
    )
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 8], help="concurrent connections"
    )
    parser.add_argument(
        "--engines",
        nargs="+",
        choices=ENGINES,
        help="ours, one server each (default: all on a CPU; auto alone on a GPU, where every "
        "engine but eager means CUDA graphs)",
    )
    parser.add_argument("--img-size", type=int, default=240)
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--photo-size", type=int, default=500)
    parser.add_argument(
        "--rounds", type=int, default=1, help="alternate the servers this many times each"
    )
    parser.add_argument("--output", type=Path, help="also write the markdown here")
    parser.add_argument(
        "--naive-server", nargs=2, metavar=("PORT", "MODEL_DIR"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.naive_server:
        run_naive_server(int(args.naive_server[0]), Path(args.naive_server[1]))
        return

    if args.engines is None:
        args.engines = ["auto"] if torch.cuda.is_available() else list(ENGINES)
    servers = {**NAIVE, **{f"ours-{engine}": ours_label(engine) for engine in args.engines}}
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        base = Path(tmp)
        uptime_at_start = uptime()
        print(f"making a {args.members}-member bundle at {args.img_size} px and photos ...")
        make_random_bundle(base / "model", args.img_size, args.members)
        photos = make_photos(base / "photos", args.photo_size)
        if export_onnx(base / "model", sorted((base / "photos").glob("images/*/*.jpg"))) is None:
            sys.exit("the ONNX export failed (see the warning above): no onnx engine to measure")
        results: dict[str, list[dict]] = {name: [] for name in servers}
        engines: dict[str, str] = {}
        for round_number in range(1, args.rounds + 1):
            for name, label in servers.items():
                print(f"round {round_number}: {label} ...", flush=True)
                results[name].append(bench_server(name, base, photos, args))
                print(f"  {summary_line(results[name][-1])}", flush=True)
                if name.startswith("ours-"):
                    engines[name] = ours_engine(base / f"{name}.log")
                # Every row on disk as it is measured: a run killed at its time limit (the
                # GPU check's) keeps the servers it finished.
                write_table(report(servers, results, engines, args, uptime_at_start), args.output)
    lines = report(servers, results, engines, args, uptime_at_start)
    print("\n".join(lines))
    write_table(lines, args.output)


def write_table(lines: list[str], output: Path | None) -> None:
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text("\n".join(lines))


def ours_label(engine: str) -> str:
    if engine == "auto":
        return "ours, auto (the engine its start-up measurement picked)"
    return f"ours, SPECIES_SERVE_ENGINE={engine}"


# --- inputs ---


def make_photos(root: Path, photo_size: int) -> list[bytes]:
    make_demo_dataset(root, photos_per_species=8, photo_size=photo_size)
    return [path.read_bytes() for path in sorted(root.glob("images/*/*.jpg"))]


# --- servers ---


def start_server(name: str, base: Path, port: int, log_path: Path) -> subprocess.Popen:
    # The wait policy is the server's own: the naive one's per run, ours' from container/serve.
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    env.update(SAGEMAKER_BASE_DIR=str(base), SAGEMAKER_BIND_TO_PORT=str(port))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if name == "naive-passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    if name.startswith("ours-"):
        env["SPECIES_SERVE_ENGINE"] = name.removeprefix("ours-")
        command = [str(SERVE)]
    else:
        command = [sys.executable, __file__, "--naive-server", str(port), str(base / "model")]
    with log_path.open("w") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def bench_server(name: str, base: Path, photos: list[bytes], args) -> dict:
    """The server's cold start in seconds, and a load run at each concurrency."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = base / f"{name}.log"
    started = time.perf_counter()
    process = start_server(name, base, port, log_path)
    try:
        try:
            wait_for_200(f"{url}/ping", 600, process, log_path)
        except AssertionError as not_ready:
            sys.exit(f"{name}: {not_ready}")
        cold_start = time.perf_counter() - started
        runs = {}
        for concurrency in args.concurrency:
            # Warm-up: the first requests pay for allocations and kernel selection.
            load(url, photos, 2 * concurrency, concurrency)
            runs[concurrency] = load(url, photos, args.requests, concurrency)
        return {"cold_start": cold_start, "runs": runs}
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


def load(url: str, photos: list[bytes], total: int, concurrency: int) -> dict:
    """`total` POSTs of the photos in turn from `concurrency` threads, each with its own
    connection; returns the throughput and every latency."""
    latencies: list[float] = []
    failures: list[str] = []
    counter = iter(range(total))
    lock = threading.Lock()

    def client() -> None:
        session = requests.Session()
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            started = time.perf_counter()
            response = session.post(
                f"{url}/invocations",
                data=photos[index % len(photos)],
                headers={"Content-Type": "image/jpeg"},
                timeout=300,
            )
            elapsed = time.perf_counter() - started
            with lock:
                if response.status_code == 200 and "predicted_species" in response.json():
                    latencies.append(elapsed)
                else:
                    failures.append(f"{response.status_code} {response.text[:200]}")

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if failures:
        sys.exit(f"{len(failures)} requests failed, e.g. {failures[0]}")
    return {"requests": len(latencies), "seconds": wall, "latencies": latencies}


def run_naive_server(port: int, model_dir: Path) -> None:
    """The seed's handler: one request at a time, batch 1, fp32, members in turn, on the GPU
    when there is one (as ours), so the ratio compares serving, not devices."""
    from PIL import Image
    from torchvision import transforms

    description = read_description(model_dir)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    networks = [net.to(device) for net in load_members(model_dir, description)]
    preprocess = transforms.Compose(
        [
            transforms.Resize((description.img_size, description.img_size)),
            transforms.ToTensor(),
            transforms.Normalize(description.mean, description.std),
        ]
    )

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/ping" else 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            image = Image.open(io.BytesIO(body)).convert("RGB")
            batch = preprocess(image).unsqueeze(0).to(device)
            with torch.no_grad():
                probs = [torch.softmax(net(batch), dim=1)[0].cpu() for net in networks]
            mean = torch.stack(probs).mean(0)
            best = int(mean.argmax())
            answer = json.dumps(
                {
                    "predicted_species": description.classes[best],
                    "confidence": float(mean[best]),
                    "class_probabilities": dict(
                        zip(description.classes, mean.tolist(), strict=True)
                    ),
                    "individual_fold_predictions": [
                        description.classes[int(p.argmax())] for p in probs
                    ],
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args) -> None:
            pass

    class Server(HTTPServer):
        # http.server's default backlog of 5 drops the connections of 8 clients and the
        # TCP retries would dominate the latencies; the seed's server was not that bad.
        request_queue_size = 128

    server = Server(("127.0.0.1", port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever()


# --- report ---


def stats(runs: list[dict]) -> dict:
    latencies = np.array([value for run in runs for value in run["latencies"]]) * 1000
    count = sum(run["requests"] for run in runs)
    seconds = sum(run["seconds"] for run in runs)
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    return {"rps": count / seconds, "p50": p50, "p95": p95, "p99": p99, "count": count}


def summary_line(result: dict) -> str:
    parts = [f"cold start {result['cold_start']:.1f} s"]
    for concurrency, run in result["runs"].items():
        s = stats([run])
        parts.append(f"c={concurrency}: {s['rps']:.2f} req/s, p50 {s['p50']:.0f} ms")
    return "; ".join(parts)


def report(
    servers: dict[str, str],
    results: dict[str, list[dict]],
    engines: dict[str, str],
    args,
    uptime_at_start: str,
) -> list[str]:
    """The table: per server its cold start and, per concurrency, requests/s, p50 and p95
    latency and the ratio of its requests/s to the naive server's best at that concurrency."""
    figures = {
        name: {c: stats([r["runs"][c] for r in rounds]) for c in args.concurrency}
        for name, rounds in results.items()
        if rounds
    }
    measured_naive = [name for name in NAIVE if name in figures]
    best_naive = {
        c: max((figures[n][c]["rps"] for n in measured_naive), default=None)
        for c in args.concurrency
    }
    header = ["server", "cold start s"]
    for c in args.concurrency:
        header += [f"c={c} req/s", f"c={c} p50 ms", f"c={c} p95 ms", f"c={c} x naive's best"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, label in servers.items():
        if name not in figures:
            continue
        cold = np.mean([r["cold_start"] for r in results[name]])
        cells = [label, f"{cold:.1f}"]
        for c in args.concurrency:
            s = figures[name][c]
            ratio = (
                ""
                if name in NAIVE or best_naive[c] is None
                else f"**{s['rps'] / best_naive[c]:.2f}x**"
            )
            cells += [f"{s['rps']:.2f}", f"{s['p50']:.0f}", f"{s['p95']:.0f}", ratio]
        rows.append("| " + " | ".join(cells) + " |")
    settings = (
        f"efficientnet_b1, {args.members} members, {args.img_size} px, random weights; "
        f"{args.photo_size} px JPEG photos; {args.rounds} round(s) of {args.requests} "
        "requests per server and concurrency, after twice the concurrency in warm-up requests"
    )
    return [
        f"Machine: {describe()}",
        "",
        f"`uptime` at the start: {uptime_at_start}",
        "",
        f"`uptime` at the end: {uptime()}",
        "",
        f"Setup: {settings}",
        "",
        "What each of ours served with (its worker's start-up log line):",
        "",
        *[f"- {servers[name]}: {engine}" for name, engine in engines.items()],
        "",
        *rows,
        "",
    ]


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def ours_engine(log_path: Path) -> str:
    """What our worker chose at start-up: its "model loaded" log line, from the dtype on."""
    if not log_path.is_file():
        return "not measured yet"
    for line in log_path.read_text().splitlines():
        if "model loaded:" in line:
            return line.split("model loaded: ", 1)[1]
    return "unknown (no model loaded line in its log)"


if __name__ == "__main__":
    main()

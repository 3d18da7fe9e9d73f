#!/usr/bin/env python3
"""Load benchmark: our `serve` (gunicorn, batching) against the seed's way of serving.

One run makes a model bundle (efficientnet_b1, random weights, 3 members by default) and
~500 px JPEG photos, then, in turn, starts
  * ours: the real container/serve, with its own defaults (it sets OMP_WAIT_POLICY=PASSIVE
    and picks its engine by measuring at start-up), and
  * naive: the seed's handler, one request at a time in a single-threaded http.server:
    PIL decode, torchvision Resize + ToTensor + Normalize, the members one after another
    in fp32 at batch 1, run twice: under torch's default OpenMP wait policy and under
    OMP_WAIT_POLICY=PASSIVE. Which one is faster depends on the machine and its load
    (PASSIVE halves it on a quiet machine, spinning collapses it on a busy one), so the
    ratio is taken against the naive server's better figure: each server at its best,
and sends each the same requests from N concurrent connections. It prints a markdown
table (requests/s and p50/p95/p99 latency for each, and the ratio) with the machine it
ran on and its load at the start and the end, and can write it to a file. It runs
unchanged on a GPU machine.

    .venv/bin/python scripts/bench_serving.py --requests 2000 --concurrency 8 \
        --output docs/benchmarks/serving-gpu.md
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
from species_classifier.artifacts import load_members, read_description
from species_classifier.demo_data import make_demo_dataset, make_random_bundle

REPO = Path(__file__).resolve().parents[1]
# The serving tests' helpers for local servers: one home for free ports and waiting for a 200.
sys.path.append(str(REPO / "tests"))
from local_servers import free_port, wait_for_200  # noqa: E402

SERVE = REPO / "container" / "serve"
# The servers, in the order they run in each round, and how the table names them.
SERVERS = {
    "naive-default": "naive (seed's handler), OpenMP's default wait policy",
    "naive-passive": "naive (seed's handler), OMP_WAIT_POLICY=PASSIVE",
    "ours": "ours (gunicorn + batching + the engine it measured)",
}
NAIVE = ("naive-default", "naive-passive")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="per server, per round")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent connections")
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

    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        base = Path(tmp)
        print(f"making a {args.members}-member bundle at {args.img_size} px and photos ...")
        make_random_bundle(base / "model", args.img_size, args.members)
        photos = make_photos(base / "photos", args.photo_size)
        load_at_start = load_average()
        results: dict[str, list[dict]] = {name: [] for name in SERVERS}
        for round_number in range(1, args.rounds + 1):
            for name in SERVERS:
                print(f"round {round_number}: {SERVERS[name]} ...", flush=True)
                results[name].append(bench_server(name, base, photos, args))
                print(f"  {summary_line(results[name][-1])}", flush=True)
                engine = ours_engine(base / "ours.log")
                # Every row on disk as it is measured: a run killed at its time limit
                # keeps the servers it finished.
                write_table(report(results, args, load_at_start, engine), args.output)
    table = report(results, args, load_at_start, engine)
    print(table)
    write_table(table, args.output)


def write_table(table: str, output: Path | None) -> None:
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(table)


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
    if name == "ours":
        command = [str(SERVE)]
    else:
        command = [sys.executable, __file__, "--naive-server", str(port), str(base / "model")]
    with log_path.open("w") as log:
        return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def bench_server(name: str, base: Path, photos: list[bytes], args) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = base / f"{name}.log"
    process = start_server(name, base, port, log_path)
    try:
        try:
            wait_for_200(f"{url}/ping", 300, process, log_path)
        except AssertionError as not_ready:
            sys.exit(f"{name}: {not_ready}")
        # Warm-up: the first requests pay for allocations and kernel selection.
        load(url, photos, 2 * args.concurrency, args.concurrency)
        return load(url, photos, args.requests, args.concurrency)
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


def summary_line(run: dict) -> str:
    s = stats([run])
    return (
        f"{s['count']} requests, {s['rps']:.2f} req/s, p50 {s['p50']:.0f} ms, p99 {s['p99']:.0f} ms"
    )


def report(results: dict[str, list[dict]], args, load_at_start: str, engine: str) -> str:
    """The table of the servers measured so far; the ratio once ours and a naive one ran."""
    figures = {name: stats(runs) for name, runs in results.items() if runs}
    rows = [
        "| server | requests | requests/s | p50 ms | p95 ms | p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for name, label in SERVERS.items():
        if name not in figures:
            continue
        s = figures[name]
        rows.append(
            f"| {label} | {s['count']} | {s['rps']:.2f} | {s['p50']:.0f} | {s['p95']:.0f} "
            f"| {s['p99']:.0f} |"
        )
    measured_naive = [name for name in NAIVE if name in figures]
    if "ours" in figures and measured_naive:
        best_naive = max(measured_naive, key=lambda name: figures[name]["rps"])
        ours, naive = figures["ours"], figures[best_naive]
        rows.append(
            f"| ratio ours / naive's best ({SERVERS[best_naive].split(', ', 1)[1]}) | | "
            f"**{ours['rps'] / naive['rps']:.2f}x** | {ours['p50'] / naive['p50']:.2f} | "
            f"{ours['p95'] / naive['p95']:.2f} | {ours['p99'] / naive['p99']:.2f} |"
        )
    settings = (
        f"efficientnet_b1, {args.members} members, {args.img_size} px, random weights; "
        f"{args.photo_size} px JPEG photos; {args.concurrency} concurrent connections; "
        f"{args.rounds} round(s) of {args.requests} requests per server"
    )
    return "\n".join(
        [
            f"Machine: {describe()}; load average at the start: {load_at_start}",
            "",
            f"Setup: {settings}",
            "",
            f"Ours served with: {engine}",
            "",
            *rows,
            "",
        ]
    )


def load_average() -> str:
    return ", ".join(f"{value:.1f}" for value in os.getloadavg())


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

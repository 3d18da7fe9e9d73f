"""Local servers, for the tests and scripts/bench_serving.py: a free port to start one on,
waiting until it answers 200, and a local AWS (moto). Plain functions with no side effects on import (unlike
conftest.py), so the benchmark can import them too.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for_200(
    url: str, timeout: float, process: subprocess.Popen | None = None, log: Path | None = None
) -> requests.Response:
    """GET `url` until it answers 200; fail early, with the server's log, if `process` exits."""

    def shown() -> str:  # the log as it stands when the wait fails
        return f":\n{log.read_text()}" if log else ""

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}{shown()}")
        try:
            response = requests.get(url, timeout=5)
        except requests.RequestException:
            pass
        else:
            if response.status_code == 200:
                return response
        time.sleep(0.1)
    raise AssertionError(f"{url} did not answer 200 within {timeout} s{shown()}")


@contextlib.contextmanager
def moto_server(region: str = "us-east-1") -> Iterator[dict[str, str]]:
    """A local AWS (moto: S3, IAM, SageMaker, CloudWatch Logs, ECR ...) while the block runs.

    Yields the environment that points boto3 at it, with test credentials.
    """
    from moto.server import ThreadedMotoServer  # slow to import: only for the tests that use it

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": region,
        }
    finally:
        server.stop()

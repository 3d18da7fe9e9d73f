"""Local servers, for the tests and scripts/bench_serving.py: a free port to start one on,
and waiting until it answers 200. Plain functions with no side effects on import (unlike
conftest.py), so the benchmark can import them too.
"""

from __future__ import annotations

import socket
import subprocess
import time
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

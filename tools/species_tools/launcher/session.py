"""The boto3 clients of one run, the commands and the context they run in, the one way to
wait, and JobFailed, what a resource that ended badly or never settled raises.

Every wait for AWS goes through `poll_until`, which gives up at a deadline and says what it
waited for: nothing in the launcher polls forever.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import botocore.config

from species_tools.launcher.settings import SettingsParser, format_duration

T = TypeVar("T")


def print_error(text: str) -> None:
    """One line on stderr: errors and notes, kept out of the output a script may parse."""
    sys.stderr.write(text + "\n")


class JobFailed(Exception):
    """The SageMaker resource ended badly, or never settled; the message says what happened."""


@dataclass(frozen=True)
class Command:
    """One subcommand: its help line, the arguments it registers, and what it runs."""

    name: str
    help: str
    add_arguments: Callable[[SettingsParser], None]
    run: Callable[[argparse.Namespace, Context], int]


@dataclass
class Aws:
    """The boto3 clients of one run, made from one session in the resolved region."""

    session: Any
    _clients: dict[str, Any] = field(default_factory=dict)

    def client(self, service: str) -> Any:
        if service not in self._clients:
            if service == "sagemaker-runtime":
                # The runtime answers within 60 s by contract; AWS recommends a 70 s socket
                # timeout. botocore would retry a read time-out up to 10 times (11 minutes per
                # photo on a hung endpoint): invoke retries only what is safe itself.
                config = botocore.config.Config(retries={"total_max_attempts": 1}, read_timeout=70)
            else:
                config = botocore.config.Config(
                    retries={"mode": "standard", "max_attempts": 10}, read_timeout=60
                )
            self._clients[service] = self.session.client(service, config=config)
        return self._clients[service]

    @property
    def sagemaker(self) -> Any:
        return self.client("sagemaker")

    @property
    def s3(self) -> Any:
        return self.client("s3")

    @property
    def logs(self) -> Any:
        return self.client("logs")

    @property
    def runtime(self) -> Any:
        return self.client("sagemaker-runtime")


@dataclass
class Context:
    """What a command needs besides its arguments; tests inject sleep and clock."""

    aws: Aws
    region: str
    sleep: Callable[[float], None] = time.sleep
    clock: Callable[[], float] = time.monotonic
    out: Callable[[str], None] = print
    err: Callable[[str], None] = print_error


def poll_until(
    describe: Callable[[], T],
    done: Callable[[T], bool],
    *,
    what: str,
    timeout_s: float,
    poll_seconds: float,
    ctx: Context,
) -> T:
    """describe() every poll_seconds until done(result); JobFailed naming `what` at the deadline."""
    deadline = ctx.clock() + timeout_s
    while True:
        result = describe()
        if done(result):
            return result
        if ctx.clock() >= deadline:
            raise JobFailed(
                f"gave up after {format_duration(timeout_s)} waiting for {what} "
                "(it carries on in AWS; --wait-timeout sets how long to wait)"
            )
        ctx.sleep(poll_seconds)

"""The command line: every command's parser, the settings layered onto it, one failure boundary.

Exit codes: 0 done, 1 an AWS error or a job/endpoint that failed or never settled, 2 a setting
that is missing or wrong, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from species_tools.aws import SettingsError, aws_message
from species_tools.launcher import hosting, invoke, training, transform, tuning
from species_tools.launcher.session import Aws, Command, Context, JobFailed, print_error
from species_tools.launcher.settings import (
    CONFIG_ENV,
    DEFAULT_CONFIG,
    PROG,
    SettingsParser,
    add_common_arguments,
    check_config_keys,
    config_path,
    defaults_for_command,
    load_config,
    require,
)

COMMANDS: dict[str, Command] = {
    command.name: command
    for command in (
        *training.COMMANDS,
        *tuning.COMMANDS,
        *hosting.COMMANDS,
        *invoke.COMMANDS,
        *transform.COMMANDS,
    )
}


def build_parsers() -> tuple[SettingsParser, dict[str, SettingsParser]]:
    parser = SettingsParser(
        prog=PROG,
        description="Train, watch, deploy, invoke and clean up the species classifier on "
        "SageMaker (boto3 only).",
        epilog="Settings: flags, then environment (SPECIES_ROLE_ARN, SPECIES_BUCKET, "
        "SPECIES_IMAGE, SPECIES_PREFIX, AWS_REGION), then the config file "
        f"(--config, ${CONFIG_ENV} or {DEFAULT_CONFIG}). See docs/sagemaker.md.",
    )
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parsers: dict[str, SettingsParser] = {}
    for command in COMMANDS.values():
        sub = subcommands.add_parser(command.name, help=command.help, description=command.help)
        add_common_arguments(sub)
        command.add_arguments(sub)
        parsers[command.name] = sub
    return parser, parsers


def parse_arguments(argv: Sequence[str], environ: Mapping[str, str]) -> argparse.Namespace:
    path, named = config_path(argv, environ)
    config = load_config(path, named)
    parser, parsers = build_parsers()
    check_config_keys(config, parsers, path)
    for name, sub in parsers.items():
        sub.set_defaults(**defaults_for_command(name, sub.settings, config, environ, path))
    return parser.parse_args(argv)


def resolve_region(args: argparse.Namespace, session_factory: Callable[..., Any]) -> str:
    region = args.region or session_factory().region_name
    if not region:
        require(args, "region")
    return region


def main(
    argv: Sequence[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    session_factory: Callable[..., Any] = boto3.session.Session,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> int:
    """Run one command and return its exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    environ = os.environ if environ is None else environ
    try:
        args = parse_arguments(argv, environ)
        region = resolve_region(args, session_factory)
        ctx = Context(
            aws=Aws(session_factory(region_name=region)), region=region, sleep=sleep, clock=clock
        )
        return COMMANDS[args.command].run(args, ctx)
    except SettingsError as error:
        print_error(f"error: {error}")
        return 2
    except (JobFailed, ClientError, BotoCoreError) as error:
        print_error(f"error: {aws_message(error)}")
        return 1
    except KeyboardInterrupt:
        print_error("interrupted")
        return 130

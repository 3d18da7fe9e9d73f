"""Settings: flags, then environment variables, then the TOML config file; one line when one is wrong.

Each command registers its own arguments on a `SettingsParser`, which records the name of every
setting it defines: those names are what the config file may set, at the top level (for every
command that has the setting) or in a table per command. Region, role, bucket and image never
have a silent default.

argparse rather than click: click's `default_map` replaces a repeatable option's default
where this tool merges them (the config's `[train.hyperparameters]` table plus
`--hyperparameter` flags, a flag winning per key), and its usage errors would need their own
formatting to stay one line with exit status 2. Recording settings as they are added keeps
argparse's private `_actions` out of it.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from species_tools.aws import SettingsError, load_toml

PROG = "scripts/run_job.py"
CONFIG_ENV = "SPECIES_CONFIG"
DEFAULT_CONFIG = "~/.species-classifier.toml"
DEFAULT_PREFIX = "species-classifier"
PROJECT_TAG = ("project", "species-classifier")

# setting -> environment variables that provide it, first set wins.
SETTING_ENV: dict[str, tuple[str, ...]] = {
    "region": ("AWS_REGION", "AWS_DEFAULT_REGION"),
    "role": ("SPECIES_ROLE_ARN",),
    "bucket": ("SPECIES_BUCKET",),
    "image": ("SPECIES_IMAGE",),
    "prefix": ("SPECIES_PREFIX",),
}
SETTING_FLAG = {
    "region": "--region REGION",
    "role": "--role ARN",
    "bucket": "--bucket NAME",
    "image": "--image URI",
    "instance_type": "--instance-type TYPE",
    "data": "--data PATH_OR_S3_URI",
    "endpoint": "--endpoint NAME",
    "input": "--input S3_URI",
}
# Config tables whose entries become KEY=VALUE pairs (hyperparameters, container environment,
# tags, tuning ranges).
PAIR_SETTINGS = ("hyperparameters", "env", "tags", "ranges")
NAME_PATTERN = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")


class SettingsParser(argparse.ArgumentParser):
    """An ArgumentParser that knows the names of the settings it defines (for the config file)."""

    def __init__(self, *args: Any, **kwargs: Any):
        # Set before argparse's own __init__, which adds --help through add_argument.
        self.settings: set[str] = set()
        super().__init__(*args, **kwargs)

    def add_argument(self, *args: Any, **kwargs: Any) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        if action.dest != "help":
            self.settings.add(action.dest)
        return action


def add_common_arguments(parser: SettingsParser) -> None:
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"TOML settings (default ${CONFIG_ENV} or {DEFAULT_CONFIG})",
    )
    parser.add_argument(
        "--region", help="AWS region (env AWS_REGION / AWS_DEFAULT_REGION, or the AWS profile's)"
    )
    parser.add_argument(
        "--poll-seconds", type=float, default=15.0, help="seconds between status polls (default 15)"
    )


def add_pairs(parser: SettingsParser, flag: str, dest: str, help_text: str) -> None:
    parser.add_argument(
        flag, dest=dest, action="append", type=parse_pair, metavar="KEY=VALUE", help=help_text
    )


def add_wait_timeout(parser: SettingsParser, default: str, what: str) -> None:
    parser.add_argument(
        "--wait-timeout",
        type=parse_duration,
        default=default,
        help=f"give up waiting for {what} after this long (default {default}); it keeps going",
    )


def parse_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


def parse_duration(text: str | int) -> int:
    """Seconds from `3600`, `90m`, `6h` or `2d`."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+)\s*([smhd]?)\s*", str(text))
    if not match:
        raise argparse.ArgumentTypeError(
            f"expected a duration like 3600, 90m, 6h or 2d, got {text!r}"
        )
    return int(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


def format_duration(seconds: float) -> str:
    seconds = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def config_value_to_string(value: Any) -> str:
    # TOML booleans must reach the container as the strings it parses, not Python's True.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(config_value_to_string(item) for item in value)
    return str(value)


def config_path(argv: Sequence[str], environ: Mapping[str, str]) -> tuple[Path, bool]:
    """The config file to read and whether the user named it (then it must exist)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    named = known.config or environ.get(CONFIG_ENV)
    if named:
        return Path(named).expanduser(), True
    return Path(DEFAULT_CONFIG).expanduser(), False


def load_config(path: Path, required: bool) -> dict[str, Any]:
    if not required and not path.exists():
        return {}
    return load_toml(path)


def as_pairs(value: Any, where: str) -> list[tuple[str, str]]:
    if not isinstance(value, dict):
        raise SettingsError(f"{where} must be a table of KEY = VALUE")
    return [(str(k), config_value_to_string(v)) for k, v in value.items()]


def defaults_for_command(
    command: str,
    settings: set[str],
    config: Mapping[str, Any],
    environ: Mapping[str, str],
    path: Path,
) -> dict[str, Any]:
    """Config values, then environment values on top: the parser's defaults, so flags win."""
    defaults: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and key not in PAIR_SETTINGS:
            continue  # another command's table
        if key in settings:
            defaults[key] = as_pairs(value, f"[{key}] in {path}") if key in PAIR_SETTINGS else value
    table = config.get(command, {})
    if not isinstance(table, dict):
        raise SettingsError(f"[{command}] in {path} must be a table of settings")
    for key, value in table.items():
        if key not in settings:
            raise SettingsError(
                f"unknown setting {key!r} in [{command}] of {path}; "
                f"`{PROG} {command} --help` lists the settings (dashes become underscores)"
            )
        if key in PAIR_SETTINGS:
            defaults[key] = defaults.get(key, []) + as_pairs(value, f"[{command}.{key}] in {path}")
        else:
            defaults[key] = value
    for setting, names in SETTING_ENV.items():
        if setting in settings:
            for name in names:
                if environ.get(name):
                    defaults[setting] = environ[name]
                    break
    return defaults


def check_config_keys(
    config: Mapping[str, Any], parsers: Mapping[str, SettingsParser], path: Path
) -> None:
    known = set(parsers).union(*(parser.settings for parser in parsers.values()))
    for key in config:
        if key not in known:
            raise SettingsError(f"unknown setting {key!r} in {path}; see docs/sagemaker.md")


def require(args: argparse.Namespace, *settings: str) -> None:
    """One line naming the first missing setting and the three ways to set it."""
    for setting in settings:
        if getattr(args, setting, None) in (None, ""):
            ways = [f"Pass {SETTING_FLAG.get(setting, '--' + setting.replace('_', '-'))}"]
            ways += [f"set {name}" for name in SETTING_ENV.get(setting, ())[:1]]
            table = "" if setting in SETTING_ENV else f" under [{args.command}]"
            ways.append(f'or put {setting} = "..."{table} in {DEFAULT_CONFIG} (or --config FILE)')
            raise SettingsError(f"missing setting: {setting}. " + ", ".join(ways))


def check_name(name: str, what: str) -> str:
    if not NAME_PATTERN.match(name):
        raise SettingsError(
            f"invalid {what} {name!r}: 1-63 letters, digits and hyphens, "
            "starting and ending with a letter or digit"
        )
    return name


def timestamped_name(base: str) -> str:
    # Milliseconds too: a deploy right after another must not reuse the model's name.
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")[:-3]
    return f"{base[: 62 - len(stamp)].rstrip('-')}-{stamp}"


def as_prefix(uri: str) -> str:
    # SageMaker treats an S3 prefix as a string prefix: without the slash, `data/train` also
    # matches `data/train-old/`; FastFile mode rejects it outright.
    return uri if uri.endswith("/") else uri + "/"


def join_s3(uri: str, *parts: str) -> str:
    return as_prefix(uri) + "/".join(part.strip("/") for part in parts)


def tag_list(pairs: Iterable[tuple[str, str]] | None) -> list[dict[str, str]]:
    tags = dict([PROJECT_TAG, *(pairs or [])])
    return [{"Key": key, "Value": value} for key, value in tags.items()]

#!/usr/bin/env python3
"""Launch, watch, deploy, invoke and clean up the species classifier on SageMaker, with boto3 only.

This script owns the path from a terminal to the SageMaker API for this project's image:
- `train`: upload a local training channel to S3 (files already there are skipped), create the
  training job (custom image, managed spot, checkpoints, metric definitions from
  `species_classifier.metric_lines`), and with `--wait` stream every host's CloudWatch log,
  report the final metrics and unpack the job's output (metrics, report, plots) locally;
- `status`, `logs`, `stop`: one training job;
- `deploy`: model, endpoint config and endpoint from a training job or a model.tar.gz, created
  or updated in place, then waits until InService;
- `invoke`: photos to an endpoint, predictions printed;
- `transform`: a batch transform job over an S3 prefix of photos;
- `delete`: an endpoint with its endpoint config and model (or leftovers by name).

Settings come from flags, then environment variables, then an optional TOML config file
(`--config`, `$SPECIES_CONFIG`, or `~/.species-classifier.toml`); region, role, bucket and image
never have a silent default. The AWS endpoint comes from boto3's own configuration
(`AWS_ENDPOINT_URL` included), so tests against a local endpoint run this same code.
See docs/sagemaker.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import boto3
import botocore.config
from botocore.exceptions import BotoCoreError, ClientError

try:
    from species_classifier.metric_lines import METRIC_DEFINITIONS
except ModuleNotFoundError:
    # Run from a clone without installing the package: it lives beside this script.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "container" / "code"))
    from species_classifier.metric_lines import METRIC_DEFINITIONS

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
# Config tables whose entries become KEY=VALUE pairs (hyperparameters, container environment, tags).
PAIR_SETTINGS = ("hyperparameters", "env", "tags")

TRAINING_CHANNEL = "training"
CHECKPOINT_LOCAL_PATH = "/opt/ml/checkpoints"
TRAINING_LOG_GROUP = "/aws/sagemaker/TrainingJobs"
JOB_TERMINAL = ("Completed", "Failed", "Stopped")
NAME_PATTERN = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
MAX_RUNTIME_LIMIT_S = 28 * 24 * 3600
# InvokeEndpoint's request limit (botocore BodyBlob); the serving container's default is the same.
MAX_INVOKE_BYTES = 6_291_456
PHOTO_CONTENT_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "application/x-image",
    ".bmp": "application/x-image",
    ".gif": "application/x-image",
    ".tif": "application/x-image",
    ".tiff": "application/x-image",
}


class SettingsError(Exception):
    """A setting that is missing or wrong: one line saying which and how to set it."""


class JobFailed(Exception):
    """The SageMaker resource ended badly; the message is what SageMaker said."""


# ---------------------------------------------------------------- settings


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
    if seconds % 86400 == 0 and seconds >= 86400:
        return f"{seconds // 86400}d"
    if seconds % 3600 == 0 and seconds >= 3600:
        return f"{seconds // 3600}h"
    if seconds % 60 == 0 and seconds >= 60:
        return f"{seconds // 60}m"
    return f"{seconds}s"


def config_value_to_string(value: Any) -> str:
    # TOML booleans must reach the container as the strings it parses, not Python's True.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(config_value_to_string(item) for item in value)
    return str(value)


def config_path(argv: Sequence[str], environ: Mapping[str, str]) -> tuple[Path | None, bool]:
    """The config file to read and whether the user named it (then it must exist)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    named = known.config or environ.get(CONFIG_ENV)
    if named:
        return Path(named).expanduser(), True
    return Path(DEFAULT_CONFIG).expanduser(), False


def load_config(path: Path | None, required: bool) -> dict[str, Any]:
    if path is None or not path.exists():
        if required:
            raise SettingsError(
                f"config file {path} does not exist (from --config or ${CONFIG_ENV})"
            )
        return {}
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise SettingsError(f"config file {path} is not valid TOML: {error}") from None


def as_pairs(value: Any, where: str) -> list[tuple[str, str]]:
    if not isinstance(value, dict):
        raise SettingsError(f"{where} must be a table of KEY = VALUE")
    return [(str(k), config_value_to_string(v)) for k, v in value.items()]


def defaults_for_command(
    command: str,
    dests: set[str],
    config: Mapping[str, Any],
    environ: Mapping[str, str],
    path: Path | None,
) -> dict[str, Any]:
    """Config values, then environment values on top: the parser's defaults, so flags win."""
    defaults: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and key not in PAIR_SETTINGS:
            continue  # another command's table
        if key in dests:
            defaults[key] = as_pairs(value, f"[{key}] in {path}") if key in PAIR_SETTINGS else value
    table = config.get(command, {})
    if not isinstance(table, dict):
        raise SettingsError(f"[{command}] in {path} must be a table of settings")
    for key, value in table.items():
        if key not in dests:
            raise SettingsError(
                f"unknown setting {key!r} in [{command}] of {path}; "
                f"`{PROG} {command} --help` lists the settings (dashes become underscores)"
            )
        if key in PAIR_SETTINGS:
            defaults[key] = defaults.get(key, []) + as_pairs(value, f"[{command}.{key}] in {path}")
        else:
            defaults[key] = value
    for setting, names in SETTING_ENV.items():
        if setting in dests:
            for name in names:
                if environ.get(name):
                    defaults[setting] = environ[name]
                    break
    return defaults


def check_config_keys(
    config: Mapping[str, Any], parsers: Mapping[str, argparse.ArgumentParser], path: Path | None
) -> None:
    known = set(parsers) | {dest for p in parsers.values() for dest in parser_dests(p)}
    for key in config:
        if key not in known:
            raise SettingsError(f"unknown setting {key!r} in {path}; see docs/sagemaker.md")


def parser_dests(parser: argparse.ArgumentParser) -> set[str]:
    return {action.dest for action in parser._actions if action.dest != "help"}


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


def split_s3_uri(uri: str) -> tuple[str, str]:
    if not uri.startswith("s3://") or len(uri) <= 5:
        raise SettingsError(f"expected an S3 URI like s3://bucket/prefix/, got {uri!r}")
    bucket, _, key = uri[5:].partition("/")
    return bucket, key


def as_prefix(uri: str) -> str:
    # SageMaker treats an S3 prefix as a string prefix: without the slash, `data/train` also
    # matches `data/train-old/`; FastFile mode rejects it outright.
    return uri if uri.endswith("/") else uri + "/"


def join_s3(uri: str, *parts: str) -> str:
    return as_prefix(uri) + "/".join(part.strip("/") for part in parts)


# ---------------------------------------------------------------- AWS clients


@dataclass
class Aws:
    """The boto3 clients of one run, made from one session in the resolved region."""

    session: Any
    _clients: dict[str, Any] = field(default_factory=dict)

    def client(self, service: str) -> Any:
        if service not in self._clients:
            # The runtime answers within 60 s by contract; AWS recommends a 70 s socket timeout.
            config = botocore.config.Config(
                retries={"mode": "standard", "max_attempts": 10},
                read_timeout=70 if service == "sagemaker-runtime" else 60,
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
    aws: Aws
    region: str
    sleep: Callable[[float], None]
    out: Callable[[str], None] = print


def error_code(error: ClientError) -> str:
    return error.response.get("Error", {}).get("Code", "")


def is_not_found(error: ClientError) -> bool:
    # SageMaker answers ValidationException "Could not find ..." for a missing resource.
    message = error.response.get("Error", {}).get("Message", "")
    return error_code(error) in ("ResourceNotFound", "ResourceNotFoundException") or (
        error_code(error) == "ValidationException" and "Could not find" in message
    )


# ---------------------------------------------------------------- upload


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def already_uploaded(path: Path, remote: tuple[int, str] | None) -> bool:
    if remote is None or remote[0] != path.stat().st_size:
        return False
    etag = remote[1]
    # A multipart or KMS ETag is no MD5: same key and size is then the best cheap evidence.
    if "-" in etag or not re.fullmatch(r"[0-9a-f]{32}", etag):
        return "-" in etag
    return etag == file_md5(path)


def local_channel_files(folder: Path) -> list[Path]:
    """Every file of the channel, minus hidden ones (.DS_Store, .ipynb_checkpoints...)."""
    return sorted(
        path
        for path in folder.rglob("*")
        if path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )


def upload_channel(s3: Any, folder: Path, destination: str, out: Callable[[str], None]) -> None:
    """Copy a local channel folder under an S3 prefix, skipping files already there."""
    files = local_channel_files(folder)
    if not any(path.suffix.lower() == ".csv" for path in files):
        raise SettingsError(f"{folder} holds no CSV file: the training channel needs one")
    bucket, prefix = split_s3_uri(destination)
    existing: dict[str, tuple[int, str]] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            existing[item["Key"]] = (item["Size"], item["ETag"].strip('"'))

    def key_of(path: Path) -> str:
        return prefix + path.relative_to(folder).as_posix()

    pending = [path for path in files if not already_uploaded(path, existing.get(key_of(path)))]
    with ThreadPoolExecutor(max_workers=8) as pool:
        for future in [pool.submit(s3.upload_file, str(p), bucket, key_of(p)) for p in pending]:
            future.result()
    out(
        f"data: uploaded {len(pending)} files to {destination} "
        f"({len(files) - len(pending)} already there)"
    )


# ---------------------------------------------------------------- training


def training_data_location(args: argparse.Namespace) -> tuple[str, Path | None]:
    """The channel's S3 prefix, and the local folder to upload there (None for an S3 --data)."""
    if args.data.startswith("s3://"):
        return as_prefix(args.data), None
    folder = Path(args.data).expanduser()
    if not folder.is_dir():
        raise SettingsError(f"--data {args.data}: no such folder (or give an s3:// URI)")
    if args.upload_to:
        return as_prefix(args.upload_to), folder
    require(args, "bucket")
    return f"s3://{args.bucket}/{args.prefix}/data/{folder.resolve().name}/", folder


def training_job_request(args: argparse.Namespace, job: str, data_uri: str, output: str) -> dict:
    hyperparameters = dict(args.hyperparameters or [])
    if not hyperparameters.get("target_species"):
        raise SettingsError(
            "missing hyperparameter target_species: pass "
            "--hyperparameter target_species=SPECIES,SPECIES or put it under "
            f"[train.hyperparameters] in {DEFAULT_CONFIG}"
        )
    if args.max_runtime > MAX_RUNTIME_LIMIT_S:
        raise SettingsError(
            f"--max-runtime is at most 28d, got {format_duration(args.max_runtime)}"
        )
    stopping: dict[str, int] = {"MaxRuntimeInSeconds": args.max_runtime}
    if args.spot:
        max_wait = args.max_wait or 2 * args.max_runtime
        if max_wait < args.max_runtime:
            raise SettingsError(
                f"--max-wait ({format_duration(max_wait)}) must be at least --max-runtime "
                f"({format_duration(args.max_runtime)}): it counts run time plus waiting for spot"
            )
        stopping["MaxWaitTimeInSeconds"] = max_wait
    channel: dict[str, Any] = {
        "ChannelName": TRAINING_CHANNEL,
        "DataSource": {
            "S3DataSource": {
                "S3DataType": "S3Prefix",
                "S3Uri": data_uri,
                # Every host trains on the whole channel (folds are split in the container).
                "S3DataDistributionType": "FullyReplicated",
            }
        },
    }
    if args.input_mode != "File":
        channel["InputMode"] = args.input_mode
    request: dict[str, Any] = {
        "TrainingJobName": job,
        "RoleArn": args.role,
        "AlgorithmSpecification": {
            "TrainingImage": args.image,
            "TrainingInputMode": "File",
            "MetricDefinitions": METRIC_DEFINITIONS,
            "EnableSageMakerMetricsTimeSeries": True,
        },
        "HyperParameters": {key: str(value) for key, value in hyperparameters.items()},
        "InputDataConfig": [channel],
        "OutputDataConfig": {"S3OutputPath": output},
        "ResourceConfig": {
            "InstanceType": args.instance_type,
            "InstanceCount": args.instance_count,
            "VolumeSizeInGB": args.volume_size,
        },
        "StoppingCondition": stopping,
        "EnableManagedSpotTraining": bool(args.spot),
        # Always checkpoint: a spot restart resumes, and so does a retry of an on-demand job.
        "CheckpointConfig": {
            "S3Uri": args.checkpoint_s3 or join_s3(output, job, "checkpoints") + "/",
            "LocalPath": CHECKPOINT_LOCAL_PATH,
        },
        "EnableNetworkIsolation": bool(args.network_isolation),
        "Tags": tag_list(args.tags),
    }
    if args.env:
        request["Environment"] = dict(args.env)
    return request


def tag_list(pairs: Iterable[tuple[str, str]] | None) -> list[dict[str, str]]:
    tags = dict([PROJECT_TAG, *(pairs or [])])
    return [{"Key": key, "Value": value} for key, value in tags.items()]


def command_train(args: argparse.Namespace, ctx: Context) -> int:
    require(args, "image", "role", "instance_type", "data")
    job = check_name(args.job_name or timestamped_name(DEFAULT_PREFIX), "job name")
    if args.output:
        output = args.output
    else:
        require(args, "bucket")
        output = f"s3://{args.bucket}/{args.prefix}/output/"
    data_uri, local_folder = training_data_location(args)
    # Validate the whole request before spending time on an upload.
    request = training_job_request(args, job, data_uri, output)
    if local_folder is not None:
        upload_channel(ctx.aws.s3, local_folder, data_uri, ctx.out)
    ctx.aws.sagemaker.create_training_job(**request)
    spot = ""
    if args.spot:
        max_wait = request["StoppingCondition"]["MaxWaitTimeInSeconds"]
        spot = f", managed spot (max wait {format_duration(max_wait)})"
    ctx.out(
        f"training job {job} created: {args.instance_count} x {args.instance_type}{spot}, "
        f"max runtime {format_duration(args.max_runtime)}"
    )
    ctx.out(f"  image:       {args.image}")
    ctx.out(f"  output:      {output}")
    ctx.out(f"  checkpoints: {request['CheckpointConfig']['S3Uri']}")
    ctx.out(f"  console:     {console_url(ctx.region, job)}")
    if not args.wait:
        ctx.out(f"watch it: {PROG} logs {job} --follow   (status: {PROG} status {job})")
        return 0
    return watch_and_collect(job, ctx, args.poll_seconds, download_dir=Path(args.download_dir))


def console_url(region: str, job: str) -> str:
    return f"https://{region}.console.aws.amazon.com/sagemaker/home?region={region}#/jobs/{job}"


def stop_hint(job: str) -> str:
    return (
        f"stopped watching; training job {job} keeps running (and billing). "
        f"Stop it with: {PROG} stop {job}"
    )


def watch_and_collect(
    job: str, ctx: Context, poll_seconds: float, download_dir: Path | None
) -> int:
    """Follow a job to its end; report the outcome; exit code 0 only for Completed."""
    try:
        description = watch_training_job(job, ctx, poll_seconds)
    except KeyboardInterrupt:
        print(stop_hint(job), file=sys.stderr)
        return 130
    status = description["TrainingJobStatus"]
    if status != "Completed":
        reason = description.get("FailureReason") or description.get("SecondaryStatus", "")
        raise JobFailed(f"training job {job} {status}: {reason}")
    report_training_outcome(description, ctx)
    if download_dir is not None:
        download_training_output(description, download_dir, ctx)
    return 0


class LogTail:
    """New CloudWatch events from every stream of one prefix, in timestamp order.

    One stream per host (`<job>/algo-N-<epoch>`) appears when that host first writes, so the
    streams are listed again on every read. Each stream remembers its forward token.
    """

    def __init__(self, logs: Any, group: str, prefix: str):
        self.logs = logs
        self.group = group
        self.prefix = prefix
        self.tokens: dict[str, str | None] = {}

    def stream_names(self) -> list[str]:
        names = []
        try:
            paginator = self.logs.get_paginator("describe_log_streams")
            for page in paginator.paginate(
                logGroupName=self.group, logStreamNamePrefix=self.prefix
            ):
                names += [stream["logStreamName"] for stream in page["logStreams"]]
        except ClientError as error:
            # The group or stream does not exist until the first host writes a line.
            if error_code(error) != "ResourceNotFoundException":
                raise
        return names

    def read_stream(self, name: str) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        token = self.tokens.get(name)
        while True:
            request = {"logGroupName": self.group, "logStreamName": name, "startFromHead": True}
            if token:
                request["nextToken"] = token
            response = self.logs.get_log_events(**request)
            events += response["events"]
            # The forward token stays the same once the end of the stream is reached.
            finished = not response["events"] or response["nextForwardToken"] == token
            token = response["nextForwardToken"]
            if finished:
                break
        self.tokens[name] = token
        return events

    def new_events(self) -> list[tuple[int, str, str]]:
        for name in self.stream_names():
            self.tokens.setdefault(name, None)
        collected = [
            (event["timestamp"], host_of(name, self.prefix), event["message"])
            for name in list(self.tokens)
            for event in self.read_stream(name)
        ]
        return sorted(collected, key=lambda item: item[0])


def host_of(stream: str, prefix: str) -> str:
    return re.sub(r"-\d+$", "", stream[len(prefix) :])


def status_line(description: Mapping[str, Any]) -> str:
    status = description["TrainingJobStatus"]
    secondary = description.get("SecondaryStatus", "")
    transitions = description.get("SecondaryStatusTransitions") or [{}]
    message = transitions[-1].get("StatusMessage", "")
    return f"[{status}] {secondary}" + (f": {message}" if message else "")


def watch_training_job(job: str, ctx: Context, poll_seconds: float) -> dict[str, Any]:
    """Print status changes and every host's log lines until the job ends; its last description."""
    tail = LogTail(ctx.aws.logs, TRAINING_LOG_GROUP, f"{job}/")
    last_status = None
    while True:
        description = ctx.aws.sagemaker.describe_training_job(TrainingJobName=job)
        line = status_line(description)
        if line != last_status:
            ctx.out(line)
            last_status = line
        several_hosts = description["ResourceConfig"].get("InstanceCount", 1) > 1
        print_log_events(tail.new_events(), several_hosts, ctx.out)
        if description["TrainingJobStatus"] in JOB_TERMINAL:
            # CloudWatch delivers the last lines shortly after the job ends: read once more.
            ctx.sleep(poll_seconds)
            print_log_events(tail.new_events(), several_hosts, ctx.out)
            return description
        ctx.sleep(poll_seconds)


def print_log_events(events: Iterable[tuple[int, str, str]], with_host: bool, out) -> None:
    for _, host, message in events:
        out(f"[{host}] {message}" if with_host else message)


def report_training_outcome(description: Mapping[str, Any], ctx: Context) -> None:
    job = description["TrainingJobName"]
    ctx.out(f"training job {job} completed")
    metrics = description.get("FinalMetricDataList") or []
    for metric in sorted(metrics, key=lambda m: m["MetricName"]):
        ctx.out(f"  {metric['MetricName']} = {metric['Value']:g}")
    training_s = description.get("TrainingTimeInSeconds")
    billable_s = description.get("BillableTimeInSeconds")
    if training_s and billable_s:
        time_line = f"  time: {training_s} s training, {billable_s} s billable"
        if description.get("EnableManagedSpotTraining"):
            time_line += f" ({100 * (1 - billable_s / training_s):.0f}% saved by spot)"
        ctx.out(time_line)
    ctx.out(f"  model: {description['ModelArtifacts']['S3ModelArtifacts']}")


def output_archive_uri(description: Mapping[str, Any]) -> str:
    # SageMaker puts output.tar.gz (from /opt/ml/output/data) beside model.tar.gz.
    model = description["ModelArtifacts"]["S3ModelArtifacts"]
    return model.rsplit("/", 1)[0] + "/output.tar.gz"


def download_training_output(description: Mapping[str, Any], download_dir: Path, ctx: Context):
    uri = output_archive_uri(description)
    bucket, key = split_s3_uri(uri)
    destination = download_dir / description["TrainingJobName"]
    with tempfile.TemporaryDirectory() as scratch:
        archive = Path(scratch) / "output.tar.gz"
        try:
            ctx.aws.s3.download_file(bucket, key, str(archive))
        except ClientError as error:
            if error_code(error) in ("404", "NoSuchKey"):
                print(f"warning: no output archive at {uri}", file=sys.stderr)
                return
            raise
        destination.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            tar.extractall(destination, filter="data")
    files = sorted(
        p.relative_to(destination).as_posix() for p in destination.rglob("*") if p.is_file()
    )
    ctx.out(f"output unpacked in {destination}: {', '.join(files)}")
    metrics_file = destination / "metrics.json"
    if metrics_file.exists():
        metrics = json.loads(metrics_file.read_text())
        if "mean_macro_f1" in metrics:
            ctx.out(
                f"  cross-validated macro F1: {metrics['mean_macro_f1']:.4f}"
                f" ± {metrics.get('std_macro_f1', 0):.4f}"
            )
    if (destination / "report.md").exists():
        ctx.out(f"  report: {destination / 'report.md'}")


def command_status(args: argparse.Namespace, ctx: Context) -> int:
    d = ctx.aws.sagemaker.describe_training_job(TrainingJobName=args.job)
    resources = d["ResourceConfig"]
    spot = ", managed spot" if d.get("EnableManagedSpotTraining") else ""
    ctx.out(f"job:       {d['TrainingJobName']}")
    ctx.out(f"status:    {d['TrainingJobStatus']} ({d.get('SecondaryStatus', '')})")
    if d.get("FailureReason"):
        ctx.out(f"failure:   {d['FailureReason']}")
    ctx.out(f"instances: {resources.get('InstanceCount')} x {resources.get('InstanceType')}{spot}")
    ctx.out(f"image:     {d['AlgorithmSpecification'].get('TrainingImage')}")
    ctx.out(f"created:   {d['CreationTime']:%Y-%m-%d %H:%M:%S %Z}")
    for transition in d.get("SecondaryStatusTransitions", []):
        message = transition.get("StatusMessage", "")
        ctx.out(f"  {transition['StartTime']:%H:%M:%S} {transition['Status']}: {message}")
    for metric in d.get("FinalMetricDataList") or []:
        ctx.out(f"metric:    {metric['MetricName']} = {metric['Value']:g}")
    if d.get("ModelArtifacts"):
        ctx.out(f"model:     {d['ModelArtifacts']['S3ModelArtifacts']}")
    return 0


def command_logs(args: argparse.Namespace, ctx: Context) -> int:
    if args.follow:
        return watch_and_collect(args.job, ctx, args.poll_seconds, download_dir=None)
    tail = LogTail(ctx.aws.logs, TRAINING_LOG_GROUP, f"{args.job}/")
    events = tail.new_events()
    print_log_events(events, len(tail.tokens) > 1, ctx.out)
    if not tail.tokens:
        ctx.out(f"no log streams yet for {args.job} (they appear once the instances start)")
    return 0


def command_stop(args: argparse.Namespace, ctx: Context) -> int:
    ctx.aws.sagemaker.stop_training_job(TrainingJobName=args.job)
    ctx.out(
        f"stopping training job {args.job}: the container gets SIGTERM, then SIGKILL after 120 s; "
        "checkpoints already in S3 stay"
    )
    return 0


# ---------------------------------------------------------------- models and endpoints


def model_source(args: argparse.Namespace, ctx: Context) -> str:
    """The model.tar.gz to serve; with --training-job, that job's (which must be Completed)."""
    if args.training_job:
        d = ctx.aws.sagemaker.describe_training_job(TrainingJobName=args.training_job)
        if d["TrainingJobStatus"] != "Completed":
            raise SettingsError(
                f"training job {args.training_job} is {d['TrainingJobStatus']}: "
                "only a Completed job has a model to serve"
            )
        if not args.image:
            # The image that trained the model reads its bundle; used when no image is set.
            args.image = d["AlgorithmSpecification"]["TrainingImage"]
        return d["ModelArtifacts"]["S3ModelArtifacts"]
    if args.model_data:
        split_s3_uri(args.model_data)
        return args.model_data
    raise SettingsError("missing model: pass --training-job NAME or --model-data S3_URI")


def create_model(args: argparse.Namespace, ctx: Context, name: str, model_data: str) -> None:
    require(args, "image", "role")
    container: dict[str, Any] = {"Image": args.image, "ModelDataUrl": model_data}
    if args.env:
        container["Environment"] = dict(args.env)
    ctx.aws.sagemaker.create_model(
        ModelName=name,
        ExecutionRoleArn=args.role,
        PrimaryContainer=container,
        Tags=tag_list(args.tags),
    )
    ctx.out(f"model {name} created: {args.image} serving {model_data}")


def current_endpoint_config(ctx: Context, endpoint: str) -> str | None:
    """The config an existing endpoint runs, or None when there is no such endpoint."""
    try:
        return ctx.aws.sagemaker.describe_endpoint(EndpointName=endpoint)["EndpointConfigName"]
    except ClientError as error:
        if is_not_found(error):
            return None
        raise


def command_deploy(args: argparse.Namespace, ctx: Context) -> int:
    require(args, "endpoint", "instance_type")
    endpoint = check_name(args.endpoint, "endpoint name")
    model_data = model_source(args, ctx)
    model = timestamped_name(endpoint)
    config = timestamped_name(f"{endpoint[:40]}-config")
    create_model(args, ctx, model, model_data)
    ctx.aws.sagemaker.create_endpoint_config(
        EndpointConfigName=config,
        ProductionVariants=[
            {
                "VariantName": "AllTraffic",
                "ModelName": model,
                "InstanceType": args.instance_type,
                "InitialInstanceCount": args.instance_count,
                # The default start-up window (about 4 minutes) is short for a cold GPU model load.
                "ContainerStartupHealthCheckTimeoutInSeconds": args.startup_timeout,
                "ModelDataDownloadTimeoutInSeconds": args.download_timeout,
            }
        ],
        Tags=tag_list(args.tags),
    )
    ctx.out(f"endpoint config {config} created: {args.instance_count} x {args.instance_type}")
    previous = current_endpoint_config(ctx, endpoint)
    if previous:
        ctx.aws.sagemaker.update_endpoint(EndpointName=endpoint, EndpointConfigName=config)
        old_models = [
            variant["ModelName"]
            for variant in ctx.aws.sagemaker.describe_endpoint_config(EndpointConfigName=previous)[
                "ProductionVariants"
            ]
        ]
        ctx.out(f"endpoint {endpoint} updating in place (it serves {previous} until then)")
        ctx.out(
            "  once it is InService, remove what it no longer uses: "
            f"{PROG} delete --endpoint-config {previous}"
            + "".join(f" --model {model}" for model in old_models)
        )
    else:
        ctx.aws.sagemaker.create_endpoint(
            EndpointName=endpoint, EndpointConfigName=config, Tags=tag_list(args.tags)
        )
        ctx.out(f"endpoint {endpoint} creating")
    if not args.wait:
        return 0
    try:
        description = wait_for_endpoint(endpoint, ctx, args.poll_seconds)
    except KeyboardInterrupt:
        print(f"stopped waiting; endpoint {endpoint} keeps deploying", file=sys.stderr)
        return 130
    if description["EndpointConfigName"] != config:
        raise JobFailed(
            f"endpoint {endpoint} rolled back to {description['EndpointConfigName']}: "
            f"{description.get('FailureReason', 'no reason given')}"
        )
    ctx.out(f"endpoint {endpoint} is InService. Try: {PROG} invoke --endpoint {endpoint} PHOTO.jpg")
    return 0


def wait_for_endpoint(endpoint: str, ctx: Context, poll_seconds: float) -> dict[str, Any]:
    last = None
    while True:
        description = ctx.aws.sagemaker.describe_endpoint(EndpointName=endpoint)
        status = description["EndpointStatus"]
        if status != last:
            ctx.out(f"[{status}] {endpoint}")
            last = status
        if status == "InService":
            return description
        if status in ("Failed", "OutOfService"):
            raise JobFailed(f"endpoint {endpoint} {status}: {description.get('FailureReason', '')}")
        ctx.sleep(poll_seconds)


def collect_photos(paths: Sequence[str]) -> list[Path]:
    photos: list[Path] = []
    for text in paths:
        path = Path(text).expanduser()
        if path.is_dir():
            photos += sorted(p for p in path.rglob("*") if p.suffix.lower() in PHOTO_CONTENT_TYPES)
        elif path.is_file():
            photos.append(path)
        else:
            raise SettingsError(f"{text}: no such file or folder")
    if not photos:
        raise SettingsError(
            f"no photos ({', '.join(sorted(PHOTO_CONTENT_TYPES))}) in {', '.join(paths)}"
        )
    return photos


def parse_answer(body: bytes) -> Any:
    """The endpoint's JSON, or its text when it is not JSON."""
    try:
        return json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace")


def describe_prediction(body: bytes) -> str:
    prediction = parse_answer(body)
    if isinstance(prediction, str):
        return prediction
    if isinstance(prediction, dict) and "predicted_species" in prediction:
        species = prediction["predicted_species"]
        runners_up = sorted(
            (
                (name, p)
                for name, p in (prediction.get("class_probabilities") or {}).items()
                if name != species
            ),
            key=lambda item: item[1],
            reverse=True,
        )[:2]
        others = ", ".join(f"{name} {p:.3f}" for name, p in runners_up)
        return f"{species} (confidence {prediction.get('confidence', 0):.3f})" + (
            f"; next: {others}" if others else ""
        )
    return json.dumps(prediction)


def command_invoke(args: argparse.Namespace, ctx: Context) -> int:
    require(args, "endpoint")
    failures = 0
    for photo in collect_photos(args.photos):
        body = photo.read_bytes()
        if len(body) > MAX_INVOKE_BYTES:
            print(
                f"{photo}: {len(body)} bytes is over InvokeEndpoint's "
                f"{MAX_INVOKE_BYTES}-byte limit; resize it or use transform",
                file=sys.stderr,
            )
            failures += 1
            continue
        content_type = PHOTO_CONTENT_TYPES.get(photo.suffix.lower(), "application/x-image")
        try:
            response = ctx.aws.runtime.invoke_endpoint(
                EndpointName=args.endpoint,
                Body=body,
                ContentType=content_type,
                Accept="application/json",
            )
        except ClientError as error:
            detail = error.response.get("Error", {})
            print(f"{photo}: {detail.get('Code')}: {detail.get('Message')}", file=sys.stderr)
            failures += 1
            continue
        answer = response["Body"].read()
        if args.json:
            ctx.out(json.dumps({"photo": str(photo), "prediction": parse_answer(answer)}))
        else:
            ctx.out(f"{photo}: {describe_prediction(answer)}")
    return 1 if failures else 0


def command_transform(args: argparse.Namespace, ctx: Context) -> int:
    require(args, "input", "instance_type")
    job = check_name(args.job_name or timestamped_name(f"{DEFAULT_PREFIX}-transform"), "job name")
    input_uri = as_prefix(args.input)
    check_photo_prefix(ctx.aws.s3, input_uri)
    if args.output:
        output = args.output
    else:
        require(args, "bucket")
        output = f"s3://{args.bucket}/{args.prefix}/transform/{job}/"
    if args.model:
        model = args.model
    else:
        model = job
        create_model(args, ctx, model, model_source(args, ctx))
    request: dict[str, Any] = {
        "TransformJobName": job,
        "ModelName": model,
        # One photo per request: the container answers one JSON per photo.
        "BatchStrategy": "SingleRecord",
        "MaxPayloadInMB": args.max_payload_mb,
        "ModelClientConfig": {
            "InvocationsTimeoutInSeconds": args.invocations_timeout,
            "InvocationsMaxRetries": 1,
        },
        "TransformInput": {
            "DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": input_uri}},
            "ContentType": "application/x-image",
            "SplitType": "None",
        },
        "TransformOutput": {
            "S3OutputPath": output,
            "Accept": "application/json",
            "AssembleWith": "None",
        },
        "TransformResources": {
            "InstanceType": args.instance_type,
            "InstanceCount": args.instance_count,
        },
        "Tags": tag_list(args.tags),
    }
    if args.max_concurrent:
        request["MaxConcurrentTransforms"] = args.max_concurrent
    ctx.aws.sagemaker.create_transform_job(**request)
    ctx.out(
        f"transform job {job} created: {input_uri} -> {output} (one <photo>.out JSON per photo)"
    )
    if not args.wait:
        return 0
    last = None
    while True:
        d = ctx.aws.sagemaker.describe_transform_job(TransformJobName=job)
        status = d["TransformJobStatus"]
        if status != last:
            ctx.out(f"[{status}] {job}")
            last = status
        if status in JOB_TERMINAL:
            break
        ctx.sleep(args.poll_seconds)
    if status != "Completed":
        raise JobFailed(f"transform job {job} {status}: {d.get('FailureReason', '')}")
    ctx.out(f"predictions in {output}")
    return 0


def check_photo_prefix(s3: Any, uri: str) -> None:
    """Batch transform sends every object under the prefix to the model: only photos belong."""
    bucket, prefix = split_s3_uri(uri)
    keys = [
        item["Key"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for item in page.get("Contents", [])
        if not item["Key"].endswith("/")
    ]
    if not keys:
        raise SettingsError(f"no objects under {uri}")
    strangers = [key for key in keys if Path(key).suffix.lower() not in PHOTO_CONTENT_TYPES]
    if strangers:
        raise SettingsError(
            f"{len(strangers)} objects under {uri} are not photos (e.g. {strangers[0]}); "
            "batch transform would send them to the model: use a prefix that holds photos only"
        )


def command_delete(args: argparse.Namespace, ctx: Context) -> int:
    sm = ctx.aws.sagemaker
    configs = list(args.endpoint_config or [])
    models = list(args.model or [])
    if not (args.endpoint or configs or models):
        raise SettingsError(
            "nothing to delete: pass --endpoint NAME (and/or --endpoint-config, --model)"
        )
    if args.endpoint:
        config = sm.describe_endpoint(EndpointName=args.endpoint)["EndpointConfigName"]
        variants = sm.describe_endpoint_config(EndpointConfigName=config)["ProductionVariants"]
        sm.delete_endpoint(EndpointName=args.endpoint)
        ctx.out(f"endpoint {args.endpoint} deleted (billing stops as its instances shut down)")
        configs.insert(0, config)
        if not args.keep_model:
            models[:0] = [variant["ModelName"] for variant in variants]
    for config in configs:
        sm.delete_endpoint_config(EndpointConfigName=config)
        ctx.out(f"endpoint config {config} deleted")
    for model in models:
        sm.delete_model(ModelName=model)
        ctx.out(f"model {model} deleted")
    return 0


# ---------------------------------------------------------------- command line


def build_parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="FILE",
        help=f"TOML settings (default ${CONFIG_ENV} or {DEFAULT_CONFIG})",
    )
    common.add_argument(
        "--region", help="AWS region (env AWS_REGION / AWS_DEFAULT_REGION, or the AWS profile's)"
    )
    common.add_argument(
        "--poll-seconds", type=float, default=15.0, help="seconds between status polls (default 15)"
    )

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train, watch, deploy, invoke and clean up the species classifier on "
        "SageMaker (boto3 only).",
        epilog="Settings: flags, then environment (SPECIES_ROLE_ARN, SPECIES_BUCKET, "
        "SPECIES_IMAGE, SPECIES_PREFIX, AWS_REGION), then the config file "
        f"(--config, ${CONFIG_ENV} or {DEFAULT_CONFIG}). See docs/sagemaker.md.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    subs: dict[str, argparse.ArgumentParser] = {}

    def add(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=help_text, description=help_text)
        subs[name] = sub
        return sub

    def pairs(sub, flag: str, dest: str, help_text: str) -> None:
        sub.add_argument(
            flag, dest=dest, action="append", type=parse_pair, metavar="KEY=VALUE", help=help_text
        )

    train = add(
        "train", "upload the data if local, create a training job, optionally follow it to the end"
    )
    train.add_argument("--image", help="ECR image URI (env SPECIES_IMAGE)")
    train.add_argument("--role", help="SageMaker execution role ARN (env SPECIES_ROLE_ARN)")
    train.add_argument(
        "--data", help="training channel: a local folder (uploaded) or an s3:// prefix"
    )
    train.add_argument(
        "--output", help="S3 URI for model and output archives (default s3://BUCKET/PREFIX/output/)"
    )
    train.add_argument(
        "--bucket", help="bucket for uploads and default outputs (env SPECIES_BUCKET)"
    )
    train.add_argument(
        "--prefix",
        default=DEFAULT_PREFIX,
        help=f"key prefix in the bucket (default {DEFAULT_PREFIX})",
    )
    train.add_argument(
        "--upload-to",
        metavar="S3_URI",
        help="where a local --data goes (default s3://BUCKET/PREFIX/data/FOLDER/)",
    )
    train.add_argument("--instance-type", help="e.g. ml.g5.2xlarge, ml.g6.2xlarge, ml.g4dn.xlarge")
    train.add_argument(
        "--instance-count",
        type=int,
        default=1,
        help="instances; each gets the whole channel (default 1)",
    )
    train.add_argument(
        "--volume-size", type=int, default=50, help="EBS GB per instance (default 50)"
    )
    train.add_argument(
        "--max-runtime",
        type=parse_duration,
        default=6 * 3600,
        help="stop after this long: 3600, 90m, 6h, 2d (default 6h)",
    )
    train.add_argument(
        "--spot",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="managed spot training (resumes from checkpoints)",
    )
    train.add_argument(
        "--max-wait",
        type=parse_duration,
        help="spot only: run time plus waiting for capacity (default 2 x max runtime)",
    )
    train.add_argument(
        "--checkpoint-s3",
        metavar="S3_URI",
        help="checkpoint prefix (default OUTPUT/JOB/checkpoints/)",
    )
    train.add_argument(
        "--input-mode",
        choices=["File", "FastFile"],
        default="File",
        help="channel input mode (default File)",
    )
    train.add_argument(
        "--network-isolation",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="no network in the container",
    )
    train.add_argument("--job-name", help="default species-classifier-YYYYMMDD-HHMMSS-mmm")
    pairs(
        train,
        "--hyperparameter",
        "hyperparameters",
        "repeatable; sent as strings (target_species is required)",
    )
    pairs(train, "--env", "env", "repeatable container environment variable")
    pairs(train, "--tag", "tags", "repeatable tag (project=species-classifier is always added)")
    train.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="stream logs until the job ends, then download its output",
    )
    train.add_argument(
        "--download-dir",
        default="sagemaker-output",
        help="where --wait unpacks the output (default ./sagemaker-output/JOB)",
    )

    for name, text in (
        ("status", "describe a training job"),
        ("stop", "stop a training job (SIGTERM, SIGKILL after 120 s)"),
    ):
        add(name, text).add_argument("job", help="training job name")
    logs = add("logs", "print a training job's log (all hosts, in time order)")
    logs.add_argument("job", help="training job name")
    logs.add_argument(
        "--follow",
        action="store_true",
        help="keep streaming until the job ends; non-zero exit if it fails",
    )

    def model_options(sub, creates_what: str) -> None:
        source = sub.add_mutually_exclusive_group()
        source.add_argument(
            "--training-job", help=f"serve this Completed job's model ({creates_what})"
        )
        source.add_argument("--model-data", metavar="S3_URI", help="serve this model.tar.gz")
        sub.add_argument(
            "--image", help="serving image (default: the training job's image; env SPECIES_IMAGE)"
        )
        sub.add_argument("--role", help="execution role ARN for the model (env SPECIES_ROLE_ARN)")
        pairs(
            sub,
            "--env",
            "env",
            "repeatable container environment variable, e.g. SAGEMAKER_MODEL_SERVER_WORKERS=1",
        )
        pairs(sub, "--tag", "tags", "repeatable tag")

    deploy = add(
        "deploy",
        "create or update an endpoint from a training job or a model.tar.gz, wait for InService",
    )
    deploy.add_argument(
        "--endpoint", help="endpoint name (created, or updated in place if it exists)"
    )
    model_options(deploy, "creates a model")
    deploy.add_argument(
        "--instance-type", help="e.g. ml.g5.xlarge, ml.g6.xlarge, ml.g4dn.xlarge, ml.m5.xlarge"
    )
    deploy.add_argument("--instance-count", type=int, default=1, help="default 1")
    deploy.add_argument(
        "--startup-timeout",
        type=int,
        default=600,
        help="seconds for /ping to pass after start (60-3600, default 600)",
    )
    deploy.add_argument(
        "--download-timeout",
        type=int,
        default=600,
        help="seconds to download the model (60-3600, default 600)",
    )
    deploy.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wait until InService (default)",
    )

    invoke = add(
        "invoke", "send photos (files or folders) to an endpoint and print the predictions"
    )
    invoke.add_argument("photos", nargs="+", metavar="PHOTO_OR_FOLDER")
    invoke.add_argument("--endpoint", help="endpoint name")
    invoke.add_argument("--json", action="store_true", help="print each answer as one JSON line")

    transform = add("transform", "batch transform over an S3 prefix of photos")
    transform.add_argument("--input", metavar="S3_URI", help="prefix holding only photos")
    transform.add_argument(
        "--output", metavar="S3_URI", help="default s3://BUCKET/PREFIX/transform/JOB/"
    )
    transform.add_argument("--bucket", help="bucket for the default output (env SPECIES_BUCKET)")
    transform.add_argument(
        "--prefix", default=DEFAULT_PREFIX, help=f"key prefix (default {DEFAULT_PREFIX})"
    )
    transform.add_argument("--model", help="an existing SageMaker model (e.g. one deploy created)")
    model_options(transform, "creates a model named after the job")
    transform.add_argument("--instance-type", help="e.g. ml.g4dn.xlarge, ml.m5.xlarge")
    transform.add_argument("--instance-count", type=int, default=1, help="default 1")
    transform.add_argument(
        "--job-name", help="default species-classifier-transform-YYYYMMDD-HHMMSS-mmm"
    )
    transform.add_argument(
        "--max-payload-mb", type=int, default=6, help="largest photo in MB (default 6, max 100)"
    )
    transform.add_argument(
        "--max-concurrent",
        type=int,
        help="parallel requests per instance (default: the container's)",
    )
    transform.add_argument(
        "--invocations-timeout", type=int, default=600, help="seconds per request (default 600)"
    )
    transform.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="wait for the job to end",
    )

    delete = add(
        "delete", "delete an endpoint with its endpoint config and model, or leftovers by name"
    )
    delete.add_argument("--endpoint", help="endpoint to delete, with its current config and model")
    delete.add_argument(
        "--endpoint-config", action="append", help="also delete this endpoint config (repeatable)"
    )
    delete.add_argument("--model", action="append", help="also delete this model (repeatable)")
    delete.add_argument(
        "--keep-model", action="store_true", help="keep the endpoint's model (e.g. for transform)"
    )
    return parser, subs


COMMANDS: dict[str, Callable[[argparse.Namespace, Context], int]] = {
    "train": command_train,
    "status": command_status,
    "logs": command_logs,
    "stop": command_stop,
    "deploy": command_deploy,
    "invoke": command_invoke,
    "transform": command_transform,
    "delete": command_delete,
}


def parse_arguments(argv: Sequence[str], environ: Mapping[str, str]) -> argparse.Namespace:
    path, named = config_path(argv, environ)
    config = load_config(path, named)
    parser, subs = build_parsers()
    check_config_keys(config, subs, path)
    for name, sub in subs.items():
        sub.set_defaults(**defaults_for_command(name, parser_dests(sub), config, environ, path))
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
) -> int:
    """Run one command; the exit code: 0 done, 1 AWS or job failure, 2 settings, 130 interrupted."""
    argv = list(sys.argv[1:] if argv is None else argv)
    environ = os.environ if environ is None else environ
    try:
        args = parse_arguments(argv, environ)
        region = resolve_region(args, session_factory)
        ctx = Context(aws=Aws(session_factory(region_name=region)), region=region, sleep=sleep)
        return COMMANDS[args.command](args, ctx)
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except JobFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except ClientError as error:
        detail = error.response.get("Error", {})
        print(
            f"error: {detail.get('Code', 'Error')}: {detail.get('Message', error)}", file=sys.stderr
        )
        return 1
    except BotoCoreError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

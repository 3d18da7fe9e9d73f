"""Training jobs: `train` (upload, create, follow), `status`, `logs` and `stop`, with the log tail.

`train` validates the whole request (settings, names, every documented limit) before it
uploads a byte. Following a job prints each status change and every host's CloudWatch lines in
time order, reports the final metrics and unpacks the job's output locally.
"""

from __future__ import annotations

import argparse
import json
import re
import tarfile
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError
from species_classifier.contract import preflight
from species_classifier.contract.metric_lines import METRIC_DEFINITIONS
from species_classifier.contract.paths import DEFAULT_CHECKPOINT_DIR, TRAINING_CHANNEL

from species_tools.aws import SettingsError, error_code, is_not_found, split_s3_uri
from species_tools.launcher import limits
from species_tools.launcher.session import Command, Context, JobFailed, poll_until
from species_tools.launcher.settings import (
    DEFAULT_CONFIG,
    DEFAULT_PREFIX,
    PROG,
    SettingsParser,
    add_pairs,
    as_prefix,
    check_name,
    format_duration,
    join_s3,
    parse_duration,
    require,
    tag_list,
    timestamped_name,
)
from species_tools.launcher.upload import (
    channel_files,
    check_channel_csv,
    content_name,
    upload_channel,
)

TRAINING_LOG_GROUP = "/aws/sagemaker/TrainingJobs"
JOB_TERMINAL = ("Completed", "Failed", "Stopped")
MAX_RUNTIME_LIMIT_S = 28 * 24 * 3600
MAX_KEEP_ALIVE_S = 6 * 3600  # ResourceConfig.KeepAlivePeriodInSeconds in the service model
MAX_RETRIES = 30
# Beyond its stopping condition a job still starts instances, downloads data and uploads
# the model: the watch gives up this long after SageMaker itself would have stopped the job.
WATCH_MARGIN_S = 2 * 3600
TRAINING_ENVIRONMENT_ENTRIES = 100
TRAINING_ENVIRONMENT_LENGTH = 512


# ---------------------------------------------------------------- train


def add_job_arguments(train: SettingsParser) -> None:
    """What defines a training job: shared by `train` and `tune` (whose trials are such jobs)."""
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
        help="where a local --data goes (default s3://BUCKET/PREFIX/data/FOLDER-CONTENTHASH/)",
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
        help="managed spot training (a train job resumes from its checkpoints)",
    )
    train.add_argument(
        "--max-wait",
        type=parse_duration,
        help="spot only: run time plus waiting for capacity (default 2 x max runtime)",
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
    train.add_argument(
        "--retries",
        type=int,
        help="retry the job up to N times (1-30) when SageMaker fails it with an internal error; "
        "each attempt of a train job resumes from the same checkpoints",
    )
    add_pairs(
        train,
        "--hyperparameter",
        "hyperparameters",
        "repeatable; sent as strings (target_species is required), checked first with the "
        "image's own parser",
    )
    add_pairs(train, "--env", "env", "repeatable container environment variable")
    add_pairs(train, "--tag", "tags", "repeatable tag (project=species-classifier is always added)")


def add_train_arguments(train: SettingsParser) -> None:
    add_job_arguments(train)
    train.add_argument(
        "--checkpoint-s3",
        metavar="S3_URI",
        help="checkpoint prefix (default OUTPUT/JOB/checkpoints/)",
    )
    train.add_argument(
        "--keep-alive",
        type=parse_duration,
        help="warm pool: keep the instances this long after the job (e.g. 30m, at most 6h; not "
        "with --spot) so the next matching job starts in seconds; billed while kept",
    )
    train.add_argument(
        "--resume",
        metavar="JOB",
        help="start from JOB's checkpoints (a stopped, failed or interrupted job of this command)",
    )
    train.add_argument("--job-name", help="default species-classifier-YYYYMMDD-HHMMSS-mmm")
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


def stopping_condition(args: argparse.Namespace) -> dict[str, int]:
    if not 1 <= args.max_runtime <= MAX_RUNTIME_LIMIT_S:
        raise SettingsError(f"--max-runtime is 1s to 28d, got {format_duration(args.max_runtime)}")
    stopping = {"MaxRuntimeInSeconds": args.max_runtime}
    if args.spot:
        max_wait = args.max_wait or 2 * args.max_runtime
        if max_wait < args.max_runtime:
            raise SettingsError(
                f"--max-wait ({format_duration(max_wait)}) must be at least --max-runtime "
                f"({format_duration(args.max_runtime)}): it counts run time plus waiting for spot"
            )
        stopping["MaxWaitTimeInSeconds"] = max_wait
    return stopping


def checked_hyperparameters(args: argparse.Namespace) -> dict[str, str]:
    hyperparameters = {key: str(value) for key, value in args.hyperparameters or []}
    if not hyperparameters.get("target_species"):
        raise SettingsError(
            "missing hyperparameter target_species: pass "
            "--hyperparameter target_species=SPECIES,SPECIES or put it under "
            f"[{args.command}.hyperparameters] in {DEFAULT_CONFIG}"
        )
    limits.check_hyperparameters(hyperparameters)
    check_with_the_images_rules(hyperparameters)
    return hyperparameters


def check_with_the_images_rules(hyperparameters: Mapping[str, str]) -> None:
    """Names and values as the image's own parser reads them: what the job would refuse or
    silently ignore on a billed instance is refused here, before any upload."""
    try:
        preflight.check_hyperparameters(hyperparameters)
    except preflight.ConfigError as error:
        message = str(error)
        raise SettingsError(
            message if message.startswith("unknown") else f"hyperparameter {message}"
        ) from None


def checked_tags(args: argparse.Namespace) -> list[dict[str, str]]:
    tags = tag_list(args.tags)
    limits.check_tags(tags)
    return tags


def job_definition(args: argparse.Namespace, data_uri: str, output: str) -> dict[str, Any]:
    """What a training job and a tuning trial share: image, data, resources, stopping..."""
    limits.check_instance_type(args.instance_type)
    environment = dict(args.env or [])
    limits.check_environment(
        environment, "a training job", TRAINING_ENVIRONMENT_ENTRIES, TRAINING_ENVIRONMENT_LENGTH
    )
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
    definition: dict[str, Any] = {
        "RoleArn": args.role,
        "AlgorithmSpecification": {
            "TrainingImage": args.image,
            "TrainingInputMode": "File",
            "MetricDefinitions": METRIC_DEFINITIONS,
        },
        "InputDataConfig": [channel],
        "OutputDataConfig": {"S3OutputPath": output},
        "ResourceConfig": {
            "InstanceType": args.instance_type,
            "InstanceCount": args.instance_count,
            "VolumeSizeInGB": args.volume_size,
        },
        "StoppingCondition": stopping_condition(args),
        "EnableManagedSpotTraining": bool(args.spot),
        "EnableNetworkIsolation": bool(args.network_isolation),
    }
    if environment:
        definition["Environment"] = environment
    if args.retries is not None:
        limits.check_range(args.retries, 1, MAX_RETRIES, "--retries")
        definition["RetryStrategy"] = {"MaximumRetryAttempts": args.retries}
    return definition


def training_job_request(args: argparse.Namespace, job: str, data_uri: str, output: str) -> dict:
    """The CreateTrainingJob request, every documented limit checked."""
    hyperparameters = checked_hyperparameters(args)
    tags = checked_tags(args)
    request: dict[str, Any] = {
        "TrainingJobName": job,
        **job_definition(args, data_uri, output),
        "HyperParameters": hyperparameters,
        # Always checkpoint: a spot restart resumes, and so does a retry of an on-demand job.
        "CheckpointConfig": {
            "S3Uri": args.checkpoint_s3 or join_s3(output, job, "checkpoints") + "/",
            "LocalPath": DEFAULT_CHECKPOINT_DIR,
        },
        "Tags": tags,
    }
    request["AlgorithmSpecification"]["EnableSageMakerMetricsTimeSeries"] = True
    if args.keep_alive:
        limits.check_range(args.keep_alive, 1, MAX_KEEP_ALIVE_S, "--keep-alive (seconds)")
        if args.spot:
            raise SettingsError("--keep-alive: SageMaker keeps no warm pool for spot instances")
        request["ResourceConfig"]["KeepAlivePeriodInSeconds"] = args.keep_alive
    return request


def checkpoints_of(ctx: Context, job: str) -> str:
    """The checkpoint prefix an earlier job wrote, for --resume."""
    description = ctx.aws.sagemaker.describe_training_job(TrainingJobName=job)
    uri = (description.get("CheckpointConfig") or {}).get("S3Uri")
    if not uri:
        raise SettingsError(f"--resume {job}: that job kept no checkpoints (no CheckpointConfig)")
    return uri


def output_location(args: argparse.Namespace) -> str:
    """Where jobs put their model and output archives: --output, or s3://BUCKET/PREFIX/output/."""
    if args.output:
        return args.output
    require(args, "bucket")
    return f"s3://{args.bucket}/{args.prefix}/output/"


def training_data_location(args: argparse.Namespace) -> tuple[str, Path | None, list[Path]]:
    """The channel's S3 prefix, and the local folder and files to upload there (none for S3)."""
    if args.data.startswith("s3://"):
        return as_prefix(args.data), None, []
    folder = Path(args.data).expanduser()
    if not folder.is_dir():
        raise SettingsError(f"--data {args.data}: no such folder (or give an s3:// URI)")
    check_channel_csv(folder, dict(args.hyperparameters or []).get("csv_file"))
    files = channel_files(folder)
    if args.upload_to:
        data_uri = as_prefix(args.upload_to)
        split_s3_uri(data_uri)
        return data_uri, folder, files
    require(args, "bucket")
    return f"s3://{args.bucket}/{args.prefix}/data/{content_name(folder, files)}/", folder, files


def command_train(args: argparse.Namespace, ctx: Context) -> int:
    require(args, "image", "role", "instance_type", "data")
    job = check_name(args.job_name or timestamped_name(DEFAULT_PREFIX), "job name")
    output = output_location(args)
    data_uri, folder, files = training_data_location(args)
    # The whole request is validated before any upload.
    request = training_job_request(args, job, data_uri, output)
    if args.resume:
        if args.checkpoint_s3:
            raise SettingsError("pass --resume JOB or --checkpoint-s3 URI, not both")
        request["CheckpointConfig"]["S3Uri"] = checkpoints_of(ctx, args.resume)
    if folder is not None:
        upload_channel(ctx.aws.s3, folder, files, data_uri, ctx.out)
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
    ctx.out(f"  data:        {data_uri}")
    ctx.out(f"  output:      {output}")
    resumed = f" (from {args.resume})" if args.resume else ""
    ctx.out(f"  checkpoints: {request['CheckpointConfig']['S3Uri']}{resumed}")
    ctx.out(f"  console:     {console_url(ctx.region, job)}")
    if not args.wait:
        ctx.out(f"watch it: {PROG} logs {job} --follow   (status: {PROG} status {job})")
        return 0
    return watch_and_collect(job, ctx, args.poll_seconds, download_dir=Path(args.download_dir))


def console_url(region: str, job: str) -> str:
    return f"https://{region}.console.aws.amazon.com/sagemaker/home?region={region}#/jobs/{job}"


# ---------------------------------------------------------------- following a job


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
            if not is_not_found(error):
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
            # A page can be empty before the end of the stream; the end is where the forward
            # token comes back unchanged.
            if response["nextForwardToken"] == token:
                break
            token = response["nextForwardToken"]
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


def print_log_events(events: Iterable[tuple[int, str, str]], with_host: bool, out) -> None:
    for _, host, message in events:
        out(f"[{host}] {message}" if with_host else message)


def status_line(description: Mapping[str, Any]) -> str:
    status = description["TrainingJobStatus"]
    secondary = description.get("SecondaryStatus", "")
    transitions = description.get("SecondaryStatusTransitions") or [{}]
    message = transitions[-1].get("StatusMessage", "")
    return f"[{status}] {secondary}" + (f": {message}" if message else "")


def watch_limit_s(description: Mapping[str, Any]) -> int:
    """How long SageMaker lets the job run (spot: run plus wait), plus the watch margin."""
    stopping = description.get("StoppingCondition") or {}
    longest = max(
        stopping.get("MaxRuntimeInSeconds", MAX_RUNTIME_LIMIT_S),
        stopping.get("MaxWaitTimeInSeconds", 0),
    )
    return longest + WATCH_MARGIN_S


def watch_training_job(job: str, ctx: Context, poll_seconds: float) -> dict[str, Any]:
    """Print status changes and every host's log lines until the job ends; its last description."""
    tail = LogTail(ctx.aws.logs, TRAINING_LOG_GROUP, f"{job}/")
    printed = {"status": ""}
    first = ctx.aws.sagemaker.describe_training_job(TrainingJobName=job)
    several_hosts = first["ResourceConfig"].get("InstanceCount", 1) > 1

    def describe() -> dict[str, Any]:
        description = ctx.aws.sagemaker.describe_training_job(TrainingJobName=job)
        line = status_line(description)
        if line != printed["status"]:
            ctx.out(line)
            printed["status"] = line
        print_log_events(tail.new_events(), several_hosts, ctx.out)
        return description

    description = poll_until(
        describe,
        lambda d: d["TrainingJobStatus"] in JOB_TERMINAL,
        what=f"training job {job} to end",
        timeout_s=watch_limit_s(first),
        poll_seconds=poll_seconds,
        ctx=ctx,
    )
    # CloudWatch delivers the last lines shortly after the job ends: read once more.
    ctx.sleep(poll_seconds)
    print_log_events(tail.new_events(), several_hosts, ctx.out)
    return description


def watch_and_collect(
    job: str, ctx: Context, poll_seconds: float, download_dir: Path | None
) -> int:
    """Follow a job to its end; report the outcome; exit code 0 only for Completed."""
    try:
        description = watch_training_job(job, ctx, poll_seconds)
    except KeyboardInterrupt:
        ctx.err(
            f"stopped watching; training job {job} keeps running (and billing). "
            f"Stop it with: {PROG} stop {job}"
        )
        return 130
    status = description["TrainingJobStatus"]
    if status != "Completed":
        reason = description.get("FailureReason") or description.get("SecondaryStatus", "")
        raise JobFailed(f"training job {job} {status}: {reason}")
    report_training_outcome(description, ctx)
    if download_dir is not None:
        download_training_output(description, download_dir, ctx)
    return 0


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
                ctx.err(f"warning: no output archive at {uri}")
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


# ---------------------------------------------------------------- status, logs, stop


def add_job_argument(parser: SettingsParser) -> None:
    parser.add_argument("job", help="training job name")


def add_logs_arguments(parser: SettingsParser) -> None:
    add_job_argument(parser)
    parser.add_argument(
        "--follow",
        action="store_true",
        help="keep streaming until the job ends; non-zero exit if it fails",
    )


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
    pool = d.get("WarmPoolStatus")
    if pool:
        billable = pool.get("ResourceRetainedBillableTimeInSeconds")
        ctx.out(
            f"warm pool: {pool['Status']}"
            + (f", {billable} s billable while kept" if billable is not None else "")
            + (f", reused by {pool['ReusedByName']}" if pool.get("ReusedByName") else "")
        )
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


COMMANDS = [
    Command(
        "train",
        "upload the data if local, create a training job, optionally follow it to the end",
        add_train_arguments,
        command_train,
    ),
    Command("status", "describe a training job", add_job_argument, command_status),
    Command(
        "logs",
        "print a training job's log (all hosts, in time order)",
        add_logs_arguments,
        command_logs,
    ),
    Command(
        "stop",
        "stop a training job (SIGTERM, SIGKILL after 120 s)",
        add_job_argument,
        command_stop,
    ),
]

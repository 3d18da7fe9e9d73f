"""The launcher (species_tools.launcher, run as scripts/run_job.py) against a local AWS.

moto's ThreadedMotoServer plays S3, IAM, SageMaker and CloudWatch Logs; the launcher runs its
production code path, boto3 finding the local server through AWS_ENDPOINT_URL. Every request
the launcher builds is first checked by `aws_validation` against botocore's service model and
the documented limits (moto accepts what AWS refuses): a request AWS would refuse raises there
and fails the test. Assertions are on what the service holds afterwards and what the tool
printed; where moto drops a field it was sent, on the request as it went over the wire
(recorded by a botocore `before-send` hook).

moto gaps bridged here, on the fake service's side only:
- training jobs are born Completed and endpoints InService: tests set status, secondary status
  and FailureReason in moto's backend (the service's state), the way real ones would move;
- UpdateEndpoint and StopTrainingJob are not implemented: a `before-call` hook answers them and
  applies the change to moto's backend; DescribeEndpoint never reports an update in flight, so
  a hook adds the PendingDeploymentSummary the real service would;
- moto's runtime takes only UTF-8 bodies: tests that send real photos answer InvokeEndpoint
  themselves.
Waiting is driven by the tool's injectable `sleep` and `clock`, so no test sleeps for real.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aws_validation
import boto3
import pytest
import requests
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError, ReadTimeoutError
from conftest import moto_server
from moto.core import DEFAULT_ACCOUNT_ID
from moto.sagemaker.models import sagemaker_backends
from PIL import Image
from species_classifier.metric_lines import METRIC_DEFINITIONS
from species_tools.launcher import cli

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "run_job.py"
IAM_DOCS = REPO / "docs" / "iam"
REGION = "us-east-1"
BUCKET = "species-test"
IMAGE = f"{DEFAULT_ACCOUNT_ID}.dkr.ecr.{REGION}.amazonaws.com/species-classifier:2025-01-01"
ROLE_NAME = "SpeciesClassifierSageMaker"
ROLE_ARN = f"arn:aws:iam::{DEFAULT_ACCOUNT_ID}:role/{ROLE_NAME}"
TARGETS = "Lycorma delicatula,Acer rubrum"
LOG_GROUP = "/aws/sagemaker/TrainingJobs"
# What a user would export; passed to main() as its environment.
SETTINGS = {
    "SPECIES_ROLE_ARN": ROLE_ARN,
    "SPECIES_BUCKET": BUCKET,
    "SPECIES_IMAGE": IMAGE,
    "AWS_DEFAULT_REGION": REGION,
}
# Older instance types: the ones moto validates against.
GPU = "ml.g4dn.xlarge"
CREATES = ("PutObject", "CreateMultipartUpload", "CreateTrainingJob", "CreateModel",
           "CreateEndpointConfig", "CreateEndpoint", "CreateTransformJob")  # fmt: skip


@dataclass
class LocalAws:
    endpoint: str
    env: dict[str, str]
    s3: object
    sagemaker: object
    logs: object


@pytest.fixture(scope="module")
def aws(tmp_path_factory):
    """A moto server for this module; the process environment points boto3 at it."""
    home = tmp_path_factory.mktemp("home")
    werkzeug = logging.getLogger("werkzeug")
    level = werkzeug.level
    werkzeug.setLevel(logging.ERROR)
    with moto_server(REGION) as local, pytest.MonkeyPatch.context() as patch:
        env = {
            **local,
            # No profile, credentials or ~/.species-classifier.toml of the developer's leaks in.
            "AWS_CONFIG_FILE": str(home / "aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(home / "aws-credentials"),
            "HOME": str(home),
        }
        for name, value in env.items():
            patch.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_REGION", "AWS_SESSION_TOKEN", "SPECIES_CONFIG", *SETTINGS):
            if name != "AWS_DEFAULT_REGION":
                patch.delenv(name, raising=False)
        s3 = boto3.client("s3")
        s3.create_bucket(Bucket=BUCKET)
        trust = (IAM_DOCS / "execution-role-trust.json").read_text()
        boto3.client("iam").create_role(RoleName=ROLE_NAME, AssumeRolePolicyDocument=trust)
        yield LocalAws(
            env["AWS_ENDPOINT_URL"], env, s3, boto3.client("sagemaker"), boto3.client("logs")
        )
    werkzeug.setLevel(level)


@dataclass
class Wire:
    """boto3 sessions that validate and record every request, and answer some locally.

    `answers` replace a call (before-call), `after` see its parsed answer, `sends` answer the
    HTTP request itself (before-send), so the client's own retry and error handling run.
    """

    sent: list[tuple[str, str, object]] = field(default_factory=list)
    answers: dict[str, Callable] = field(default_factory=dict)
    after: dict[str, Callable] = field(default_factory=dict)
    sends: dict[str, Callable] = field(default_factory=dict)

    def session(self, **kwargs):
        session = aws_validation.install(boto3.session.Session(**kwargs))
        session.events.register("before-send", self._record)
        for operation, answer in self.answers.items():
            session.events.register(f"before-call.{operation}", answer)
        for operation, hook in self.after.items():
            session.events.register(f"after-call.{operation}", hook)
        for operation, answer in self.sends.items():
            session.events.register(f"before-send.{operation}", answer)
        return session

    def _record(self, request, event_name, **_):
        _, service, operation = event_name.split(".")
        self.sent.append((service, operation, request))

    def bodies(self, operation: str) -> list[dict]:
        return [json.loads(r.body) for _, op, r in self.sent if op == operation]

    def operations(self) -> list[str]:
        return [op for _, op, _ in self.sent]


@dataclass
class Clock:
    """A clock that moves only when the tool sleeps; `steps` run one per sleep (the service moving)."""

    now: float = 0.0
    sleeps: int = 0
    steps: list[Callable] = field(default_factory=list)
    limit: int = 200

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        assert self.sleeps <= self.limit, "the tool kept polling: a wait without an end"
        self.now += max(seconds, 1.0)
        if self.steps:
            self.steps.pop(0)()


@pytest.fixture
def run(aws, capsys):
    """run(*argv, environ=, wire=, clock=) -> (exit code, stdout, stderr), in process."""

    def invoke(*argv, environ=SETTINGS, wire=None, clock=None):
        wire = wire or Wire()
        clock = clock or Clock()
        code = cli.main(
            [str(a) for a in argv],
            environ=environ,
            session_factory=wire.session,
            sleep=clock.sleep,
            clock=clock,
        )
        out, err = capsys.readouterr()
        return code, out, err

    return invoke


def moto_sagemaker():
    return sagemaker_backends[DEFAULT_ACCOUNT_ID][REGION]


def set_job_state(job: str, status: str, secondary: str | None = None, reason: str | None = None):
    """Move a training job the way SageMaker would (moto creates them Completed)."""
    fake = moto_sagemaker().training_jobs[job]
    fake.training_job_status = status
    fake.secondary_status = secondary or status
    if reason is not None:
        fake.failure_reason = reason


def job_name_from(parsed: dict) -> str:
    return parsed["TrainingJobArn"].rsplit("/", 1)[1]


def put_log_lines(logs, stream: str, lines: list[tuple[int, str]]) -> None:
    try:
        logs.create_log_group(logGroupName=LOG_GROUP)
    except ClientError as error:
        assert error.response["Error"]["Code"] == "ResourceAlreadyExistsException"
    try:
        logs.create_log_stream(logGroupName=LOG_GROUP, logStreamName=stream)
    except ClientError as error:
        assert error.response["Error"]["Code"] == "ResourceAlreadyExistsException"
    logs.put_log_events(
        logGroupName=LOG_GROUP,
        logStreamName=stream,
        logEvents=[{"timestamp": t, "message": m} for t, m in lines],
    )


def put_output_archive(s3, output_key_prefix: str, job: str) -> None:
    """What SageMaker uploads from /opt/ml/output/data: metrics, report, plots."""
    files = {
        "metrics.json": json.dumps({"classes": ["a"], "mean_macro_f1": 0.9, "std_macro_f1": 0.01}),
        "report.md": "# Report\n",
        "plots/confusion_pooled.png": "not really a png",
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    key = f"{output_key_prefix}/{job}/output/output.tar.gz"
    s3.put_object(Bucket=BUCKET, Key=key, Body=buffer.getvalue())


def make_channel(folder: Path) -> Path:
    (folder / "images").mkdir(parents=True)
    (folder / "labels.csv").write_text(
        "species_name,image_name\nAcer rubrum,images/a.jpg\nZenaida macroura,images/b.jpg\n"
        "Acer saccharum,images/c.png\n"
    )
    (folder / "images" / "a.jpg").write_bytes(b"\xff\xd8 photo a")
    (folder / "images" / "b.jpg").write_bytes(b"\xff\xd8 photo b")
    (folder / "images" / "c.png").write_bytes(b"\x89PNG photo c")
    (folder / ".DS_Store").write_bytes(b"finder")
    return folder


def keys_under(s3, prefix: str) -> set[str]:
    listing = s3.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return {item["Key"][len(prefix) :] for item in listing}


def train_args(job: str, *extra, data: object = f"s3://{BUCKET}/channels/demo") -> list[str]:
    return [
        "train",
        "--data",
        str(data),
        "--instance-type",
        GPU,
        "--job-name",
        job,
        "--hyperparameter",
        f"target_species={TARGETS}",
        *extra,
    ]


# ---------------------------------------------------------------- train


def uploaded_prefix(out: str) -> str:
    """The key prefix the tool says it uploaded to."""
    [line] = [line for line in out.splitlines() if line.startswith("data: uploaded")]
    return line.split(f"s3://{BUCKET}/", 1)[1].split(" ", 1)[0]


def test_train_uploads_local_data_and_creates_the_job(run, aws, tmp_path):
    data = make_channel(tmp_path / "training")
    wire = Wire()

    code, out, err = run(
        "train", "--data", data, "--instance-type", GPU, "--instance-count", "2", "--spot",
        "--max-runtime", "2h", "--job-name", "sc-upload",
        "--hyperparameter", f"target_species={TARGETS}", "--hyperparameter", "k_folds=3",
        "--hyperparameter", "pretrained=false", "--env", "PYTHONUNBUFFERED=1",
        "--tag", "team=field-biology", wire=wire,
    )  # fmt: skip

    assert code == 0, err
    prefix = uploaded_prefix(out)
    assert re.fullmatch(r"species-classifier/data/training-[0-9a-f]{10}/", prefix), prefix
    assert keys_under(aws.s3, prefix) == {
        "labels.csv",
        "images/a.jpg",
        "images/b.jpg",
        "images/c.png",
    }
    assert f"uploaded 4 files to s3://{BUCKET}/{prefix} (0 already there)" in out
    job = aws.sagemaker.describe_training_job(TrainingJobName="sc-upload")
    assert job["AlgorithmSpecification"]["TrainingImage"] == IMAGE
    assert job["RoleArn"] == ROLE_ARN
    assert job["EnableManagedSpotTraining"] is True
    assert job["StoppingCondition"] == {"MaxRuntimeInSeconds": 7200, "MaxWaitTimeInSeconds": 14400}
    assert job["CheckpointConfig"] == {
        "S3Uri": f"s3://{BUCKET}/species-classifier/output/sc-upload/checkpoints/",
        "LocalPath": "/opt/ml/checkpoints",
    }
    assert job["HyperParameters"] == {
        "target_species": TARGETS,
        "k_folds": "3",
        "pretrained": "false",
    }
    assert job["ResourceConfig"]["InstanceType"] == GPU
    assert job["ResourceConfig"]["InstanceCount"] == 2
    [channel] = job["InputDataConfig"]
    assert channel["ChannelName"] == "training"
    assert channel["DataSource"]["S3DataSource"] == {
        "S3DataType": "S3Prefix",
        "S3Uri": f"s3://{BUCKET}/{prefix}",
        "S3DataDistributionType": "FullyReplicated",
    }
    [sent] = wire.bodies("CreateTrainingJob")
    assert sent["AlgorithmSpecification"]["MetricDefinitions"] == METRIC_DEFINITIONS
    assert sent["Environment"] == {"PYTHONUNBUFFERED": "1"}
    assert {"Key": "team", "Value": "field-biology"} in sent["Tags"]
    assert {"Key": "project", "Value": "species-classifier"} in sent["Tags"]

    # Same size, other bytes in S3: that file alone is sent again.
    aws.s3.put_object(Bucket=BUCKET, Key=prefix + "images/b.jpg", Body=b"\xff\xd8 photo B")
    code, out, err = run(
        "train", "--data", data, "--instance-type", GPU, "--job-name", "sc-upload-again",
        "--hyperparameter", f"target_species={TARGETS}",
    )  # fmt: skip
    assert code == 0, err
    assert f"uploaded 1 files to s3://{BUCKET}/{prefix} (3 already there)" in out
    body = aws.s3.get_object(Bucket=BUCKET, Key=prefix + "images/b.jpg")["Body"].read()
    assert body == b"\xff\xd8 photo b"


def test_two_folders_with_one_name_never_share_a_prefix(run, aws, tmp_path):
    first = make_channel(tmp_path / "first" / "training")
    second = make_channel(tmp_path / "second" / "training")
    (second / "labels.csv").rename(second / "species.csv")
    (second / "images" / "d.jpg").write_bytes(b"\xff\xd8 photo d")
    prefixes = []
    for job, folder in (("sc-same-name-1", first), ("sc-same-name-2", second)):
        code, out, err = run(*train_args(job, data=folder))
        assert code == 0, err
        prefixes.append(uploaded_prefix(out))

    assert prefixes[0] != prefixes[1]
    assert keys_under(aws.s3, prefixes[0]) == {"labels.csv", "images/a.jpg", "images/b.jpg",
                                               "images/c.png"}  # fmt: skip
    assert keys_under(aws.s3, prefixes[1]) == {"species.csv", "images/a.jpg", "images/b.jpg",
                                               "images/c.png", "images/d.jpg"}  # fmt: skip


def test_an_upload_prefix_holding_other_objects_is_refused(run, aws, tmp_path):
    data = make_channel(tmp_path / "training")
    aws.s3.put_object(Bucket=BUCKET, Key="species-classifier/shared/old.csv", Body=b"a,b\n")
    wire = Wire()

    code, _, err = run(
        *train_args(
            "sc-stale", "--upload-to", f"s3://{BUCKET}/species-classifier/shared", data=data
        ),
        wire=wire,
    )

    assert code == 2
    [line] = err.strip().splitlines()
    assert f"s3://{BUCKET}/species-classifier/shared/ already holds 1 objects" in line
    assert "species-classifier/shared/old.csv" in line
    assert not set(wire.operations()) & set(CREATES)


@pytest.mark.parametrize(
    ("layout", "hyperparameters", "message"),
    [
        ({"images/labels.csv": "species_name,image_name\n"}, [], "no CSV in the training channel"),
        ({"a.csv": "x", "b.csv": "y"}, [], "several CSVs in the training channel (a.csv, b.csv)"),
        ({"a.csv": "x"}, ["--hyperparameter", "csv_file=b.csv"], "csv_file='b.csv' is not in"),
    ],
)
def test_the_channel_csv_rule_is_the_containers(run, tmp_path, layout, hyperparameters, message):
    folder = tmp_path / "training"
    for name, text in layout.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    wire = Wire()

    code, _, err = run(*train_args("sc-csv", *hyperparameters, data=folder), wire=wire)

    assert code == 2
    [line] = err.strip().splitlines()
    assert message in line and line.startswith(f"error: --data {folder}:"), line
    assert wire.operations() == []


TOO_MANY = [arg for i in range(100) for arg in ("--hyperparameter", f"h{i}=1")]
FIFTY_TAGS = [arg for i in range(50) for arg in ("--tag", f"t{i}=v")]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (TOO_MANY, "101 hyperparameters: SageMaker takes at most 100"),
        (["--hyperparameter", "notes=" + "x" * 2501], "hyperparameter notes has a value of 2501 characters: at most 2500"),
        (["--hyperparameter", "k" * 257 + "=1"], "257 characters: 1 to 256 allowed"),
        (FIFTY_TAGS, "51 tags (project=species-classifier included): at most 50"),
        (["--tag", "team=field biology!"], "tag value 'field biology!': only letters, digits, spaces"),
        (["--tag", "aws:owner=me"], "tag key 'aws:owner': the aws: prefix is reserved"),
        (["--env", "1BAD=x"], "environment variable name '1BAD': letters, digits and _"),
        (["--env", "NOTE=" + "x" * 513], "environment variable NOTE has a value of 513 characters: at most 512"),
        (["--job-name", "under_score"], "invalid job name 'under_score'"),
        (["--spot", "--max-runtime", "2h", "--max-wait", "1h"], "--max-wait (1h) must be at least --max-runtime (2h)"),
        (["--max-runtime", "29d"], "--max-runtime is 1s to 28d, got 29d"),
        (["--keep-alive", "7h"], "--keep-alive (seconds) must be between 1 and 21600, got 25200"),
        (["--spot", "--keep-alive", "10m"], "--keep-alive: SageMaker keeps no warm pool for spot"),
        (["--retries", "31"], "--retries must be between 1 and 30, got 31"),
    ],
)  # fmt: skip
def test_training_limits_are_checked_before_any_upload(run, tmp_path, extra, message):
    data = make_channel(tmp_path / "training")
    wire = Wire()

    code, _, err = run(*train_args("sc-limits", *extra, data=data), wire=wire)

    assert code == 2
    [line] = err.strip().splitlines()
    assert message in line, line
    assert wire.operations() == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-payload-mb", "101"], "--max-payload-mb must be between 0 and 100, got 101"),
        (["--max-payload-mb", "30", "--max-concurrent", "4"], "--max-concurrent 4 x --max-payload-mb 30 = 120"),
        (["--invocations-timeout", "3601"], "--invocations-timeout must be between 1 and 3600"),
    ],
)  # fmt: skip
def test_transform_limits_are_checked_before_any_call(run, extra, message):
    wire = Wire()
    code, _, err = run(
        "transform", "--input", f"s3://{BUCKET}/batch/photos/", "--model-data",
        f"s3://{BUCKET}/m/model.tar.gz", "--instance-type", "ml.m5.xlarge", *extra, wire=wire,
    )  # fmt: skip
    assert code == 2
    [line] = err.strip().splitlines()
    assert message in line, line
    assert wire.operations() == []


def test_warm_pool_retries_and_resume_reach_the_request(run, aws):
    wire = Wire()
    code, out, err = run(*train_args("sc-warm", "--keep-alive", "30m", "--retries", "3"), wire=wire)
    assert code == 0, err
    [sent] = wire.bodies("CreateTrainingJob")
    assert sent["ResourceConfig"]["KeepAlivePeriodInSeconds"] == 1800
    assert sent["RetryStrategy"] == {"MaximumRetryAttempts": 3}
    first = f"s3://{BUCKET}/species-classifier/output/sc-warm/checkpoints/"
    # Retried attempts are the same job: its checkpoint prefix does not change between them.
    assert sent["CheckpointConfig"]["S3Uri"] == first

    wire = Wire()
    code, out, err = run(*train_args("sc-warm-resumed", "--resume", "sc-warm"), wire=wire)
    assert code == 0, err
    [sent] = wire.bodies("CreateTrainingJob")
    assert sent["CheckpointConfig"]["S3Uri"] == first
    assert f"checkpoints: {first} (from sc-warm)" in out

    def pool_kept(parsed, **_):
        # What SageMaker reports once the job is done and its instances wait (moto has no pools).
        parsed["WarmPoolStatus"] = {
            "Status": "Available",
            "ResourceRetainedBillableTimeInSeconds": 420,
        }

    code, out, _ = run(
        "status", "sc-warm", wire=Wire(after={"sagemaker.DescribeTrainingJob": pool_kept})
    )
    assert code == 0 and "warm pool: Available, 420 s billable while kept" in out

    code, _, err = run(*train_args("sc-warm-2", "--resume", "sc-warm", "--checkpoint-s3", first))
    assert code == 2 and "pass --resume JOB or --checkpoint-s3 URI, not both" in err
    wire = Wire()
    code, _, err = run(*train_args("sc-warm-3", "--resume", "sc-no-such-job"), wire=wire)
    assert code == 1 and "Could not find training job" in err
    assert "CreateTrainingJob" not in wire.operations()


def test_train_wait_streams_every_host_in_time_order_and_unpacks_the_output(run, aws, tmp_path):
    job = "sc-wait"
    now = int(time.time() * 1000)
    put_log_lines(aws.logs, f"{job}/algo-1-1700000000", [(now + 1, "one"), (now + 3, "three")])
    put_log_lines(aws.logs, f"{job}/algo-2-1700000000", [(now + 2, "two"), (now + 4, "four")])
    put_output_archive(aws.s3, "species-classifier/output", job)
    downloads = tmp_path / "downloads"

    code, out, err = run(
        *train_args(job, "--instance-count", "2", "--wait", "--download-dir", downloads)
    )

    assert code == 0, err
    lines = out.splitlines()
    logged = [line for line in lines if line.startswith("[algo-")]
    assert logged == ["[algo-1] one", "[algo-2] two", "[algo-1] three", "[algo-2] four"]
    assert "  train:progress = 100" in lines  # moto's final metric, as SageMaker reports them
    unpacked = downloads / job
    assert json.loads((unpacked / "metrics.json").read_text())["mean_macro_f1"] == 0.9
    assert (unpacked / "report.md").exists() and (unpacked / "plots/confusion_pooled.png").exists()
    assert f"output unpacked in {unpacked}" in out
    assert "cross-validated macro F1: 0.9000" in out


def test_logs_follow_prints_lines_as_streams_appear_and_grow(run, aws):
    job = "sc-follow"
    assert run(*train_args(job, "--instance-count", "2"))[0] == 0
    set_job_state(job, "InProgress", "Starting")
    now = int(time.time() * 1000)
    steps = [
        lambda: (
            put_log_lines(aws.logs, f"{job}/algo-1-1", [(now + 10, "loading photos")]),
            set_job_state(job, "InProgress", "Training"),
        ),
        lambda: (
            put_log_lines(aws.logs, f"{job}/algo-2-1", [(now + 20, "host two joined")]),
            put_log_lines(aws.logs, f"{job}/algo-1-1", [(now + 30, "fold=1 epoch=1")]),
        ),
        lambda: set_job_state(job, "Completed"),
    ]

    code, out, err = run("logs", job, "--follow", "--poll-seconds", "0", clock=Clock(steps=steps))

    assert code == 0, err
    lines = [
        line for line in out.splitlines() if line.startswith(("[algo-", "[InProgress", "[Comp"))
    ]
    assert [line.split(":")[0] for line in lines] == [
        "[InProgress] Starting",
        "[InProgress] Training",
        "[algo-1] loading photos",
        "[algo-2] host two joined",
        "[algo-1] fold=1 epoch=1",
        "[Completed] Completed",
    ]


def test_logs_read_past_empty_pages_to_the_last_line(run, aws):
    job = "sc-empty-pages"
    now = int(time.time() * 1000)
    lines = ["fold=1 epoch=2 train_loss=0.4 val_loss=0.5 val_macro_f1=0.8 img_per_s=99",
             "Traceback (most recent call last):", "RuntimeError: CUDA out of memory"]  # fmt: skip
    put_log_lines(aws.logs, f"{job}/algo-1-1", [(now + i, line) for i, line in enumerate(lines)])
    served_empty = set()

    def empty_page_first(params, **_):
        # CloudWatch may answer a page with no events and a new token before the stream's end;
        # this token makes moto start from the first event, as the real next page would.
        stream = json.loads(params["body"])["logStreamName"]
        if stream in served_empty:
            return None
        served_empty.add(stream)
        page = {"events": [], "nextForwardToken": f"f/{-1:056d}", "nextBackwardToken": "b/0"}
        return AWSResponse("", 200, {}, None), page

    code, out, err = run("logs", job, wire=Wire(answers={"logs.GetLogEvents": empty_page_first}))

    assert code == 0, err
    assert served_empty == {f"{job}/algo-1-1"}
    assert out.splitlines() == lines


def test_a_failed_job_prints_its_reason_and_exits_non_zero(run, aws, tmp_path):
    reason = "AlgorithmError: no photo of target species 'Acer rubrum' in labels.csv"
    wire = Wire(
        after={
            "sagemaker.CreateTrainingJob": lambda parsed, **_: set_job_state(
                job_name_from(parsed), "Failed", "Failed", reason
            )
        }
    )
    downloads = tmp_path / "downloads"

    code, out, err = run(*train_args("sc-failed", "--wait", "--download-dir", downloads), wire=wire)

    assert code == 1
    assert err.strip().splitlines() == [f"error: training job sc-failed Failed: {reason}"]
    assert not downloads.exists()
    code, out, _ = run("status", "sc-failed")
    assert code == 0 and f"failure:   {reason}" in out


def test_ctrl_c_stops_watching_not_the_job_and_says_how_to_stop_it(run, aws):
    stopped = []

    def stop_training_job(params, **_):
        job = json.loads(params["body"])["TrainingJobName"]
        stopped.append(job)
        set_job_state(job, "Stopping")
        return AWSResponse("", 200, {}, None), {}

    def interrupt():
        raise KeyboardInterrupt

    wire = Wire(
        answers={"sagemaker.StopTrainingJob": stop_training_job},
        after={
            "sagemaker.CreateTrainingJob": lambda parsed, **_: set_job_state(
                job_name_from(parsed), "InProgress", "Training"
            )
        },
    )

    code, out, err = run(
        *train_args("sc-interrupted", "--wait"), wire=wire, clock=Clock(steps=[interrupt])
    )

    assert code == 130
    assert "training job sc-interrupted keeps running" in err
    assert "Stop it with: scripts/run_job.py stop sc-interrupted" in err
    status = aws.sagemaker.describe_training_job(TrainingJobName="sc-interrupted")
    assert status["TrainingJobStatus"] == "InProgress"
    code, out, err = run("stop", "sc-interrupted", wire=wire)
    assert code == 0, err
    assert stopped == ["sc-interrupted"]


# ---------------------------------------------------------------- settings and errors


@pytest.mark.parametrize(
    ("missing", "hints"),
    [
        ("SPECIES_ROLE_ARN", ["missing setting: role", "--role ARN", "SPECIES_ROLE_ARN"]),
        ("SPECIES_IMAGE", ["missing setting: image", "--image URI", "SPECIES_IMAGE"]),
        ("SPECIES_BUCKET", ["missing setting: bucket", "--bucket NAME", "SPECIES_BUCKET"]),
        ("AWS_DEFAULT_REGION", ["missing setting: region", "--region REGION", "AWS_REGION"]),
    ],
)
def test_a_missing_setting_is_one_clear_line(run, monkeypatch, tmp_path, missing, hints):
    # boto3 itself falls back on the process environment for the region.
    monkeypatch.delenv(missing, raising=False)
    environ = {k: v for k, v in SETTINGS.items() if k != missing}
    wire = Wire()

    code, out, err = run(
        "train", "--data", make_channel(tmp_path / "training"), "--instance-type", GPU,
        "--hyperparameter", f"target_species={TARGETS}", environ=environ, wire=wire,
    )  # fmt: skip

    assert code == 2
    [line] = err.strip().splitlines()
    assert all(hint in line for hint in hints), line
    assert "~/.species-classifier.toml" in line
    assert "CreateTrainingJob" not in wire.operations()


def test_a_missing_target_species_is_caught_before_anything_is_created(run):
    wire = Wire()
    code, _, err = run(
        "train", "--data", f"s3://{BUCKET}/x/", "--instance-type", GPU, wire=wire
    )  # fmt: skip
    assert code == 2
    assert "missing hyperparameter target_species" in err
    assert wire.operations() == []


def test_aws_errors_are_their_code_and_message(run):
    code, out, err = run("status", "no-such-job")
    assert code == 1
    [line] = err.strip().splitlines()
    assert line.startswith("error: ValidationException: Could not find training job")


def test_flags_beat_environment_beat_config_file(run, aws, tmp_path):
    config = tmp_path / "species.toml"
    config.write_text(
        f"""
role = "arn:aws:iam::{DEFAULT_ACCOUNT_ID}:role/FromConfig"
bucket = "{BUCKET}"
image = "from-config:1"

[train]
instance_type = "ml.g4dn.2xlarge"
spot = true
max_runtime = "3h"

[train.hyperparameters]
target_species = ["Acer rubrum", "Zenaida macroura"]
k_folds = 5
pretrained = false
"""
    )
    environ = {"SPECIES_CONFIG": str(config), "SPECIES_IMAGE": IMAGE, "AWS_DEFAULT_REGION": REGION}

    code, out, err = run(
        "train", "--data", f"s3://{BUCKET}/channels/demo/", "--role", ROLE_ARN,
        "--job-name", "sc-precedence", "--hyperparameter", "k_folds=2", environ=environ,
    )  # fmt: skip

    assert code == 0, err
    job = aws.sagemaker.describe_training_job(TrainingJobName="sc-precedence")
    assert job["RoleArn"] == ROLE_ARN  # flag over config
    assert job["AlgorithmSpecification"]["TrainingImage"] == IMAGE  # environment over config
    assert job["ResourceConfig"]["InstanceType"] == "ml.g4dn.2xlarge"  # config
    assert job["EnableManagedSpotTraining"] is True
    assert job["StoppingCondition"]["MaxRuntimeInSeconds"] == 3 * 3600
    assert job["HyperParameters"] == {
        "target_species": "Acer rubrum,Zenaida macroura",
        "k_folds": "2",
        "pretrained": "false",
    }

    config.write_text('instance_typ = "ml.p3.2xlarge"\n')
    code, _, err = run("status", "sc-precedence", environ=environ)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "unknown setting 'instance_typ'" in err


def test_every_subcommand_documents_its_flags(capsys):
    expected = {
        "train": ["--image", "--role", "--data", "--output", "--instance-type", "--instance-count",
                  "--spot", "--job-name", "--wait", "--hyperparameter", "--max-wait"],
        "deploy": ["--endpoint", "--training-job", "--model-data", "--startup-timeout",
                   "--wait-timeout"],
        "invoke": ["--endpoint", "PHOTO_OR_FOLDER"],
        "transform": ["--input", "--output", "--model", "--training-job", "--model-data"],
        "delete": ["--endpoint", "--endpoint-config", "--model", "--transform-job"],
        "status": ["job"],
        "logs": ["--follow"],
        "stop": ["job"],
        "tune": ["--range", "--strategy", "--max-jobs", "--max-parallel", "--early-stopping"],
    }  # fmt: skip
    for command, flags in expected.items():
        with pytest.raises(SystemExit) as exit_:
            cli.main([command, "--help"], environ={})
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        assert all(flag in text for flag in flags), (command, text)


# ---------------------------------------------------------------- tuning

RANGES = ("--range", "learning_rate=1e-5:1e-3:log", "--range", "batch_size=32,64,128",
          "--range", "epoch_patience=3:8", "--range", "downsample_frac=0.3:0.9")  # fmt: skip


def tune_args(name: str, *extra) -> list[str]:
    return ["tune", "--data", f"s3://{BUCKET}/channels/demo/", "--instance-type", GPU,
            "--hyperparameter", f"target_species={TARGETS}", "--tuning-job-name", name,
            *extra]  # fmt: skip


def set_tuning_state(name: str, status: str, best: str | None = None, value: float = 0.0):
    """Move a tuning job the way SageMaker would (moto creates them Completed)."""
    fake = moto_sagemaker().hyper_parameter_tuning_jobs[name]
    fake.hyper_parameter_tuning_job_status = status
    if best:
        fake.best_training_job = {
            **fake.best_training_job,
            "TrainingJobName": best,
            "FinalHyperParameterTuningJobObjectiveMetric": {
                "Type": "Maximize", "MetricName": "cv:mean_macro_f1", "Value": value},
        }  # fmt: skip


def trial(name: str, status: str, value: float | None, **tuned) -> dict:
    summary = {
        "TrainingJobName": name, "TrainingJobArn": f"arn:aws:sagemaker:{REGION}:1:training-job/{name}",
        "CreationTime": "2026-01-01T00:00:00Z", "TrainingJobStatus": status,
        "TunedHyperParameters": {key: str(v) for key, v in tuned.items()},
    }  # fmt: skip
    if value is not None:
        summary["FinalHyperParameterTuningJobObjectiveMetric"] = {
            "MetricName": "cv:mean_macro_f1", "Value": value}  # fmt: skip
    return summary


def test_tune_searches_the_ranges_and_prints_each_trial_as_it_ends(run, aws):
    name = "sc-tune-1"
    trials = [trial("sc-tune-1-001-a", "InProgress", None, learning_rate=1e-4, batch_size=64)]

    def list_trials(params, **_):
        # ListTrainingJobsForHyperParameterTuningJob: moto lacks it; the request as sent was
        # checked by the validator already.
        return AWSResponse("", 200, {}, None), {"TrainingJobSummaries": list(trials)}

    def first_trial_done():
        trials[0] = trial("sc-tune-1-001-a", "Completed", 0.81, learning_rate=1e-4, batch_size=64)
        trials.append(trial("sc-tune-1-002-b", "InProgress", None, learning_rate=3e-4))

    def all_done():
        trials[1] = trial("sc-tune-1-002-b", "Failed", None, learning_rate=3e-4, batch_size=32)
        set_tuning_state(name, "Completed", best="sc-tune-1-001-a", value=0.81)

    wire = Wire(
        answers={"sagemaker.ListTrainingJobsForHyperParameterTuningJob": list_trials},
        after={
            "sagemaker.CreateHyperParameterTuningJob": lambda **_: set_tuning_state(
                name, "InProgress"
            )
        },
    )

    code, out, err = run(*tune_args(name, *RANGES, "--max-jobs", "4", "--wait"), wire=wire,
                         clock=Clock(steps=[first_trial_done, all_done]))  # fmt: skip

    assert code == 0, err
    [sent] = wire.bodies("CreateHyperParameterTuningJob")
    config = sent["HyperParameterTuningJobConfig"]
    assert config["Strategy"] == "Bayesian"
    assert config["HyperParameterTuningJobObjective"] == {
        "Type": "Maximize", "MetricName": "cv:mean_macro_f1"}  # fmt: skip
    assert config["ResourceLimits"] == {"MaxNumberOfTrainingJobs": 4, "MaxParallelTrainingJobs": 2}
    assert config["TrainingJobEarlyStoppingType"] == "Auto"
    assert config["ParameterRanges"] == {
        "ContinuousParameterRanges": [
            {"Name": "learning_rate", "MinValue": "1e-5", "MaxValue": "1e-3",
             "ScalingType": "Logarithmic"},
            {"Name": "downsample_frac", "MinValue": "0.3", "MaxValue": "0.9"},
        ],
        "CategoricalParameterRanges": [{"Name": "batch_size", "Values": ["32", "64", "128"]}],
        "IntegerParameterRanges": [{"Name": "epoch_patience", "MinValue": "3", "MaxValue": "8"}],
    }  # fmt: skip
    definition = sent["TrainingJobDefinition"]
    assert definition["StaticHyperParameters"] == {"target_species": TARGETS}
    assert definition["AlgorithmSpecification"]["MetricDefinitions"] == METRIC_DEFINITIONS
    assert "CheckpointConfig" not in definition
    rows = [line for line in out.splitlines() if line.startswith("  sc-tune-1-")]
    assert [row.split()[:3] for row in rows] == [
        ["sc-tune-1-001-a", "Completed", "0.8100"],
        ["sc-tune-1-002-b", "Failed", "-"],
    ]
    assert "learning_rate=0.0001 batch_size=64" in rows[0]
    assert "best trial sc-tune-1-001-a (cv:mean_macro_f1 0.8100)" in out

    # The best trial's model, served.
    assert run(*train_args("sc-tune-1-001-a"))[0] == 0
    code, out, err = run("deploy", "--endpoint", "sc-tuned", "--tuning-job", name,
                         "--instance-type", GPU)  # fmt: skip
    assert code == 0, err
    assert "best trial of tuning job sc-tune-1: sc-tune-1-001-a" in out
    best = aws.sagemaker.describe_training_job(TrainingJobName="sc-tune-1-001-a")
    assert serving(aws, "sc-tuned")[2] == best["ModelArtifacts"]["S3ModelArtifacts"]


def test_tuning_ranges_come_from_the_config_file_too(run, aws, tmp_path):
    config = tmp_path / "species.toml"
    config.write_text(
        """
[tune]
max_jobs = 6
strategy = "Random"

[tune.ranges]
learning_rate = "1e-5:1e-3:log"
batch_size = [32, 64]
"""
    )
    wire = Wire()
    code, out, err = run(*tune_args("sc-tune-toml"), environ={**SETTINGS, "SPECIES_CONFIG": str(config)},
                         wire=wire)  # fmt: skip
    assert code == 0, err
    [sent] = wire.bodies("CreateHyperParameterTuningJob")
    config_sent = sent["HyperParameterTuningJobConfig"]
    assert config_sent["Strategy"] == "Random"
    assert config_sent["ResourceLimits"]["MaxNumberOfTrainingJobs"] == 6
    assert config_sent["ParameterRanges"] == {
        "ContinuousParameterRanges": [{"Name": "learning_rate", "MinValue": "1e-5",
                                       "MaxValue": "1e-3", "ScalingType": "Logarithmic"}],
        "CategoricalParameterRanges": [{"Name": "batch_size", "Values": ["32", "64"]}],
    }  # fmt: skip
    assert "deploy --tuning-job sc-tune-toml" in out

    # The default name fits the tuning job's 32 characters and the policy's prefix.
    args = [a for a in tune_args("unused") if a not in ("--tuning-job-name", "unused")]
    code, out, err = run(*args, environ={**SETTINGS, "SPECIES_CONFIG": str(config)})
    assert code == 0, err
    assert re.search(r"tuning job species-classifier-\d{4}-\d{6} created", out), out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ((), "tune needs at least one --range NAME=SPEC"),
        (("--range", "target_species=a,b"), "target_species is both a --hyperparameter and a --range"),
        (("--range", "learning_rate=1e-3:1e-5"), "LOW must be below HIGH"),
        (("--range", "learning_rate=0:1e-3:log"), "a log scale needs LOW above 0"),
        (("--range", "learning_rate=1e-5:1e-3:ln"), "SCALE one of auto, linear, log, reverse-log"),
        (("--range", "lr=1e-5:1e-3", "--strategy", "Grid"), "--strategy Grid searches choices only"),
        (("--range", "lr=1:2", "--max-jobs", "2", "--max-parallel", "3"), "--max-parallel must be between 1 and 2"),
        (("--range", "lr=1:2", "--tuning-job-name", "t" * 33), "at most 32 characters"),
    ],
)  # fmt: skip
def test_tuning_settings_are_checked_before_any_call(run, extra, message):
    wire = Wire()
    args = tune_args("sc-tune-limits", *extra)
    code, _, err = run(*args, wire=wire)
    assert code == 2
    [line] = err.strip().splitlines()
    assert message in line, line
    assert wire.operations() == []


# ---------------------------------------------------------------- hosting


def set_endpoint_state(name: str, status: str, reason: str | None = None) -> None:
    """Move an endpoint the way SageMaker would (moto creates them InService)."""
    fake = moto_sagemaker().endpoints[name]
    fake.endpoint_status = status
    fake.failure_reason = reason


def update_endpoint_answer(updates: list, status: str = "InService", adopt: bool = True):
    """UpdateEndpoint, which moto lacks: record it, and move the endpoint to `status`."""

    def answer(params, **_):
        request = json.loads(params["body"])
        updates.append(request)
        fake = moto_sagemaker().endpoints[request["EndpointName"]]
        if adopt:
            fake.endpoint_config_name = request["EndpointConfigName"]
        fake.endpoint_status = status
        return AWSResponse("", 200, {}, None), {"EndpointArn": fake.arn}

    return answer


def deploy_args(endpoint: str, version: str = "v1", *extra) -> list[str]:
    model_data = f"s3://{BUCKET}/models/{version}/model.tar.gz"
    return ["deploy", "--endpoint", endpoint, "--model-data", model_data, "--instance-type", GPU,
            *extra]  # fmt: skip


def serving(aws, endpoint: str) -> tuple[str, str, str]:
    """(endpoint config, model, model data) an endpoint serves."""
    config = aws.sagemaker.describe_endpoint(EndpointName=endpoint)["EndpointConfigName"]
    [variant] = aws.sagemaker.describe_endpoint_config(EndpointConfigName=config)[
        "ProductionVariants"
    ]
    model = aws.sagemaker.describe_model(ModelName=variant["ModelName"])
    return config, variant["ModelName"], model["PrimaryContainer"]["ModelDataUrl"]


def test_deploy_creates_then_updates_the_endpoint_in_place(run, aws):
    assert run(*train_args("sc-deploy-src", "--image", "trained-with:7"))[0] == 0
    environ = {k: v for k, v in SETTINGS.items() if k != "SPECIES_IMAGE"}

    code, out, err = run(
        "deploy", "--endpoint", "sc-endpoint", "--training-job", "sc-deploy-src",
        "--instance-type", GPU, "--env", "SAGEMAKER_MODEL_SERVER_WORKERS=1", environ=environ,
    )  # fmt: skip

    assert code == 0, err
    assert "endpoint sc-endpoint is InService" in out
    endpoint = aws.sagemaker.describe_endpoint(EndpointName="sc-endpoint")
    config = aws.sagemaker.describe_endpoint_config(
        EndpointConfigName=endpoint["EndpointConfigName"]
    )
    [variant] = config["ProductionVariants"]
    assert variant["ContainerStartupHealthCheckTimeoutInSeconds"] == 600
    assert variant["InstanceType"] == GPU and variant["InitialInstanceCount"] == 1
    model = aws.sagemaker.describe_model(ModelName=variant["ModelName"])
    source = aws.sagemaker.describe_training_job(TrainingJobName="sc-deploy-src")
    assert model["PrimaryContainer"]["Image"] == "trained-with:7"  # the job's own image
    assert model["PrimaryContainer"]["ModelDataUrl"] == source["ModelArtifacts"]["S3ModelArtifacts"]
    assert model["PrimaryContainer"]["Environment"] == {"SAGEMAKER_MODEL_SERVER_WORKERS": "1"}
    assert model["ExecutionRoleArn"] == ROLE_ARN

    updates = []

    v2 = f"s3://{BUCKET}/models/v2/model.tar.gz"
    code, out, err = run(
        "deploy", "--endpoint", "sc-endpoint", "--model-data", v2, "--instance-type", GPU,
        wire=Wire(answers={"sagemaker.UpdateEndpoint": update_endpoint_answer(updates)}),
    )  # fmt: skip

    assert code == 0, err
    assert "updating in place" in out
    [update] = updates
    assert update["EndpointConfigName"] != endpoint["EndpointConfigName"]
    updated = aws.sagemaker.describe_endpoint(EndpointName="sc-endpoint")
    assert updated["EndpointConfigName"] == update["EndpointConfigName"]
    new_config = aws.sagemaker.describe_endpoint_config(
        EndpointConfigName=update["EndpointConfigName"]
    )
    new_model = aws.sagemaker.describe_model(
        ModelName=new_config["ProductionVariants"][0]["ModelName"]
    )
    assert new_model["PrimaryContainer"]["ModelDataUrl"] == v2
    assert new_model["PrimaryContainer"]["Image"] == IMAGE


def test_delete_removes_endpoint_config_and_model(run, aws):
    model_data = f"s3://{BUCKET}/models/v1/model.tar.gz"
    code, _, err = run(
        "deploy", "--endpoint", "sc-doomed", "--model-data", model_data, "--instance-type", GPU
    )  # fmt: skip
    assert code == 0, err
    config = aws.sagemaker.describe_endpoint(EndpointName="sc-doomed")["EndpointConfigName"]
    model = aws.sagemaker.describe_endpoint_config(EndpointConfigName=config)["ProductionVariants"][
        0
    ]["ModelName"]

    code, out, err = run("delete", "--endpoint", "sc-doomed")

    assert code == 0, err
    for describe, kwargs in [
        (aws.sagemaker.describe_endpoint, {"EndpointName": "sc-doomed"}),
        (aws.sagemaker.describe_endpoint_config, {"EndpointConfigName": config}),
        (aws.sagemaker.describe_model, {"ModelName": model}),
    ]:
        with pytest.raises(ClientError, match="Could not find"):
            describe(**kwargs)
    assert f"model {model} deleted" in out


def test_deploy_onto_a_failed_endpoint_deletes_it_then_creates_it(run, aws):
    name = "sc-failed-endpoint"
    assert run(*deploy_args(name))[0] == 0
    old_config, old_model, _ = serving(aws, name)
    set_endpoint_state(name, "Failed", "CannotStartContainerError: ping timed out")

    def delete_slowly(params, **_):
        # A real endpoint stays Deleting for a while before it is gone.
        set_endpoint_state(name, "Deleting")
        return AWSResponse("", 200, {}, None), {}

    def gone():
        del moto_sagemaker().endpoints[name]

    # No UpdateEndpoint answer: a Failed endpoint accepts none.
    wire = Wire(answers={"sagemaker.DeleteEndpoint": delete_slowly})

    code, out, err = run(*deploy_args(name, "v2"), wire=wire, clock=Clock(steps=[gone]))

    assert code == 0, err
    operations = wire.operations()
    assert "UpdateEndpoint" not in operations
    assert f"endpoint {name} is Failed (CannotStartContainerError: ping timed out)" in out
    lines = out.splitlines()
    assert lines.index(f"[Deleting] {name}") < lines.index(f"[gone] {name}")
    assert lines.index(f"[gone] {name}") < lines.index(f"endpoint {name} creating")
    assert f"delete --endpoint-config {old_config} --model {old_model}" in out
    config, _, model_data = serving(aws, name)
    assert config != old_config and model_data.endswith("/v2/model.tar.gz")
    assert f"endpoint {name} is InService" in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--endpoint", "under_score"), "invalid endpoint name 'under_score'"),
        (("--env", "2FAST=1"), "environment variable name '2FAST'"),
        (("--env", "NOTE=" + "x" * 1025), "NOTE has a value of 1025 characters: at most 1024"),
        (("--tag", "aws:team=x"), "tag key 'aws:team': the aws: prefix is reserved"),
        (("--startup-timeout", "59"), "--startup-timeout must be between 60 and 3600, got 59"),
        (("--download-timeout", "4000"), "--download-timeout must be between 60 and 3600"),
    ],
)
def test_deploy_limits_are_checked_before_any_call(run, extra, message):
    wire = Wire()
    code, _, err = run(*deploy_args("sc-limits", "v1", *extra), wire=wire)
    assert code == 2
    [line] = err.strip().splitlines()
    assert message in line, line
    assert wire.operations() == []


@pytest.mark.parametrize("status", ["OutOfService", "UpdateRollbackFailed"])
def test_deploy_updates_an_endpoint_that_accepts_updates(run, aws, status):
    name = f"sc-{status.lower()}"
    assert run(*deploy_args(name))[0] == 0
    set_endpoint_state(name, status, "the previous deployment went wrong")
    updates = []

    code, out, err = run(
        *deploy_args(name, "v2"),
        wire=Wire(answers={"sagemaker.UpdateEndpoint": update_endpoint_answer(updates)}),
    )

    assert code == 0, err
    assert len(updates) == 1
    assert f"endpoint {name} updating in place from {status}" in out
    assert serving(aws, name)[2].endswith("/v2/model.tar.gz")


def test_deploy_waits_out_a_busy_endpoint_before_changing_it(run, aws):
    assert run(*deploy_args("sc-busy"))[0] == 0
    set_endpoint_state("sc-busy", "Updating")
    updates = []
    clock = Clock(steps=[lambda: None, lambda: set_endpoint_state("sc-busy", "InService")])

    code, out, err = run(
        *deploy_args("sc-busy", "v2"),
        wire=Wire(answers={"sagemaker.UpdateEndpoint": update_endpoint_answer(updates)}),
        clock=clock,
    )

    assert code == 0, err
    lines = out.splitlines()
    assert lines.index("[Updating] sc-busy") < lines.index("[InService] sc-busy")
    assert lines.index("[InService] sc-busy") < next(
        i for i, line in enumerate(lines) if line.startswith("model sc-busy-")
    )
    assert len(updates) == 1


def test_an_update_whose_rollback_failed_ends_the_wait_with_its_reason(run, aws):
    assert run(*deploy_args("sc-rollback"))[0] == 0
    updates = []

    def rollback_failed(params, **kwargs):
        answer = update_endpoint_answer(updates, "UpdateRollbackFailed", adopt=False)
        response = answer(params, **kwargs)
        moto_sagemaker().endpoints["sc-rollback"].failure_reason = "the new model did not start"
        return response

    code, out, err = run(
        *deploy_args("sc-rollback", "v2"),
        wire=Wire(answers={"sagemaker.UpdateEndpoint": rollback_failed}),
    )

    assert code == 1
    [line] = err.strip().splitlines()
    assert line.startswith("error: endpoint sc-rollback UpdateRollbackFailed: the update failed")
    assert "the new model did not start" in line and "Deploy again, or delete it" in line


@pytest.mark.parametrize(("extra", "limit"), [((), "50m"), (("--wait-timeout", "20m"), "20m")])
def test_every_wait_has_a_deadline_that_names_what_it_waited_for(run, aws, extra, limit):
    name = f"sc-stuck-{limit}"
    stuck = Wire(
        after={"sagemaker.CreateEndpoint": lambda **_: set_endpoint_state(name, "Creating")}
    )

    code, out, err = run(*deploy_args(name, "v1", *extra), wire=stuck)

    assert code == 1
    assert err.strip().splitlines() == [
        f"error: gave up after {limit} waiting for endpoint {name} to be InService "
        "(it carries on in AWS; --wait-timeout sets how long to wait)"
    ]


def test_a_compiling_model_gets_a_longer_startup_window(run, aws):
    code, _, err = run(*deploy_args("sc-compiled", "v1", "--env", "SPECIES_SERVE_COMPILE=1"))
    assert code == 0, err
    config, _, _ = serving(aws, "sc-compiled")
    [variant] = aws.sagemaker.describe_endpoint_config(EndpointConfigName=config)[
        "ProductionVariants"
    ]
    assert variant["ContainerStartupHealthCheckTimeoutInSeconds"] == 1800

    code, _, err = run(*deploy_args("sc-compiled", "v1", "--startup-timeout", "3601"))
    assert code == 2
    assert "--startup-timeout must be between 60 and 3600, got 3601" in err


def serverless_args(endpoint: str, *extra) -> list[str]:
    model_data = f"s3://{BUCKET}/models/v1/model.tar.gz"
    return ["deploy", "--endpoint", endpoint, "--model-data", model_data, "--serverless", *extra]


def test_deploy_serverless_for_rare_traffic(run, aws):
    code, out, err = run(*serverless_args("sc-serverless", "--memory", "4096"))

    assert code == 0, err
    config, _, _ = serving(aws, "sc-serverless")
    [variant] = aws.sagemaker.describe_endpoint_config(EndpointConfigName=config)[
        "ProductionVariants"
    ]
    assert variant["ServerlessConfig"] == {"MemorySizeInMB": 4096, "MaxConcurrency": 5}
    assert "InstanceType" not in variant
    assert "serverless, 4096 MB, up to 5 concurrent requests" in out

    wire = Wire()
    code, _, err = run(*deploy_args("sc-serverless", "v2"), wire=wire)
    assert code == 2
    assert "runs serverless and SageMaker cannot update it to run on instances" in err
    assert not set(wire.operations()) & set(CREATES)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--instance-type", GPU), "a serverless endpoint has no --instance-type"),
        (("--memory", "3000"), "--memory must be one of 1024, 2048, 3072, 4096, 5120, 6144 MB"),
        (("--max-concurrency", "201"), "--max-concurrency must be between 1 and 200, got 201"),
        (("--env", "SPECIES_SERVE_COMPILE=1"), "within 3 minutes, too short to compile"),
        (("--max-instances", "3", "--max-rps", "5"), "a serverless endpoint scales by itself"),
        (("--async", f"s3://{BUCKET}/out/"), "SageMaker runs asynchronous endpoints on instances"),
    ],
)
def test_serverless_limits_are_checked_before_any_call(run, extra, message):
    wire = Wire()
    code, _, err = run(*serverless_args("sc-serverless-limits", *extra), wire=wire)
    assert code == 2
    [line] = err.strip().splitlines()
    assert message in line, line
    assert wire.operations() == []


def scaling_of(endpoint: str) -> tuple[list, list]:
    """(scalable targets, scaling policies) Application Auto Scaling holds for the endpoint."""
    client = boto3.client("application-autoscaling")
    resource = f"endpoint/{endpoint}/variant/AllTraffic"
    targets = client.describe_scalable_targets(ServiceNamespace="sagemaker", ResourceIds=[resource])
    policies = client.describe_scaling_policies(ServiceNamespace="sagemaker", ResourceId=resource)
    return targets["ScalableTargets"], policies["ScalingPolicies"]


def test_deploy_autoscales_and_delete_removes_it(run, aws):
    name = "sc-scaled"
    scale = ("--max-instances", "4", "--max-rps", "10")
    code, out, err = run(*deploy_args(name, "v1", "--instance-count", "2", *scale))

    assert code == 0, err
    [target], [policy] = scaling_of(name)
    assert (target["MinCapacity"], target["MaxCapacity"]) == (2, 4)
    assert target["ScalableDimension"] == "sagemaker:variant:DesiredInstanceCount"
    tracking = policy["TargetTrackingScalingPolicyConfiguration"]
    assert tracking["TargetValue"] == 300.0
    assert tracking["PredefinedMetricSpecification"] == {
        "PredefinedMetricType": "SageMakerVariantInvocationsPerInstance"
    }
    assert "target 300 invocations per instance per minute (10 requests/s x 0.5 x 60)" in out

    # A new model on the same instance type keeps the scaling (SageMaker allows that update).
    updates = []
    answers = {"sagemaker.UpdateEndpoint": update_endpoint_answer(updates)}
    code, out, err = run(*deploy_args(name, "v2"), wire=Wire(answers=answers))
    assert code == 0, err
    assert "autoscaling of" not in out and len(scaling_of(name)[0]) == 1

    # A new instance type is refused for a scaled variant: the scaling goes first.
    scaled_at_update = []

    def update_unscaled(params, **kwargs):
        scaled_at_update.append(bool(scaling_of(name)[0]))
        return update_endpoint_answer(updates)(params, **kwargs)

    wire = Wire(answers={"sagemaker.UpdateEndpoint": update_unscaled})
    code, out, err = run(*deploy_args(name, "v3", "--instance-type", "ml.m5.xlarge"), wire=wire)
    assert code == 0, err
    assert scaled_at_update == [False]
    assert "DeregisterScalableTarget" in wire.operations()
    assert f"autoscaling of {name} removed (SageMaker refuses to change" in out
    assert scaling_of(name) == ([], [])

    code, _, err = run(*deploy_args(name, "v3", "--instance-type", "ml.m5.xlarge", *scale),
                       wire=Wire(answers=answers))  # fmt: skip
    assert code == 0, err
    wire = Wire()
    code, out, err = run("delete", "--endpoint", name, wire=wire)
    assert code == 0, err
    operations = wire.operations()
    assert operations.index("DeregisterScalableTarget") < operations.index("DeleteEndpoint")
    assert f"autoscaling of {name} removed (its endpoint is being deleted)" in out
    assert scaling_of(name) == ([], [])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--max-instances", "3"), "--max-instances needs --max-rps"),
        (("--max-rps", "10"), "--min-instances and --max-rps need --max-instances"),
        (("--max-instances", "2", "--min-instances", "3", "--max-rps", "5"),
         "1 <= --min-instances (3) <= --max-instances (2)"),
        (("--max-instances", "2", "--max-rps", "5", "--no-wait"), "leave out --no-wait"),
    ],
)  # fmt: skip
def test_autoscaling_settings_are_checked_before_any_call(run, extra, message):
    wire = Wire()
    code, _, err = run(*deploy_args("sc-scaling-limits", "v1", *extra), wire=wire)
    assert code == 2
    [line] = err.strip().splitlines()
    assert message in line, line
    assert wire.operations() == []


def test_delete_removes_the_config_and_model_of_an_update_in_flight(run, aws):
    assert run(*deploy_args("sc-in-flight"))[0] == 0
    old_config, old_model, _ = serving(aws, "sc-in-flight")
    updates = []
    code, _, err = run(
        *deploy_args("sc-in-flight", "v2", "--no-wait"),
        wire=Wire(
            answers={"sagemaker.UpdateEndpoint": update_endpoint_answer(updates, "Updating", False)}
        ),
    )
    assert code == 0, err
    [update] = updates
    pending = update["EndpointConfigName"]
    [pending_model] = [
        v["ModelName"]
        for v in aws.sagemaker.describe_endpoint_config(EndpointConfigName=pending)[
            "ProductionVariants"
        ]
    ]

    def report_pending(parsed, **_):
        # What SageMaker says of an endpoint mid-update (moto never reports one).
        if parsed.get("EndpointName") == "sc-in-flight":
            parsed["PendingDeploymentSummary"] = {"EndpointConfigName": pending}

    code, out, err = run(
        "delete", "--endpoint", "sc-in-flight",
        wire=Wire(after={"sagemaker.DescribeEndpoint": report_pending}),
    )  # fmt: skip

    assert code == 0, err
    for config in (old_config, pending):
        assert f"endpoint config {config} deleted" in out
        with pytest.raises(ClientError, match="Could not find"):
            aws.sagemaker.describe_endpoint_config(EndpointConfigName=config)
    for model in (old_model, pending_model):
        assert f"model {model} deleted" in out
        with pytest.raises(ClientError, match="Could not find"):
            aws.sagemaker.describe_model(ModelName=model)


def test_invoke_sends_each_photo_and_prints_the_predictions(run, aws, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    # moto's runtime decodes request bodies as UTF-8, so these "photos" are text.
    (photos / "a.jpg").write_bytes(b"jpeg bytes")
    (photos / "b.png").write_bytes(b"png bytes")
    (photos / "notes.txt").write_text("not a photo")
    too_big = tmp_path / "huge.jpg"
    too_big.write_bytes(b"\xff" * (6_291_456 + 1))
    answers = [
        {
            "predicted_species": species,
            "confidence": confidence,
            "class_probabilities": probabilities,
            "individual_fold_predictions": [],
        }
        for species, confidence, probabilities in [
            ("Acer rubrum", 0.91, {"Acer rubrum": 0.91, "other": 0.07, "Zenaida macroura": 0.02}),
            ("other", 0.75, {"Acer rubrum": 0.25, "other": 0.75}),
        ]
    ]
    results = [
        {
            "Body": json.dumps(a),
            "ContentType": "application/json",
            "InvokedProductionVariant": "AllTraffic",
        }
        for a in answers
    ]
    response = requests.post(
        f"{aws.endpoint}/moto-api/static/sagemaker/endpoint-results",
        json={"results": results},
        timeout=10,
    )
    assert response.status_code == 201
    wire = Wire()

    code, out, err = run("invoke", "--endpoint", "sc-endpoint", photos, too_big, wire=wire)

    assert code == 1  # the oversized file that is no photo
    assert out.splitlines() == [
        f"{photos / 'a.jpg'}: Acer rubrum (confidence 0.910); "
        "next: other 0.070, Zenaida macroura 0.020",
        f"{photos / 'b.png'}: other (confidence 0.750); next: Acer rubrum 0.250",
    ]
    assert "6291456-byte limit and it cannot be re-encoded" in err and "huge.jpg" in err
    sent = [(r.headers["Content-Type"], r.body) for _, op, r in wire.sent if op == "InvokeEndpoint"]
    assert sent == [(b"image/jpeg", b"jpeg bytes"), (b"image/png", b"png bytes")]


class RawBody:
    """The raw HTTP body botocore reads a response from."""

    def __init__(self, data: bytes):
        self._data = io.BytesIO(data)

    def stream(self, **_):
        yield self._data.read()

    def read(self, *args, **_):
        return self._data.read(*args)


def answer_json(status: int, body: dict, headers: dict | None = None) -> AWSResponse:
    data = json.dumps(body).encode()
    headers = {
        "Content-Type": "application/json",
        "Content-Length": str(len(data)),
        **(headers or {}),
    }
    return AWSResponse("https://runtime.sagemaker", status, headers, RawBody(data))


PREDICTION = {"predicted_species": "Acer rubrum", "confidence": 0.9,
              "class_probabilities": {"Acer rubrum": 0.9, "other": 0.1}}  # fmt: skip


def test_invoke_reencodes_a_photo_over_the_limit_or_too_large(run, tmp_path):
    phone = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: the photo shows rotated by 90 degrees
    Image.new("RGB", (3000, 2000), (200, 40, 40)).save(phone, quality=90, exif=exif)
    noisy = tmp_path / "noisy.png"  # under 2,048 px but over 6 MiB
    Image.frombytes("RGB", (1500, 1500), os.urandom(1500 * 1500 * 3)).save(noisy)
    small = tmp_path / "small.jpg"
    Image.new("RGB", (500, 400), (10, 120, 10)).save(small)
    assert noisy.stat().st_size > 6_291_456
    sent = []

    def answer(request, **_):
        sent.append((request.headers["Content-Type"], request.body))
        return answer_json(200, PREDICTION)

    code, out, err = run(
        "invoke", "--endpoint", "sc-endpoint", phone, noisy, small,
        wire=Wire(sends={"sagemaker-runtime.InvokeEndpoint": answer}),
    )  # fmt: skip

    assert code == 0, err
    assert len(out.splitlines()) == 3
    shapes = [(kind, Image.open(io.BytesIO(body)).size) for kind, body in sent]
    assert shapes == [
        (b"image/jpeg", (1365, 2048)),  # upright, long side 2,048
        (b"image/jpeg", (1500, 1500)),
        (b"image/jpeg", (500, 400)),
    ]
    assert sent[2][1] == small.read_bytes()  # a photo within the limits goes as it is
    assert all(len(body) <= 6_291_456 for _, body in sent)
    notes = err.strip().splitlines()
    assert notes[0] == (
        f"{phone}: re-encoded 3000x2000 ({phone.stat().st_size} bytes) to 1365x2048 JPEG q95 "
        f"({len(sent[0][1])} bytes) before sending"
    )
    assert notes[1].startswith(f"{noisy}: re-encoded 1500x1500")
    assert len(notes) == 2


def test_invoke_keeps_photos_under_a_serverless_endpoints_4_mb(run, aws, tmp_path):
    assert run(*serverless_args("sc-serverless-photos"))[0] == 0
    photo = tmp_path / "noisy.png"  # between 4 MB and 6 MiB: fine for instances, not serverless
    Image.frombytes("RGB", (1200, 1200), os.urandom(1200 * 1200 * 3)).save(photo)
    assert 4_000_000 < photo.stat().st_size <= 6_291_456
    sent = []

    def answer(request, **_):
        sent.append(request.body)
        return answer_json(200, PREDICTION)

    code, out, err = run("invoke", "--endpoint", "sc-serverless-photos", photo,
                         wire=Wire(sends={"sagemaker-runtime.InvokeEndpoint": answer}))  # fmt: skip

    assert code == 0, err
    [body] = sent
    assert len(body) <= 4_000_000 and Image.open(io.BytesIO(body)).format == "JPEG"
    assert f"{photo}: re-encoded 1200x1200" in err


def test_invoke_retries_throttling_but_never_a_read_timeout(run, tmp_path):
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (64, 64)).save(tmp_path / name)
    attempts = {"a.jpg": 0, "b.jpg": 0}

    def answer(request, **_):
        name = "a.jpg" if not attempts["a.jpg"] else "b.jpg"
        attempts[name] += 1
        if name == "a.jpg":
            raise ReadTimeoutError(endpoint_url=request.url)
        if attempts[name] == 1:
            return answer_json(
                400, {"message": "Rate exceeded"}, {"x-amzn-ErrorType": "ThrottlingException"}
            )
        return answer_json(200, PREDICTION)

    clock = Clock()
    code, out, err = run(
        "invoke",
        "--endpoint",
        "sc-endpoint",
        tmp_path,
        wire=Wire(sends={"sagemaker-runtime.InvokeEndpoint": answer}),
        clock=clock,
    )

    assert code == 1  # a.jpg
    assert attempts == {"a.jpg": 1, "b.jpg": 2}
    assert clock.sleeps == 1
    assert f"{tmp_path / 'a.jpg'}: Read timeout on endpoint URL" in err
    assert out.splitlines() == [
        f"{tmp_path / 'b.jpg'}: Acer rubrum (confidence 0.900); next: other 0.100"
    ]


def test_an_async_endpoint_queues_photos_and_prints_the_answers_from_s3(run, aws, tmp_path):
    name = "sc-async"
    output = f"s3://{BUCKET}/species-classifier/async-out/"
    code, out, err = run(*deploy_args(name, "v1", "--async", output))
    assert code == 0, err
    config, _, _ = serving(aws, name)
    described = aws.sagemaker.describe_endpoint_config(EndpointConfigName=config)
    assert described["AsyncInferenceConfig"]["OutputConfig"] == {
        "S3OutputPath": output,
        "S3FailurePath": output + "failures/",
    }
    assert f"asynchronous, answers under {output}" in out
    # What the endpoint will answer, in order (moto writes each to S3 as SageMaker would).
    results = [{"data": json.dumps(PREDICTION)}, {"is_failure": True, "data": "CUDA error: OOM"}]
    queued = requests.post(
        f"{aws.endpoint}/moto-api/static/sagemaker/async-endpoint-results",
        json={"results": results},
        timeout=10,
    )
    assert queued.status_code == 201
    photos = [tmp_path / "a.jpg", tmp_path / "b.jpg"]
    for photo in photos:
        Image.new("RGB", (64, 64)).save(photo)
    wire = Wire()

    code, out, err = run("invoke", "--endpoint", name, *photos, wire=wire)

    assert code == 1  # b.jpg failed
    assert out.splitlines() == [f"{photos[0]}: Acer rubrum (confidence 0.900); next: other 0.100"]
    assert err.strip().splitlines() == [f"{photos[1]}: the endpoint failed on it: CUDA error: OOM"]
    assert wire.operations().count("InvokeEndpointAsync") == 2
    assert "InvokeEndpoint" not in wire.operations()
    inputs = keys_under(aws.s3, "species-classifier/async-out/inputs/")
    assert len(inputs) == 2 and all(key.endswith(".jpg") for key in inputs)

    def never_answered(params, **_):
        nowhere = f"s3://{BUCKET}/species-classifier/async-out/never"
        answer = {"OutputLocation": nowhere + ".out", "FailureLocation": nowhere + ".failure"}
        return AWSResponse("", 202, {}, None), answer

    code, out, err = run(
        "invoke", "--endpoint", name, photos[0], "--wait-timeout", "5m",
        wire=Wire(answers={"sagemaker-runtime.InvokeEndpointAsync": never_answered}),
    )  # fmt: skip
    assert code == 1
    assert err.strip().splitlines() == [
        f"error: gave up after 5m waiting for the answer for {photos[0]} at "
        f"s3://{BUCKET}/species-classifier/async-out/never.out "
        "(it carries on in AWS; --wait-timeout sets how long to wait)"
    ]


def test_transform_creates_a_model_and_a_job_over_a_prefix_of_photos(run, aws):
    for name in ("a.jpg", "b.png"):
        aws.s3.put_object(Bucket=BUCKET, Key=f"batch/photos/{name}", Body=b"photo")
    model_data = f"s3://{BUCKET}/models/v1/model.tar.gz"
    wire = Wire()

    code, out, err = run(
        "transform", "--input", f"s3://{BUCKET}/batch/photos", "--model-data", model_data,
        "--instance-type", "ml.m5.xlarge", "--job-name", "sc-transform", "--wait", wire=wire,
    )  # fmt: skip

    assert code == 0, err
    job = aws.sagemaker.describe_transform_job(TransformJobName="sc-transform")
    assert job["ModelName"] == "sc-transform"
    assert job["BatchStrategy"] == "SingleRecord"
    assert job["TransformInput"]["DataSource"]["S3DataSource"]["S3Uri"] == (
        f"s3://{BUCKET}/batch/photos/"
    )
    assert job["TransformInput"]["ContentType"] == "application/x-image"
    output = f"s3://{BUCKET}/species-classifier/transform/sc-transform/"
    assert job["TransformOutput"]["S3OutputPath"] == output
    assert job["TransformResources"] == {"InstanceType": "ml.m5.xlarge", "InstanceCount": 1}
    [model] = wire.bodies("CreateModel")
    assert model["ModelName"] == "sc-transform"
    assert model["PrimaryContainer"] == {"Image": IMAGE, "ModelDataUrl": model_data}
    assert f"predictions in {output}" in out
    # The model made for the job goes once the job has ended.
    assert "model sc-transform deleted (it was created for this job)" in out
    with pytest.raises(ClientError, match="Could not find model"):
        aws.sagemaker.describe_model(ModelName="sc-transform")

    aws.s3.put_object(Bucket=BUCKET, Key="batch/mixed/a.jpg", Body=b"photo")
    aws.s3.put_object(Bucket=BUCKET, Key="batch/mixed/labels.csv", Body=b"csv")
    code, _, err = run(
        "transform", "--input", f"s3://{BUCKET}/batch/mixed/", "--model", "sc-any-model",
        "--instance-type", "ml.m5.xlarge",
    )  # fmt: skip
    assert code == 2
    assert "are not photos (e.g. batch/mixed/labels.csv)" in err


def test_delete_transform_job_removes_only_the_model_made_for_it(run, aws):
    aws.s3.put_object(Bucket=BUCKET, Key="batch/later/a.jpg", Body=b"photo")
    source = ("--input", f"s3://{BUCKET}/batch/later/", "--instance-type", "ml.m5.xlarge")
    model_data = ("--model-data", f"s3://{BUCKET}/models/v1/model.tar.gz")
    code, out, err = run("transform", *source, *model_data, "--job-name", "sc-transform-later")
    assert code == 0, err
    assert "remove its model: scripts/run_job.py delete --transform-job sc-transform-later" in out
    aws.sagemaker.describe_model(ModelName="sc-transform-later")
    code, _, err = run("transform", *source, "--model", "sc-transform-later", "--job-name",
                       "sc-transform-reuse")  # fmt: skip
    assert code == 0, err

    code, out, err = run("delete", "--transform-job", "sc-transform-reuse")
    assert code == 0, err
    assert (
        "model sc-transform-later of transform job sc-transform-reuse was not created for it: kept"
        in out
    )
    aws.sagemaker.describe_model(ModelName="sc-transform-later")

    code, out, err = run("delete", "--transform-job", "sc-transform-later")
    assert code == 0, err
    assert "model sc-transform-later deleted" in out
    with pytest.raises(ClientError, match="Could not find model"):
        aws.sagemaker.describe_model(ModelName="sc-transform-later")


# ---------------------------------------------------------------- as a real process


def test_the_script_runs_as_a_real_process(aws, tmp_path):
    # The strict validator in the real process too: sitecustomize runs before the script.
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import aws_validation\naws_validation.install_everywhere()\n"
    )
    path = [hooks, REPO / "tests"]  # the script finds the launcher in its clone itself
    env = {**os.environ, **aws.env, **SETTINGS, "PYTHONPATH": os.pathsep.join(map(str, path))}
    put_output_archive(aws.s3, "species-classifier/output", "sc-process")
    command = [
        sys.executable, str(SCRIPT), "train", "--data", str(make_channel(tmp_path / "training")),
        "--instance-type", "ml.m5.xlarge", "--hyperparameter", f"target_species={TARGETS}",
        "--job-name", "sc-process", "--wait", "--poll-seconds", "0.05",
        "--download-dir", str(tmp_path / "out"),
    ]  # fmt: skip

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr
    assert "training job sc-process completed" in done.stdout
    assert (tmp_path / "out" / "sc-process" / "metrics.json").exists()
    job = aws.sagemaker.describe_training_job(TrainingJobName="sc-process")
    assert job["AlgorithmSpecification"]["TrainingImage"] == IMAGE

    del env["SPECIES_ROLE_ARN"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: missing setting: role. Pass --role ARN, set SPECIES_ROLE_ARN, or put "
        'role = "..." in ~/.species-classifier.toml (or --config FILE)'
    ]


# ---------------------------------------------------------------- IAM documents

PLACEHOLDERS = {
    "ACCOUNT_ID": DEFAULT_ACCOUNT_ID,
    "REGION": REGION,
    "BUCKET": BUCKET,
    "REPOSITORY": "species-classifier",
    "EXECUTION_ROLE_NAME": ROLE_NAME,
}
# Actions AWS does not scope to a resource, or only to ARNs with a random ID that exists only
# after the call (Application Auto Scaling's scalable targets): the only ones allowed on "*".
UNSCOPED_ACTIONS = {
    "ecr:GetAuthorizationToken",
    "cloudwatch:PutMetricData",
    *(f"application-autoscaling:{action}" for action in (
        "RegisterScalableTarget", "DeregisterScalableTarget", "DescribeScalableTargets",
        "PutScalingPolicy", "DescribeScalingPolicies", "DeleteScalingPolicy")),
}  # fmt: skip
# Every AWS action the launcher performs.
LAUNCHER_ACTIONS = {
    "sagemaker:CreateTrainingJob", "sagemaker:DescribeTrainingJob", "sagemaker:StopTrainingJob",
    "sagemaker:AddTags", "sagemaker:CreateModel", "sagemaker:DeleteModel",
    "sagemaker:CreateEndpointConfig", "sagemaker:DescribeEndpointConfig",
    "sagemaker:DeleteEndpointConfig", "sagemaker:CreateEndpoint", "sagemaker:DescribeEndpoint",
    "sagemaker:UpdateEndpoint", "sagemaker:DeleteEndpoint", "sagemaker:InvokeEndpoint",
    "sagemaker:CreateTransformJob", "sagemaker:DescribeTransformJob", "s3:ListBucket",
    "s3:GetObject", "s3:PutObject", "logs:DescribeLogStreams", "logs:GetLogEvents",
    "iam:PassRole", "sagemaker:InvokeEndpointAsync", "sagemaker:CreateHyperParameterTuningJob",
    "sagemaker:DescribeHyperParameterTuningJob",
    "sagemaker:ListTrainingJobsForHyperParameterTuningJob", "application-autoscaling:RegisterScalableTarget",
    "application-autoscaling:DeregisterScalableTarget",
    "application-autoscaling:DescribeScalableTargets", "application-autoscaling:PutScalingPolicy",
    "application-autoscaling:DescribeScalingPolicies",
    "application-autoscaling:DeleteScalingPolicy",
}  # fmt: skip


def policy_text(name: str) -> str:
    text = (IAM_DOCS / name).read_text()
    for placeholder, value in PLACEHOLDERS.items():
        text = text.replace(placeholder, value)
    return text


@pytest.mark.parametrize("name", ["launcher-policy.json", "execution-role-policy.json"])
def test_iam_policies_are_valid_and_scoped(aws, name):
    text = policy_text(name)
    boto3.client("iam").create_policy(PolicyName=name.removesuffix(".json"), PolicyDocument=text)
    statements = json.loads(text)["Statement"]
    actions = set()
    for statement in statements:
        listed = (
            statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        )
        resources = (
            statement["Resource"]
            if isinstance(statement["Resource"], list)
            else [statement["Resource"]]
        )
        actions |= set(listed)
        assert not any(a == "*" or a.endswith(":*") for a in listed), statement
        if "*" in resources:
            assert set(listed) <= UNSCOPED_ACTIONS, statement
    if name == "launcher-policy.json":
        assert actions >= LAUNCHER_ACTIONS, LAUNCHER_ACTIONS - actions
        [pass_role] = [s for s in statements if "iam:PassRole" in s["Action"]]
        assert pass_role["Resource"] == ROLE_ARN
        assert pass_role["Condition"] == {
            "StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}
        }

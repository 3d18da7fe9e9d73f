"""What the launcher's tests (test_launcher_*.py) share: a local AWS, the wire, a fake clock.

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
The `aws` and `run` fixtures (conftest.py) are built from `local_aws` and `runner` here.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aws_validation
import boto3
import pytest
import requests
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError
from local_servers import moto_server
from moto.core import DEFAULT_ACCOUNT_ID
from moto.sagemaker.models import sagemaker_backends
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


def uploaded_prefix(out: str) -> str:
    """The key prefix the tool says it uploaded to."""
    [line] = [line for line in out.splitlines() if line.startswith("data: uploaded")]
    return line.split(f"s3://{BUCKET}/", 1)[1].split(" ", 1)[0]


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


def serverless_args(endpoint: str, *extra) -> list[str]:
    model_data = f"s3://{BUCKET}/models/v1/model.tar.gz"
    return ["deploy", "--endpoint", endpoint, "--model-data", model_data, "--serverless", *extra]


def serving(aws, endpoint: str) -> tuple[str, str, str]:
    """(endpoint config, model, model data) an endpoint serves."""
    config = aws.sagemaker.describe_endpoint(EndpointName=endpoint)["EndpointConfigName"]
    [variant] = aws.sagemaker.describe_endpoint_config(EndpointConfigName=config)[
        "ProductionVariants"
    ]
    model = aws.sagemaker.describe_model(ModelName=variant["ModelName"])
    return config, variant["ModelName"], model["PrimaryContainer"]["ModelDataUrl"]


@contextlib.contextmanager
def local_aws(home: Path) -> Iterator[LocalAws]:
    """A moto server, emptied, with the bucket and the execution role; the process environment
    points boto3 at it while the block runs."""
    werkzeug = logging.getLogger("werkzeug")
    level = werkzeug.level
    werkzeug.setLevel(logging.ERROR)
    with moto_server(REGION) as local, pytest.MonkeyPatch.context() as patch:
        # moto's backends live in this process and outlive a server: start from nothing.
        requests.post(f"{local['AWS_ENDPOINT_URL']}/moto-api/reset", timeout=30).raise_for_status()
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


def runner(capsys) -> Callable:
    """run(*argv, environ=, wire=, clock=) -> (exit code, stdout, stderr): the launcher in process."""

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

"""The launcher on GPU instance types: the AMI version whose driver runs the image is asked
for, and V100 instances (no kernels in the image's torch) are refused before any call that
creates something. Against moto, every request checked against botocore's service model."""

from __future__ import annotations

import json

import aws_validation
import boto3
import pytest
from launcher_helpers import BUCKET, SETTINGS, local_aws
from species_classifier import gpu
from species_tools.launcher import cli

MODEL_DATA = f"s3://{BUCKET}/models/v1/model.tar.gz"
CREATES = {"PutObject", "CreateTrainingJob", "CreateModel", "CreateEndpointConfig"}
CREATES |= {"CreateEndpoint", "CreateTransformJob", "CreateHyperParameterTuningJob"}


@pytest.fixture(scope="module")
def aws(tmp_path_factory):
    with local_aws(tmp_path_factory.mktemp("home")) as local:
        local.s3.put_object(Bucket=BUCKET, Key="batch/photos/a.jpg", Body=b"photo")
        yield local.sagemaker


class Recorder:
    """boto3 sessions that check every request against botocore and keep its body."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def session(self, **kwargs):
        session = aws_validation.install(boto3.session.Session(**kwargs))
        session.events.register("before-send", self._record)
        return session

    def _record(self, request, event_name, **_):
        self.sent.append((event_name.split(".")[-1], request.body))

    def bodies(self, operation: str) -> list[dict]:
        return [json.loads(body) for op, body in self.sent if op == operation]

    def operations(self) -> set[str]:
        return {op for op, _ in self.sent}


@pytest.fixture
def run(aws, capsys):
    def invoke(*argv):
        recorder = Recorder()
        code = cli.main(
            [str(a) for a in argv],
            environ=SETTINGS,
            session_factory=recorder.session,
            sleep=lambda _s: None,
            clock=lambda: 0.0,
        )
        out, err = capsys.readouterr()
        return code, out, err, recorder

    return invoke


def deployed_variant(sagemaker, endpoint: str) -> dict:
    config = sagemaker.describe_endpoint(EndpointName=endpoint)["EndpointConfigName"]
    [variant] = sagemaker.describe_endpoint_config(EndpointConfigName=config)["ProductionVariants"]
    return variant


def test_deploy_to_a_gpu_asks_for_the_driver_580_ami(run, aws):
    # moto knows only the older GPU types; gpu.py's tests cover the other families.
    endpoint = "sc-gpu"
    code, _, err, recorder = run(
        "deploy", "--endpoint", endpoint, "--model-data", MODEL_DATA,
        "--instance-type", "ml.g4dn.xlarge",
    )  # fmt: skip
    assert code == 0, err
    [sent] = recorder.bodies("CreateEndpointConfig")
    assert sent["ProductionVariants"][0]["InferenceAmiVersion"] == gpu.ENDPOINT_AMI
    assert deployed_variant(aws, endpoint)["InferenceAmiVersion"] == gpu.ENDPOINT_AMI


def test_deploy_to_a_cpu_asks_for_no_ami(run, aws):
    code, _, err, recorder = run(
        "deploy", "--endpoint", "sc-cpu", "--model-data", MODEL_DATA,
        "--instance-type", "ml.m5.xlarge",
    )  # fmt: skip
    assert code == 0, err
    [sent] = recorder.bodies("CreateEndpointConfig")
    assert "InferenceAmiVersion" not in sent["ProductionVariants"][0]


@pytest.mark.parametrize(
    ("instance_type", "ami"), [("ml.g4dn.xlarge", gpu.TRANSFORM_AMI), ("ml.m5.xlarge", None)]
)
def test_transform_to_a_gpu_asks_for_the_newest_batch_driver(run, instance_type, ami):
    job = f"sc-transform-{instance_type.split('.')[1]}"
    code, _, err, recorder = run(
        "transform", "--input", f"s3://{BUCKET}/batch/photos/", "--model-data", MODEL_DATA,
        "--instance-type", instance_type, "--job-name", job,
    )  # fmt: skip
    assert code == 0, err
    [sent] = recorder.bodies("CreateTransformJob")
    assert sent["TransformResources"].get("TransformAmiVersion") == ami


@pytest.mark.parametrize(
    "command",
    [
        ["train", "--data", f"s3://{BUCKET}/data/", "--hyperparameter", "target_species=A b"],
        [
            "tune",
            "--data",
            f"s3://{BUCKET}/data/",
            "--hyperparameter",
            "target_species=A b",
            "--range",
            "learning_rate=1e-5:1e-3:log",
        ],
        ["deploy", "--endpoint", "sc-v100", "--model-data", MODEL_DATA],
        ["transform", "--input", f"s3://{BUCKET}/batch/photos/", "--model-data", MODEL_DATA],
    ],
)
def test_v100_instances_are_refused_before_anything_is_created(run, command):
    code, _, err, recorder = run(*command, "--instance-type", "ml.p3.2xlarge")
    assert code == 2
    assert (
        err.strip()
        .splitlines()[-1]
        .endswith(
            "ml.p3.2xlarge has an NVIDIA V100 (sm_70), for which this image's torch "
            "2.14.1+cu130 has no kernels (they start at sm_75): use ml.g4dn, ml.g5, ml.g6, "
            "ml.p4d or ml.p5"
        )
    )
    assert not recorder.operations() & CREATES

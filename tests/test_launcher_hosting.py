"""The launcher's `hosting`: `deploy` (create, update in place, replace) and `delete`.

Against a local AWS: see launcher_helpers for how and for the gaps of moto it bridges.
"""

from __future__ import annotations

import pytest
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ClientError
from launcher_helpers import (
    BUCKET,
    CREATES,
    GPU,
    IMAGE,
    ROLE_ARN,
    SETTINGS,
    Clock,
    Wire,
    deploy_args,
    moto_sagemaker,
    serverless_args,
    serving,
    set_endpoint_state,
    train_args,
    update_endpoint_answer,
)


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
        # What the server would refuse at start-up, after the instance was provisioned.
        (("--env", "SPECIES_SERVE_COMPILE=yes"), "--env SPECIES_SERVE_COMPILE='yes' is not valid: set it to one of 0, 1, or unset it for 0"),
        (("--env", "SPECIES_SERVE_ENGINE=fast"), "--env SPECIES_SERVE_ENGINE='fast' is not valid: set it to one of auto, eager, graph"),
        (("--env", "SAGEMAKER_MODEL_SERVER_WORKERS=0"), "--env SAGEMAKER_MODEL_SERVER_WORKERS='0' is not valid: set it to a positive whole number, or unset it for one per GPU"),
        (("--env", "SAGEMAKER_MAX_PAYLOAD_IN_MB=200"), "--env SAGEMAKER_MAX_PAYLOAD_IN_MB='200' is not valid: set it to 1 to 100"),
    ],
)  # fmt: skip
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

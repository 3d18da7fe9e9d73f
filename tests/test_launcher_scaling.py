"""The launcher's `scaling`: endpoint autoscaling and its removal.

Against a local AWS: see launcher_helpers for how and for the gaps of moto it bridges.
"""

from __future__ import annotations

import boto3
import pytest
from launcher_helpers import (
    Wire,
    deploy_args,
    update_endpoint_answer,
)


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

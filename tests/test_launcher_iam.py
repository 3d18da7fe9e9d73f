"""The launcher's The IAM documents in docs/iam: valid, scoped, and covering every action the launcher performs.

Against a local AWS: see launcher_helpers for how and for the gaps of moto it bridges.
"""

from __future__ import annotations

import json

import boto3
import pytest
from launcher_helpers import (
    BUCKET,
    IAM_DOCS,
    REGION,
    ROLE_ARN,
    ROLE_NAME,
)
from moto.core import DEFAULT_ACCOUNT_ID

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

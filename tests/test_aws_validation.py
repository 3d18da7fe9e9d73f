"""The strict request validator refuses what AWS refuses (so the launcher tests that use it can fail)."""

import boto3
import pytest
from aws_validation import InvalidRequest, install, validate

ROLE = "arn:aws:iam::123456789012:role/SpeciesClassifierSageMaker"


def training_request(**changes) -> dict:
    request = {
        "TrainingJobName": "species-classifier-1",
        "RoleArn": ROLE,
        "AlgorithmSpecification": {"TrainingImage": "image:1", "TrainingInputMode": "File"},
        "OutputDataConfig": {"S3OutputPath": "s3://bucket/output/"},
        "ResourceConfig": {"InstanceType": "ml.g5.2xlarge", "InstanceCount": 1},
        "StoppingCondition": {"MaxRuntimeInSeconds": 3600},
        "Tags": [{"Key": "project", "Value": "species-classifier"}],
    }
    return {**request, **changes}


def test_a_valid_request_has_no_faults():
    assert validate("sagemaker", "CreateTrainingJob", training_request()) == []


@pytest.mark.parametrize(
    ("changes", "fault"),
    [
        ({"TrainingJobName": "under_score"}, "TrainingJobName: 'under_score' does not match"),
        ({"TrainingJobName": "x" * 64}, "TrainingJobName: 64 characters, at most 63"),
        ({"ResourceConfig": {"InstanceType": "ml.g99.huge", "InstanceCount": 1}}, "is not one of"),
        ({"OutputDataConfig": {}}, "OutputDataConfig: missing required member S3OutputPath"),
        ({"Tags": [{"Key": "team!", "Value": "a"}]}, "Tags[0].Key: 'team!' does not match"),
        ({"Tags": [{"Key": "aws:owner", "Value": "a"}]}, "reserved aws: prefix"),
        ({"Tags": [{"Key": f"k{i}", "Value": "v"} for i in range(51)]}, "51 entries, at most 50"),
        ({"HyperParameters": {"a": "x" * 2501}}, "2501 characters, at most 2500"),
        ({"HyperParameters": {f"k{i}": "v" for i in range(101)}}, "101 entries, at most 100"),
        ({"Environment": {"1BAD": "x"}}, "Environment key '1BAD': '1BAD' does not match"),
        ({"EnableManagedSpotTraining": True}, "managed spot needs MaxWaitTimeInSeconds"),
        (
            {
                "EnableManagedSpotTraining": True,
                "StoppingCondition": {"MaxRuntimeInSeconds": 7200, "MaxWaitTimeInSeconds": 3600},
            },
            "MaxWaitTimeInSeconds 3600 < MaxRuntimeInSeconds 7200",
        ),
        (
            {
                "EnableManagedSpotTraining": True,
                "StoppingCondition": {"MaxRuntimeInSeconds": 60, "MaxWaitTimeInSeconds": 60},
                "ResourceConfig": {
                    "InstanceType": "ml.g5.2xlarge",
                    "InstanceCount": 1,
                    "KeepAlivePeriodInSeconds": 600,
                },
            },
            "warm pools (KeepAlivePeriodInSeconds) do not work with spot",
        ),
        ({"EnableNetworkIsolation": "yes"}, "expected true or false"),
        ({"Bogus": 1}, "unknown member Bogus"),
    ],
)
def test_training_job_faults_are_found(changes, fault):
    faults = validate("sagemaker", "CreateTrainingJob", training_request(**changes))
    assert any(fault in f for f in faults), faults


def test_transform_payload_limits_the_model_does_not_encode():
    request = {
        "TransformJobName": "t",
        "ModelName": "m",
        "MaxPayloadInMB": 30,
        "MaxConcurrentTransforms": 4,
        "TransformInput": {"DataSource": {"S3DataSource": {"S3DataType": "S3Prefix", "S3Uri": "s3://b/p/"}}},
        "TransformOutput": {"S3OutputPath": "s3://b/o/"},
        "TransformResources": {"InstanceType": "ml.m5.xlarge", "InstanceCount": 1},
    }  # fmt: skip
    assert validate("sagemaker", "CreateTransformJob", request) == [
        "MaxConcurrentTransforms x MaxPayloadInMB = 120, at most 100 allowed"
    ]
    request.update(MaxPayloadInMB=101, MaxConcurrentTransforms=1)
    assert validate("sagemaker", "CreateTransformJob", request) == [
        "MaxPayloadInMB: 101, at most 100 allowed",
        "MaxConcurrentTransforms x MaxPayloadInMB = 101, at most 100 allowed",
    ]


def test_an_installed_session_refuses_before_sending():
    session = install(boto3.session.Session(region_name="us-east-1"))
    client = session.client(
        "sagemaker",
        aws_access_key_id="x",
        aws_secret_access_key="x",
        endpoint_url="http://0.0.0.0:9",
    )
    with pytest.raises(
        InvalidRequest, match=r"sagemaker.DeleteEndpoint would be refused.*EndpointName"
    ):
        client.delete_endpoint(EndpointName="bad_name")

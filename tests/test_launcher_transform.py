"""The launcher's `transform`: batch transform jobs and the model made for them.

Against a local AWS: see launcher_helpers for how and for the gaps of moto it bridges.
"""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError
from launcher_helpers import (
    BUCKET,
    IMAGE,
    Wire,
)


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

"""The launcher's `training`: `train`, `status`, `logs`, `stop` and the log tail.

Against a local AWS: see launcher_helpers for how and for the gaps of moto it bridges.
"""

from __future__ import annotations

import json
import re
import time

import pytest
from botocore.awsrequest import AWSResponse
from launcher_helpers import (
    BUCKET,
    GPU,
    IMAGE,
    ROLE_ARN,
    TARGETS,
    Clock,
    Wire,
    job_name_from,
    keys_under,
    make_channel,
    put_log_lines,
    put_output_archive,
    set_job_state,
    train_args,
    uploaded_prefix,
)
from species_classifier.contract.metric_lines import METRIC_DEFINITIONS


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


@pytest.mark.parametrize(
    ("hyperparameter", "message"),
    [
        ("k_folds=500", "hyperparameter k_folds=500 is out of range: allowed 1 to 20"),
        ("lerning_rate=0.01", "unknown hyperparameter 'lerning_rate': did you mean learning_rate?"),
        ("precision=fp8", "hyperparameter precision='fp8' is not one of auto, bf16, fp16, fp32"),
        ("pretrained=maybe", "hyperparameter pretrained='maybe' is not a boolean: use true or false"),
        ("num_epochs=ten", "hyperparameter num_epochs='ten' is not a number"),
    ],
)  # fmt: skip
def test_what_the_image_would_refuse_is_refused_before_any_upload(
    run, aws, tmp_path, hyperparameter, message
):
    data = make_channel(tmp_path / "training")
    stored = keys_under(aws.s3, "")
    wire = Wire()

    code, _, err = run(
        *train_args("sc-contract", "--hyperparameter", hyperparameter, data=data), wire=wire
    )

    assert code == 2
    assert err.strip().splitlines() == [f"error: {message}"]
    assert wire.operations() == []  # no upload, no call of any kind
    assert keys_under(aws.s3, "") == stored
    assert (
        aws.sagemaker.list_training_jobs(NameContains="sc-contract")["TrainingJobSummaries"] == []
    )


def test_keys_sagemaker_and_its_sdk_add_stay_allowed(run, aws):
    sdk_keys = {
        "sagemaker_program": "train",
        "sagemaker_container_log_level": "20",
        "_tuning_objective_metric": "cv:mean_macro_f1",
    }
    pairs = [
        arg for key, value in sdk_keys.items() for arg in ("--hyperparameter", f"{key}={value}")
    ]
    code, _, err = run(*train_args("sc-sdk-keys", *pairs, "--hyperparameter", "k-folds=5"))

    assert code == 0, err
    sent = aws.sagemaker.describe_training_job(TrainingJobName="sc-sdk-keys")["HyperParameters"]
    assert sent == {"target_species": TARGETS, "k-folds": "5", **sdk_keys}


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

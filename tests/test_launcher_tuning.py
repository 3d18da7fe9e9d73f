"""The launcher's `tuning`: `tune`, its ranges and its trials.

Against a local AWS: see launcher_helpers for how and for the gaps of moto it bridges.
"""

from __future__ import annotations

import re

import pytest
from botocore.awsrequest import AWSResponse
from launcher_helpers import (
    BUCKET,
    GPU,
    REGION,
    SETTINGS,
    TARGETS,
    Clock,
    Wire,
    moto_sagemaker,
    serving,
    train_args,
)
from species_classifier.contract.metric_lines import METRIC_DEFINITIONS

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
        (("--range", "learning_rate=1e-5:1e-3", "--strategy", "Grid"), "--strategy Grid searches choices only"),
        (("--range", "seed=1:2", "--max-jobs", "2", "--max-parallel", "3"), "--max-parallel must be between 1 and 2"),
        (("--range", "seed=1:2", "--tuning-job-name", "t" * 33), "at most 32 characters"),
        # Names and bounds the image would refuse or ignore: N identical or failing paid trials.
        (("--range", "lerning_rate=1e-5:1e-3:log"), "--range lerning_rate=1e-5:1e-3:log: unknown hyperparameter 'lerning_rate': did you mean learning_rate?"),
        (("--range", "k_folds=2:500"), "--range k_folds=2:500: k_folds=500 is out of range: allowed 1 to 20"),
        (("--range", "batch_size=1:64"), "--range batch_size=1:64: batch_size=1 is out of range: allowed 2 to 4096"),
        (("--range", "k_folds=2.5:5"), "--range k_folds=2.5:5: k_folds takes whole numbers; give LOW and HIGH as integers"),
        (("--range", "pretrained=0:1"), "--range pretrained=0:1: pretrained is not a number; give its choices as A,B"),
        (("--range", "precision=bf16,fp8"), "--range precision=bf16,fp8: precision='fp8' is not one of auto, bf16, fp16, fp32"),
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

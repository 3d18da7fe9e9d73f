"""`tune`: SageMaker automatic model tuning over this trainer's hyperparameters.

Each trial is a training job defined as `train` defines one (same image, data, resources and
limits); the ranges come from `--range NAME=SPEC` or the config's `[tune.ranges]`. The
objective is `cv:mean_macro_f1`, scraped from the one line the trainer prints at the end of a
job (the mean over folds), never an epoch's value. With `--wait` the finished trials are
printed as a table as they end; `deploy --tuning-job` serves the best one.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from species_classifier.contract import hyperparameters as image_hyperparameters
from species_classifier.contract import preflight
from species_classifier.contract.metric_lines import OBJECTIVE_METRIC

from species_tools.aws import SettingsError
from species_tools.launcher import limits
from species_tools.launcher.session import Command, Context, JobFailed, poll_until
from species_tools.launcher.settings import (
    DEFAULT_PREFIX,
    PROG,
    SettingsParser,
    check_name,
    format_duration,
    parse_pair,
    require,
)
from species_tools.launcher.training import (
    WATCH_MARGIN_S,
    add_job_arguments,
    checked_hyperparameters,
    checked_tags,
    job_definition,
    output_location,
    training_data_location,
)
from species_tools.launcher.upload import upload_channel

OBJECTIVE = {"Type": "Maximize", "MetricName": OBJECTIVE_METRIC}
STRATEGIES = ("Bayesian", "Random", "Grid")
SCALES = {
    "auto": "Auto",
    "linear": "Linear",
    "log": "Logarithmic",
    "reverse-log": "ReverseLogarithmic",
}
MAX_RANGES_PER_KIND = 30
MAX_CATEGORICAL_VALUES = 30
NAME_LIMIT = 32  # tuning job names are shorter than training job names
TUNING_TERMINAL = ("Completed", "Failed", "Stopped")
TRIAL_TERMINAL = ("Completed", "Failed", "Stopped")
INTEGER = re.compile(r"[-+]?\d+")


def add_tune_arguments(tune: SettingsParser) -> None:
    add_job_arguments(tune)
    tune.add_argument(
        "--range",
        dest="ranges",
        action="append",
        type=parse_pair,
        metavar="NAME=SPEC",
        help="repeatable: LOW:HIGH[:log|linear|auto|reverse-log] (integers or decimals) or "
        "A,B,C (choices), e.g. learning_rate=1e-5:1e-3:log batch_size=32,64,128",
    )
    tune.add_argument(
        "--strategy",
        choices=STRATEGIES,
        default="Bayesian",
        help="search strategy (default Bayesian)",
    )
    tune.add_argument("--max-jobs", type=int, default=20, help="trials in all (default 20)")
    tune.add_argument("--max-parallel", type=int, default=2, help="trials at once (default 2)")
    tune.add_argument(
        "--early-stopping",
        choices=["Auto", "Off"],
        default="Auto",
        help="let SageMaker stop trials that look worse than the median (default Auto)",
    )
    tune.add_argument(
        "--tuning-job-name",
        help=f"at most {NAME_LIMIT} characters (default species-classifier-MMDD-HHMMSS)",
    )
    tune.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="print each trial as it ends, then the best one",
    )


def parameter_range(name: str, spec: str) -> tuple[str, dict[str, Any]]:
    """(kind of range, its request entry) from `LOW:HIGH[:SCALE]` or `A,B,C`, every value one
    the image accepts for that hyperparameter."""
    if not image_hyperparameters.is_known(name):
        raise SettingsError(f"--range {name}={spec}: {image_hyperparameters.unknown_name(name)}")
    if ":" not in spec:
        values = [value.strip() for value in spec.split(",") if value.strip()]
        if not 1 <= len(values) <= MAX_CATEGORICAL_VALUES:
            raise SettingsError(
                f"--range {name}: 1 to {MAX_CATEGORICAL_VALUES} choices, got {len(values)}"
            )
        for value in values:
            check_range_value(name, spec, value)
        return "CategoricalParameterRanges", {"Name": name, "Values": values}
    low, high, *scale = (part.strip() for part in spec.split(":"))
    if len(scale) > 1 or (scale and scale[0] not in SCALES):
        raise SettingsError(
            f"--range {name}={spec}: expected LOW:HIGH or LOW:HIGH:SCALE with SCALE one of "
            f"{', '.join(SCALES)}"
        )
    try:
        low_value, high_value = float(low), float(high)
    except ValueError:
        raise SettingsError(f"--range {name}={spec}: LOW and HIGH must be numbers") from None
    if not (math.isfinite(low_value) and math.isfinite(high_value)) or low_value >= high_value:
        raise SettingsError(f"--range {name}={spec}: LOW must be below HIGH")
    entry = {"Name": name, "MinValue": low, "MaxValue": high}
    if scale:
        if SCALES[scale[0]] == "Logarithmic" and low_value <= 0:
            raise SettingsError(f"--range {name}={spec}: a log scale needs LOW above 0")
        entry["ScalingType"] = SCALES[scale[0]]
    integers = INTEGER.fullmatch(low) and INTEGER.fullmatch(high)
    kind = image_hyperparameters.value_type(name)
    if kind not in (int, float):
        raise SettingsError(
            f"--range {name}={spec}: {name} is not a number; give its choices as A,B"
        )
    if kind is int and not integers:
        raise SettingsError(
            f"--range {name}={spec}: {name} takes whole numbers; give LOW and HIGH as integers"
        )
    for bound in (low, high):
        check_range_value(name, spec, bound)
    return ("IntegerParameterRanges" if integers else "ContinuousParameterRanges"), entry


def check_range_value(name: str, spec: str, value: str) -> None:
    """A value SageMaker may hand a trial, read as the image reads it."""
    try:
        preflight.check_value(name, value)
    except preflight.ConfigError as error:
        raise SettingsError(f"--range {name}={spec}: {error}") from None


def parameter_ranges(args: argparse.Namespace, static: Mapping[str, str]) -> dict[str, list]:
    ranges: dict[str, list] = {
        "IntegerParameterRanges": [],
        "ContinuousParameterRanges": [],
        "CategoricalParameterRanges": [],
    }
    for name, spec in dict(args.ranges or []).items():
        if name in static:
            raise SettingsError(
                f"{name} is both a --hyperparameter and a --range: tune it or fix it, not both"
            )
        kind, entry = parameter_range(name, spec)
        ranges[kind].append(entry)
    if not any(ranges.values()):
        raise SettingsError(
            "tune needs at least one --range NAME=SPEC (or a [tune.ranges] table), e.g. "
            "--range learning_rate=1e-5:1e-3:log"
        )
    for kind, entries in ranges.items():
        if len(entries) > MAX_RANGES_PER_KIND:
            raise SettingsError(f"{len(entries)} {kind}: at most {MAX_RANGES_PER_KIND} allowed")
    if args.strategy == "Grid" and (
        ranges["IntegerParameterRanges"] or ranges["ContinuousParameterRanges"]
    ):
        raise SettingsError("--strategy Grid searches choices only: give every --range as A,B,C")
    return {kind: entries for kind, entries in ranges.items() if entries}


def resource_limits(args: argparse.Namespace) -> dict[str, int]:
    limits.check_range(args.max_jobs, 1, 10_000, "--max-jobs")
    limits.check_range(args.max_parallel, 1, args.max_jobs, "--max-parallel")
    return {"MaxNumberOfTrainingJobs": args.max_jobs, "MaxParallelTrainingJobs": args.max_parallel}


def tuning_request(
    args: argparse.Namespace, name: str, data_uri: str, output: str
) -> dict[str, Any]:
    static = checked_hyperparameters(args)
    config: dict[str, Any] = {
        "Strategy": args.strategy,
        "HyperParameterTuningJobObjective": OBJECTIVE,
        "ResourceLimits": resource_limits(args),
        "ParameterRanges": parameter_ranges(args, static),
        "TrainingJobEarlyStoppingType": args.early_stopping,
    }
    definition = job_definition(args, data_uri, output)
    # No CheckpointConfig: the trials would share one prefix and resume each other's folds.
    definition["StaticHyperParameters"] = static
    return {
        "HyperParameterTuningJobName": name,
        "HyperParameterTuningJobConfig": config,
        "TrainingJobDefinition": definition,
        "Tags": checked_tags(args),
    }


def tuning_name(args: argparse.Namespace) -> str:
    # 31 characters, and trials named after it match the IAM policy's species-classifier*.
    name = args.tuning_job_name or f"{DEFAULT_PREFIX}-{datetime.now(UTC):%m%d-%H%M%S}"
    check_name(name, "tuning job name")
    if len(name) > NAME_LIMIT:
        raise SettingsError(f"tuning job name {name!r}: at most {NAME_LIMIT} characters")
    return name


def trial_row(trial: Mapping[str, Any], tuned: list[str]) -> str:
    objective = trial.get("FinalHyperParameterTuningJobObjectiveMetric") or {}
    value = f"{objective['Value']:.4f}" if "Value" in objective else "-"
    values = trial.get("TunedHyperParameters") or {}
    settings = " ".join(f"{name}={values.get(name, '-')}" for name in tuned)
    return (
        f"  {trial['TrainingJobName']:<40} {trial['TrainingJobStatus']:<10} {value:>8}  {settings}"
    )


def watch_tuning_job(
    name: str, request: Mapping[str, Any], tuned: list[str], ctx: Context, poll_seconds: float
) -> dict[str, Any]:
    """Print each trial once it has ended, until the tuning job ends; its last description."""
    config = request["HyperParameterTuningJobConfig"]
    printed: set[str] = set()
    ctx.out(f"  {'trial':<40} {'status':<10} {'macro F1':>8}  {' '.join(tuned)}")

    def describe() -> dict[str, Any]:
        trials = ctx.aws.sagemaker.list_training_jobs_for_hyper_parameter_tuning_job(
            HyperParameterTuningJobName=name, SortBy="CreationTime", SortOrder="Ascending"
        )["TrainingJobSummaries"]
        for trial in trials:
            if (
                trial["TrainingJobStatus"] in TRIAL_TERMINAL
                and trial["TrainingJobName"] not in printed
            ):
                printed.add(trial["TrainingJobName"])
                ctx.out(trial_row(trial, tuned))
        return ctx.aws.sagemaker.describe_hyper_parameter_tuning_job(
            HyperParameterTuningJobName=name
        )

    resources = config["ResourceLimits"]
    rounds = math.ceil(resources["MaxNumberOfTrainingJobs"] / resources["MaxParallelTrainingJobs"])
    stopping = request["TrainingJobDefinition"]["StoppingCondition"]
    longest = max(stopping["MaxRuntimeInSeconds"], stopping.get("MaxWaitTimeInSeconds", 0))
    return poll_until(
        describe,
        lambda d: d["HyperParameterTuningJobStatus"] in TUNING_TERMINAL,
        what=f"tuning job {name} to end",
        timeout_s=rounds * longest + WATCH_MARGIN_S,
        poll_seconds=poll_seconds,
        ctx=ctx,
    )


def command_tune(args: argparse.Namespace, ctx: Context) -> int:
    require(args, "image", "role", "instance_type", "data")
    name = tuning_name(args)
    output = output_location(args)
    data_uri, folder, files = training_data_location(args)
    request = tuning_request(args, name, data_uri, output)
    if folder is not None:
        upload_channel(ctx.aws.s3, folder, files, data_uri, ctx.out)
    ctx.aws.sagemaker.create_hyper_parameter_tuning_job(**request)
    ctx.out(
        f"tuning job {name} created: {args.strategy}, {args.max_jobs} trials, "
        f"{args.max_parallel} at a time, each {args.instance_count} x {args.instance_type} "
        f"for at most {format_duration(args.max_runtime)}; objective {OBJECTIVE_METRIC} (maximize)"
    )
    if not args.wait:
        ctx.out(f"deploy its best trial once it is done: {PROG} deploy --tuning-job {name} ...")
        return 0
    tuned = list(dict(args.ranges).keys())  # the columns in the order the user gave them
    description = watch_tuning_job(name, request, tuned, ctx, args.poll_seconds)
    status = description["HyperParameterTuningJobStatus"]
    best = description.get("BestTrainingJob")
    if not best:
        raise JobFailed(
            f"tuning job {name} {status} without a best trial: "
            f"{description.get('FailureReason') or 'no trial reported ' + OBJECTIVE_METRIC}"
        )
    value = best.get("FinalHyperParameterTuningJobObjectiveMetric", {}).get("Value")
    ctx.out(
        f"tuning job {name} {status}; best trial {best['TrainingJobName']}"
        + (f" ({OBJECTIVE_METRIC} {value:.4f})" if value is not None else "")
    )
    ctx.out(f"deploy it: {PROG} deploy --tuning-job {name} --endpoint NAME --instance-type TYPE")
    return 0 if status == "Completed" else 1


COMMANDS = [
    Command(
        "tune",
        "automatic model tuning: trials over hyperparameter ranges, best by cross-validated F1",
        add_tune_arguments,
        command_tune,
    )
]

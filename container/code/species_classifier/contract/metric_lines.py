"""The one format of the metric log lines, and the regexes that scrape them.

SageMaker publishes a metric to CloudWatch by matching `MetricDefinitions` regexes against
the container's log. The trainer formats its lines here and the launcher sends
`METRIC_DEFINITIONS` from here, so the two can never drift apart.
"""

from __future__ import annotations

import re

# Finite numbers as Python formats them: 0.4123, 2711, 1e-05. CloudWatch refuses NaN and
# infinity (PutMetricData), so a `val_loss=nan` stays in the log for people and is never scraped.
_NUMBER = r"([-+]?\d+\.?\d*(?:[eE][-+]?\d+)?)"

# name in the log line -> name of the CloudWatch metric.
_EPOCH_METRICS = {
    "train_loss": "train:loss",
    "train_macro_f1": "train:macro_f1",
    "val_loss": "validation:loss",
    "val_macro_f1": "validation:macro_f1",
    "img_per_s": "train:images_per_second",
}
_JOB_METRICS = {
    "mean_macro_f1": "cv:mean_macro_f1",
    "std_macro_f1": "cv:std_macro_f1",
    "oof_macro_f1": "cv:oof_macro_f1",
}

# What a tuning job maximises: the mean over folds, printed once at the end of a job.
OBJECTIVE_METRIC = _JOB_METRICS["mean_macro_f1"]

METRIC_DEFINITIONS: list[dict[str, str]] = [
    {"Name": metric, "Regex": rf"\b{key}={_NUMBER}"}
    for key, metric in {**_EPOCH_METRICS, **_JOB_METRICS}.items()
]


def epoch_line(
    fold: int,
    epoch: int,
    train_loss: float,
    train_macro_f1: float,
    val_loss: float,
    val_macro_f1: float,
    img_per_s: float,
) -> str:
    """One epoch's metrics: `fold=1 epoch=3 train_loss=0.4123 ... img_per_s=2711`."""
    return (
        f"fold={fold} epoch={epoch} train_loss={train_loss:.4f} "
        f"train_macro_f1={train_macro_f1:.4f} val_loss={val_loss:.4f} "
        f"val_macro_f1={val_macro_f1:.4f} img_per_s={img_per_s:.0f}"
    )


def job_line(mean_macro_f1: float, std_macro_f1: float, oof_macro_f1: float) -> str:
    """The cross-validated result of the whole job."""
    return (
        f"mean_macro_f1={mean_macro_f1:.4f} std_macro_f1={std_macro_f1:.4f} "
        f"oof_macro_f1={oof_macro_f1:.4f}"
    )


def scrape(text: str) -> dict[str, list[float]]:
    """Every value each metric definition finds in `text`, as SageMaker would see them."""
    return {
        definition["Name"]: [float(v) for v in re.findall(definition["Regex"], text)]
        for definition in METRIC_DEFINITIONS
    }

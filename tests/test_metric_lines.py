"""The log-line format and the regexes SageMaker scrapes it with agree."""

import math

import pytest
from species_classifier.contract import metric_lines


def test_every_epoch_metric_is_scraped_back():
    line = metric_lines.epoch_line(2, 7, 0.41234, 0.9, 0.381, 0.87125, 2711.4)
    assert line == (
        "fold=2 epoch=7 train_loss=0.4123 train_macro_f1=0.9000 val_loss=0.3810 "
        "val_macro_f1=0.8712 img_per_s=2711"
    )
    scraped = metric_lines.scrape("2026-01-01 INFO " + line + " lr=1e-05 best=0.9@3")
    assert scraped["train:loss"] == [0.4123]
    assert scraped["train:macro_f1"] == [0.9]
    assert scraped["validation:loss"] == [0.381]
    assert scraped["validation:macro_f1"] == [0.8712]
    assert scraped["train:images_per_second"] == [2711.0]
    assert scraped["cv:mean_macro_f1"] == []


def test_job_metrics_do_not_collide_with_epoch_metrics():
    scraped = metric_lines.scrape(metric_lines.job_line(0.9, 0.01, 0.905))
    assert scraped["cv:mean_macro_f1"] == [0.9]
    assert scraped["cv:std_macro_f1"] == [0.01]
    assert scraped["cv:oof_macro_f1"] == [0.905]
    assert scraped["validation:macro_f1"] == []


def test_definitions_fit_sagemaker_limits():
    assert len(metric_lines.METRIC_DEFINITIONS) <= 40
    for definition in metric_lines.METRIC_DEFINITIONS:
        assert 1 <= len(definition["Name"]) <= 255 and 1 <= len(definition["Regex"]) <= 500


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_values_cloudwatch_refuses_are_never_scraped(bad):
    line = (
        metric_lines.epoch_line(1, 1, bad, bad, bad, bad, bad)
        + " "
        + metric_lines.job_line(bad, bad, bad)
    )
    scraped = metric_lines.scrape(line)
    assert all(values == [] for values in scraped.values()), (line, scraped)
    assert "nan" in line or "inf" in line  # still there for a person reading the log


def test_every_scraped_value_is_finite():
    line = metric_lines.epoch_line(3, 9, 1e-9, 0.25, -0.5, 1.0, 1e6)
    values = [v for found in metric_lines.scrape(line).values() for v in found]
    assert len(values) == 5 and all(math.isfinite(v) for v in values)

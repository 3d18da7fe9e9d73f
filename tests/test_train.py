"""train.py's parts in-process: the progress line's ETAs and the configuration's first check."""

from __future__ import annotations

import logging
import re

import pytest
from species_classifier.contract.hyperparameters import ConfigError
from species_classifier.contract.paths import JobPaths
from species_classifier.state import EpochRecord, FoldState
from species_classifier.train import Progress, read_config


def epoch(number: int, seconds: float = 10.0) -> EpochRecord:
    return EpochRecord(number, 0.5, 0.5, 0.5, 0.5, 1e-4, seconds, 100.0, 0.5)


def etas(caplog) -> list[tuple[str, str]]:
    return [
        re.search(r"eta_fold<=(\S+) eta_job<=(\S+)", r.getMessage()).groups()
        for r in caplog.records
    ]


def test_the_job_eta_counts_only_this_workers_folds_still_to_come(caplog):
    """Worker 1 of 2 owns folds 1 and 3 of 3: after fold 1 only fold 3 remains.

    Counting by fold number (3 folds minus fold 3) once gave it eta_job<=-1:59:50.
    """
    progress = Progress(num_epochs=2, my_folds=[1, 3])
    caplog.set_level(logging.INFO, logger="species_classifier.train")
    for fold in (1, 3):
        state = FoldState(fold=fold)
        for number in (1, 2):
            progress.report(state, epoch(number))
    assert etas(caplog) == [
        ("0:10", "0:30"),  # fold 1: one epoch left, then fold 3's two
        ("0:00", "0:20"),
        ("0:10", "0:10"),  # fold 3: its last epoch is the job's last
        ("0:00", "0:00"),
    ]


def test_the_job_eta_after_a_restart_that_skipped_finished_folds(caplog):
    progress = Progress(num_epochs=3, my_folds=[1, 2, 3])
    caplog.set_level(logging.INFO, logger="species_classifier.train")
    progress.report(FoldState(fold=2), epoch(1, seconds=20.0))
    progress.report(FoldState(fold=2), epoch(2, seconds=40.0))
    # 30 s per epoch on average: one epoch of fold 2 left, then fold 3's three.
    assert etas(caplog) == [("0:40", "1:40"), ("0:30", "2:00")]


def test_a_missing_hyperparameters_file_says_how_to_run_outside_sagemaker(tmp_path):
    with pytest.raises(ConfigError, match=r"hyperparameters.json is missing: .*SAGEMAKER_BASE_DIR"):
        read_config(JobPaths(tmp_path))

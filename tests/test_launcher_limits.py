"""The launcher's `limits`: SageMaker's documented request limits, refused before any upload or call.

Against a local AWS: see launcher_helpers for how and for the gaps of moto it bridges.
"""

from __future__ import annotations

import pytest
from launcher_helpers import (
    BUCKET,
    Wire,
    make_channel,
    train_args,
)

TOO_MANY = [arg for i in range(100) for arg in ("--hyperparameter", f"h{i}=1")]
FIFTY_TAGS = [arg for i in range(50) for arg in ("--tag", f"t{i}=v")]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (TOO_MANY, "101 hyperparameters: SageMaker takes at most 100"),
        (["--hyperparameter", "notes=" + "x" * 2501], "hyperparameter notes has a value of 2501 characters: at most 2500"),
        (["--hyperparameter", "k" * 257 + "=1"], "257 characters: 1 to 256 allowed"),
        (FIFTY_TAGS, "51 tags (project=species-classifier included): at most 50"),
        (["--tag", "team=field biology!"], "tag value 'field biology!': only letters, digits, spaces"),
        (["--tag", "aws:owner=me"], "tag key 'aws:owner': the aws: prefix is reserved"),
        (["--env", "1BAD=x"], "environment variable name '1BAD': letters, digits and _"),
        (["--env", "NOTE=" + "x" * 513], "environment variable NOTE has a value of 513 characters: at most 512"),
        (["--job-name", "under_score"], "invalid job name 'under_score'"),
        (["--spot", "--max-runtime", "2h", "--max-wait", "1h"], "--max-wait (1h) must be at least --max-runtime (2h)"),
        (["--max-runtime", "29d"], "--max-runtime is 1s to 28d, got 29d"),
        (["--keep-alive", "7h"], "--keep-alive (seconds) must be between 1 and 21600, got 25200"),
        (["--spot", "--keep-alive", "10m"], "--keep-alive: SageMaker keeps no warm pool for spot"),
        (["--retries", "31"], "--retries must be between 1 and 30, got 31"),
    ],
)  # fmt: skip
def test_training_limits_are_checked_before_any_upload(run, tmp_path, extra, message):
    data = make_channel(tmp_path / "training")
    wire = Wire()

    code, _, err = run(*train_args("sc-limits", *extra, data=data), wire=wire)

    assert code == 2
    [line] = err.strip().splitlines()
    assert message in line, line
    assert wire.operations() == []


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-payload-mb", "101"], "--max-payload-mb must be between 0 and 100, got 101"),
        (["--max-payload-mb", "30", "--max-concurrent", "4"], "--max-concurrent 4 x --max-payload-mb 30 = 120"),
        (["--invocations-timeout", "3601"], "--invocations-timeout must be between 1 and 3600"),
        (["--env", "SPECIES_SERVE_DTYPE=fp8"], "--env SPECIES_SERVE_DTYPE='fp8' is not valid: set it to one of auto, float32, bfloat16, float16"),
    ],
)  # fmt: skip
def test_transform_limits_are_checked_before_any_call(run, extra, message):
    wire = Wire()
    code, _, err = run(
        "transform", "--input", f"s3://{BUCKET}/batch/photos/", "--model-data",
        f"s3://{BUCKET}/m/model.tar.gz", "--instance-type", "ml.m5.xlarge", *extra, wire=wire,
    )  # fmt: skip
    assert code == 2
    [line] = err.strip().splitlines()
    assert message in line, line
    assert wire.operations() == []

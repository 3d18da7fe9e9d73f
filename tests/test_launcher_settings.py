"""The launcher's `settings`: flags > environment > config file, and one line for a missing setting.

Against a local AWS: see launcher_helpers for how and for the gaps of moto it bridges.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from launcher_helpers import (
    BUCKET,
    GPU,
    IMAGE,
    REGION,
    ROLE_ARN,
    SETTINGS,
    TARGETS,
    Wire,
    make_channel,
)
from moto.core import DEFAULT_ACCOUNT_ID
from species_tools.launcher import settings


@pytest.mark.parametrize(
    ("missing", "hints"),
    [
        ("SPECIES_ROLE_ARN", ["missing setting: role", "--role ARN", "SPECIES_ROLE_ARN"]),
        ("SPECIES_IMAGE", ["missing setting: image", "--image URI", "SPECIES_IMAGE"]),
        ("SPECIES_BUCKET", ["missing setting: bucket", "--bucket NAME", "SPECIES_BUCKET"]),
        ("AWS_DEFAULT_REGION", ["missing setting: region", "--region REGION", "AWS_REGION"]),
    ],
)
def test_a_missing_setting_is_one_clear_line(run, monkeypatch, tmp_path, missing, hints):
    # boto3 itself falls back on the process environment for the region.
    monkeypatch.delenv(missing, raising=False)
    environ = {k: v for k, v in SETTINGS.items() if k != missing}
    wire = Wire()

    code, out, err = run(
        "train", "--data", make_channel(tmp_path / "training"), "--instance-type", GPU,
        "--hyperparameter", f"target_species={TARGETS}", environ=environ, wire=wire,
    )  # fmt: skip

    assert code == 2
    [line] = err.strip().splitlines()
    assert all(hint in line for hint in hints), line
    assert "~/.species-classifier.toml" in line
    assert "CreateTrainingJob" not in wire.operations()


def test_a_missing_target_species_is_caught_before_anything_is_created(run):
    wire = Wire()
    code, _, err = run(
        "train", "--data", f"s3://{BUCKET}/x/", "--instance-type", GPU, wire=wire
    )  # fmt: skip
    assert code == 2
    assert "missing hyperparameter target_species" in err
    assert wire.operations() == []


def test_flags_beat_environment_beat_config_file(run, aws, tmp_path):
    config = tmp_path / "species.toml"
    config.write_text(
        f"""
role = "arn:aws:iam::{DEFAULT_ACCOUNT_ID}:role/FromConfig"
bucket = "{BUCKET}"
image = "from-config:1"

[train]
instance_type = "ml.g4dn.2xlarge"
spot = true
max_runtime = "3h"

[train.hyperparameters]
target_species = ["Acer rubrum", "Zenaida macroura"]
k_folds = 5
pretrained = false
"""
    )
    environ = {"SPECIES_CONFIG": str(config), "SPECIES_IMAGE": IMAGE, "AWS_DEFAULT_REGION": REGION}

    code, out, err = run(
        "train", "--data", f"s3://{BUCKET}/channels/demo/", "--role", ROLE_ARN,
        "--job-name", "sc-precedence", "--hyperparameter", "k_folds=2", environ=environ,
    )  # fmt: skip

    assert code == 0, err
    job = aws.sagemaker.describe_training_job(TrainingJobName="sc-precedence")
    assert job["RoleArn"] == ROLE_ARN  # flag over config
    assert job["AlgorithmSpecification"]["TrainingImage"] == IMAGE  # environment over config
    assert job["ResourceConfig"]["InstanceType"] == "ml.g4dn.2xlarge"  # config
    assert job["EnableManagedSpotTraining"] is True
    assert job["StoppingCondition"]["MaxRuntimeInSeconds"] == 3 * 3600
    assert job["HyperParameters"] == {
        "target_species": "Acer rubrum,Zenaida macroura",
        "k_folds": "2",
        "pretrained": "false",
    }

    config.write_text('instance_typ = "ml.p3.2xlarge"\n')
    code, _, err = run("status", "sc-precedence", environ=environ)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "unknown setting 'instance_typ'" in err


def test_settings_import_no_other_launcher_module():
    # settings is the bottom layer: session and every command import it, never the reverse,
    # not even for a type annotation (that circle once held JobFailed and Command).
    tree = ast.parse(Path(settings.__file__).read_text())
    imported = {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    } | {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    assert not {name for name in imported if name.startswith("species_tools.launcher")}

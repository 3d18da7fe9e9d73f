"""The launcher's `cli`: every command's help, the failure boundary, and the script as a real process.

Against a local AWS: see launcher_helpers for how and for the gaps of moto it bridges.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from launcher_helpers import (
    IMAGE,
    REPO,
    SCRIPT,
    SETTINGS,
    TARGETS,
    make_channel,
    put_output_archive,
)
from species_tools.launcher import cli


def test_aws_errors_are_their_code_and_message(run):
    code, out, err = run("status", "no-such-job")
    assert code == 1
    [line] = err.strip().splitlines()
    assert line.startswith("error: ValidationException: Could not find training job")


def test_every_subcommand_documents_its_flags(capsys):
    expected = {
        "train": ["--image", "--role", "--data", "--output", "--instance-type", "--instance-count",
                  "--spot", "--job-name", "--wait", "--hyperparameter", "--max-wait"],
        "deploy": ["--endpoint", "--training-job", "--model-data", "--startup-timeout",
                   "--wait-timeout"],
        "invoke": ["--endpoint", "PHOTO_OR_FOLDER"],
        "transform": ["--input", "--output", "--model", "--training-job", "--model-data"],
        "delete": ["--endpoint", "--endpoint-config", "--model", "--transform-job"],
        "status": ["job"],
        "logs": ["--follow"],
        "stop": ["job"],
        "tune": ["--range", "--strategy", "--max-jobs", "--max-parallel", "--early-stopping"],
    }  # fmt: skip
    for command, names in expected.items():
        with pytest.raises(SystemExit) as exit_:
            cli.main([command, "--help"], environ={})
        assert exit_.value.code == 0
        text = capsys.readouterr().out
        # Whole names: "--wait" must not pass on the strength of "--wait-timeout".
        options = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*[a-z]", text))
        usage = text.split("\n\n")[0].replace("[", " ").replace("]", " ").split()
        missing = [n for n in names if n not in (options if n.startswith("--") else usage)]
        assert not missing, (command, missing, text)


def test_the_script_runs_as_a_real_process(aws, tmp_path):
    # The strict validator in the real process too: sitecustomize runs before the script.
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import aws_validation\naws_validation.install_everywhere()\n"
    )
    path = [hooks, REPO / "tests"]  # the script finds the launcher in its clone itself
    env = {**os.environ, **aws.env, **SETTINGS, "PYTHONPATH": os.pathsep.join(map(str, path))}
    put_output_archive(aws.s3, "species-classifier/output", "sc-process")
    command = [
        sys.executable, str(SCRIPT), "train", "--data", str(make_channel(tmp_path / "training")),
        "--instance-type", "ml.m5.xlarge", "--hyperparameter", f"target_species={TARGETS}",
        "--job-name", "sc-process", "--wait", "--poll-seconds", "0.05",
        "--download-dir", str(tmp_path / "out"),
    ]  # fmt: skip

    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stderr
    assert "training job sc-process completed" in done.stdout
    assert (tmp_path / "out" / "sc-process" / "metrics.json").exists()
    job = aws.sagemaker.describe_training_job(TrainingJobName="sc-process")
    assert job["AlgorithmSpecification"]["TrainingImage"] == IMAGE

    del env["SPECIES_ROLE_ARN"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: missing setting: role. Pass --role ARN, set SPECIES_ROLE_ARN, or put "
        'role = "..." in ~/.species-classifier.toml (or --config FILE)'
    ]

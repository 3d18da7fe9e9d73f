"""Where the SageMaker contract puts things, under one base folder.

The base is /opt/ml in a SageMaker container, or whatever SAGEMAKER_BASE_DIR names (the
variable the sagemaker-training toolkit honours too), so `train` and `serve` run
unchanged in tests and on a laptop against a folder laid out like /opt/ml.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

BASE_DIR_ENV = "SAGEMAKER_BASE_DIR"
DEFAULT_BASE_DIR = "/opt/ml"
TRAINING_CHANNEL = "training"
# Where the image looks for resume state: the launcher sends it as CheckpointConfig.LocalPath.
CHECKPOINT_DIR = "checkpoints"
DEFAULT_CHECKPOINT_DIR = f"{DEFAULT_BASE_DIR}/{CHECKPOINT_DIR}"


@dataclass(frozen=True)
class JobPaths:
    base: Path

    @classmethod
    def from_environment(cls) -> JobPaths:
        return cls(Path(os.environ.get(BASE_DIR_ENV, DEFAULT_BASE_DIR)))

    @property
    def config_dir(self) -> Path:
        return self.base / "input" / "config"

    @property
    def hyperparameters(self) -> Path:
        return self.config_dir / "hyperparameters.json"

    @property
    def resource_config(self) -> Path:
        return self.config_dir / "resourceconfig.json"

    @property
    def training_channel(self) -> Path:
        return self.base / "input" / "data" / TRAINING_CHANNEL

    @property
    def model_dir(self) -> Path:
        return self.base / "model"

    @property
    def output_data_dir(self) -> Path:
        return self.base / "output" / "data"

    @property
    def failure_file(self) -> Path:
        return self.base / "output" / "failure"

    @property
    def checkpoint_dir(self) -> Path:
        """CheckpointConfig.LocalPath when the job names one, else <base>/checkpoints."""
        config = self.config_dir / "checkpointconfig.json"
        if config.is_file():
            local_path = json.loads(config.read_text()).get("LocalPath")
            if local_path:
                return Path(local_path)
        return self.base / CHECKPOINT_DIR

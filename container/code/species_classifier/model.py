"""The network: torchvision's efficientnet_b1 with the seed's head, and its optimiser groups.

Pretrained ImageNet weights are read from a file baked into the image (training jobs may
run with network isolation), never downloaded at run time.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from torchvision.models import EfficientNet_B1_Weights, efficientnet_b1

ARCHITECTURE = "efficientnet_b1"
PRETRAINED_WEIGHTS = EfficientNet_B1_Weights.IMAGENET1K_V1
HEAD_DROPOUT = 0.5

# The seed's differential learning rates: early blocks barely move, the new head moves most.
LR_MULTIPLIERS = {"features[0:3]": 0.1, "features[3:6]": 0.5, "features[6:9]": 1.0, "head": 10.0}
# The group whose learning rate is the base rate (multiplier 1): the one a log line reports.
BASE_GROUP = "features[6:9]"


class WeightsMissingError(FileNotFoundError):
    """pretrained=true, but the ImageNet weights file is not where the image puts it."""


def pretrained_weights_path() -> Path:
    """Where torchvision keeps the ImageNet weights: $TORCH_HOME/hub/checkpoints/<file>."""
    filename = os.path.basename(PRETRAINED_WEIGHTS.url)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def build_model(num_classes: int, pretrained: bool) -> nn.Module:
    """efficientnet_b1, ImageNet weights when `pretrained`, head Dropout(0.5) + Linear."""
    model = efficientnet_b1(weights=None)
    if pretrained:
        path = pretrained_weights_path()
        if not path.is_file():
            raise WeightsMissingError(
                f"pretrained=true but the ImageNet weights file {path} is missing: build the "
                "image with its weights baked in (the Dockerfile does this by default), set "
                "TORCH_HOME to a folder that holds hub/checkpoints/"
                f"{path.name}, or pass the hyperparameter pretrained=false"
            )
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    in_features = model.classifier[1].in_features
    model.classifier = nn.Sequential(
        nn.Dropout(p=HEAD_DROPOUT, inplace=True), nn.Linear(in_features, num_classes)
    )
    return model


def reset_head(model: nn.Module) -> None:
    """Fresh random head weights (from the current torch seed), backbone untouched."""
    model.classifier[1].reset_parameters()


def parameter_groups(model: nn.Module, learning_rate: float) -> list[dict]:
    """Adam parameter groups with the seed's per-block learning-rate multipliers, each
    carrying its block's name (optimisers keep extra keys of a group as they are)."""
    features = model.features
    blocks = {
        "features[0:3]": features[0:3],
        "features[3:6]": features[3:6],
        "features[6:9]": features[6:9],
        "head": model.classifier,
    }
    return [
        {
            "name": name,
            "params": list(module.parameters()),
            "lr": learning_rate * LR_MULTIPLIERS[name],
        }
        for name, module in blocks.items()
    ]


def base_learning_rate(optimizer: torch.optim.Optimizer) -> float:
    """The base learning rate as the scheduler has left it (it scales every group alike)."""
    return next(g["lr"] for g in optimizer.param_groups if g["name"] == BASE_GROUP)

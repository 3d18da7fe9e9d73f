"""The network's optimiser groups: the seed's learning-rate multipliers, found by name."""

from __future__ import annotations

import pytest
import torch
from species_classifier.model import (
    LR_MULTIPLIERS,
    base_learning_rate,
    build_model,
    parameter_groups,
)


def test_groups_carry_their_names_and_the_base_rate_is_found_by_name_in_any_order():
    model = build_model(num_classes=5, pretrained=False)
    groups = parameter_groups(model, learning_rate=1e-3)
    assert {g["name"]: g["lr"] for g in groups} == pytest.approx(
        {name: 1e-3 * multiplier for name, multiplier in LR_MULTIPLIERS.items()}
    )
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    optimizer = torch.optim.Adam(list(reversed(groups)))
    assert base_learning_rate(optimizer) == 1e-3
    for group in optimizer.param_groups:
        group["lr"] *= 0.5  # as ReduceLROnPlateau lowers every group
    assert base_learning_rate(optimizer) == 5e-4

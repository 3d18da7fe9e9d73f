"""The training engine (trainer.FoldTrainer) in process, on a network of a few hundred weights:
early stopping, the best epoch kept, class weights, the lone-last-photo merge and the
precision choice. Whole jobs (test_train_job.py, marked slow) reach it only end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.utils.class_weight import compute_class_weight
from species_classifier.contract.hyperparameters import TrainingConfig
from species_classifier.state import FoldState
from species_classifier.trainer import FoldData, FoldTrainer, choose_precision
from torch import nn

CLASSES = 3
SLOT = 16


class TinyNet(nn.Module):
    """efficientnet_b1's shape where the engine looks: features[0:9] (the learning-rate
    groups) and classifier[1] (the head it resets). No batch norm: the validation answers
    then change only through the weights."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Identity(),
            nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Identity(),
            nn.Conv2d(4, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Linear(4, CLASSES))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def fold_data(labels: list[int], val_every: int = 4) -> FoldData:
    """Photos whose brightness tells their class apart; every `val_every`-th is validation."""
    generator = torch.Generator().manual_seed(0)
    count = len(labels)
    label_t = torch.tensor(labels)
    base = (label_t * 100 + 20).view(-1, 1, 1, 1).expand(count, SLOT, SLOT, 3)
    noise = torch.randint(0, 20, (count, SLOT, SLOT, 3), generator=generator)
    rows = np.arange(count)
    return FoldData(
        pixels=(base + noise).to(torch.uint8),
        sizes=torch.full((count, 4), SLOT),
        labels=label_t,
        train_index=rows[rows % val_every != val_every - 1],
        val_index=rows[rows % val_every == val_every - 1],
    )


def trainer(**hyperparameters) -> FoldTrainer:
    torch.manual_seed(0)
    config = TrainingConfig(target_species=("a", "b"), img_size=16, batch_size=4, **hyperparameters)
    return FoldTrainer(TinyNet(), config, torch.device("cpu"), CLASSES)


def train(engine: FoldTrainer, data: FoldData) -> tuple[FoldState, list[int]]:
    ends: list[int] = []
    state = engine.run(data, FoldState(fold=1), on_epoch_end=lambda s: ends.append(s.epoch))
    return state, ends


BALANCED = [0, 1, 2] * 8


def test_a_fold_stops_after_epoch_patience_epochs_without_a_better_macro_f1():
    # At the smallest learning rate the answers never change: epoch 1 is the only improvement.
    engine = trainer(learning_rate=1e-8, num_epochs=10, epoch_patience=2)
    state, ends = train(engine, fold_data(BALANCED))

    assert ends == [1, 2, 3]  # the state is handed over after every epoch
    assert [r.epoch for r in state.history] == [1, 2, 3]
    assert state.best_epoch == 1 and state.epochs_without_improvement == 2
    assert state.best_macro_f1 == state.history[0].val_macro_f1


def test_num_epochs_ends_a_fold_that_keeps_improving_and_the_best_epoch_is_kept():
    engine = trainer(learning_rate=1e-2, num_epochs=4, epoch_patience=10)
    state, _ = train(engine, fold_data(BALANCED))

    scores = [r.val_macro_f1 for r in state.history]
    assert len(scores) == 4
    assert state.best_macro_f1 == max(scores)
    assert state.best_epoch == scores.index(max(scores)) + 1  # the first epoch with the best
    assert state.best_val_probs.shape == (6, CLASSES)
    assert torch.allclose(state.best_val_probs.sum(1), torch.ones(6))
    assert state.best_model.keys() == engine.model.state_dict().keys()


def test_class_weights_are_scikit_learns_balanced_ones():
    labels = [0] * 12 + [1] * 3 + [2] * 6
    data = fold_data(labels, val_every=10**6)  # every photo trains
    criterion, _, _ = trainer()._start(data, FoldState(fold=1), 1)

    expected = compute_class_weight("balanced", classes=np.arange(CLASSES), y=np.array(labels))
    assert torch.allclose(criterion.weight, torch.tensor(expected, dtype=torch.float32))
    assert criterion.weight[1] == 4 * criterion.weight[0]  # a quarter as many photos


def test_a_class_missing_from_the_training_photos_gets_a_finite_weight():
    labels = [0] * 4 + [1] * 4
    data = fold_data(labels, val_every=10**6)
    engine = FoldTrainer(TinyNet(), TrainingConfig(target_species=("a",)), torch.device("cpu"), 3)

    criterion, _, _ = engine._start(data, FoldState(fold=1), 1)

    assert torch.isfinite(criterion.weight).all()
    assert criterion.weight.tolist() == pytest.approx([8 / 12, 8 / 12, 8 / 3])


@pytest.mark.parametrize(
    ("photos", "batch_size", "sizes"),
    [
        (9, 4, [4, 5]),  # a lone last photo joins the batch before it
        (10, 4, [4, 4, 2]),
        (8, 4, [4, 4]),
        (1, 4, [1]),  # one photo in all has no batch to join
        (5, 4, [5]),
    ],
)
def test_a_lone_last_photo_joins_the_batch_before(photos, batch_size, sizes):
    data = fold_data([0, 1] * photos, val_every=10**6)
    index = np.arange(photos)
    engine = trainer()

    batches = list(engine._batches(data, index, batch_size, torch.arange(photos)))

    assert [len(labels) for _, _, labels in batches] == sizes
    assert torch.cat([labels for _, _, labels in batches]).tolist() == data.labels[:photos].tolist()


@pytest.mark.parametrize(
    ("requested", "device", "capability", "chosen"),
    [
        ("auto", "cpu", None, "fp32"),
        ("bf16", "cpu", None, "fp32"),  # a CPU trains in fp32 whatever was asked
        ("fp16", "cpu", None, "fp32"),
        ("auto", "cuda", (8, 0), "bf16"),  # A100 and newer
        ("auto", "cuda", (7, 5), "fp16"),  # T4: fp16 with a gradient scaler, not emulated bf16
        ("fp32", "cuda", (9, 0), "fp32"),
        ("fp16", "cuda", (9, 0), "fp16"),
    ],
)
def test_precision_is_chosen_by_the_device(monkeypatch, requested, device, capability, chosen):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # emulation counts
    assert choose_precision(requested, torch.device(device)) == chosen


def test_on_the_cpu_the_engine_runs_fp32_without_a_gradient_scaler():
    engine = trainer(precision="bf16")
    _, _, scaler = engine._start(fold_data(BALANCED), FoldState(fold=1), 1)
    assert engine.precision == "fp32" and engine.autocast_dtype is None
    assert not scaler.is_enabled()

"""What a fold's training leaves behind: its per-epoch records and its resumable state.

Plain data, shared by the engine that fills it (trainer), the store that keeps it
(checkpoint) and the report that reads it (evaluation), so that neither of the last two
needs to import the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    val_loss: float
    val_macro_f1: float
    val_accuracy: float
    learning_rate: float
    seconds: float
    img_per_s: float
    # Macro-F1 of the training predictions on the epoch's augmented batches, as they were
    # made (the weights changing along the epoch): no extra forward pass.
    train_macro_f1: float


@dataclass
class FoldState:
    """Everything needed to continue a fold exactly: written after every epoch.

    `fold` is the fold's number from 1, or None for the refit: the one model trained on
    every photo once the folds are done (final_model=refit).
    """

    fold: int | None
    epoch: int = 0
    model: dict = field(default_factory=dict)
    optimizer: dict = field(default_factory=dict)
    scheduler: dict = field(default_factory=dict)
    scaler: dict = field(default_factory=dict)
    best_macro_f1: float = -1.0
    best_epoch: int = 0
    best_model: dict = field(default_factory=dict)
    best_val_probs: torch.Tensor | None = None
    epochs_without_improvement: int = 0
    history: list[EpochRecord] = field(default_factory=list)

    @property
    def is_refit(self) -> bool:
        return self.fold is None

    @property
    def name(self) -> str:
        """The name of its checkpoint files and of its member of the model bundle."""
        return model_name(self.fold)


def model_name(fold: int | None) -> str:
    """fold-K for fold K, refit for the model trained on every photo."""
    return "refit" if fold is None else f"fold-{fold}"

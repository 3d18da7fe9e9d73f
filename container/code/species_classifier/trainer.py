"""The training engine: one fold, epoch by epoch, with no file I/O of its own.

What makes it fast: photos are decoded already (a uint8 tensor in GPU memory when it
fits, else a photo store that reads each batch, the next one ahead: stores.py), each batch
is pinned for its copy to the GPU and augmented on the device in one warp,
the model runs in bf16 (fp16 with a gradient scaler on GPUs before Ampere, fp32 on CPU)
and channels_last, the optimiser is fused, and losses stay on the device until the
epoch ends so the GPU never waits for the host.

What makes it resumable: every random draw of an epoch (shuffle, augmentation, dropout)
comes from a seed derived from (seed, fold, epoch), so a fold restarted from the state
after epoch e continues exactly as if it had never stopped. The caller receives that
state after every epoch (`on_epoch_end`) and decides where it goes.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score
from torch import nn

from species_classifier.augment import augment, resize_whole
from species_classifier.contract.hyperparameters import TrainingConfig
from species_classifier.gpu import training_precision
from species_classifier.imaging import normalize
from species_classifier.model import base_learning_rate, parameter_groups, reset_head
from species_classifier.state import EpochRecord, FoldState
from species_classifier.stores import read_batches, to_device

_log = logging.getLogger(__name__)

LR_PATIENCE = 3
LR_FACTOR = 0.5
VALIDATION_BATCH_FACTOR = 4


def choose_precision(requested: str, device: torch.device) -> str:
    """bf16 from Ampere on, fp16 (with a gradient scaler) on older GPUs, fp32 on CPU: by the
    GPU's compute capability, as torch.cuda.is_bf16_supported() also counts emulated bf16."""
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    return training_precision(requested, capability)


def epoch_seed(seed: int, fold: int, epoch: int) -> int:
    return (seed * 1_000_003 + fold * 10_007 + epoch) % 2**63


@dataclass(frozen=True)
class FoldData:
    pixels: torch.Tensor  # uint8 slots NHWC on the device, or a photo store (stores.py)
    sizes: torch.Tensor  # (N, 4) int true height, width, stored rows, cols (cache.py), CPU
    labels: torch.Tensor  # int64, same order, on the CPU
    train_index: np.ndarray
    val_index: np.ndarray


# The refit draws its random numbers from seed stream 0: folds use 1..K, so it repeats none.
REFIT_SEED_STREAM = 0


class TrainingStopped(BaseException):
    """Training was asked to stop (SIGTERM); the last completed epoch is checkpointed.

    A BaseException, like KeyboardInterrupt: raised from the signal handler wherever the
    main thread is, it must not be swallowed by an `except Exception` on the way (logging
    does exactly that when the signal lands while a log line is being written).
    """


class FoldTrainer:
    """Trains one model, fold after fold; the (possibly compiled) network is built once."""

    def __init__(
        self,
        model: nn.Module,
        config: TrainingConfig,
        device: torch.device,
        num_classes: int,
    ) -> None:
        self.config = config
        self.device = device
        self.num_classes = num_classes
        self.precision = choose_precision(config.precision, device)
        memory_format = torch.channels_last if device.type == "cuda" else torch.preserve_format
        self.model = model.to(device, memory_format=memory_format)
        self.initial_state = copy.deepcopy(self.model.state_dict())
        self.forward = torch.compile(self.model) if config.compile else self.model
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def run(
        self,
        data: FoldData,
        state: FoldState,
        on_epoch_end: Callable[[FoldState], None],
        on_progress: Callable[[FoldState, EpochRecord], None] | None = None,
    ) -> FoldState:
        """Train `state.fold` from `state.epoch` until early stopping or num_epochs."""
        config = self.config
        criterion, optimizer, scaler = self._start(data, state, state.fold)
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max", factor=LR_FACTOR, patience=LR_PATIENCE
        )
        if state.epoch:
            scheduler.load_state_dict(state.scheduler)

        while (
            state.epoch < config.num_epochs
            and state.epochs_without_improvement < config.epoch_patience
        ):
            epoch = state.epoch + 1
            started = time.perf_counter()
            train_loss, train_macro_f1 = self._train_epoch(
                data, criterion, optimizer, scaler, state.fold, epoch
            )
            train_seconds = time.perf_counter() - started
            val_loss, val_probs = self._validate(data, criterion)
            val_labels = data.labels[data.val_index].numpy()
            predicted = val_probs.argmax(1).numpy()
            macro_f1 = float(f1_score(val_labels, predicted, average="macro", zero_division=0))
            scheduler.step(macro_f1)
            record = EpochRecord(
                epoch=epoch,
                train_loss=train_loss,
                val_loss=val_loss,
                val_macro_f1=macro_f1,
                val_accuracy=float((predicted == val_labels).mean()),
                learning_rate=base_learning_rate(optimizer),
                seconds=time.perf_counter() - started,
                img_per_s=len(data.train_index) / max(train_seconds, 1e-9),
                train_macro_f1=train_macro_f1,
            )
            improved = macro_f1 > state.best_macro_f1
            if improved:
                state.best_val_probs = val_probs
                state.epochs_without_improvement = 0
            else:
                state.epochs_without_improvement += 1
            self._end_epoch(state, record, improved, optimizer, scaler, scheduler)
            on_epoch_end(state)
            if on_progress is not None:
                on_progress(state, record)
        return state

    def refit(
        self,
        data: FoldData,
        epochs: int,
        shard: tuple[int, int],
        state: FoldState,
        on_epoch_end: Callable[[FoldState], None],
    ) -> FoldState:
        """One model on every photo (data.train_index) for a fixed number of epochs.

        Data-parallel across workers (DistributedDataParallel averages the gradients), with
        no validation set: the epoch count comes from the folds, and the learning rate stays
        at its starting value because ReduceLROnPlateau has nothing to watch. Every epoch's
        weights are its best, since there is nothing to compare them against.
        """
        criterion, optimizer, scaler = self._start(data, state, REFIT_SEED_STREAM)
        forward = self._refit_forward(workers=shard[1])
        while state.epoch < epochs:
            epoch = state.epoch + 1
            started = time.perf_counter()
            loss, train_macro_f1 = self._train_epoch(
                data, criterion, optimizer, scaler, REFIT_SEED_STREAM, epoch, forward, shard
            )
            seconds = time.perf_counter() - started
            record = EpochRecord(
                epoch=epoch,
                train_loss=loss,
                val_loss=math.nan,
                val_macro_f1=math.nan,
                val_accuracy=math.nan,
                learning_rate=base_learning_rate(optimizer),
                seconds=seconds,
                img_per_s=len(data.train_index) / max(seconds, 1e-9),
                train_macro_f1=train_macro_f1,
            )
            self._end_epoch(state, record, True, optimizer, scaler)
            on_epoch_end(state)
            _log.info(
                "refit epoch=%d/%d train_loss=%.4f img_per_s=%.0f epoch_s=%.1f",
                epoch,
                epochs,
                loss,
                record.img_per_s,
                seconds,
            )
        return state

    def _refit_forward(self, workers: int):
        """The network the refit trains through: the fold's (compiled when asked) on one
        worker; on several, DistributedDataParallel, compiled around it when asked."""
        if workers == 1:
            return self.forward
        device_ids = [self.device] if self.device.type == "cuda" else None
        parallel = nn.parallel.DistributedDataParallel(self.model, device_ids=device_ids)
        return torch.compile(parallel) if self.config.compile else parallel

    def _end_epoch(
        self,
        state: FoldState,
        record: EpochRecord,
        improved: bool,
        optimizer: torch.optim.Optimizer,
        scaler: torch.amp.GradScaler,
        scheduler: torch.optim.lr_scheduler.ReduceLROnPlateau | None = None,
    ) -> None:
        """Record the epoch in the state, with everything a restart needs to continue it."""
        state.history.append(record)
        state.epoch = record.epoch
        # One CPU copy serves as both the latest and the best weights: neither is modified
        # in place, and torch.save stores shared tensors once.
        state.model = _cpu_copy(self.model.state_dict())
        if improved:
            state.best_macro_f1, state.best_epoch = record.val_macro_f1, record.epoch
            state.best_model = state.model
        state.optimizer = optimizer.state_dict()
        state.scaler = scaler.state_dict()
        if scheduler is not None:
            state.scheduler = scheduler.state_dict()

    def _start(self, data: FoldData, state: FoldState, seed_stream: int):
        """Loss, optimiser and scaler for the photos in data.train_index, and the network's
        weights: fresh (the head seeded by `seed_stream`) at epoch 0, else exactly as the
        state left them."""
        labels = data.labels[data.train_index]
        criterion = nn.CrossEntropyLoss(weight=self._class_weights(labels).to(self.device))
        optimizer = torch.optim.Adam(
            parameter_groups(self.model, self.config.learning_rate),
            fused=self.device.type == "cuda",
        )
        scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
        if state.epoch == 0:
            self.model.load_state_dict(self.initial_state)
            torch.manual_seed(epoch_seed(self.config.seed, seed_stream, 0))
            reset_head(self.model)
        else:
            self.model.load_state_dict(state.model)
            optimizer.load_state_dict(state.optimizer)
            scaler.load_state_dict(state.scaler)
        return criterion, optimizer, scaler

    def _class_weights(self, train_labels: torch.Tensor) -> torch.Tensor:
        """Balanced weights n / (classes * count), as scikit-learn's 'balanced' gives."""
        counts = torch.bincount(train_labels, minlength=self.num_classes).clamp(min=1).float()
        return len(train_labels) / (self.num_classes * counts)

    def _batches(self, data: FoldData, index: np.ndarray, batch_size: int, order: torch.Tensor):
        """Yield (uint8 pixels on the device, their sizes on the CPU, labels on the device).

        Nothing here waits for the GPU: the epoch's rows go to the cache's device in one copy,
        and every copy to the GPU starts from pinned memory, so the host queues ahead."""
        index_t = torch.as_tensor(index)[order]
        pin = data.pixels.device.type == "cpu" and self.device.type == "cuda"
        bounds = [*range(0, len(index_t), batch_size), len(index_t)]
        if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
            # A lone last photo would break batch norm in training: it joins the batch before.
            del bounds[-2]
        row_batches = [index_t[start:stop] for start, stop in itertools.pairwise(bounds)]
        for rows, pixels in zip(row_batches, read_batches(data.pixels, row_batches), strict=True):
            if pin:
                pixels = pixels.pin_memory()
            yield (
                pixels.to(self.device, non_blocking=True),
                data.sizes[rows],
                to_device(data.labels[rows], self.device),
            )

    def _train_epoch(
        self, data, criterion, optimizer, scaler, fold: int, epoch: int, forward=None, shard=(0, 1)
    ) -> tuple[float, float]:
        """One pass over data.train_index; with shard=(rank, workers), this worker's share.

        Returns the mean loss and the macro-F1 of the batches' own predictions."""
        forward = forward or self.forward
        seed = epoch_seed(self.config.seed, fold, epoch)
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # dropout
        order = torch.randperm(len(data.train_index), generator=generator)
        rank, workers = shard
        if workers > 1:
            # Equal shares, or data-parallel workers would wait for each other's extra step.
            order = order[: len(order) - len(order) % workers][rank::workers]
            generator = torch.Generator().manual_seed(seed + rank)
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        seen = 0
        # Predicted and true labels stay on the device until the epoch ends: no sync per batch.
        predicted, truth = [], []
        batches = self._batches(data, data.train_index, self.config.batch_size, order)
        for pixels, sizes, labels in batches:
            inputs = normalize(augment(pixels, sizes, self.config.img_size, generator))
            with self._autocast():
                logits = forward(inputs)
                loss = criterion(logits, labels)
            predicted.append(logits.detach().argmax(1))
            truth.append(labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            loss_sum += loss.detach() * len(labels)
            seen += len(labels)
        loss = float(loss_sum) / max(seen, 1)
        if not seen:
            return loss, math.nan
        macro_f1 = f1_score(
            torch.cat(truth).cpu().numpy(),
            torch.cat(predicted).cpu().numpy(),
            average="macro",
            zero_division=0,
        )
        return loss, float(macro_f1)

    @torch.inference_mode()
    def _validate(self, data: FoldData, criterion) -> tuple[float, torch.Tensor]:
        """Validation loss and float32 class probabilities (CPU) for the fold's val photos."""
        self.model.eval()
        batch_size = self.config.batch_size * VALIDATION_BATCH_FACTOR
        order = torch.arange(len(data.val_index))
        logits = []
        for pixels, sizes, _ in self._batches(data, data.val_index, batch_size, order):
            inputs = normalize(resize_whole(pixels, sizes, self.config.img_size))
            with self._autocast():
                logits.append(self.forward(inputs).float())
        all_logits = torch.cat(logits)
        labels = data.labels[data.val_index].to(self.device)
        loss = float(criterion(all_logits, labels))
        return loss, F.softmax(all_logits, dim=1).cpu()


def _cpu_copy(state_dict: dict) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in state_dict.items()}


def format_clock(seconds: float) -> str:
    """A time span as a clock shows it, m:ss or h:mm:ss, for the progress lines; ? if unknown.

    Not the launcher's format_duration, which echoes a setting as it is typed (90m, 6h)."""
    if not math.isfinite(seconds):
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"

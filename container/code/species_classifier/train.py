"""`train`: the SageMaker training entry point, and the job's one failure boundary.

Flow: hyperparameters -> labelled photos -> photo cache -> folds -> per fold: train with
a checkpoint after every epoch (finished folds are skipped on restart) -> evaluation and
report in output/data -> model bundle in model/. Any error ends in output/failure with a
short, specific reason first (SageMaker shows its first 1024 characters as the job's
FailureReason) and a non-zero exit; SIGTERM stops at once and leaves the last completed
epoch checkpointed for a restarted job to continue from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import sys
import time
import traceback
from datetime import datetime, timezone

import numpy as np
import torch

from species_classifier import metric_lines
from species_classifier.artifacts import BundleDescription, Member, write_bundle
from species_classifier.cache import build_cache
from species_classifier.checkpoint import CheckpointStore
from species_classifier.config import ConfigError, TrainingConfig, parse_hyperparameters
from species_classifier.dataset import (
    DatasetError,
    LabelledPhotos,
    check_class_sizes,
    find_csv,
    label_photos,
    make_folds,
    read_rows,
)
from species_classifier.evaluation import summarize, write_outputs, write_skipped
from species_classifier.model import WeightsMissingError, build_model
from species_classifier.paths import BASE_DIR_ENV, JobPaths
from species_classifier.trainer import (
    EpochRecord,
    FoldData,
    FoldState,
    FoldTrainer,
    TrainingStopped,
    format_duration,
)

_log = logging.getLogger("species_classifier.train")

EXIT_FAILED = 1
EXIT_STOPPED = 128 + signal.SIGTERM
# Keep the photo cache on the GPU only while it leaves this much of the free memory for training.
GPU_CACHE_SHARE = 0.5


def main() -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout
    )
    paths = JobPaths.from_environment()
    paths.failure_file.unlink(missing_ok=True)
    signal.signal(signal.SIGTERM, _stop_on_signal)
    try:
        run(paths)
    except TrainingStopped as stop:
        return _fail(paths, f"Stopped by {stop}", EXIT_STOPPED, detail=_resume_note(paths))
    except (ConfigError, DatasetError, WeightsMissingError) as error:
        return _fail(paths, str(error), EXIT_FAILED)
    except Exception as error:  # noqa: BLE001 - the job's failure boundary: report, never hang
        reason = f"Unexpected error: {type(error).__name__}: {error}"
        return _fail(paths, reason, EXIT_FAILED, detail=traceback.format_exc())
    return 0


def _stop_on_signal(signum: int, _frame) -> None:
    raise TrainingStopped(signal.Signals(signum).name)


def _fail(paths: JobPaths, reason: str, code: int, detail: str = "") -> int:
    _log.error("%s", reason)
    if detail:
        _log.error("%s", detail.rstrip())
    paths.failure_file.parent.mkdir(parents=True, exist_ok=True)
    paths.failure_file.write_text(reason + ("\n\n" + detail if detail else "") + "\n")
    return code


def _resume_note(paths: JobPaths) -> str:
    return (
        f"Every completed epoch is checkpointed in {paths.checkpoint_dir}; a job restarted "
        "with the same checkpoint location skips finished folds and continues from there."
    )


def read_config(paths: JobPaths) -> TrainingConfig:
    if not paths.hyperparameters.is_file():
        raise ConfigError(
            f"{paths.hyperparameters} is missing: run inside a SageMaker training job, or set "
            f"{BASE_DIR_ENV} to a folder laid out like /opt/ml with input/config/hyperparameters.json"
        )
    # The toolkit reads its base folder once, at import, and creates folders when it finds
    # none: import it only now that the folder is known to exist.
    os.environ[BASE_DIR_ENV] = str(paths.base)
    from sagemaker_training.environment import read_hyperparameters

    logging.getLogger("sagemaker_training").setLevel(logging.WARNING)
    try:
        raw = read_hyperparameters()
    except ValueError as error:
        raise ConfigError(f"{paths.hyperparameters} is not valid JSON: {error}") from None
    return parse_hyperparameters(raw)


def run(paths: JobPaths) -> None:
    job_started = time.perf_counter()
    config = read_config(paths)
    _log.info("hyperparameters: %s", json.dumps(config.to_dict()))
    channel = paths.training_channel
    csv_path = find_csv(channel, config.csv_file)
    photos = label_photos(
        read_rows(csv_path), channel, config.target_species,
        config.downsample_other, config.downsample_frac, config.seed,
    )  # fmt: skip
    _log.info("%s: %d photos, classes %s", csv_path.name, len(photos.labels), photos.class_counts())
    check_class_sizes(photos, config.k_folds)

    cache = build_cache(
        photos.paths, channel, config.img_size, config.decode_workers, paths.checkpoint_dir
    )
    if cache.failures:
        skipped = [
            (str(photos.paths[row].relative_to(channel)), photos.species[row], reason)
            for row, reason in sorted(cache.failures.items())
        ]
        write_skipped(paths.output_data_dir / "skipped_images.csv", skipped)
        _log.warning(
            "left out %d unreadable photo(s), listed in skipped_images.csv; first: %s: %s",
            len(skipped), skipped[0][0], skipped[0][2],
        )  # fmt: skip
    readable = cache.readable
    photos = photos.subset(readable)
    check_class_sizes(photos, config.k_folds, unreadable=len(cache.failures))

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    pixels = _place_cache(torch.from_numpy(cache.pixels[readable]), device, config.cache_device)
    labels = torch.from_numpy(photos.labels)
    folds = make_folds(photos.labels, config.k_folds, config.seed)
    store = CheckpointStore(paths.checkpoint_dir, _fingerprint(config, photos, channel))
    store.open()

    model = build_model(len(photos.classes), config.pretrained)
    trainer = FoldTrainer(model, config, device, len(photos.classes))
    _log.info(
        "device %s, precision %s, compile %s, %d fold(s) of up to %d epochs",
        _device_name(device), trainer.precision, config.compile, len(folds), config.num_epochs,
    )  # fmt: skip
    progress = _Progress(config, len(folds))
    finished: list[FoldState] = []
    for fold, (train_index, val_index) in enumerate(folds, start=1):
        done = store.load_finished(fold)
        if done is not None:
            _log.info("fold %d: finished in an earlier run (macro-F1 %.4f), skipping", fold, done.best_macro_f1)
            finished.append(done)
            continue
        state = store.load_progress(fold) or FoldState(fold=fold)
        if state.epoch:
            _log.info("fold %d: resuming after epoch %d", fold, state.epoch)
        data = FoldData(pixels, labels, train_index, val_index)
        state = trainer.run(data, state, store.save_progress, progress.report)
        store.save_finished(state)
        _log.info("fold %d: best macro-F1 %.4f at epoch %d", fold, state.best_macro_f1, state.best_epoch)
        finished.append(state)

    fold_indices = [val for _, val in folds]
    metrics = summarize(finished, fold_indices, photos, skipped=len(cache.failures))
    _log.info(
        "%s",
        metric_lines.job_line(
            metrics["mean_macro_f1"], metrics["std_macro_f1"], metrics["out_of_fold"]["macro_f1"]
        ),
    )
    settings = {**config.to_dict(), "csv": csv_path.name, "device": _device_name(device),
                "precision": trainer.precision}  # fmt: skip
    write_outputs(paths.output_data_dir, metrics, finished, fold_indices, photos, channel, settings)
    _write_model(paths, config, photos, finished, metrics, settings)
    _log.info(
        "done in %s: model in %s, report in %s",
        format_duration(time.perf_counter() - job_started), paths.model_dir,
        paths.output_data_dir / "report.md",
    )  # fmt: skip


def _place_cache(pixels: torch.Tensor, device: torch.device, preference: str) -> torch.Tensor:
    """GPU memory when it fits comfortably (or is asked for), else (pinned) host memory."""
    if device.type != "cuda" or preference == "cpu":
        where = "pinned host memory" if device.type == "cuda" else "host memory"
        _log.info("photo cache: %.2f GB in %s", pixels.nbytes / 1e9, where)
        return pixels.pin_memory() if device.type == "cuda" else pixels
    free, _ = torch.cuda.mem_get_info(device)
    budget = free * GPU_CACHE_SHARE
    if preference == "gpu" or pixels.nbytes <= budget:
        _log.info("photo cache: %.2f GB in GPU memory (budget %.2f GB)", pixels.nbytes / 1e9, budget / 1e9)
        return pixels.to(device)
    _log.info(
        "photo cache: %.2f GB exceeds the GPU budget of %.2f GB: pinned host memory",
        pixels.nbytes / 1e9, budget / 1e9,
    )  # fmt: skip
    return pixels.pin_memory()


def _fingerprint(config: TrainingConfig, photos: LabelledPhotos, channel) -> str:
    """What makes two runs the same job: settings that change results, and the data."""
    settings = {k: v for k, v in config.to_dict().items() if k not in ("decode_workers", "cache_device")}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path, label in zip(photos.paths, photos.labels.tolist(), strict=True):
        digest.update(f"\n{path.relative_to(channel)}:{label}".encode())
    return digest.hexdigest()[:16]


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


class _Progress:
    """Per-epoch log line: the scrapeable metrics, then learning rate, best so far and ETAs."""

    def __init__(self, config: TrainingConfig, fold_count: int) -> None:
        self.config = config
        self.fold_count = fold_count
        self.epoch_seconds: list[float] = []

    def report(self, state: FoldState, record: EpochRecord) -> None:
        self.epoch_seconds.append(record.seconds)
        per_epoch = float(np.mean(self.epoch_seconds))
        fold_left = per_epoch * (self.config.num_epochs - record.epoch)
        job_left = fold_left + per_epoch * self.config.num_epochs * (self.fold_count - state.fold)
        line = metric_lines.epoch_line(
            state.fold, record.epoch, record.train_loss, record.val_loss,
            record.val_macro_f1, record.img_per_s,
        )  # fmt: skip
        _log.info(
            "%s lr=%.2g best=%.4f@%d epoch_s=%.1f eta_fold<=%s eta_job<=%s",
            line, record.learning_rate, state.best_macro_f1, state.best_epoch, record.seconds,
            format_duration(fold_left), format_duration(job_left),
        )  # fmt: skip


def _write_model(paths, config, photos, finished, metrics, settings) -> None:
    for stale in list(paths.model_dir.glob("fold-*.pt")) + list(paths.model_dir.glob("model.json")):
        stale.unlink()
    members = [
        Member(name=f"fold-{s.fold}", weights_file=f"fold-{s.fold}.pt", val_macro_f1=s.best_macro_f1)
        for s in finished
    ]
    description = BundleDescription(
        classes=photos.classes,
        img_size=config.img_size,
        members=members,
        training={
            "settings": settings,
            "target_species": list(config.target_species),
            "mean_macro_f1": metrics["mean_macro_f1"],
            "std_macro_f1": metrics["std_macro_f1"],
            "job_name": os.environ.get("TRAINING_JOB_NAME"),
            "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "torch_version": torch.__version__,
        },
    )
    write_bundle(paths.model_dir, description, {f"fold-{s.fold}": s.best_model for s in finished})

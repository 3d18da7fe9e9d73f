"""`train`: the SageMaker training entry point, and the job's one failure boundary.

Flow: hyperparameters -> labelled photos -> photo store -> folds -> per fold: train with
a checkpoint after every epoch (finished folds are skipped on restart) -> evaluation and
report in output/data -> model bundle in model/. Any error ends in output/failure with a
short, specific reason first (SageMaker shows its first 1024 characters as the job's
FailureReason) and a non-zero exit; SIGTERM stops at once and leaves the last completed
epoch checkpointed for a restarted job to continue from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

from species_classifier import holdout
from species_classifier.atomic import NoSpaceLeft, is_full, no_space_left
from species_classifier.bundle import BundleDescription, Member, write_bundle
from species_classifier.cache import build_store, survey_photos
from species_classifier.checkpoint import CheckpointStore
from species_classifier.contract import metric_lines
from species_classifier.contract.channel import find_csv
from species_classifier.contract.hyperparameters import (
    ConfigError,
    TrainingConfig,
    parse_hyperparameters,
)
from species_classifier.contract.paths import BASE_DIR_ENV, JobPaths
from species_classifier.dataset import (
    DatasetError,
    LabelledPhotos,
    check_class_sizes,
    label_photos,
    make_folds,
    read_rows,
)
from species_classifier.distributed import Workers, join_process_group, launch, read_topology
from species_classifier.evaluation import summarize, write_outputs, write_skipped
from species_classifier.gpu import GpuUnusableError, check_host, out_of_memory_message
from species_classifier.memory import (
    StorePlan,
    available_host_memory,
    plan_store,
    worker_bytes,
)
from species_classifier.model import WeightsMissingError, build_model
from species_classifier.onnx_export import export_onnx
from species_classifier.state import EpochRecord, FoldState
from species_classifier.stores import JpegStore, SlotStore, open_store
from species_classifier.trainer import FoldData, FoldTrainer, TrainingStopped, format_clock

_log = logging.getLogger("species_classifier.train")

EXIT_FAILED = 1
EXIT_STOPPED = 128 + signal.SIGTERM


class GpuOutOfMemoryError(RuntimeError):
    """Training or validation ran out of GPU memory; the message names the setting to lower."""


def main() -> int:
    _configure_logging()
    paths = JobPaths.from_environment()
    paths.failure_file.unlink(missing_ok=True)
    signal.signal(signal.SIGTERM, _stop_on_signal)
    try:
        config = read_config(paths)
        check_host("train")
        topology = read_topology(paths.resource_config, config.workers_per_host)
        if topology.world_size == 1:
            run(paths, config, Workers())
        else:
            run_id = os.environ.get("TRAINING_JOB_NAME", "species-classifier")
            launch(topology, run_id, worker_main, str(paths.base))
    except (TrainingStopped, SignalException) as stop:
        name = stop.args[0] if isinstance(stop, TrainingStopped) else stop.sigval.name
        return _fail(paths, f"Stopped by {name}", EXIT_STOPPED, detail=_resume_note(paths))
    except (
        ConfigError,
        DatasetError,
        WeightsMissingError,
        GpuUnusableError,
        GpuOutOfMemoryError,
        NoSpaceLeft,
    ) as error:
        return _fail(paths, str(error), EXIT_FAILED)
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        message = (
            failure.message["message"] if isinstance(failure.message, dict) else failure.message
        )
        return _fail(paths, f"worker rank {rank} failed: {message}", EXIT_FAILED, detail=str(error))
    except Exception as error:  # noqa: BLE001 - the job's failure boundary: report, never hang
        if is_full(error):
            reason = str(_full_disk(error, paths.base))
            return _fail(paths, reason, EXIT_FAILED, detail=traceback.format_exc())
        reason = f"Unexpected error: {type(error).__name__}: {error}"
        return _fail(paths, reason, EXIT_FAILED, detail=traceback.format_exc())
    return 0


def worker_main(base: str) -> None:
    """One of several workers (started by `launch`): its errors reach main() through the launcher."""
    rank = os.environ.get("RANK", "?")
    _configure_logging(prefix=f"[rank {rank}] ")
    signal.signal(signal.SIGTERM, _stop_on_signal)
    paths = JobPaths(Path(base))
    workers = join_process_group()
    try:
        run(paths, read_config(paths), workers)
    finally:
        torch.distributed.destroy_process_group()


def _configure_logging(prefix: str = "") -> None:
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s {prefix}%(message)s",
        stream=sys.stdout,
        force=True,
    )


def _stop_on_signal(signum: int, _frame) -> None:
    raise TrainingStopped(signal.Signals(signum).name)


def _fail(paths: JobPaths, reason: str, code: int, detail: str = "") -> int:
    _log.error("%s", reason)
    if detail:
        _log.error("%s", detail.rstrip())
    paths.failure_file.parent.mkdir(parents=True, exist_ok=True)
    paths.failure_file.write_text(reason + ("\n\n" + detail if detail else "") + "\n")
    return code


def _full_disk(error: Exception, folder: Path) -> NoSpaceLeft:
    """A full disk met outside the atomic writers, said as they say it; `folder` is where
    the write went when the error does not name its file."""
    if isinstance(error, NoSpaceLeft):
        return error
    filename = getattr(error, "filename", None)
    if filename is None:
        return no_space_left(folder, None, "a file")
    return no_space_left(Path(filename).parent, None, Path(filename).name)


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

    # The toolkit logs every plain-string value it could not JSON-decode; we log the result.
    logging.getLogger("sagemaker-training-toolkit").setLevel(logging.WARNING)
    try:
        raw = read_hyperparameters()
    except ValueError as error:
        raise ConfigError(f"{paths.hyperparameters} is not valid JSON: {error}") from None
    return parse_hyperparameters(raw)


def run(paths: JobPaths, config: TrainingConfig, workers: Workers) -> None:
    """The whole job as one worker sees it: its own folds, and on the leader the outputs."""
    job_started = time.perf_counter()
    if workers.is_leader:
        _log.info("hyperparameters: %s", json.dumps(config.to_dict()))
    device = workers.device()
    job_photos = load_photos(paths, config, workers, device)
    photos = job_photos.photos
    folds = make_folds(photos.labels, config.k_folds, config.seed, photos.groups)
    store = CheckpointStore(
        paths.checkpoint_dir, _fingerprint(config, photos, paths.training_channel)
    )
    if workers.local_rank == 0:
        store.open()
    workers.barrier()

    torch.manual_seed(config.seed)  # random initial weights, when not pretrained, are the job's own
    model = build_model(len(photos.classes), config.pretrained)
    trainer = FoldTrainer(model, config, device, len(photos.classes))
    cache_on_gpu = job_photos.pixels.device.type == "cuda"
    try:
        finished = train_own_folds(trainer, store, job_photos, folds, workers)
        refit = None
        if config.final_model == "refit":
            refit = refit_on_all_photos(trainer, store, job_photos, finished, workers)
    except torch.OutOfMemoryError:
        message = out_of_memory_message("training", config.batch_size, cache_on_gpu)
        raise GpuOutOfMemoryError(message) from None
    if workers.local_rank == 0:
        # Training is over on every worker of this host: the scratch copy has served.
        shutil.rmtree(scratch_dir(paths), ignore_errors=True)
    damaged = workers.gather_to_leader(store.damaged)
    if not workers.is_leader:
        return
    job_photos = dataclasses.replace(
        job_photos, damaged_checkpoints=sorted(name for names in damaged for name in names)
    )
    settings = {
        **config.to_dict(),
        "csv": job_photos.csv_name,
        "device": _device_name(device),
        "cache_device": "gpu" if job_photos.plan.place == "gpu" else "cpu",
        "photo_store": job_photos.plan.kind,
        "precision": trainer.precision,
        "workers": workers.world_size,
    }
    publish(paths, config, job_photos, folds, finished, refit, settings)
    _log.info(
        "done in %s: model in %s, report in %s",
        format_clock(time.perf_counter() - job_started),
        paths.model_dir,
        paths.output_data_dir / "report.md",
    )


@dataclass(frozen=True)
class JobPhotos:
    """The training channel's readable photos, labelled, and their pixels decoded once."""

    csv_name: str
    photos: LabelledPhotos
    # uint8 NHWC slots in photo order: one tensor in GPU memory, or a store (stores.py)
    # that reads batches of them from host memory
    pixels: torch.Tensor | SlotStore | JpegStore
    sizes: torch.Tensor  # (N, 4) true height, width, stored rows, cols (cache.py), CPU
    skipped: int  # unreadable photos left out
    held_out: LabelledPhotos | None  # set aside before the folds (holdout_fraction), unread
    plan: StorePlan  # which store, where, and why
    damaged_checkpoints: list[str] = dataclasses.field(default_factory=list)  # trained again

    def fold_data(self, train_index: np.ndarray, val_index: np.ndarray) -> FoldData:
        labels = torch.from_numpy(self.photos.labels)
        return FoldData(self.pixels, self.sizes, labels, train_index, val_index)


def load_photos(
    paths: JobPaths, config: TrainingConfig, workers: Workers, device: torch.device
) -> JobPhotos:
    """Phase 1: the CSV's labelled photos, checked, decoded into the cache, placed for training."""
    channel = paths.training_channel
    csv_path = find_csv(channel, config.csv_file)
    csv_rows = read_rows(csv_path, config.group_by)
    _log.info("%s", _grouping_note(csv_rows.group_by, config.group_by))
    photos = label_photos(
        csv_rows,
        channel,
        config.target_species,
        config.downsample_other,
        config.downsample_frac,
        config.seed,
    )
    photos, held_out = holdout.set_aside(photos, config.holdout_fraction, config.seed)
    _log.info("%s: %d photos, classes %s", csv_path.name, len(photos.labels), photos.class_counts())
    check_class_sizes(photos, config.k_folds)

    store, plan = _shared_store(paths, config, photos, workers, device)
    if store.failures and workers.is_leader:
        _report_unreadable(paths, photos, store.failures)
    readable = store.readable
    photos = photos.subset(readable)
    check_class_sizes(photos, config.k_folds, unreadable=len(store.failures))
    store = store.select(readable)
    pixels = store.to_device(device) if plan.place == "gpu" else store
    if plan.decode == "cuda":
        store.decode_on(device)
    sizes = torch.from_numpy(store.sizes)
    return JobPhotos(csv_path.name, photos, pixels, sizes, len(store.failures), held_out, plan)


def train_own_folds(
    trainer: FoldTrainer,
    store: CheckpointStore,
    job_photos: JobPhotos,
    folds: list[tuple[np.ndarray, np.ndarray]],
    workers: Workers,
) -> list[FoldState]:
    """Phase 2: this worker's folds, each resumed from its checkpoint or skipped when done.

    Returns every fold of the job on the leader (gathered from all workers, in fold order),
    this worker's own elsewhere.
    """
    config = trainer.config
    my_folds = [fold for fold in range(1, len(folds) + 1) if workers.owns_fold(fold)]
    _log.info(
        "device %s, precision %s, compile %s, fold(s) %s of %d, up to %d epochs each",
        _device_name(trainer.device),
        trainer.precision,
        config.compile,
        my_folds,
        len(folds),
        config.num_epochs,
    )
    progress = Progress(config.num_epochs, my_folds)
    finished: list[FoldState] = []
    for fold in my_folds:
        done = store.load_finished(fold)
        if done is not None:
            _log.info(
                "fold %d: finished in an earlier run (macro-F1 %.4f), skipping",
                fold,
                done.best_macro_f1,
            )
            finished.append(done)
            continue
        state = store.load_progress(fold) or FoldState(fold=fold)
        if state.epoch:
            _log.info("fold %d: resuming after epoch %d", fold, state.epoch)
        data = job_photos.fold_data(*folds[fold - 1])
        state = trainer.run(data, state, store.save_progress, progress.report)
        store.save_finished(state)
        _log.info(
            "fold %d: best macro-F1 %.4f at epoch %d", fold, state.best_macro_f1, state.best_epoch
        )
        finished.append(_without_resume_state(state))

    gathered = workers.gather_to_leader(finished)
    if not workers.is_leader:
        return finished
    return sorted((s for states in gathered for s in states), key=lambda s: s.fold)


def _without_resume_state(state: FoldState) -> FoldState:
    """A finished fold as evaluation and the bundle need it (weights and history on the
    CPU): its optimiser state lives on the GPU, and gathering it would unpickle every
    worker's Adam moments onto the leader's GPU."""
    return dataclasses.replace(state, model={}, optimizer={}, scheduler={}, scaler={})


def refit_on_all_photos(
    trainer: FoldTrainer,
    store: CheckpointStore,
    job_photos: JobPhotos,
    finished: list[FoldState],
    workers: Workers,
) -> FoldState:
    """Phase 3 (final_model=refit): one model on all photos at once, data-parallel across
    the workers, for as many epochs as the folds needed to reach their best."""
    epochs = workers.share_from_leader(
        int(np.median([s.best_epoch for s in finished])) if workers.is_leader else None
    )
    everything = job_photos.fold_data(np.arange(len(job_photos.photos.labels)), np.arange(0))
    # fold=None names the refit: its checkpoints are refit-*.pt, its bundle member "refit".
    state = store.load_finished(None) or store.load_progress(None) or FoldState(fold=None)
    save = store.save_progress if workers.is_leader else (lambda _state: None)
    refit = trainer.refit(everything, epochs, (workers.rank, workers.world_size), state, save)
    if workers.is_leader:
        store.save_finished(refit)
    return refit


def publish(
    paths: JobPaths,
    config: TrainingConfig,
    job_photos: JobPhotos,
    folds: list[tuple[np.ndarray, np.ndarray]],
    finished: list[FoldState],
    refit: FoldState | None,
    settings: dict,
) -> None:
    """Phase 4, on the leader only: metrics, plots and report in output/data, the model bundle."""
    photos, channel = job_photos.photos, paths.training_channel
    fold_indices = [val for _, val in folds]
    if refit is None:
        final_model = {"strategy": "ensemble", "members": len(finished)}
    else:
        final_model = {
            "strategy": "refit",
            "epochs": refit.epoch,
            "train_loss": [r.train_loss for r in refit.history],
        }
    metrics = summarize(
        finished,
        fold_indices,
        photos,
        skipped=job_photos.skipped,
        final_model=final_model,
        seed=config.seed,
        min_precision=config.min_precision,
    )
    metrics["damaged_checkpoints"] = job_photos.damaged_checkpoints
    _log.info(
        "%s",
        metric_lines.job_line(
            metrics["mean_macro_f1"], metrics["std_macro_f1"], metrics["out_of_fold"]["macro_f1"]
        ),
    )
    _write_model(paths, config, photos, [refit] if refit else finished, metrics, settings)
    held_out = job_photos.held_out
    # The portable copy, checked on photos the model did not train on where there are any.
    export_onnx(paths.model_dir, (held_out if held_out is not None else photos).paths)
    # The bundle is written first: the holdout is scored by it, exactly as `serve` loads it.
    try:
        scored = (
            None
            if held_out is None
            else holdout.score(paths.model_dir, held_out, channel, config.seed)
        )
        write_outputs(
            paths.output_data_dir,
            metrics,
            finished,
            fold_indices,
            photos,
            channel,
            settings,
            scored,
        )
    except Exception as error:
        if not is_full(error):
            raise
        # The model is whole in model/: the job is not lost for a report it could not finish.
        _log.error(
            "report incomplete, model complete in %s: %s",
            paths.model_dir,
            _full_disk(error, paths.output_data_dir),
        )


def _grouping_note(group_by: str, asked: str) -> str:
    if group_by == "none":
        why = "asked for" if asked == "none" else "the CSV has no observation_uuid column"
        return (
            f"group_by none ({why}): splits are drawn photo by photo, so near-copies of one "
            "observation may score each other"
        )
    how = "the CSV has observation_uuid" if asked == "auto" else "asked for"
    return f"group_by {group_by} ({how}): no {group_by} is split between folds or the holdout"


def _shared_store(paths, config, photos, workers: Workers, device: torch.device):
    """One store per host, planned from the memory there before decoding: its first worker
    builds it (or reopens a previous run's), the others open the files it wrote."""
    survey = survey_photos(
        photos.paths, paths.training_channel, config.img_size, config.decode_workers
    )
    if config.cache_device == "gpu" and device.type != "cuda":
        _log.warning(
            "cache_device=gpu, but this machine has no GPU: the photo store stays in host memory"
        )
    available, source = available_host_memory()
    free_gpu = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    per_host = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    per_worker = worker_bytes(device.type, config.batch_size, config.img_size)
    plan = plan_store(
        survey.count,
        survey.bytes_per_photo,
        available,
        free_gpu,
        per_host,
        per_worker,
        config.photo_store,
        config.cache_device,
    )
    if workers.local_rank == 0:
        _log.info(
            "%s; %.0f bytes a photo as uint8, %.0f as jpeg (from a sample); memory from %s; "
            "%d worker(s) of %.2f GB",
            plan.describe(survey.count),
            survey.bytes_per_photo["uint8"],
            survey.bytes_per_photo["jpeg"],
            source,
            per_host,
            per_worker / 1e9,
        )
    store_dir = store_home(paths, plan, survey.photo_bytes)
    store = (
        build_store(survey, plan.kind, config.decode_workers, store_dir)
        if workers.local_rank == 0
        else None
    )
    workers.barrier()
    if store is None:
        store = open_store(store_dir, survey.key, plan.kind, config.decode_workers)
    return store, plan


def store_home(paths: JobPaths, plan: StorePlan, photo_bytes: int) -> Path:
    """The checkpoint folder, which SageMaker restores on a spot restart, for a store smaller
    than the photos (reading it back beats decoding again: docs/benchmarks/photo-stores-cpu.md);
    else scratch space in /tmp, out of the folder SageMaker uploads while the job runs."""
    if plan.kind == "jpeg" and plan.store_bytes < photo_bytes:
        return paths.checkpoint_dir
    return scratch_dir(paths)


def scratch_dir(paths: JobPaths) -> Path:
    """The job's folder in /tmp: one per base folder, so jobs side by side keep apart."""
    digest = hashlib.sha256(str(paths.base.resolve()).encode()).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"species-classifier-{digest}"


def _report_unreadable(paths: JobPaths, photos: LabelledPhotos, failures: dict[int, str]) -> None:
    channel = paths.training_channel
    skipped = [
        (str(photos.paths[row].relative_to(channel)), photos.species[row], reason)
        for row, reason in sorted(failures.items())
    ]
    write_skipped(paths.output_data_dir / "skipped_images.csv", skipped)
    _log.warning(
        "left out %d unreadable photo(s), listed in skipped_images.csv; first: %s: %s",
        len(skipped),
        skipped[0][0],
        skipped[0][2],
    )


def _fingerprint(config: TrainingConfig, photos: LabelledPhotos, channel) -> str:
    """What makes two runs the same job: settings that change results, and the data."""
    settings = {
        k: v for k, v in config.to_dict().items() if k not in ("decode_workers", "cache_device")
    }
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for path, label in zip(photos.paths, photos.labels.tolist(), strict=True):
        digest.update(f"\n{path.relative_to(channel)}:{label}".encode())
    return digest.hexdigest()[:16]


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


class Progress:
    """Per-epoch log line: the scrapeable metrics, then learning rate, best so far and ETAs.

    The ETAs are upper bounds (every remaining epoch run, none stopped early) for this
    worker: the rest of its current fold, and that plus its folds still to come.
    """

    def __init__(self, num_epochs: int, my_folds: list[int]) -> None:
        self.num_epochs = num_epochs
        self.my_folds = my_folds
        self.epoch_seconds: list[float] = []

    def report(self, state: FoldState, record: EpochRecord) -> None:
        self.epoch_seconds.append(record.seconds)
        per_epoch = float(np.mean(self.epoch_seconds))
        fold_left = per_epoch * (self.num_epochs - record.epoch)
        folds_to_come = sum(1 for fold in self.my_folds if fold > state.fold)
        job_left = fold_left + per_epoch * self.num_epochs * folds_to_come
        line = metric_lines.epoch_line(
            state.fold,
            record.epoch,
            record.train_loss,
            record.train_macro_f1,
            record.val_loss,
            record.val_macro_f1,
            record.img_per_s,
        )
        _log.info(
            "%s lr=%.2g best=%.4f@%d epoch_s=%.1f eta_fold<=%s eta_job<=%s",
            line,
            record.learning_rate,
            state.best_macro_f1,
            state.best_epoch,
            record.seconds,
            format_clock(fold_left),
            format_clock(job_left),
        )


def _write_model(paths, config, photos, finished, metrics, settings) -> None:
    """The bundle serve loads: the fold models as an ensemble, or the one refit model."""
    for stale in [*paths.model_dir.glob("*.pt"), *paths.model_dir.glob("model.json")]:
        stale.unlink()
    members = [
        Member(
            name=s.name,
            weights_file=f"{s.name}.pt",
            val_macro_f1=None if s.is_refit else s.best_macro_f1,
        )
        for s in finished
    ]
    description = BundleDescription(
        classes=photos.classes,
        img_size=config.img_size,
        members=members,
        temperature=metrics["calibration"]["temperature"],
        calibration=metrics["calibration"],
        abstain_below=metrics["abstain"]["abstain_below"],
        training={
            "settings": settings,
            "target_species": list(config.target_species),
            "mean_macro_f1": metrics["mean_macro_f1"],
            "std_macro_f1": metrics["std_macro_f1"],
            "job_name": os.environ.get("TRAINING_JOB_NAME"),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "torch_version": torch.__version__,
        },
    )
    weights = {m.name: s.best_model for m, s in zip(members, finished, strict=True)}
    write_bundle(paths.model_dir, description, weights)

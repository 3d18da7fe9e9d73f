"""Resume state in /opt/ml/checkpoints: spot-safe, written atomically, tied to its job.

SageMaker syncs this folder to S3 while the job runs and restores it when a spot job
restarts. Files:
    job.json               fingerprint of the hyperparameters and data that wrote them
    fold-K-progress.pt     the fold in progress, after its last completed epoch
    fold-K-done.pt         a finished fold: best weights, validation probabilities, history
    refit-*.pt             the same for the final model on all photos (final_model=refit)
Every file is written to a temporary name, flushed to disk and renamed, so a kill at any
moment leaves the previous complete file, never a torn one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from species_classifier.atomic import atomic_write
from species_classifier.state import EpochRecord, FoldState, model_name

_log = logging.getLogger(__name__)

JOB_FILE = "job.json"


class CheckpointStore:
    def __init__(self, directory: Path, fingerprint: str) -> None:
        self.directory = directory
        self.fingerprint = fingerprint

    def open(self) -> None:
        """Create the folder; drop fold files that another job (other data or settings) left."""
        self.directory.mkdir(parents=True, exist_ok=True)
        job_file = self.directory / JOB_FILE
        previous = (
            json.loads(job_file.read_text()).get("fingerprint") if job_file.is_file() else None
        )
        if previous not in (None, self.fingerprint):
            _log.warning(
                "checkpoints in %s belong to a different job (data or hyperparameters "
                "changed): starting from scratch",
                self.directory,
            )
            for stale in [*self.directory.glob("fold-*.pt"), *self.directory.glob("refit-*.pt")]:
                stale.unlink()
        _write_atomically(job_file, json.dumps({"fingerprint": self.fingerprint}).encode())

    def save_progress(self, state: FoldState) -> None:
        self._save(self._path(state.fold, "progress"), state)

    def save_finished(self, state: FoldState) -> None:
        """Keep what evaluation and the bundle need; the optimiser state is no longer useful."""
        finished = dataclasses.replace(state, model={}, optimizer={}, scheduler={}, scaler={})
        self._save(self._path(state.fold, "done"), finished)
        self._path(state.fold, "progress").unlink(missing_ok=True)

    def load_finished(self, fold: int | None) -> FoldState | None:
        """The finished fold `fold`, or with None the finished refit."""
        return self._load(self._path(fold, "done"))

    def load_progress(self, fold: int | None) -> FoldState | None:
        """The fold `fold` (or with None the refit) after its last completed epoch."""
        return self._load(self._path(fold, "progress"))

    def _path(self, fold: int | None, kind: str) -> Path:
        return self.directory / f"{model_name(fold)}-{kind}.pt"

    def _save(self, path: Path, state: FoldState) -> None:
        # Shallow on purpose: dataclasses.asdict would deep-copy every tensor (~100 MB) only
        # for torch.save to read it once.
        payload = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
        payload["history"] = [dataclasses.asdict(r) for r in state.history]
        _write_atomically(path, payload)

    def _load(self, path: Path) -> FoldState | None:
        if not path.is_file():
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unreadable file means: start that fold over
            _log.warning("checkpoint %s is unreadable (%s): ignoring it", path, error)
            return None
        payload["history"] = [EpochRecord(**r) for r in payload["history"]]
        return FoldState(**payload)


def _write_atomically(path: Path, payload: object) -> None:
    with atomic_write(path) as handle:
        if isinstance(payload, bytes):
            handle.write(payload)
        else:
            torch.save(payload, handle)

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
import io
import json
import logging
from pathlib import Path

import torch

from species_classifier.atomic import NoSpaceLeft, atomic_write, no_space_left
from species_classifier.state import EpochRecord, FoldState, model_name

_log = logging.getLogger(__name__)

JOB_FILE = "job.json"


class CheckpointStore:
    def __init__(self, directory: Path, fingerprint: str) -> None:
        self.directory = directory
        self.fingerprint = fingerprint
        self.damaged: list[str] = []  # checkpoint files found unreadable, and trained again

    def open(self) -> None:
        """Create the folder; drop fold files that another job (other data or settings) left."""
        self.directory.mkdir(parents=True, exist_ok=True)
        job_file = self.directory / JOB_FILE
        previous = self._previous_fingerprint(job_file)
        if previous not in (None, self.fingerprint):
            _log.warning(
                "checkpoints in %s belong to a different job (data or hyperparameters "
                "changed): starting from scratch",
                self.directory,
            )
            for stale in [*self.directory.glob("fold-*.pt"), *self.directory.glob("refit-*.pt")]:
                stale.unlink()
        _write_atomically(job_file, json.dumps({"fingerprint": self.fingerprint}).encode())

    def _previous_fingerprint(self, job_file: Path) -> str | None:
        """The fingerprint job.json names; a damaged job.json is set aside (as job.json.damaged)
        and its fold files count as another job's, rather than failing every restart."""
        if not job_file.is_file():
            return None
        try:
            fingerprint = json.loads(job_file.read_text())["fingerprint"]
            if isinstance(fingerprint, str):
                return fingerprint
            raise TypeError(f"fingerprint is {fingerprint!r}")
        except (UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
            aside = job_file.with_name(JOB_FILE + ".damaged")
            job_file.replace(aside)
            _log.warning(
                "%s is damaged (%s: %s): set aside as %s, starting from scratch",
                job_file,
                type(error).__name__,
                error,
                aside.name,
            )
            return ""

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
            self.damaged.append(path.name)
            return None
        payload["history"] = [EpochRecord(**r) for r in payload["history"]]
        return FoldState(**payload)


def _write_atomically(path: Path, payload: object) -> None:
    if not isinstance(payload, bytes):
        # Serialised first, so a full disk is an OSError that knows the bytes it needed,
        # not torch.save's "[enforce fail at inline_container.cc] unexpected pos".
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        payload = buffer.getvalue()
    try:
        with atomic_write(path) as handle:
            handle.write(payload)
    except NoSpaceLeft as error:
        raise no_space_left(path.parent, len(payload), f"checkpoint {path.name}") from error

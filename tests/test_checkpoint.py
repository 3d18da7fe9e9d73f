"""The resume store: folds and the refit each in their own files, round-tripped exactly; a
damaged job file set aside, damaged checkpoints named, a full disk said in one line."""

from __future__ import annotations

import dataclasses
import errno
import io
import json
import os

import pytest
import torch
from species_classifier.atomic import NoSpaceLeft
from species_classifier.checkpoint import CheckpointStore
from species_classifier.state import EpochRecord, FoldState


def state_after_one_epoch(fold: int | None) -> FoldState:
    weights = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    return FoldState(
        fold=fold,
        epoch=1,
        model=weights,
        optimizer={"state": {}, "param_groups": [{"name": "head", "lr": 1e-3, "params": [0]}]},
        best_macro_f1=0.5,
        best_epoch=1,
        best_model=weights,  # the same tensors, as the trainer shares them
        best_val_probs=torch.full((4, 5), 0.2),
        history=[EpochRecord(1, 1.5, 1.4, 0.5, 0.6, 1e-4, 2.0, 300.0, train_macro_f1=0.45)],
    )


def test_a_fold_and_the_refit_keep_separate_files_and_come_back_whole(tmp_path):
    store = CheckpointStore(tmp_path, fingerprint="job-a")
    store.open()
    fold, refit = state_after_one_epoch(2), state_after_one_epoch(None)
    store.save_progress(fold)
    store.save_progress(refit)
    assert {p.name for p in tmp_path.glob("*.pt")} == {"fold-2-progress.pt", "refit-progress.pt"}

    loaded = store.load_progress(None)
    assert loaded.is_refit and loaded.name == "refit"
    assert loaded.history == refit.history
    assert torch.equal(loaded.best_model["w"], refit.best_model["w"])
    assert loaded.optimizer["param_groups"][0]["name"] == "head"
    assert store.load_progress(2).fold == 2 and store.load_progress(1) is None

    store.save_finished(refit)
    assert store.load_progress(None) is None
    done = store.load_finished(None)
    assert (
        done.model == {}
        and done.optimizer == {}
        and torch.equal(done.best_model["w"], refit.best_model["w"])
    )


def test_another_jobs_checkpoints_are_dropped(tmp_path):
    first = CheckpointStore(tmp_path, fingerprint="job-a")
    first.open()
    first.save_progress(state_after_one_epoch(1))
    first.save_finished(state_after_one_epoch(None))
    second = CheckpointStore(tmp_path, fingerprint="job-b")
    second.open()
    assert second.load_progress(1) is None and second.load_finished(None) is None


def test_a_damaged_job_file_is_set_aside_and_the_job_starts_clean(tmp_path, caplog):
    first = CheckpointStore(tmp_path, fingerprint="job-a")
    first.open()
    first.save_progress(state_after_one_epoch(1))
    (tmp_path / "job.json").write_bytes(b"\x80\x81 not json")  # UnicodeDecodeError, as seen
    again = CheckpointStore(tmp_path, fingerprint="job-a")
    again.open()
    assert (tmp_path / "job.json.damaged").read_bytes() == b"\x80\x81 not json"
    assert "job.json is damaged (UnicodeDecodeError" in caplog.text
    assert again.load_progress(1) is None  # nothing it cannot vouch for is resumed
    assert json.loads((tmp_path / "job.json").read_text()) == {"fingerprint": "job-a"}


def test_damaged_fold_checkpoints_are_named_for_the_report(tmp_path):
    store = CheckpointStore(tmp_path, fingerprint="job-a")
    store.open()
    (tmp_path / "fold-2-done.pt").write_bytes(b"torn")
    assert store.load_finished(2) is None and store.load_finished(1) is None
    assert store.damaged == ["fold-2-done.pt"]


def test_a_full_disk_names_the_folder_the_bytes_and_the_fix(tmp_path, monkeypatch):
    store = CheckpointStore(tmp_path, fingerprint="job-a")
    store.open()

    def full(*_args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(NoSpaceLeft) as caught:
        store.save_progress(state_after_one_epoch(1))
    message = str(caught.value)
    size = len(_serialised(state_after_one_epoch(1)))
    assert message.startswith(f"{tmp_path} is full: writing checkpoint fold-1-progress.pt ")
    assert f"needed {size:,} bytes with " in message
    assert message.endswith(
        "bytes free; free space there or give the job a larger volume (VolumeSizeInGB)"
    )
    assert not list(tmp_path.glob(".partial-*")) and not list(tmp_path.glob("fold-*"))


def _serialised(state: FoldState) -> bytes:
    buffer = io.BytesIO()
    payload = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    payload["history"] = [dataclasses.asdict(r) for r in state.history]
    torch.save(payload, buffer)
    return buffer.getvalue()

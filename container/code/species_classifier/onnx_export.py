"""model.onnx from a written bundle: the served ensemble as one portable graph, checked.

After training has written the bundle, `export_onnx` rebuilds its ensemble exactly as `serve`
does (every member, the temperature, softmax, the mean; the normalisation inside), exports
it with torch's exporter (torch.export based, dynamic batch, one self-contained file), runs
it in ONNX Runtime on real photos and compares it with PyTorch. Only a graph within
CHECK_TOLERANCE of PyTorch on every class probability is kept, and only then does model.json
describe it (its "onnx" entry: onnx_runtime.contract plus the check). Any failure costs the
bundle its model.onnx and the job one warning: the bundle serves as before.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from species_classifier.atomic import PARTIAL_PREFIX
from species_classifier.bundle import load_members, read_description, write_description
from species_classifier.engine import Ensemble
from species_classifier.imaging import PhotoError, decode_photo
from species_classifier.onnx_runtime import (
    INPUT,
    MEAN_OUTPUT,
    MEMBERS_OUTPUT,
    ONNX_FILE,
    contract,
    open_session,
)

_log = logging.getLogger(__name__)

# The largest gap allowed between ONNX Runtime's and PyTorch's class probabilities.
CHECK_TOLERANCE = 1e-4
# Photos the check runs on: enough to see different answers, few enough to take seconds.
CHECK_PHOTOS = 32


class ExportCheckError(RuntimeError):
    """The exported graph does not answer as the PyTorch bundle does."""


class _WithMean(nn.Module):
    """The ensemble's member probabilities and their mean, the two outputs of model.onnx."""

    def __init__(self, ensemble: Ensemble) -> None:
        super().__init__()
        self.ensemble = ensemble

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        members = self.ensemble(pixels)
        return members.mean(dim=0), members


def export_onnx(model_dir: Path, photo_paths: Sequence[Path]) -> dict | None:
    """Write and check model.onnx for the bundle in `model_dir` on up to CHECK_PHOTOS of
    `photo_paths`; record it in model.json. Returns model.json's "onnx" entry, or None (with
    one warning, and no model.onnx) when the export or its check fails."""
    started = time.monotonic()
    target = model_dir / ONNX_FILE
    try:
        description = read_description(model_dir)
        ensemble = Ensemble(
            load_members(model_dir, description),
            description.mean,
            description.std,
            description.temperature,
        ).eval()
        photos = _decode(photo_paths, description.img_size)
        _export(ensemble, target, description.img_size)
        gap = largest_gap(ensemble, target, photos)
        if gap > CHECK_TOLERANCE:
            raise ExportCheckError(
                f"ONNX Runtime's probabilities differ from PyTorch's by up to {gap:.2g}, over "
                f"the {CHECK_TOLERANCE:g} allowed"
            )
    except Exception as error:  # noqa: BLE001 - the bundle is whole without it: never fail the job
        target.unlink(missing_ok=True)
        detail = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
        _log.warning(
            "no %s in the bundle: %s: %s. The model serves as before; species-classify "
            "needs a bundle with %s",
            ONNX_FILE,
            type(error).__name__,
            detail,
            ONNX_FILE,
        )
        return None
    entry = {
        **contract(description.img_size, description.resize),
        "check": {
            "photos": len(photos),
            "largest_probability_gap": gap,
            "tolerance": CHECK_TOLERANCE,
        },
        "exported_with": f"torch {torch.__version__}",
    }
    write_description(model_dir, replace(description, onnx=entry))
    _log.info(
        "%s: %.0f MB, exported and checked in %.0f s; largest probability gap to PyTorch "
        "%.2g over %d photos",
        ONNX_FILE,
        target.stat().st_size / 1e6,
        time.monotonic() - started,
        gap,
        len(photos),
    )
    return entry


def _decode(photo_paths: Sequence[Path], img_size: int) -> np.ndarray:
    photos = []
    # Spread over the list (a CSV's photos come grouped by species), skipping unreadable ones.
    spread = np.unique(np.linspace(0, len(photo_paths) - 1, CHECK_PHOTOS).round().astype(int))
    for path in [photo_paths[index] for index in spread] if photo_paths else []:
        try:
            photos.append(decode_photo(path, img_size))
        except PhotoError:
            continue  # training left it out too
    if len(photos) < 2:
        raise ExportCheckError(f"fewer than 2 readable photos to check {ONNX_FILE} on")
    return np.stack(photos)


def _export(ensemble: Ensemble, target: Path, img_size: int) -> None:
    """The ensemble as a single ONNX file with a dynamic batch, written atomically."""
    partial = target.with_name(f"{PARTIAL_PREFIX}{target.name}")
    example = torch.zeros((2, img_size, img_size, 3), dtype=torch.uint8)
    try:
        # The exporter prints its progress and logs every graph pass; a failure raises and is
        # reported, so the job's log keeps one line for the export.
        with _quiet_exporter():
            torch.onnx.export(
                _WithMean(ensemble),
                (example,),
                str(partial),
                input_names=[INPUT],
                output_names=[MEAN_OUTPUT, MEMBERS_OUTPUT],
                dynamic_shapes={"pixels": {0: torch.export.Dim("batch", min=1, max=4096)}},
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.WARNING)
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def largest_gap(ensemble: Ensemble, onnx_file: Path, photos: np.ndarray) -> float:
    """The largest difference of any probability (the mean and every member's) between
    ONNX Runtime and PyTorch, for the photos as one batch and for the first one alone."""
    session = open_session(onnx_file, torch.get_num_threads())
    gap = 0.0
    for batch in (photos, photos[:1]):
        mean, members = session.run([MEAN_OUTPUT, MEMBERS_OUTPUT], {INPUT: batch})
        with torch.inference_mode():
            expected = ensemble(torch.from_numpy(batch)).numpy()
        gap = max(
            gap,
            float(np.abs(members - expected).max()),
            float(np.abs(mean - expected.mean(axis=0)).max()),
        )
    return gap

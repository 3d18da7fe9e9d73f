"""The model bundle in /opt/ml/model: what training writes and serving loads.

Layout:
    model.json      description: classes in label order, input size, normalisation,
                    architecture, members (one weights file each), the temperature that
                    divides the logits, and how it was trained
    fold-1.pt ...   state_dicts, loadable with torch.load(..., weights_only=True)
    model.onnx      the same ensemble as one ONNX graph (onnx_export.py), written after the
                    rest and described under "onnx" in model.json only once it has been
                    checked against PyTorch; a bundle without it serves all the same

The bundle is self-describing: the predictor builds its preprocessing from model.json, so
there is no second copy of the constants that could drift from training.
"""

from __future__ import annotations

import json
import math
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from species_classifier.atomic import atomic_write
from species_classifier.imaging import IMAGENET_MEAN, IMAGENET_STD
from species_classifier.model import ARCHITECTURE, build_model
from species_classifier.onnx_runtime import ONNX_FILE

DESCRIPTION_FILE = "model.json"
FORMAT_VERSION = 1


class BundleError(ValueError):
    """The model folder does not hold a usable bundle; the message says what is wrong."""


@dataclass(frozen=True)
class Member:
    """One network of the ensemble: a fold model, or the model refit on all data."""

    name: str
    weights_file: str
    val_macro_f1: float | None = None


@dataclass(frozen=True)
class BundleDescription:
    classes: list[str]
    img_size: int
    members: list[Member]
    architecture: str = ARCHITECTURE
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    resize: str = "squash to img_size x img_size, bilinear, after EXIF orientation"
    ensemble: str = "mean of the members' softmax(logits / temperature) probabilities"
    # Fitted on the out-of-fold predictions; 1.0 where it did not lower the calibration
    # error. `calibration` says which: ece_before, ece_after, applied, fitted_temperature.
    temperature: float = 1.0
    calibration: dict = field(default_factory=dict)
    # Answers less confident than this are served with "unsure": true (0: never); chosen on
    # the out-of-fold predictions for the min_precision hyperparameter (scoring.py).
    abstain_below: float = 0.0
    training: dict = field(default_factory=dict)
    # model.onnx's contract (onnx_runtime.contract) and its check against PyTorch; empty
    # when the bundle has no checked model.onnx.
    onnx: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION


def write_bundle(
    model_dir: Path, description: BundleDescription, state_dicts: dict[str, dict]
) -> None:
    """Write the weights of every member (keyed by member name) and model.json last."""
    model_dir.mkdir(parents=True, exist_ok=True)
    # An earlier bundle's ONNX graph would answer with other weights than these.
    (model_dir / ONNX_FILE).unlink(missing_ok=True)
    for member in description.members:
        cpu_state = {k: v.detach().cpu() for k, v in state_dicts[member.name].items()}
        torch.save(cpu_state, model_dir / member.weights_file)
    # model.json goes last: a bundle with a description has all its weights.
    write_description(model_dir, description)


def write_description(model_dir: Path, description: BundleDescription) -> None:
    """model.json, atomically: a reader sees the old description or the new one."""
    with atomic_write(model_dir / DESCRIPTION_FILE) as handle:
        handle.write((json.dumps(asdict(description), indent=2) + "\n").encode())


def read_description(model_dir: Path) -> BundleDescription:
    path = model_dir / DESCRIPTION_FILE
    if not path.is_file():
        raise BundleError(
            f"no {DESCRIPTION_FILE} in {model_dir}: point the server at the model folder "
            "that training wrote (SageMaker unpacks model.tar.gz into /opt/ml/model)"
        )
    try:
        raw = json.loads(path.read_text())
        members = [Member(**m) for m in raw.pop("members")]
        raw["mean"], raw["std"] = tuple(raw["mean"]), tuple(raw["std"])
        description = BundleDescription(members=members, **raw)
    except (ValueError, KeyError, TypeError) as error:
        raise BundleError(f"{path} is not a valid model description: {error}") from None
    if description.format_version != FORMAT_VERSION:
        raise BundleError(
            f"{path} has format_version {description.format_version}; this image reads "
            f"version {FORMAT_VERSION}: serve it with the image that trained it"
        )
    if description.architecture != ARCHITECTURE or not description.members:
        raise BundleError(f"{path} describes no {ARCHITECTURE} members")
    temperature = description.temperature
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, int | float)
        or not (math.isfinite(temperature) and temperature > 0)
    ):
        raise BundleError(f"{path} has temperature {temperature!r}: it must be a number above 0")
    threshold = description.abstain_below
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, int | float)
        or not 0 <= threshold <= 1
    ):
        raise BundleError(
            f"{path} has abstain_below {threshold!r}: it must be a number from 0 to 1"
        )
    return description


def load_members(model_dir: Path, description: BundleDescription) -> list[torch.nn.Module]:
    """Every member network, weights loaded, in eval mode on the CPU."""
    networks = []
    for member in description.members:
        weights = model_dir / member.weights_file
        if not weights.is_file():
            raise BundleError(f"{weights} is named in {DESCRIPTION_FILE} but missing")
        network = build_model(len(description.classes), pretrained=False)
        try:
            network.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        except (RuntimeError, OSError, ValueError, pickle.UnpicklingError) as error:
            raise BundleError(f"{weights} does not load: {str(error)[:300]}") from None
        networks.append(network.eval())
    return networks

"""model.onnx: exported and checked after training, served by ONNX Runtime, and answered by
`species-classify` where torch is not installed, with the answers `/invocations` gives."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from photos import encode, greyscale_jpeg
from PIL import Image
from serving_helpers import CLASSES, REPO, ServerProcess, make_bundle, photo
from species_classifier.onnx_export import CHECK_TOLERANCE, export_onnx
from species_classifier.onnx_runtime import ONNX_FILE
from species_classifier.predictor import Predictor

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMG_SIZE = 64
MEMBERS = 2
# Photos of several shapes and formats: landscape, portrait, large, square PNG, greyscale.
PHOTO_SHAPES = [(96, 72), (50, 120), (640, 480), (64, 64)]


@pytest.fixture(scope="module")
def photo_files(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("photos")
    files = []
    for seed, size in enumerate(PHOTO_SHAPES):
        fmt = "PNG" if size == (64, 64) else "JPEG"
        path = folder / f"photo-{seed}.{fmt.lower()}"
        path.write_bytes(photo(seed, size, fmt))
        files.append(path)
    (folder / "grey.jpg").write_bytes(greyscale_jpeg())
    return [*files, folder / "grey.jpg"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, photo_files) -> Path:
    """A base folder whose model/ has a checked model.onnx, as train leaves it."""
    base = tmp_path_factory.mktemp("opt_ml")
    make_bundle(base / "model", img_size=IMG_SIZE, members=MEMBERS)
    assert export_onnx(base / "model", photo_files) is not None
    return base


@pytest.fixture
def torchless_env(tmp_path) -> dict:
    """An environment in which `import torch` fails, as on a laptop without it."""
    blocked = tmp_path / "no-torch"
    for name in ("torch", "torchvision"):
        (blocked / name).mkdir(parents=True)
        (blocked / name / "__init__.py").write_text(
            f"raise ImportError('{name} is not installed here')\n"
        )
    code = REPO / "container" / "code"
    return {"PATH": str(Path(sys.executable).parent), "PYTHONPATH": f"{blocked}:{code}"}


def classify(env: dict, *args, check_torch_is_absent: bool = True) -> subprocess.CompletedProcess:
    if check_torch_is_absent:
        probe = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True)
        assert probe.returncode != 0 and b"torch is not installed here" in probe.stderr
    return subprocess.run(
        [sys.executable, "-m", "species_classifier.classify", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_model_json_describes_the_checked_graph(exported):
    description = json.loads((exported / "model" / "model.json").read_text())
    onnx = description["onnx"]
    assert onnx["file"] == ONNX_FILE and (exported / "model" / ONNX_FILE).is_file()
    assert onnx["input"]["shape"] == ["batch", IMG_SIZE, IMG_SIZE, 3]
    assert onnx["input"]["dtype"] == "uint8"
    assert [output["name"] for output in onnx["outputs"]] == [
        "probabilities",
        "member_probabilities",
    ]
    assert onnx["check"]["photos"] == len(PHOTO_SHAPES) + 1
    assert 0 <= onnx["check"]["largest_probability_gap"] <= CHECK_TOLERANCE
    assert description["classes"] == CLASSES


def test_species_classify_answers_as_invocations_without_torch(
    exported, photo_files, torchless_env, tmp_path
):
    # The served answers from PyTorch itself (eager), so the comparison is ONNX vs PyTorch.
    with ServerProcess(exported, tmp_path / "serve.log", SPECIES_SERVE_ENGINE="eager") as server:
        served = [
            requests.post(
                f"{server.url}/invocations",
                data=path.read_bytes(),
                headers={"Content-Type": "image/png" if path.suffix == ".png" else "image/jpeg"},
                timeout=60,
            ).json()
            for path in photo_files
        ]
    archive = tmp_path / "model.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for path in sorted((exported / "model").iterdir()):
            tar.add(path, arcname=path.name)
    result = classify(torchless_env, "--model", archive, *photo_files)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) == len(photo_files)
    # The photos get different answers, so equal answers mean something.
    probabilities = np.array([list(answer["class_probabilities"].values()) for answer in served])
    assert (probabilities.max(axis=0) - probabilities.min(axis=0)).max() > 100 * CHECK_TOLERANCE
    for got, expected in zip(lines, served, strict=True):
        assert list(got) == list(expected)
        assert got["predicted_species"] == expected["predicted_species"]
        assert got["individual_fold_predictions"] == expected["individual_fold_predictions"]
        assert list(got["class_probabilities"]) == list(expected["class_probabilities"])
        np.testing.assert_allclose(
            list(got["class_probabilities"].values()),
            list(expected["class_probabilities"].values()),
            atol=CHECK_TOLERANCE,
            rtol=0,
        )
        assert got["confidence"] == pytest.approx(expected["confidence"], abs=CHECK_TOLERANCE)
        for got_fold, expected_fold in zip(
            got["fold_details"], expected["fold_details"], strict=True
        ):
            assert got_fold["fold"] == expected_fold["fold"]
            assert got_fold["predicted_species"] == expected_fold["predicted_species"]
            assert got_fold["confidence"] == pytest.approx(
                expected_fold["confidence"], abs=CHECK_TOLERANCE
            )


def test_species_classify_reports_unsure_from_the_bundles_threshold(
    exported, photo_files, torchless_env, tmp_path
):
    model = tmp_path / "model"
    model.mkdir()
    (model / ONNX_FILE).symlink_to(exported / "model" / ONNX_FILE)
    description = json.loads((exported / "model" / "model.json").read_text())
    # Random members answer near 1/5 for every class: a threshold between the confidences.
    result = classify(torchless_env, "--model", exported / "model", *photo_files)
    confidences = sorted(json.loads(line)["confidence"] for line in result.stdout.splitlines())
    threshold = (confidences[0] + confidences[-1]) / 2
    (model / "model.json").write_text(json.dumps({**description, "abstain_below": threshold}))
    result = classify(torchless_env, "--model", model, *photo_files, check_torch_is_absent=False)
    answers = [json.loads(line) for line in result.stdout.splitlines()]
    assert {answer["unsure"] for answer in answers} == {True, False}
    for answer in answers:
        assert answer["unsure"] == (answer["confidence"] < threshold)


def test_species_classify_says_what_is_wrong_in_one_line(exported, torchless_env, tmp_path):
    not_a_photo = tmp_path / "notes.txt"
    not_a_photo.write_text("not a photo")
    good = tmp_path / "good.jpg"
    good.write_bytes(encode(Image.new("RGB", (60, 40), (10, 200, 30))))
    result = classify(torchless_env, "--model", exported / "model", not_a_photo, good)
    assert result.returncode == 1
    bad, fine = (json.loads(line) for line in result.stdout.splitlines())
    assert bad == {
        "error": f"cannot use the photo {not_a_photo}: not an image format Pillow can read "
        "(JPEG, PNG, ...)"
    }
    assert fine["predicted_species"] in CLASSES
    no_onnx = make_bundle(tmp_path / "trained-before", img_size=IMG_SIZE, members=1)
    result = classify(torchless_env, "--model", no_onnx, good)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert f"has no checked {ONNX_FILE}: the export failed" in result.stderr
    result = classify(torchless_env, "--model", not_a_photo, good)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "is neither a model folder nor a readable model.tar.gz" in result.stderr


def test_onnx_runtime_serves_the_pytorch_answers(exported, photo_files, caplog):
    model_dir = exported / "model"
    reference = Predictor(model_dir, cpu_threads=1, engine="eager")
    images = [reference.decode(path.read_bytes()) for path in photo_files]
    onnx = Predictor(model_dir, cpu_threads=1, engine="onnx")
    assert onnx.built.engine == "onnx runtime"
    np.testing.assert_allclose(
        onnx.probabilities(images), reference.probabilities(images), atol=CHECK_TOLERANCE, rtol=0
    )
    auto = Predictor(model_dir, cpu_threads=1)
    assert "onnx runtime" in auto.built.engine and "frozen graph" in auto.built.engine


def test_a_failed_export_is_one_warning_and_the_bundle_still_serves(
    tmp_path, photo_files, monkeypatch, caplog
):
    model_dir = make_bundle(tmp_path / "model", img_size=IMG_SIZE, members=1)
    # A model.onnx from an earlier bundle in the same folder must not survive a failed export.
    (model_dir / ONNX_FILE).write_bytes(b"an earlier bundle's graph")

    def broken_exporter(*args, **kwargs):
        raise RuntimeError("an operator the exporter does not know")

    monkeypatch.setattr(torch.onnx, "export", broken_exporter)
    with caplog.at_level(logging.WARNING):
        assert export_onnx(model_dir, photo_files) is None
    (warning,) = [record.message for record in caplog.records if record.levelno >= logging.WARNING]
    assert warning.startswith(
        "no model.onnx in the bundle: RuntimeError: an operator the exporter does not know."
    )
    assert not (model_dir / ONNX_FILE).exists()
    assert not json.loads((model_dir / "model.json").read_text())["onnx"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="species_classifier.engine"):
        predictor = Predictor(model_dir, cpu_threads=1, engine="onnx")
    assert predictor.built.engine == "eager"
    assert [record.message for record in caplog.records] == [
        "ONNX Runtime left out: FileNotFoundError: the bundle has no checked model.onnx (its "
        "export failed, see the training log)"
    ]
    (answer,) = predictor.predict([predictor.decode(photo_files[0].read_bytes())])
    assert answer["predicted_species"] in CLASSES

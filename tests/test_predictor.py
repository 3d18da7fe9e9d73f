"""The predictor's model on the CPU, in process: the optimised forward functions give the eager
answers, padded batches give each photo its own answer, the temperature in model.json is
applied per member, and a failed graph capture leaves a working eager model.

The CUDA-graph path itself needs a GPU (make gpu-check); here its padding runs with a plain
call standing in for the graph replay, and its capture fails as it would without a GPU.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from serving_helpers import CLASSES, make_bundle, photo
from species_classifier.bundle import BundleError, load_members, read_description
from species_classifier.engine import (
    PADDED_SIZES,
    Ensemble,
    PaddedBatches,
    cpu_forward,
    cuda_graph_forward,
    frozen_graph,
    padded_sizes,
)
from species_classifier.predictor import Predictor

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IMG_SIZE = 32
# Frozen graphs fold batch norm into the convolutions and use other kernels: float noise.
SAME_ANSWER_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("bundle") / "model", img_size=IMG_SIZE, members=2)


@pytest.fixture(scope="module")
def pixels(model_dir):
    predictor = predictor_for(model_dir, engine="eager")
    return torch.from_numpy(np.stack([predictor.decode(photo(seed)) for seed in range(6)]))


def predictor_for(model_dir, **settings) -> Predictor:
    return Predictor(model_dir, cpu_threads=1, **settings)


def ensemble(model_dir, temperature: float = 1.0) -> Ensemble:
    description = read_description(model_dir)
    members = load_members(model_dir, description)
    return Ensemble(members, description.mean, description.std, temperature).eval()


def test_the_frozen_graph_answers_as_eager_does(model_dir, pixels):
    model = ensemble(model_dir)
    with torch.inference_mode():
        eager = model(pixels)
    frozen = frozen_graph(model, pixels[:4])(pixels)
    assert frozen.shape == (2, len(pixels), len(CLASSES))
    # The photos get different answers, so equal answers mean something.
    assert (eager[:, 0] - eager[:, 1]).abs().max() > 1e-3
    torch.testing.assert_close(frozen, eager, atol=SAME_ANSWER_TOLERANCE, rtol=0)


def test_padded_sizes_cover_every_batch_up_to_the_max():
    assert padded_sizes(64) == PADDED_SIZES
    assert padded_sizes(16) == (1, 2, 4, 8, 16)
    assert padded_sizes(12) == (1, 2, 4, 8, 12)
    assert padded_sizes(1) == (1,)


def test_padded_batches_run_the_smallest_size_that_holds_the_batch(model_dir, pixels):
    model = ensemble(model_dir)
    shapes = []

    def plain_call(forward, static_input):
        """What a graph replay does, without a GPU: run on the very same input tensor."""

        def replay():
            shapes.append(len(static_input))
            with torch.inference_mode():
                return forward(static_input)

        return replay

    padded = PaddedBatches(model, (1, 2, 4, 8), (IMG_SIZE, IMG_SIZE, 3), plain_call, "cpu")
    with torch.inference_mode():
        alone = [model(pixels[k : k + 1]) for k in range(len(pixels))]
    for count, expected_size in [(1, 1), (3, 4), (4, 4), (5, 8), (6, 8)]:
        shapes.clear()
        out = padded(pixels[:count])
        assert shapes == [expected_size]
        assert out.shape == (2, count, len(CLASSES))
        # Rows left over from earlier, bigger batches sit in the padding: no effect on these.
        for k in range(count):
            torch.testing.assert_close(out[:, k], alone[k][:, 0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="over the largest padded size 8"):
        padded(torch.zeros((9, IMG_SIZE, IMG_SIZE, 3), dtype=torch.uint8))


def test_a_failed_graph_capture_serves_eager_with_one_log_line(model_dir, pixels, caplog):
    model = ensemble(model_dir)
    # Without a GPU the capture fails at its first CUDA call, as a broken driver would.
    with caplog.at_level(logging.WARNING, logger="species_classifier.engine"):
        forward, dtype, engine = cuda_graph_forward(
            model, torch.device("cpu"), IMG_SIZE, 8, engine="auto", compile_model=False
        )
    assert engine == "eager (graph capture failed)" and dtype == torch.float32
    warnings = [record for record in caplog.records if record.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "CUDA graph capture failed, serving eager" in warnings[0].message
    with torch.inference_mode():
        torch.testing.assert_close(forward(pixels), model(pixels), atol=0, rtol=0)


def test_a_cpu_candidate_that_fails_is_left_out_with_one_log_line(
    model_dir, pixels, monkeypatch, caplog
):
    def broken(_):
        raise RuntimeError("no C++ compiler")

    # torch.compile compiles on the first call: stand in for a compile that fails then.
    monkeypatch.setattr(torch, "compile", lambda model: broken)
    model = ensemble(model_dir)
    with caplog.at_level(logging.WARNING, logger="species_classifier.engine"):
        forward, _, engine = cpu_forward(model, IMG_SIZE, 16, engine="eager", compile_model=True)
    assert engine.startswith("eager (measured at batch 4: eager ")
    assert [record.message for record in caplog.records] == [
        "torch.compile left out: RuntimeError: no C++ compiler"
    ]
    with torch.inference_mode():
        torch.testing.assert_close(forward(pixels), model(pixels), atol=0, rtol=0)


@pytest.mark.parametrize("engine", ["eager", "graph", "auto"])
def test_every_cpu_engine_gives_the_eager_answers(model_dir, pixels, engine, caplog):
    images = list(pixels.numpy())
    reference = predictor_for(model_dir, engine="eager").probabilities(images)
    with caplog.at_level(logging.INFO, logger="species_classifier.predictor"):
        predictor = predictor_for(model_dir, engine=engine)
    assert predictor.built.engine.startswith(
        {"eager": "eager", "graph": "frozen graph"}.get(engine, "")
    )
    if engine == "auto":
        assert "measured at batch 4: eager" in predictor.built.engine
    (loaded,) = [r.message for r in caplog.records if r.message.startswith("model loaded")]
    assert f"float32, {predictor.built.engine}, max batch 16" in loaded
    np.testing.assert_allclose(
        predictor.probabilities(images), reference, atol=SAME_ANSWER_TOLERANCE, rtol=0
    )


def test_the_temperature_in_model_json_divides_each_members_logits(tmp_path, pixels):
    model_dir = make_bundle(tmp_path / "model", img_size=IMG_SIZE, members=2)
    model = ensemble(model_dir)
    images = list(pixels.numpy())
    batch = (pixels.permute(0, 3, 1, 2).float() - model.mean) / model.std
    with torch.inference_mode():
        logits = torch.stack([member(batch) for member in model.members]).double()

    plain = predictor_for(model_dir, engine="eager")
    np.testing.assert_allclose(
        plain.probabilities(images), torch.softmax(logits, 2).numpy(), atol=1e-6, rtol=0
    )
    document = json.loads((model_dir / "model.json").read_text())
    (model_dir / "model.json").write_text(json.dumps({**document, "temperature": 2.5}))
    calibrated = predictor_for(model_dir, engine="eager")
    expected = torch.softmax(logits / 2.5, 2).numpy()
    np.testing.assert_allclose(calibrated.probabilities(images), expected, atol=1e-6, rtol=0)
    answer = calibrated.predict(images[:1])[0]
    mean = expected[:, 0].mean(axis=0)
    assert answer["confidence"] == pytest.approx(mean.max() / mean.sum(), abs=1e-6)
    # Softening spreads the probability: the calibrated top class is less confident.
    assert answer["confidence"] < plain.predict(images[:1])[0]["confidence"]


def test_unsure_follows_abstain_below_in_model_json_unless_overridden(tmp_path, pixels):
    model_dir = make_bundle(tmp_path / "model", img_size=IMG_SIZE, members=2)
    images = list(pixels.numpy())
    confidences = [
        a["confidence"] for a in predictor_for(model_dir, engine="eager").predict(images)
    ]
    middle = float(np.median(confidences))
    document = json.loads((model_dir / "model.json").read_text())
    assert document["abstain_below"] == 0.0  # a bundle without a threshold: never unsure
    (model_dir / "model.json").write_text(json.dumps({**document, "abstain_below": middle}))
    answers = predictor_for(model_dir, engine="eager").predict(images)
    assert [a["unsure"] for a in answers] == [c < middle for c in confidences]
    assert any(a["unsure"] for a in answers) and not all(a["unsure"] for a in answers)
    overridden = predictor_for(model_dir, engine="eager", abstain_below=0.0).predict(images)
    assert not any(a["unsure"] for a in overridden)
    (model_dir / "model.json").write_text(json.dumps({**document, "abstain_below": 1.5}))
    with pytest.raises(BundleError, match="abstain_below 1.5: it must be a number from 0 to 1"):
        read_description(model_dir)

"""Serving: the real `serve` (gunicorn) in a subprocess, spoken to over real HTTP."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from photos import (
    cmyk_jpeg,
    encode,
    exif_rotated_jpeg,
    greyscale_jpeg,
    halves,
    png_header,
    sixteen_bit_png,
    transparent_png,
    truncated_jpeg,
)
from serving_helpers import CLASSES, ServerProcess, b64, make_bundle, photo, run_serve
from species_classifier.imaging import PhotoError
from species_classifier.predictor import Batcher
from species_classifier.serve import ServerConfig, ServerConfigError

MB = 1024 * 1024


@pytest.fixture(scope="module")
def bundle_base(tmp_path_factory):
    base = tmp_path_factory.mktemp("opt_ml")
    make_bundle(base / "model")
    return base


@pytest.fixture(scope="module")
def server(bundle_base, tmp_path_factory):
    process = ServerProcess(bundle_base, tmp_path_factory.mktemp("log") / "serve.log")
    try:
        process.wait_ready()
        yield process
    finally:
        process.terminate()


def invoke(server, body, content_type="image/jpeg", **headers) -> requests.Response:
    headers = {"Content-Type": content_type, **headers} if content_type else headers
    return requests.post(f"{server.url}/invocations", data=body, headers=headers, timeout=60)


def assert_answer(answer: dict) -> None:
    assert set(answer) == {
        "predicted_species",
        "confidence",
        "class_probabilities",
        "individual_fold_predictions",
    }
    probabilities = answer["class_probabilities"]
    assert list(probabilities) == CLASSES
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-9)
    assert answer["predicted_species"] == max(probabilities, key=probabilities.get)
    assert answer["confidence"] == probabilities[answer["predicted_species"]]
    folds = answer["individual_fold_predictions"]
    assert [fold["fold"] for fold in folds] == ["fold-1", "fold-2", "fold-3"]
    for fold in folds:
        assert fold["predicted_species"] in CLASSES and 0 < fold["confidence"] <= 1


def assert_same_answer(got: dict, expected: dict) -> None:
    """Equal up to float noise: CPU kernels pick other algorithms for other batch sizes, so a
    photo's probabilities may move by ~1e-5 between batch compositions, never more."""
    assert got["predicted_species"] == expected["predicted_species"]
    for name, probability in expected["class_probabilities"].items():
        assert got["class_probabilities"][name] == pytest.approx(probability, abs=1e-4)


# --- the contract, on one running server ---


def test_ping_answers_200_with_an_empty_body_only_once_the_model_is_loaded(server):
    response = requests.get(f"{server.url}/ping", timeout=5)
    assert response.status_code == 200 and response.content == b""
    assert "200" not in server.early_pings
    # The worker logs this before it accepts a connection; the first 200 came after it.
    assert "model loaded: 3 members, 5 classes, 64 px" in server.log()


def test_jpeg_gets_the_seed_answer_with_probabilities_summing_to_one(server):
    response = invoke(server, photo(1))
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/json"
    assert_answer(response.json())


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("image/png", encode(halves((120, 90)), "PNG")),
        ("image/png", transparent_png()),
        ("image/png", sixteen_bit_png()),
        ("image/jpeg", greyscale_jpeg()),
        ("image/jpeg", cmyk_jpeg()),
        ("image/jpeg", exif_rotated_jpeg(6)),
        ("application/x-image", photo(2)),
        ("application/x-image", encode(halves(), "PNG")),
        ("image/jpeg; charset=binary", photo(3)),
    ],
    ids=["png", "rgba", "16bit", "grey", "cmyk", "exif", "x-image-jpeg", "x-image-png", "params"],
)
def test_every_photo_kind_and_image_content_type_is_answered(server, content_type, body):
    response = invoke(server, body, content_type)
    assert response.status_code == 200, response.text
    assert_answer(response.json())


def test_base64_json_gets_the_same_answer_as_the_raw_photo(server):
    raw = invoke(server, photo(4)).json()
    response = invoke(server, json.dumps({"image": b64(photo(4))}), "application/json")
    assert response.status_code == 200, response.text
    assert_same_answer(response.json(), raw)


def test_base64_with_line_breaks_or_a_data_url_prefix_is_accepted(server):
    text = b64(photo(5))
    for image in (
        "\n".join(text[i : i + 76] for i in range(0, len(text), 76)),
        "data:image/jpeg;base64," + text,
    ):
        response = invoke(server, json.dumps({"image": image}), "application/json")
        assert response.status_code == 200, response.text


def test_instances_get_one_prediction_each_in_order(server):
    photos = [photo(seed) for seed in range(10, 15)] + [transparent_png()]
    singles = [invoke(server, body).json() for body in photos]
    document = {"instances": [{"b64": b64(body)} for body in photos]}
    response = invoke(server, json.dumps(document), "application/json; charset=utf-8")
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == len(photos)
    for got, expected in zip(predictions, singles, strict=True):
        assert_answer(got)
        assert_same_answer(got, expected)


def test_execution_parameters_for_batch_transform(server):
    response = requests.get(f"{server.url}/execution-parameters", timeout=5)
    assert response.json() == {
        "MaxConcurrentTransforms": 16,
        "BatchStrategy": "MULTI_RECORD",
        "MaxPayloadInMB": 6,
    }


def test_custom_attributes_are_echoed_on_answers_and_errors(server):
    attributes = "trace_id=abc123,user=field-team"
    good = invoke(server, photo(6), **{"X-Amzn-SageMaker-Custom-Attributes": attributes})
    bad = invoke(server, b"nope", **{"X-Amzn-SageMaker-Custom-Attributes": attributes})
    assert good.status_code == 200 and bad.status_code == 400
    for response in (good, bad):
        assert response.headers["X-Amzn-SageMaker-Custom-Attributes"] == attributes
    assert "X-Amzn-SageMaker-Custom-Attributes" not in invoke(server, photo(6)).headers


def test_accept_json_or_anything_is_served(server):
    for accept in ("application/json", "*/*", "application/*", "text/html, application/json;q=0.5"):
        assert invoke(server, photo(7), Accept=accept).status_code == 200, accept


ERRORS = {
    "undecodable": (400, "image/jpeg", b"this is not a photo", {}, "not an image format"),
    "truncated": (400, "image/jpeg", truncated_jpeg(), {}, "truncated"),
    "bomb": (400, "image/png", png_header(10_000, 10_000), {}, "decompression bomb"),
    "empty": (400, "image/jpeg", b"", {}, "empty body"),
    "bad-json": (400, "application/json", b'{"image": ', {}, "not valid JSON"),
    "bad-base64": (400, "application/json", b'{"image": "%%%not base64%%%"}', {}, "base64"),
    "json-keys": (400, "application/json", b'{"picture": "abc"}', {}, '"instances"'),
    "empty-instances": (400, "application/json", b'{"instances": []}', {}, "empty"),
    "bad-instance": (400, "application/json", b'{"instances": ["abc"]}', {}, "instance 0"),
    "bad-photo-in-instances": (
        400,
        "application/json",
        json.dumps({"instances": [{"b64": b64(photo(8))}, {"b64": b64(b"junk")}]}).encode(),
        {},
        "instance 1",
    ),
    "too-big": (413, "image/jpeg", b"\xff" * (6 * MB + 1), {}, "6 MB limit"),
    "csv": (415, "text/csv", b"1,2,3", {}, "image/jpeg, image/png, application/x-image"),
    "no-content-type": (415, None, photo(9), {}, "no Content-Type"),
    "accept-csv": (406, "image/jpeg", photo(9), {"Accept": "text/csv"}, "application/json"),
}


@pytest.mark.parametrize("case", ERRORS.values(), ids=ERRORS.keys())
def test_bad_requests_get_json_errors_that_say_what_to_do(server, case):
    status, content_type, body, headers, fragment = case
    response = invoke(server, body, content_type, **headers)
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    assert set(response.json()) == {"error"}
    assert fragment in response.json()["error"]


def test_wrong_method_and_unknown_path_are_json_errors(server):
    assert requests.get(f"{server.url}/invocations", timeout=5).status_code == 405
    response = requests.get(f"{server.url}/nowhere", timeout=5)
    assert response.status_code == 404 and "error" in response.json()


def test_a_barrage_of_malformed_requests_leaves_the_worker_serving(server):
    expected = invoke(server, photo(20)).json()
    rng = np.random.default_rng(0)
    garbage = [rng.bytes(int(n)) for n in rng.integers(1, 50_000, 12)]
    bodies = [
        *[("image/jpeg", body) for body in garbage],
        *[("image/png", b"\x89PNG\r\n\x1a\n" + body) for body in garbage[:4]],
        *[("image/jpeg", b"\xff\xd8\xff" + body) for body in garbage[:4]],
        ("image/jpeg", truncated_jpeg()),
        ("image/png", png_header(10_000, 10_000)),
        ("image/png", png_header(2**31 - 1, 2**31 - 1)),
        ("application/json", b'{"image": "' + b"A" * 1001 + b'"}'),
        ("application/json", b'{"instances": [{"b64": 7}]}'),
        ("application/json", b"[1, 2, 3]"),
        ("application/json", b"\xff\xfe not utf-8"),
        ("application/json", b"null"),
        ("text/plain", b"hello"),
        ("", photo(21)),
        ("image/jpeg", b"\x00" * (7 * MB)),
    ]
    with ThreadPoolExecutor(4) as pool:
        statuses = list(pool.map(lambda item: invoke(server, item[1], item[0]).status_code, bodies))
    assert all(400 <= status < 500 for status in statuses), statuses
    assert requests.get(f"{server.url}/ping", timeout=5).status_code == 200
    assert_same_answer(invoke(server, photo(20)).json(), expected)
    assert server.log().count("Booting worker") == 1, "a worker was restarted"


def test_concurrent_requests_are_answered_like_single_requests(server):
    photos = [photo(seed) for seed in range(30, 46)]
    singles = [invoke(server, body).json() for body in photos]
    barrier = threading.Barrier(8)

    def client(index: int) -> list[dict]:
        barrier.wait()
        return [invoke(server, photos[k]).json() for k in (index, index + 8)]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(client, range(8)))
    for index, (first, second) in enumerate(answers):
        assert_same_answer(first, singles[index])
        assert_same_answer(second, singles[index + 8])


# --- configuration from the environment, and stopping ---


def test_environment_configures_workers_payload_limit_and_graceful_sigterm(bundle_base, tmp_path):
    server = ServerProcess(
        bundle_base,
        tmp_path / "serve.log",
        SAGEMAKER_MODEL_SERVER_WORKERS="2",
        SAGEMAKER_MAX_PAYLOAD_IN_MB="1",
        SAGEMAKER_MODEL_SERVER_TIMEOUT="30",
    )
    try:
        server.wait_ready()
        parameters = requests.get(f"{server.url}/execution-parameters", timeout=5).json()
        assert parameters["MaxPayloadInMB"] == 1 and parameters["MaxConcurrentTransforms"] == 32
        assert invoke(server, b"\xff" * (MB + 1)).status_code == 413
        document = json.dumps({"instances": [{"b64": b64(photo(k))} for k in range(64)]})
        result = {}

        def slow_request() -> None:
            result["response"] = invoke(server, document, "application/json")
            result["answered_at"] = time.monotonic()

        client = threading.Thread(target=slow_request)
        client.start()
        time.sleep(0.3)
        stopped_at = time.monotonic()
        exit_code = server.terminate()
        client.join()
    finally:
        server.terminate()
    log = server.log()
    assert log.count("model loaded") == 2
    assert exit_code == 0, log
    # The request was in flight when SIGTERM came, and still got its full answer.
    assert result["answered_at"] > stopped_at
    assert result["response"].status_code == 200
    assert len(result["response"].json()["predictions"]) == 64


def test_server_config_defaults_and_errors_that_name_the_variable(tmp_path):
    config = ServerConfig.from_environment({"SAGEMAKER_BASE_DIR": str(tmp_path)})
    assert config.model_dir == tmp_path / "model"
    assert (config.port, config.timeout_s, config.max_payload_mb) == (8080, 60, 6)
    assert config.workers >= 1
    for name, value in [
        ("SAGEMAKER_MODEL_SERVER_WORKERS", "two"),
        ("SAGEMAKER_BIND_TO_PORT", "70000"),
        ("SAGEMAKER_MAX_PAYLOAD_IN_MB", "0"),
    ]:
        with pytest.raises(ServerConfigError, match=name):
            ServerConfig.from_environment({name: value})


def _break_weights(model_dir):
    (model_dir / "fold-2.pt").write_bytes(b"not a state dict")


def _remove_bundle(model_dir):
    for path in model_dir.iterdir():
        path.unlink()


@pytest.mark.parametrize(
    ("damage", "env", "message"),
    [
        (_remove_bundle, {}, "no model.json in"),
        (_break_weights, {}, "not load"),
        (
            lambda _: None,
            {"SAGEMAKER_MODEL_SERVER_WORKERS": "many"},
            "SAGEMAKER_MODEL_SERVER_WORKERS",
        ),
    ],
    ids=["missing", "corrupt-weights", "bad-env"],
)
def test_startup_fails_fast_with_one_clear_line(bundle_base, tmp_path, damage, env, message):
    base = tmp_path / "opt_ml"
    (base / "model").mkdir(parents=True)
    for path in (bundle_base / "model").iterdir():
        (base / "model" / path.name).symlink_to(path)
    damage(base / "model")
    started = time.monotonic()
    result = run_serve(base, **env)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert time.monotonic() - started < 30
    errors = [line for line in output.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and message in errors[0], output
    assert "cannot start the model server" in errors[0]
    assert "Traceback" not in output and "Booting worker" not in output


# --- the batching thread, in process ---


class _SlowPredictor:
    """Stands in for Predictor: records batch sizes, holds the first batch until released."""

    max_batch = 16

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.release = threading.Event()

    def decode(self, body: bytes):
        if body == b"bad":
            raise PhotoError("not an image format Pillow can read")
        return body

    def predict(self, images: list) -> list[dict]:
        self.batches.append(len(images))
        self.release.wait(10)
        return [{"photo": image} for image in images]


def test_requests_waiting_behind_a_batch_run_together_as_the_next_batch():
    predictor = _SlowPredictor()
    batcher = Batcher(predictor)
    with ThreadPoolExecutor(9) as pool:
        first = pool.submit(batcher.predict, [b"first"], 10)
        while not predictor.batches:
            time.sleep(0.01)
        waiting = [pool.submit(batcher.predict, [f"p{k}".encode()], 10) for k in range(8)]
        time.sleep(0.2)
        predictor.release.set()
        assert first.result() == [{"photo": b"first"}]
        assert [future.result() for future in waiting] == [
            [{"photo": f"p{k}".encode()}] for k in range(8)
        ]
    assert predictor.batches == [1, 8]


def test_a_bad_photo_fails_only_its_own_request_and_names_the_instance():
    predictor = _SlowPredictor()
    predictor.release.set()
    batcher = Batcher(predictor)
    with pytest.raises(PhotoError, match="instance 1: not an image format"):
        batcher.predict([b"good", b"bad"], 10)
    assert batcher.predict([b"good"], 10) == [{"photo": b"good"}]


def test_an_answer_that_takes_too_long_times_out_and_is_dropped():
    predictor = _SlowPredictor()
    batcher = Batcher(predictor)
    with ThreadPoolExecutor(2) as pool:
        blocker = pool.submit(batcher.predict, [b"first"], 10)
        while not predictor.batches:
            time.sleep(0.01)
        with pytest.raises(TimeoutError):
            batcher.predict([b"late"], 0.1)
        predictor.release.set()
        blocker.result()
    assert batcher.predict([b"next"], 10) == [{"photo": b"next"}]
    assert predictor.batches == [1, 1]

"""Serving: the real `serve` (gunicorn) in a subprocess, spoken to over real HTTP."""

from __future__ import annotations

import http.client
import json
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch
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
from species_classifier.app import discard
from species_classifier.contract.serving import ServerConfigError
from species_classifier.imaging import PhotoError
from species_classifier.predictor import Batcher
from species_classifier.serve import ServerConfig

MB = 1024 * 1024
# The bundle's model.json abstain_below: the random members' confidences fall both sides.
ABSTAIN_BELOW = 0.3


@pytest.fixture(scope="module")
def bundle_base(tmp_path_factory):
    base = tmp_path_factory.mktemp("opt_ml")
    make_bundle(base / "model")
    description = base / "model" / "model.json"
    document = json.loads(description.read_text())
    description.write_text(json.dumps({**document, "abstain_below": ABSTAIN_BELOW}))
    return base


@pytest.fixture(scope="module")
def server(bundle_base, tmp_path_factory):
    with ServerProcess(bundle_base, tmp_path_factory.mktemp("log") / "serve.log") as process:
        yield process


def invoke(server, body, content_type="image/jpeg", **headers) -> requests.Response:
    headers = {"Content-Type": content_type, **headers} if content_type else headers
    return requests.post(f"{server.url}/invocations", data=body, headers=headers, timeout=60)


def assert_answer(answer: dict, abstain_below: float = ABSTAIN_BELOW) -> None:
    assert set(answer) == {
        "predicted_species",
        "confidence",
        "class_probabilities",
        "individual_fold_predictions",
        "fold_details",
        "unsure",
    }
    assert answer["unsure"] is (answer["confidence"] < abstain_below)
    probabilities = answer["class_probabilities"]
    assert list(probabilities) == CLASSES
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-9)
    assert answer["predicted_species"] == max(probabilities, key=probabilities.get)
    assert answer["confidence"] == probabilities[answer["predicted_species"]]
    details = answer["fold_details"]
    assert [fold["fold"] for fold in details] == ["fold-1", "fold-2", "fold-3"]
    for fold in details:
        assert fold["predicted_species"] in CLASSES and 0 < fold["confidence"] <= 1
    # The seed's key keeps the seed's shape: one species name per fold.
    assert answer["individual_fold_predictions"] == [fold["predicted_species"] for fold in details]


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
    # The worker logs this line once its model is built, measured and warmed up; the log
    # as it stood when the first /ping answered 200 already held it. A server that
    # answered before its model was ready would fail here.
    loaded = "model loaded: 3 members, 5 classes, 64 px, temperature 1, device cpu, float32"
    assert loaded in server.log_at_first_200
    # On a CPU, with the engine left to it, the server measures eager against the frozen
    # graph and serves the faster one: both timings in the line, the smaller one chosen.
    measured = re.search(
        r"float32, (eager|frozen graph) \(measured at batch \d+: "
        r"eager ([\d.]+) ms, frozen graph ([\d.]+) ms\)",
        server.log_at_first_200,
    )
    assert measured, server.log_at_first_200
    chosen, eager_ms, graph_ms = measured[1], float(measured[2]), float(measured[3])
    times = {"eager": eager_ms, "frozen graph": graph_ms}
    assert times[chosen] == min(times.values()), measured[0]


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
    "csv": (415, "text/csv", b"1,2,3", {}, "image/jpeg, image/png, application/x-image, app"),
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


# --- the seed's clients, with nothing but Python's standard library ---


def urllib_post(server, body: bytes, content_type: str) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{server.url}/invocations", data=body, headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_the_seeds_image_jpg_is_answered_like_image_jpeg(server):
    status, answer = urllib_post(server, photo(50), "image/jpg")
    assert status == 200, answer
    assert_answer(answer)
    assert_same_answer(answer, invoke(server, photo(50)).json())


def test_the_seeds_json_client_reads_one_species_name_per_fold(server):
    body = json.dumps({"image": b64(photo(51))}).encode()
    status, answer = urllib_post(server, body, "application/json")
    assert status == 200, answer
    names = answer["individual_fold_predictions"]
    assert len(names) == 3 and all(name in CLASSES for name in names)
    assert [detail["predicted_species"] for detail in answer["fold_details"]] == names
    # The seed's client reads these fields, as it always did.
    assert answer["predicted_species"] in CLASSES and 0 < answer["confidence"] <= 1
    assert set(answer["class_probabilities"]) == set(CLASSES)


def test_a_body_over_the_limit_reaches_urllib_as_a_json_413(server):
    # urllib sends the whole body before it reads the answer: the server must read it.
    status, answer = urllib_post(server, b"\xff" * (7 * MB), "image/jpeg")
    assert status == 413
    assert "7340032 bytes, over the 6 MB limit" in answer["error"]


def test_after_a_413_within_the_discard_bound_the_connection_serves_the_next_request(server):
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        for body, status in [(b"\0" * (9 * MB), 413), (photo(52), 200)]:
            connection.request("POST", "/invocations", body, {"Content-Type": "image/jpeg"})
            response = connection.getresponse()
            assert (response.status, response.getheader("Connection")) == (status, "keep-alive")
            json.loads(response.read())
    finally:
        connection.close()


def test_a_body_past_the_discard_bound_gets_its_413_and_then_the_connection_closes(server):
    bound = 4 * 6 * MB
    declared = bound + 40 * MB
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as client:
        client.sendall(
            b"POST /invocations HTTP/1.1\r\nHost: test\r\nContent-Type: image/jpeg\r\n"
            + f"Content-Length: {declared}\r\n\r\n".encode()
        )

        def send_body() -> None:
            nonlocal sent
            try:
                while sent < declared:
                    client.sendall(b"\xff" * MB)
                    sent += MB
            except OSError:
                pass  # the server closed the connection: what this test expects

        sender = threading.Thread(target=send_body)
        sender.start()
        received = b""
        try:
            while chunk := client.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        sender.join(60)
    assert received.startswith(b"HTTP/1.1 413"), received[:200]
    assert b"over the 6 MB limit" in received
    assert bound <= sent < declared


class _SocketBody:
    """A request body read straight from the socket, as gunicorn reads one."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def read(self, size: int) -> bytes:
        return self.sock.recv(size)


def test_discarding_a_body_stops_at_its_byte_and_time_bounds():
    server_side, client_side = socket.socketpair()
    stream = _SocketBody(server_side)
    with server_side, client_side:
        # A thread sends: the socket's buffer holds less than the body.
        sender = threading.Thread(target=client_side.sendall, args=(b"x" * 300_000,))
        sender.start()
        assert not discard(stream, 100_000, time.monotonic() + 10, server_side)
        # The rest arrives and the client stops sending, but keeps the connection open.
        started = time.monotonic()
        assert not discard(stream, 10 * MB, time.monotonic() + 0.5, server_side)
        assert 0.4 < time.monotonic() - started < 5
        sender.join(5)
        assert server_side.gettimeout() is None  # gunicorn's blocking socket, as it was
        client_side.sendall(b"y" * 1000)
        client_side.shutdown(socket.SHUT_WR)
        assert discard(stream, 10 * MB, time.monotonic() + 10, server_side)


# --- configuration from the environment, and stopping ---


def test_environment_configures_workers_payload_limit_and_graceful_sigterm(bundle_base, tmp_path):
    server = ServerProcess(
        bundle_base,
        tmp_path / "serve.log",
        SAGEMAKER_MODEL_SERVER_WORKERS="2",
        SAGEMAKER_MAX_PAYLOAD_IN_MB="1",
        SAGEMAKER_MODEL_SERVER_TIMEOUT="30",
        # Eager skips measuring the frozen graph in each of the two workers.
        SPECIES_SERVE_ENGINE="eager",
        # Overrides model.json's ABSTAIN_BELOW: every answer is less confident than 1.
        SPECIES_ABSTAIN_BELOW="1",
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
    assert log.count("float32, eager, max batch 16") == 2
    assert exit_code == 0, log
    # The request was in flight when SIGTERM came, and still got its full answer.
    assert result["answered_at"] > stopped_at
    assert result["response"].status_code == 200
    predictions = result["response"].json()["predictions"]
    assert len(predictions) == 64
    for answer in predictions:
        assert_answer(answer, abstain_below=1.0)


def test_server_config_defaults_and_errors_that_name_the_variable(tmp_path):
    config = ServerConfig.from_environment({"SAGEMAKER_BASE_DIR": str(tmp_path)})
    assert config.model_dir == tmp_path / "model"
    assert (config.port, config.timeout_s, config.max_payload_mb) == (8080, 60, 6)
    assert config.workers >= 1
    assert (config.dtype, config.engine, config.compile_model) == (None, "auto", False)
    assert config.abstain_below is None  # model.json's
    assert ServerConfig.from_environment({"SPECIES_ABSTAIN_BELOW": "0.8"}).abstain_below == 0.8
    config = ServerConfig.from_environment(
        {
            "SPECIES_SERVE_DTYPE": "BFloat16",
            "SPECIES_SERVE_ENGINE": "graph",
            "SPECIES_SERVE_COMPILE": "1",
        }
    )
    assert (config.dtype, config.engine, config.compile_model) == (torch.bfloat16, "graph", True)
    for name, value in [
        ("SAGEMAKER_MODEL_SERVER_WORKERS", "two"),
        ("SAGEMAKER_BIND_TO_PORT", "70000"),
        ("SAGEMAKER_MAX_PAYLOAD_IN_MB", "0"),
        ("SPECIES_SERVE_DTYPE", "fp8"),
        ("SPECIES_SERVE_ENGINE", "fast"),
        ("SPECIES_SERVE_COMPILE", "yes"),
        ("SPECIES_ABSTAIN_BELOW", "1.5"),
        ("SPECIES_ABSTAIN_BELOW", "sure"),
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

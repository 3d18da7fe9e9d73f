"""The launcher's `invoke`: photos to an endpoint, real-time, serverless and asynchronous.

Against a local AWS: see launcher_helpers for how and for the gaps of moto it bridges.
"""

from __future__ import annotations

import io
import json
import os

import requests
from botocore.awsrequest import AWSResponse
from botocore.exceptions import ReadTimeoutError
from launcher_helpers import (
    BUCKET,
    Clock,
    Wire,
    deploy_args,
    keys_under,
    serverless_args,
    serving,
)
from PIL import Image


def test_invoke_sends_each_photo_and_prints_the_predictions(run, aws, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    # moto's runtime decodes request bodies as UTF-8, so these "photos" are text.
    (photos / "a.jpg").write_bytes(b"jpeg bytes")
    (photos / "b.png").write_bytes(b"png bytes")
    (photos / "notes.txt").write_text("not a photo")
    too_big = tmp_path / "huge.jpg"
    too_big.write_bytes(b"\xff" * (6_291_456 + 1))
    answers = [
        {
            "predicted_species": species,
            "confidence": confidence,
            "class_probabilities": probabilities,
            "individual_fold_predictions": [],
        }
        for species, confidence, probabilities in [
            ("Acer rubrum", 0.91, {"Acer rubrum": 0.91, "other": 0.07, "Zenaida macroura": 0.02}),
            ("other", 0.75, {"Acer rubrum": 0.25, "other": 0.75}),
        ]
    ]
    results = [
        {
            "Body": json.dumps(a),
            "ContentType": "application/json",
            "InvokedProductionVariant": "AllTraffic",
        }
        for a in answers
    ]
    response = requests.post(
        f"{aws.endpoint}/moto-api/static/sagemaker/endpoint-results",
        json={"results": results},
        timeout=10,
    )
    assert response.status_code == 201
    wire = Wire()

    code, out, err = run("invoke", "--endpoint", "sc-endpoint", photos, too_big, wire=wire)

    assert code == 1  # the oversized file that is no photo
    assert out.splitlines() == [
        f"{photos / 'a.jpg'}: Acer rubrum (confidence 0.910); "
        "next: other 0.070, Zenaida macroura 0.020",
        f"{photos / 'b.png'}: other (confidence 0.750); next: Acer rubrum 0.250",
    ]
    assert "6291456-byte limit and it cannot be re-encoded" in err and "huge.jpg" in err
    sent = [(r.headers["Content-Type"], r.body) for _, op, r in wire.sent if op == "InvokeEndpoint"]
    assert sent == [(b"image/jpeg", b"jpeg bytes"), (b"image/png", b"png bytes")]


class RawBody:
    """The raw HTTP body botocore reads a response from."""

    def __init__(self, data: bytes):
        self._data = io.BytesIO(data)

    def stream(self, **_):
        yield self._data.read()

    def read(self, *args, **_):
        return self._data.read(*args)


def answer_json(status: int, body: dict, headers: dict | None = None) -> AWSResponse:
    data = json.dumps(body).encode()
    headers = {
        "Content-Type": "application/json",
        "Content-Length": str(len(data)),
        **(headers or {}),
    }
    return AWSResponse("https://runtime.sagemaker", status, headers, RawBody(data))


PREDICTION = {"predicted_species": "Acer rubrum", "confidence": 0.9,
              "class_probabilities": {"Acer rubrum": 0.9, "other": 0.1}}  # fmt: skip


def test_invoke_reencodes_a_photo_over_the_limit_or_too_large(run, tmp_path):
    phone = tmp_path / "phone.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: the photo shows rotated by 90 degrees
    Image.new("RGB", (3000, 2000), (200, 40, 40)).save(phone, quality=90, exif=exif)
    noisy = tmp_path / "noisy.png"  # under 2,048 px but over 6 MiB
    Image.frombytes("RGB", (1500, 1500), os.urandom(1500 * 1500 * 3)).save(noisy)
    small = tmp_path / "small.jpg"
    Image.new("RGB", (500, 400), (10, 120, 10)).save(small)
    assert noisy.stat().st_size > 6_291_456
    sent = []

    def answer(request, **_):
        sent.append((request.headers["Content-Type"], request.body))
        return answer_json(200, PREDICTION)

    code, out, err = run(
        "invoke", "--endpoint", "sc-endpoint", phone, noisy, small,
        wire=Wire(sends={"sagemaker-runtime.InvokeEndpoint": answer}),
    )  # fmt: skip

    assert code == 0, err
    assert len(out.splitlines()) == 3
    shapes = [(kind, Image.open(io.BytesIO(body)).size) for kind, body in sent]
    assert shapes == [
        (b"image/jpeg", (1365, 2048)),  # upright, long side 2,048
        (b"image/jpeg", (1500, 1500)),
        (b"image/jpeg", (500, 400)),
    ]
    assert sent[2][1] == small.read_bytes()  # a photo within the limits goes as it is
    assert all(len(body) <= 6_291_456 for _, body in sent)
    notes = err.strip().splitlines()
    assert notes[0] == (
        f"{phone}: re-encoded 3000x2000 ({phone.stat().st_size} bytes) to 1365x2048 JPEG q95 "
        f"({len(sent[0][1])} bytes) before sending"
    )
    assert notes[1].startswith(f"{noisy}: re-encoded 1500x1500")
    assert len(notes) == 2


def test_invoke_keeps_photos_under_a_serverless_endpoints_4_mb(run, aws, tmp_path):
    assert run(*serverless_args("sc-serverless-photos"))[0] == 0
    photo = tmp_path / "noisy.png"  # between 4 MB and 6 MiB: fine for instances, not serverless
    Image.frombytes("RGB", (1200, 1200), os.urandom(1200 * 1200 * 3)).save(photo)
    assert 4_000_000 < photo.stat().st_size <= 6_291_456
    sent = []

    def answer(request, **_):
        sent.append(request.body)
        return answer_json(200, PREDICTION)

    code, out, err = run("invoke", "--endpoint", "sc-serverless-photos", photo,
                         wire=Wire(sends={"sagemaker-runtime.InvokeEndpoint": answer}))  # fmt: skip

    assert code == 0, err
    [body] = sent
    assert len(body) <= 4_000_000 and Image.open(io.BytesIO(body)).format == "JPEG"
    assert f"{photo}: re-encoded 1200x1200" in err


def test_invoke_retries_throttling_but_never_a_read_timeout(run, tmp_path):
    for name in ("a.jpg", "b.jpg"):
        Image.new("RGB", (64, 64)).save(tmp_path / name)
    attempts = {"a.jpg": 0, "b.jpg": 0}

    def answer(request, **_):
        name = "a.jpg" if not attempts["a.jpg"] else "b.jpg"
        attempts[name] += 1
        if name == "a.jpg":
            raise ReadTimeoutError(endpoint_url=request.url)
        if attempts[name] == 1:
            return answer_json(
                400, {"message": "Rate exceeded"}, {"x-amzn-ErrorType": "ThrottlingException"}
            )
        return answer_json(200, PREDICTION)

    clock = Clock()
    code, out, err = run(
        "invoke",
        "--endpoint",
        "sc-endpoint",
        tmp_path,
        wire=Wire(sends={"sagemaker-runtime.InvokeEndpoint": answer}),
        clock=clock,
    )

    assert code == 1  # a.jpg
    assert attempts == {"a.jpg": 1, "b.jpg": 2}
    assert clock.sleeps == 1
    assert f"{tmp_path / 'a.jpg'}: Read timeout on endpoint URL" in err
    assert out.splitlines() == [
        f"{tmp_path / 'b.jpg'}: Acer rubrum (confidence 0.900); next: other 0.100"
    ]


def test_an_async_endpoint_queues_photos_and_prints_the_answers_from_s3(run, aws, tmp_path):
    name = "sc-async"
    output = f"s3://{BUCKET}/species-classifier/async-out/"
    code, out, err = run(*deploy_args(name, "v1", "--async", output))
    assert code == 0, err
    config, _, _ = serving(aws, name)
    described = aws.sagemaker.describe_endpoint_config(EndpointConfigName=config)
    assert described["AsyncInferenceConfig"]["OutputConfig"] == {
        "S3OutputPath": output,
        "S3FailurePath": output + "failures/",
    }
    assert f"asynchronous, answers under {output}" in out
    # What the endpoint will answer, in order (moto writes each to S3 as SageMaker would).
    results = [{"data": json.dumps(PREDICTION)}, {"is_failure": True, "data": "CUDA error: OOM"}]
    queued = requests.post(
        f"{aws.endpoint}/moto-api/static/sagemaker/async-endpoint-results",
        json={"results": results},
        timeout=10,
    )
    assert queued.status_code == 201
    photos = [tmp_path / "a.jpg", tmp_path / "b.jpg"]
    for photo in photos:
        Image.new("RGB", (64, 64)).save(photo)
    wire = Wire()

    code, out, err = run("invoke", "--endpoint", name, *photos, wire=wire)

    assert code == 1  # b.jpg failed
    assert out.splitlines() == [f"{photos[0]}: Acer rubrum (confidence 0.900); next: other 0.100"]
    assert err.strip().splitlines() == [f"{photos[1]}: the endpoint failed on it: CUDA error: OOM"]
    assert wire.operations().count("InvokeEndpointAsync") == 2
    assert "InvokeEndpoint" not in wire.operations()
    inputs = keys_under(aws.s3, "species-classifier/async-out/inputs/")
    assert len(inputs) == 2 and all(key.endswith(".jpg") for key in inputs)

    def never_answered(params, **_):
        nowhere = f"s3://{BUCKET}/species-classifier/async-out/never"
        answer = {"OutputLocation": nowhere + ".out", "FailureLocation": nowhere + ".failure"}
        return AWSResponse("", 202, {}, None), answer

    code, out, err = run(
        "invoke", "--endpoint", name, photos[0], "--wait-timeout", "5m",
        wire=Wire(answers={"sagemaker-runtime.InvokeEndpointAsync": never_answered}),
    )  # fmt: skip
    assert code == 1
    assert err.strip().splitlines() == [
        f"error: gave up after 5m waiting for the answer for {photos[0]} at "
        f"s3://{BUCKET}/species-classifier/async-out/never.out "
        "(it carries on in AWS; --wait-timeout sets how long to wait)"
    ]

"""The HTTP side of the endpoint: SageMaker's /ping, /invocations and /execution-parameters.

Owns the request contract (content types, payload limit, Accept, custom attributes) and
turns every bad request into a JSON {"error": ...} with the right status and a message
that says what was wrong and what to do. Prediction itself is the Batcher's.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import re
import socket
import time
from typing import BinaryIO

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from species_classifier.imaging import PhotoError
from species_classifier.predictor import Batcher

_log = logging.getLogger(__name__)

IMAGE_TYPES = ("image/jpeg", "image/png", "application/x-image")
# Not a registered type, but clients send it and the seed accepted it; not advertised.
UNREGISTERED_IMAGE_TYPES = ("image/jpg",)
JSON_TYPE = "application/json"
ACCEPTED_TYPES = (*IMAGE_TYPES, JSON_TYPE)
CUSTOM_ATTRIBUTES = "X-Amzn-SageMaker-Custom-Attributes"
MEBIBYTE = 1024 * 1024
# An oversized body is read and thrown away before the 413, up to this many times the limit
# or this many seconds (nginx's lingering close): a client that sends the whole body before
# it reads the answer (Python's urllib, most scripts) then sees the 413, not a broken pipe.
DISCARD_LIMIT_FACTOR = 4
DISCARD_SECONDS = 30.0
_DISCARD_CHUNK = 64 * 1024
_DATA_URL_PREFIX = re.compile(r"^data:[^,]*;base64,", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")


class RequestRejected(Exception):
    """A request the client must change; becomes a JSON error with `status`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def create_app(
    batcher: Batcher,
    *,
    max_payload_mb: int = 6,
    max_concurrent_transforms: int = 1,
    timeout_seconds: float = 60.0,
) -> Flask:
    """The Flask app for one worker; the model behind `batcher` is already loaded."""
    app = Flask(__name__)
    # Keep class_probabilities in the model's label order, as model.json lists the classes.
    app.json.sort_keys = False
    max_bytes = max_payload_mb * MEBIBYTE
    too_large = (
        f"over the {max_payload_mb} MB limit ({max_bytes} bytes): send a smaller photo (a few "
        "hundred pixels is enough) or fewer instances per request"
    )

    @app.get("/ping")
    def ping() -> Response:
        # 503 once the worker's GPU is broken: it is on its way out, gunicorn replaces it.
        return Response(status=200 if batcher.healthy else 503)

    @app.get("/execution-parameters")
    def execution_parameters() -> Response:
        return jsonify(
            MaxConcurrentTransforms=max_concurrent_transforms,
            BatchStrategy="MULTI_RECORD",
            MaxPayloadInMB=max_payload_mb,
        )

    @app.post("/invocations")
    def invocations() -> Response:
        length = request.content_length
        if length is not None and length > max_bytes:
            _discard_rest(max_bytes, already_read=0)
            raise RequestRejected(413, f"request body is {length} bytes, {too_large}")
        # Read the body before any other refusal: a body left unread makes gunicorn close a
        # connection it has just called keep-alive. Reading one byte past the limit catches
        # chunked bodies, which announce no length.
        body = request.stream.read(max_bytes + 1)
        if len(body) > max_bytes:
            _discard_rest(max_bytes, already_read=len(body))
            raise RequestRejected(413, f"request body is {too_large}")
        _check_accept()
        bodies, single = _photos_from_request(body)
        try:
            answers = batcher.predict(bodies, timeout=timeout_seconds)
        except PhotoError as error:
            raise RequestRejected(400, f"cannot use the photo: {error}") from None
        except TimeoutError:
            raise RequestRejected(
                503,
                f"no answer within {timeout_seconds:g} s: the server is overloaded; retry "
                "later or add workers/instances",
            ) from None
        return jsonify(answers[0] if single else {"predictions": answers})

    @app.after_request
    def echo_custom_attributes(response: Response) -> Response:
        attributes = request.headers.get(CUSTOM_ATTRIBUTES)
        if attributes is not None:
            response.headers[CUSTOM_ATTRIBUTES] = attributes
        return response

    @app.errorhandler(RequestRejected)
    def bad_request(error: RequestRejected) -> tuple[Response, int]:
        return jsonify(error=str(error)), error.status

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> tuple[Response, int]:
        return jsonify(error=f"{error.name}: {error.description}"), error.code or 500

    @app.errorhandler(Exception)
    def unexpected_error(error: Exception) -> tuple[Response, int]:
        _log.exception("unexpected error on %s %s", request.method, request.path)
        return jsonify(error=f"internal error ({type(error).__name__}); see the server log"), 500

    return app


def _discard_rest(max_bytes: int, already_read: int) -> None:
    """Read and drop the rest of an oversized body, up to DISCARD_LIMIT_FACTOR x the limit
    in all and DISCARD_SECONDS. Past either bound the body stays unread, and gunicorn closes
    the connection after the 413 instead of keeping it alive."""
    discard(
        request.stream,
        DISCARD_LIMIT_FACTOR * max_bytes - already_read,
        time.monotonic() + DISCARD_SECONDS,
        request.environ.get("gunicorn.socket"),
    )


def discard(stream: BinaryIO, max_bytes: int, deadline: float, sock: socket.socket | None) -> bool:
    """Read `stream` to its end and drop it; False when `max_bytes` or the monotonic
    `deadline` came first. `sock`, the connection under the stream when known, gets a
    timeout so a client that stops sending cannot hold the thread past the deadline."""
    prior_timeout = sock.gettimeout() if sock is not None else None
    remaining_bytes = max_bytes
    try:
        while remaining_bytes > 0:
            remaining_seconds = deadline - time.monotonic()
            if remaining_seconds <= 0:
                return False
            if sock is not None:
                sock.settimeout(remaining_seconds)
            try:
                chunk = stream.read(min(_DISCARD_CHUNK, remaining_bytes))
            except OSError:  # the socket's timeout, or a client that went away
                return False
            if not chunk:
                return True
            remaining_bytes -= len(chunk)
        return False
    finally:
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.settimeout(prior_timeout)


def _check_accept() -> None:
    if request.headers.get("Accept") and request.accept_mimetypes.quality(JSON_TYPE) <= 0:
        raise RequestRejected(
            406,
            f"Accept: {request.headers['Accept']} cannot be served: answers are "
            f"{JSON_TYPE}; send Accept: {JSON_TYPE} or */* (or no Accept header)",
        )


def _photos_from_request(body: bytes) -> tuple[list[bytes], bool]:
    """The photos' encoded bytes, and whether the request holds exactly one photo."""
    mimetype = request.mimetype
    if mimetype in IMAGE_TYPES or mimetype in UNREGISTERED_IMAGE_TYPES:
        if not body:
            raise RequestRejected(400, f"empty body: send the photo's bytes as {mimetype}")
        return [body], True
    if mimetype == JSON_TYPE:
        return _photos_from_json(body)
    given = f"Content-Type {mimetype!r}" if mimetype else "no Content-Type"
    raise RequestRejected(
        415,
        f"{given} is not supported: send one of {', '.join(ACCEPTED_TYPES)} (raw photo "
        'bytes, or JSON {"image": "<base64>"} / {"instances": [{"b64": "<base64>"}, ...]})',
    )


def _photos_from_json(body: bytes) -> tuple[list[bytes], bool]:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        # RecursionError: deeply nested JSON ("[[[[..."), which is no ValueError.
        document = None
    if document is None:
        raise RequestRejected(
            400,
            'the body is not valid JSON: send {"image": "<base64>"} or '
            '{"instances": [{"b64": "<base64>"}, ...]}',
        )
    if isinstance(document, dict) and isinstance(document.get("image"), str):
        return [_decode_base64(document["image"], '"image"')], True
    if isinstance(document, dict) and isinstance(document.get("instances"), list):
        instances = document["instances"]
        if not instances:
            raise RequestRejected(400, '"instances" is empty: send at least one {"b64": "..."}')
        bodies = []
        for index, instance in enumerate(instances):
            if not (isinstance(instance, dict) and isinstance(instance.get("b64"), str)):
                raise RequestRejected(
                    400,
                    f'instance {index} is not {{"b64": "<base64>"}}: wrap each photo\'s '
                    'base64 string in an object with the key "b64"',
                )
            bodies.append(_decode_base64(instance["b64"], f"instance {index}"))
        return bodies, False
    raise RequestRejected(
        400,
        'JSON body needs the key "image" (a base64 string) or "instances" (a list of '
        '{"b64": "<base64>"})',
    )


def _decode_base64(text: str, where: str) -> bytes:
    # Line breaks (MIME base64) and a data: URL prefix are common in client code; accept them.
    text = _WHITESPACE.sub("", _DATA_URL_PREFIX.sub("", text, count=1))
    try:
        body = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestRejected(
            400, f"{where} is not valid base64: encode the photo's bytes with standard base64"
        ) from None
    if not body:
        raise RequestRejected(400, f"{where} is empty: send the photo's bytes, base64-encoded")
    return body

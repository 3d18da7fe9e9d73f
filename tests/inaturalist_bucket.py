"""A tiny iNaturalist open-data bucket for the collector's tests, and an S3 endpoint that
behaves like the real one where moto does not.

`OpenData` builds the four metadata files (the real layout: gzip, tab-separated, unquoted)
and the photo objects, observation by observation.

`S3Front` is an HTTP server in front of moto's S3. The real open-data bucket's policy lets
anyone read it without signing, while a request signed by a user whose own policy does not
allow `s3:GetObject` there is denied, CopyObject included (S3 checks the signer's right to
read the source). moto (5.2.5) cannot say so: it applies a bucket policy to every caller
alike, without looking at the principal, its optional IAM check reads only the caller's own
policies, and it checks a CopyObject against the destination bucket only. So the front
answers those requests AccessDenied itself, over real HTTP, and passes everything else to
moto, where the source bucket carries the public-read policy. It can also answer 403 for photos withdrawn since the
snapshot, cut a download after some bytes (a dropped connection), stall one (a slow read,
to interrupt the collector in the middle of a scan), and it records every
request, so tests can see what the collector asked for.
"""

from __future__ import annotations

import gzip
import http.client
import io
import json
import threading
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import numpy as np
from PIL import Image

TAXA_COLUMNS = ["taxon_id", "ancestry", "rank_level", "rank", "name", "active"]
OBSERVATION_COLUMNS = [
    "observation_uuid", "observer_id", "latitude", "longitude", "positional_accuracy",
    "taxon_id", "quality_grade", "observed_on", "anomaly_score",
]  # fmt: skip
PHOTO_COLUMNS = [
    "photo_uuid", "photo_id", "observation_uuid", "observer_id", "extension", "license",
    "width", "height", "position",
]  # fmt: skip
OBSERVER_COLUMNS = ["observer_id", "login", "name"]


def tsv(header: list[str], rows: list[list[object]]) -> bytes:
    # Like the real files: tab-separated, no quoting at all (names keep their quotes).
    lines = ["\t".join(header)] + ["\t".join(str(v) for v in row) for row in rows]
    return gzip.compress(("\n".join(lines) + "\n").encode())


def observer_login(observer_id: int) -> str:
    return f"observer{observer_id}"


def observer_name(observer_id: int) -> str:
    # Some observers give no name; some names hold quotes and commas, as real ones do.
    return "" if observer_id % 3 == 0 else f'Ann "Birder" {observer_id}, Jr.'


def public_read(bucket: str) -> dict:
    """The open-data bucket's policy: anyone may list and read it, without signing.

    S3 authorizes a HEAD with s3:GetObject; moto asks for an action s3:HeadObject instead,
    which the policy therefore names too.
    """
    return {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": "*",
                       "Action": ["s3:GetObject", "s3:HeadObject", "s3:ListBucket"],
                       "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}],
    }  # fmt: skip


class OpenData:
    """Rows of the four metadata files and the photo objects."""

    def __init__(self, taxa: list[tuple]) -> None:
        self.taxa = taxa  # (taxon_id, ancestry, rank_level, rank, name[, active])
        self.observations: list[list[object]] = []
        self.photos: list[list[object]] = []
        self.observers: set[int] = set()
        self.images: dict[str, bytes] = {}
        self.next_photo_id = 123_456_000  # real ids are this large: the bitmap must grow
        self.rng = np.random.default_rng(0)

    def observe(self, taxon: int | str, where, grade: str = "research") -> str:
        obs = str(uuid.uuid5(uuid.NAMESPACE_URL, f"obs-{len(self.observations)}"))
        lat, lon = (f"{v:.10f}" for v in where) if where else ("", "")
        self.observations.append(
            [obs, 7000 + len(self.observations) % 5, lat, lon, 10, taxon, grade, "2024-05-01", 1.0]
        )
        return obs

    def photo(self, obs: str, license: str = "CC-BY", extension: str = "jpg", position: int = 0,
              photo_id: int | None = None, stored: bool = True,
              observer: int | None = None, listed: bool = True) -> int:  # fmt: skip
        if photo_id is None:
            photo_id = self.next_photo_id = self.next_photo_id + 7
        observer = 8000 + len(self.photos) % 7 if observer is None else observer
        if listed:
            self.observers.add(observer)
        self.photos.append(
            [uuid.uuid4(), photo_id, obs, observer, extension, license, 500, 375, position]
        )
        if stored:
            self.images[f"photos/{photo_id}/medium.{extension}"] = self._image(extension)
        return photo_id

    def add(self, taxon: int | str, where, grade: str = "research", **photo) -> int:
        return self.photo(self.observe(taxon, where, grade), **photo)

    def _image(self, extension: str) -> bytes:
        pixels = self.rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG" if extension == "png" else "JPEG")
        return buffer.getvalue()

    def metadata(self) -> dict[str, bytes]:
        taxa = [[*row, "true"] if len(row) == 5 else list(row) for row in self.taxa]
        observers = [[o, observer_login(o), observer_name(o)] for o in sorted(self.observers)]
        return {
            "taxa.csv.gz": tsv(TAXA_COLUMNS, taxa),
            "observations.csv.gz": tsv(OBSERVATION_COLUMNS, self.observations),
            "photos.csv.gz": tsv(PHOTO_COLUMNS, self.photos),
            "observers.csv.gz": tsv(OBSERVER_COLUMNS, observers),
        }

    def fill(self, s3, bucket: str) -> None:
        """Create `bucket` holding the metadata and the stored photos."""
        s3.create_bucket(Bucket=bucket)
        s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps(public_read(bucket)))
        for key, body in {**self.metadata(), **self.images}.items():
            s3.put_object(Bucket=bucket, Key=key, Body=body)


@dataclass
class Request:
    method: str
    bucket: str
    key: str
    signed: bool
    query: str
    copy_source: str  # "bucket/key" of a CopyObject, else ""
    range: str
    status: int
    body_bytes: int  # bytes of the answer's body actually sent


DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    b"<Message>Access Denied</Message><RequestId>FRONT</RequestId></Error>"
)
# Hop-by-hop headers, and what the front sets itself.
_NOT_FORWARDED = {"connection", "transfer-encoding", "expect", "server", "date", "keep-alive"}


class S3Front:
    """HTTP in front of moto's S3; see the module docstring for what it adds."""

    def __init__(self, moto_port: int) -> None:
        self.moto_port = moto_port
        self.public_buckets: set[str] = set()  # buckets that deny the user's signed requests
        self.withdrawn: set[tuple[str, str]] = set()  # (bucket, key) refused to everyone
        self.cuts: dict[tuple[str, str], int] = {}  # first full GET of (bucket, key): N bytes
        # First GET of (bucket, key): left unanswered until reset(); the event says it came.
        self.stalls: dict[tuple[str, str], threading.Event] = {}
        self._release = threading.Event()
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        front = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # so that `Expect: 100-continue` is answered

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                front._handle(self)

            do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def stall(self, bucket: str, key: str) -> threading.Event:
        """Leave the next GET of `key` unanswered (a slow read) until reset(); the returned
        event is set once that request is waiting."""
        arrived = threading.Event()
        with self._lock:
            self.stalls[(bucket, key)] = arrived
        return arrived

    def reset(self) -> None:
        with self._lock:
            self._release.set()
            self._release = threading.Event()
            self.stalls.clear()
            self.public_buckets.clear()
            self.withdrawn.clear()
            self.cuts.clear()
            self.requests.clear()

    def requests_for(self, key: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.key == key]

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        url = urlsplit(handler.path)
        bucket, _, key = unquote(url.path).lstrip("/").partition("/")
        signed = "authorization" in {k.lower() for k in handler.headers} or (
            "X-Amz-Credential" in url.query
        )
        copy_source = unquote(urlsplit(handler.headers.get("x-amz-copy-source", "")).path)
        copy_source = copy_source.lstrip("/")
        source_bucket, _, source_key = copy_source.partition("/")
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        with self._lock:
            stalled = self.stalls.pop((bucket, key), None) if handler.command == "GET" else None
            release = self._release
        if stalled is not None:
            stalled.set()
            release.wait(60)
            handler.close_connection = True
            return  # the client gave up while it waited: nothing to answer
        read = (bucket, key) if handler.command in ("GET", "HEAD") else None
        copied = (source_bucket, source_key) if copy_source else None
        denied = any(
            place in self.withdrawn or (signed and place[0] in self.public_buckets and place[1])
            for place in (read, copied)
            if place
        )
        record = Request(handler.command, bucket, key, signed, url.query, copy_source,
                         handler.headers.get("Range", ""), 403, 0)  # fmt: skip
        if denied:
            self._answer(handler, 403, [("Content-Type", "application/xml")], DENIED, record)
            return
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in _NOT_FORWARDED}
        connection = http.client.HTTPConnection("127.0.0.1", self.moto_port, timeout=60)
        try:
            connection.request(handler.command, handler.path, body=body, headers=headers)
            response = connection.getresponse()
            answer = response.read()
            kept = [(k, v) for k, v in response.getheaders() if k.lower() not in _NOT_FORWARDED]
        finally:
            connection.close()
        record.status = response.status
        cut = None
        with self._lock:
            if handler.command == "GET" and not record.range and (bucket, key) in self.cuts:
                cut = self.cuts.pop((bucket, key))
        self._answer(handler, response.status, kept, answer, record, cut)

    def _answer(self, handler, status, headers, body, record: Request, cut=None) -> None:
        handler.send_response(status)
        for name, value in headers:
            if name.lower() != "content-length":
                handler.send_header(name, value)
        if handler.command == "HEAD":
            length = dict((k.lower(), v) for k, v in headers).get("content-length", "0")
            handler.send_header("Content-Length", length)
            body = b""
        else:
            handler.send_header("Content-Length", str(len(body)))
        handler.send_header("Connection", "close")
        handler.end_headers()
        sent = body if cut is None else body[:cut]
        record.body_bytes = len(sent)
        # Recorded before the client can have its answer: a test that goes on as soon as its
        # request returns must find it recorded (and a reset after it must clear it).
        with self._lock:
            self.requests.append(record)
        handler.wfile.write(sent)
        handler.wfile.flush()
        handler.close_connection = True

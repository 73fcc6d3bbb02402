"""The HTTP API and web page: ``create_app(Classifier.load("runs/x"), ServeSettings())``.

Endpoints (see /docs, served offline):

    POST /v1/predict   one or more images → top-k {label, score} per image
    GET  /v1/model     name, classes, input size, metrics, request limits
    GET  /healthz      liveness: the process answers
    GET  /readyz       readiness: the model is loaded, warmed up, and its worker runs
    GET  /             the web page (static/index.html, app.js, style.css; no external URLs)

A request's way through the server, and what bounds each step (the server faces strangers):

    admission    at most ``max_concurrent`` predict requests in progress; more → 503 at once
    body         Content-Length checked before reading; streamed bytes counted → 413 past the limit;
                 all requests' bodies together stay under ``max_buffered_mb`` → 503; slow senders → 408
    multipart    parsed as it streams, in memory (nothing is written to disk), at most ``max_files``
                 files and a few other fields → 400 past that, before the rest is read
    header       each image's header is read before any is decoded: more than ``max_pixels`` (16 Mpx), a
                 side over ``max_side`` or all the request's images over ``max_request_pixels`` → 413, an
                 aspect ratio over ``max_aspect`` → 422 (decoding costs far more than the upload: a 155 KB
                 PNG can decode to 40 Mpx, a 78 KB one to a 1×39,999,999 strip)
    decode       imgrec's safe decoder, in worker threads (never on the event loop), at most
                 ``decode_threads`` at once so pixel buffers stay bounded → 415 for anything not an image
    batch        the Batcher (batcher.py) runs one forward pass for many requests; its queue is bounded
                 → 503 with Retry-After when full
    timeout      ``timeout_s`` from arrival to answer → 504; the worker finishes its pass and lives on

The classifier is either backend's (imgrec.infer.backends): images, batches and probabilities are torch
tensors with PyTorch and numpy arrays with ONNX Runtime, and this module handles both without importing
torch itself, so ``imgrec serve --backend onnxruntime`` never loads PyTorch (tests/test_serve_onnx.py).

Every error is JSON ``{"detail": "<message in words>"}`` with a 4xx status for bad input; uploads are
never stored, logged or echoed back. No endpoint takes a path, URL or model name: the model is chosen
when the server starts, and the static files are read once at start-up from the package.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread
import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from imgrec.errors import ConfigError, ImageDecodeError
from imgrec.infer.backends import resolve_backend
from imgrec.serve.batcher import Batcher, BatcherStopped, QueueFull

if TYPE_CHECKING:
    import torch

__all__ = ["ServeSettings", "create_app"]

log = logging.getLogger("imgrec.serve")

MAX_TOP_K = 1000
MAX_OTHER_FIELDS = 16  # multipart parts besides `files` (ignored, but counted so thousands cost nothing)


@dataclass
class ServeSettings:
    """Serving limits. The defaults suit a small model on a laptop; every one is a CLI flag."""

    max_batch: int = 32  # images per forward pass; 1 turns dynamic batching off
    max_wait_ms: float = 5.0  # how long the oldest request waits for others to fill its batch
    max_upload_mb: float = 10.0  # one request's body, multipart framing included
    max_files: int = 32  # images in one request
    queue_size: int = 128  # images waiting for the model; more → 503
    max_concurrent: int | None = None  # predict requests in progress (reading, decoding, waiting); None: queue_size
    timeout_s: float = 10.0  # per request, from arrival to answer → 504
    read_timeout_s: float = 30.0  # to receive a request body (slow or stalled senders) → 408
    decode_threads: int | None = None  # images decoded at once; None: half the CPU cores, 1 to 4
    max_buffered_mb: float | None = None  # all bodies in memory together; None: max(4 × max_upload_mb, 64)
    # decode limits, checked from each image's header before anything is decoded (→ 413 / 422)
    max_pixels: int = 16_000_000  # per image (the library's own cap is 40 Mpx); a 16-Mpx photo is 4900×3265
    max_side: int = 16_384  # pixels on the longer side
    max_aspect: float = 50.0  # longer side / shorter side (a phone's long screenshot is about 20)
    max_request_pixels: int | None = None  # all images of one request together; None: 4 × max_pixels
    # connections (uvicorn): a client that opens a connection and never finishes its request line and headers
    # is cut off after header_timeout_s (uvicorn's h11 protocol has no such deadline of its own); at most
    # max_connections are open at once, fewer when the open-file limit is lower, after which uvicorn answers 503
    header_timeout_s: float = 10.0
    max_connections: int = 4096
    # the "unknown" answer (a model trained with an out-of-distribution score): the share of in-distribution
    # images to answer (None: the model's own, 0.95 by default), or off
    accept_rate: float | None = None
    unknown: bool = True

    def __post_init__(self) -> None:
        def positive(name: str, integer: bool = True, zero_ok: bool = False) -> None:
            v = getattr(self, name)
            if v is None:
                return
            bad = (not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v)
                   or (integer and int(v) != v) or (v < 0 if zero_ok else v <= 0))
            if bad:
                raise ConfigError(f"{name.replace('_', '-')} must be a {'whole ' if integer else ''}number "
                                  f"{'≥ 0' if zero_ok else '> 0'}, got {v!r}")

        for name in ("max_batch", "max_files", "queue_size", "max_concurrent", "decode_threads", "max_pixels",
                     "max_side", "max_request_pixels", "max_connections"):
            positive(name)
        for name in ("max_upload_mb", "timeout_s", "read_timeout_s", "max_buffered_mb", "max_aspect",
                     "header_timeout_s"):
            positive(name, integer=False)
        positive("max_wait_ms", integer=False, zero_ok=True)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def request_pixels(self) -> int:
        return int(self.max_request_pixels if self.max_request_pixels is not None else 4 * self.max_pixels)

    @property
    def max_buffered_bytes(self) -> int:
        mb = self.max_buffered_mb if self.max_buffered_mb is not None else max(4 * self.max_upload_mb, 64.0)
        return max(int(mb * 1024 * 1024), self.max_upload_bytes)


# -- response models (they document the API; responses are built as plain JSON for speed) ------------
class Prediction(BaseModel):
    label: str
    score: float = Field(ge=0, le=1)


class PredictResponse(BaseModel):
    model: str = Field(description="architecture of the served model")
    predictions: list[list[Prediction]] = Field(description="one list per image, in upload order, best first")
    input_notes: list[list[str]] = Field(default_factory=list,
                                         description="one list per image, in upload order: how that image differs "
                                                     "much from the training images (colour into a grey model, a "
                                                     "much larger or smaller size, a far-off aspect ratio); empty "
                                                     "when it does not")
    unknown: list[bool] | None = Field(None, description="one per image, in upload order: true when the image is "
                                                          "unlike the training images (its out-of-distribution "
                                                          "score is below the model's threshold); absent when the "
                                                          "model has no such score or it is turned off")
    ood_scores: list[float] | None = Field(None, description="one per image: the out-of-distribution score "
                                                             "(higher: more like the training images)")
    time_ms: float = Field(description="time the server spent on the request")


class Limits(BaseModel):
    max_upload_bytes: int
    max_files: int
    max_batch: int
    max_top_k: int


class ModelInfo(BaseModel):
    name: str
    classes: list[str]
    num_classes: int
    image_size: int
    channels: int
    metrics: dict[str, float | int | bool | None]
    limits: Limits
    task: str = Field("classification", description="classification (top-k labels) or multilabel (every label "
                                                      "whose score reaches its threshold)")
    thresholds: list[float] | None = Field(None, description="multilabel: the decision threshold of each class")
    unknown: dict[str, Any] | None = Field(None, description="the out-of-distribution score that answers "
                                                             "\"unknown\": {score, threshold, accept_rate}; null "
                                                             "when off")


class Status(BaseModel):
    status: str


class ErrorBody(BaseModel):
    detail: str = Field(description="what went wrong, in words")


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {400: "malformed request", 404: "not found", 408: "the body arrived too slowly",
            413: "upload too large", 415: "not a usable image", 422: "invalid parameter",
            503: "busy, starting or stopping: retry later", 504: "inference took longer than the timeout"}
    return {c: {"model": ErrorBody, "description": text[c]} for c in codes}


_BINARY = {"type": "string", "format": "binary"}
PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "description": "Either multipart/form-data with one or more `files` fields (one image each), "
                       "or one image as the raw body.",
        "content": {
            "multipart/form-data": {"schema": {
                "type": "object", "required": ["files"],
                "properties": {"files": {"type": "array", "items": _BINARY, "minItems": 1,
                                         "description": "repeat the field for several images"}}}},
            "application/octet-stream": {"schema": _BINARY},
            "image/png": {"schema": _BINARY},
            "image/jpeg": {"schema": _BINARY},
        },
    }
}


# -- request state that spans requests ----------------------------------------------------------
class _ServerState:
    def __init__(self, classifier, settings: ServeSettings):
        self.classifier = classifier
        self.settings = settings
        self.max_concurrent = settings.max_concurrent or settings.queue_size
        self.active = 0  # predict requests in progress (touched only on the event loop: no lock)
        self.buffered = 0  # bytes of request bodies held in memory, all requests together
        # decoding competes with the model for the cores: by default at most half of them decode at once
        self.decode_limiter = anyio.CapacityLimiter(settings.decode_threads
                                                    or max(1, min(4, (os.cpu_count() or 1) // 2)))
        self.ready = False
        self.batcher = Batcher(self._forward, settings.max_batch, settings.max_wait_ms / 1000, settings.queue_size)

    def _forward(self, batch: torch.Tensor | np.ndarray) -> list[tuple[list[float], list[int], float | None]]:
        """Per image: (scores, class indices, out-of-distribution score or None), best first, as Python lists
        (runs in the batcher's thread).

        Sorting and ``tolist`` once per batch here, instead of a ``topk`` per request on the event loop,
        keeps tensor calls (and their GIL hand-offs) off the thread that answers every connection.
        """
        # chunks of max_batch bound memory when one request brings more images than a batch holds
        probs, ood = self.classifier.scored(batch, batch_size=self.settings.max_batch)
        ood = [None] * len(probs) if ood is None else [float(v) for v in ood]
        k = min(MAX_TOP_K, probs.shape[1])
        if isinstance(probs, np.ndarray):  # ONNX Runtime; a stable sort of -p keeps ties in class order, as torch
            idx = np.argsort(-probs, axis=1, kind="stable")[:, :k]
            scores = np.take_along_axis(probs, idx, axis=1)
        else:
            scores, idx = probs.sort(dim=1, descending=True, stable=True)
            scores, idx = scores[:, :k], idx[:, :k]
        return list(zip(scores.tolist(), idx.tolist(), ood))

    def warm_up(self) -> None:
        """Run the shapes the server will see first, so the first real request is not the slow one."""
        for n in sorted({1, self.settings.max_batch}):
            self._forward(blank_batch(self.classifier, n))


def blank_batch(classifier, n: int):
    """``n`` black images at the model's size, of the type its ``load_image`` gives (torch or numpy)."""
    one = classifier.load_image(np.zeros((classifier.channels, classifier.image_size, classifier.image_size),
                                         np.uint8))
    return _stack([one] * n)


def _stack(images: list):
    """Decoded C×H×W images → one N×C×H×W batch, with the library that made them."""
    if isinstance(images[0], np.ndarray):
        return np.stack(images)
    import torch  # the images are torch tensors: PyTorch is loaded already
    return torch.stack(images)


async def _with_timeout(coro, seconds: float):
    """``await coro`` or raise TimeoutError. On Python 3.11+ without wrapping it in a new task, as
    ``asyncio.wait_for`` does: that task and its extra event-loop turn showed up in profiles of busy servers."""
    if hasattr(asyncio, "timeout"):
        async with asyncio.timeout(seconds):
            return await coro
    return await asyncio.wait_for(coro, seconds)  # pragma: no cover - Python 3.10


def _http_error(status: int, detail: str, retry_after: int | None = None) -> StarletteHTTPException:
    return StarletteHTTPException(status, detail, headers={"Retry-After": str(retry_after)} if retry_after else None)


# -- reading a request body: bounded, counted, in memory --------------------------------------------
class _Body:
    """Counts one request's bytes against its own limit and against all requests' shared budget."""

    def __init__(self, state: _ServerState):
        self.state = state
        self.limit = state.settings.max_upload_bytes
        self.total = 0  # bytes received
        self.held = 0  # bytes counted into the shared budget
        self.finished = False  # the whole body was read

    def check_declared(self, request: Request) -> None:
        declared = request.headers.get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.limit:
            # refused before a byte of the body is read
            raise _http_error(413, f"upload too large: {int(declared)} bytes, limit {self.limit}")

    def count(self, n: int) -> None:
        self.total += n
        if self.total > self.limit:  # a chunked body, or one longer than its Content-Length said
            raise _http_error(413, f"upload too large: more than {self.limit} bytes")
        if self.state.buffered + n > self.state.settings.max_buffered_bytes:
            raise _http_error(503, "server busy: too many uploads in progress; retry shortly", retry_after=1)
        self.state.buffered += n
        self.held += n

    def release(self) -> None:
        self.state.buffered -= self.held
        self.held = 0


class _MultipartFiles:
    """Collect the `files` parts of a multipart body as it streams in; refuse floods early."""

    def __init__(self, boundary: bytes, max_files: int):
        self.max_files = max_files
        self.max_parts = max_files + MAX_OTHER_FIELDS
        self.files: list[tuple[str | None, bytearray]] = []
        self.parts = 0
        self.complete = False
        self._header_field = bytearray()
        self._header_value = bytearray()
        self._disposition = b""
        self._target: bytearray | None = None
        self.parser = MultipartParser(boundary, callbacks={
            "on_part_begin": self._part_begin, "on_header_field": self._field, "on_header_value": self._value,
            "on_header_end": self._header_end, "on_headers_finished": self._headers_finished,
            "on_part_data": self._data, "on_end": self._end,
        }, max_header_count=8, max_header_size=1024)

    def write(self, chunk: bytes) -> None:
        self.parser.write(chunk)

    def _part_begin(self) -> None:
        self.parts += 1
        if self.parts > self.max_parts:
            raise _http_error(400, f"too many form fields (limit {self.max_parts})")
        self._disposition = b""
        self._target = None

    def _field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _header_end(self) -> None:
        if bytes(self._header_field).strip().lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_field.clear()
        self._header_value.clear()

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._disposition)
        if params.get(b"name") != b"files":
            return  # another field: its bytes are counted by the body limit and dropped
        if len(self.files) >= self.max_files:
            raise _http_error(400, f"too many files (limit {self.max_files} per request)")
        filename = params.get(b"filename")
        name = filename.decode("utf-8", "replace") if filename else None
        self._target = bytearray()
        self.files.append((name, self._target))

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._target is not None:
            self._target += data[start:end]

    def _end(self) -> None:
        self.complete = True


def _describe_upload(index: int, name: str | None, multipart: bool) -> str:
    if not multipart:
        return "request body"
    if name:  # a client-chosen name: printable, short, and only ever inside a JSON string
        name = "".join(ch if ch.isprintable() else "?" for ch in name)[:80]
        return f"files[{index}] ({name!r})"
    return f"files[{index}]"


Uploads = list[tuple[str | None, bytearray]]  # (client file name, encoded bytes) per image


async def _read_uploads(request: Request, body: _Body, max_files: int) -> tuple[Uploads, bool]:
    """The request's images as (client file name, bytes), and whether they came as multipart."""
    ctype, params = parse_options_header(request.headers.get("content-type"))
    if ctype == b"multipart/form-data":
        boundary = params.get(b"boundary")
        if not boundary:
            raise _http_error(400, "multipart/form-data without a boundary")
        try:
            form = _MultipartFiles(boundary, max_files)
        except FormParserError as e:  # e.g. a boundary longer than the parser allows
            raise _http_error(400, f"malformed multipart body ({e})") from None
        try:
            async for chunk in request.stream():
                if chunk:
                    body.count(len(chunk))
                    form.write(chunk)
            body.finished = True
        except FormParserError as e:  # MultipartParseError and its relatives
            raise _http_error(400, f"malformed multipart body ({str(e)[:120]})") from None
        if not form.complete:
            raise _http_error(400, "malformed multipart body (it ends before its closing boundary)")
        if not form.files:
            raise _http_error(400, "no image: send one or more multipart fields named 'files'")
        await _check_headers(body.state, form.files, True)
        return form.files, True
    data = bytearray()
    async for chunk in request.stream():
        if chunk:
            body.count(len(chunk))
            data += chunk
    body.finished = True
    await _check_headers(body.state, [(None, data)], False)
    return [(None, data)], False


async def _check_headers(state: _ServerState, uploads: Uploads, multipart: bool) -> None:
    """Refuse the request from its images' headers, before any is decoded (in a worker thread: a PNG's chunks
    are walked in Python), against the per-image and per-request pixel limits."""
    await anyio.to_thread.run_sync(_check_headers_sync, state.settings, uploads, multipart,
                                   limiter=state.decode_limiter)


def _check_headers_sync(settings: ServeSettings, uploads: Uploads, multipart: bool) -> None:
    from imgrec.data.decode import ImageTooLargeError, image_header
    total = 0
    for i, (name, data) in enumerate(uploads):
        try:
            _, w, h = image_header(bytes(data), max_pixels=settings.max_pixels, max_side=settings.max_side,
                                   max_aspect=settings.max_aspect)
        except ImageTooLargeError as e:
            status = 422 if e.kind == "aspect" else 413
            raise _http_error(status, f"{_describe_upload(i, name, multipart)}: {e.reason}") from None
        except ImageDecodeError as e:
            raise _http_error(415, f"{_describe_upload(i, name, multipart)}: {e.reason}") from None
        total += w * h
        if total > settings.request_pixels:
            raise _http_error(413, f"the request's images hold more than {settings.request_pixels} pixels together "
                                   f"(the first {i + 1} of {len(uploads)}); send fewer or smaller images")


async def _drain(request: Request, body: _Body, timeout_s: float) -> bool:
    """Read and drop the rest of a refused request's body: True if it ended within the size and time limits."""
    async def drain() -> None:
        async for chunk in request.stream():
            body.total += len(chunk)  # counted, not kept
            if body.total > body.limit:
                raise OverflowError
        body.finished = True

    try:
        await asyncio.wait_for(drain(), timeout_s)
    except (TimeoutError, OverflowError, ClientDisconnect, RuntimeError):  # RuntimeError: stream already consumed
        return False
    return True


def _decode_all(classifier, uploads: Uploads, multipart: bool, deadline: float | None = None,
                timeout_s: float = 0.0) -> tuple[torch.Tensor | np.ndarray, list[list[str]]]:
    """Decode every upload to the model's size and channels (runs in a worker thread): a torch tensor
    (PyTorch backend) or a numpy array (ONNX Runtime backend), as the classifier's ``load_image`` gives,
    and each upload's input notes (imgrec.infer.inputs, from its header). Decoding counts against the
    request's ``timeout_s``: past ``deadline`` (a ``time.perf_counter`` value) no further image is decoded and
    the request gets a 504 (one image's decode is bounded by the header checks' pixel limits)."""
    from imgrec.infer.inputs import image_info, input_notes
    images, notes = [], []
    for i, (name, data) in enumerate(uploads):
        if deadline is not None and time.perf_counter() > deadline:
            raise _http_error(504, f"decoding the images did not finish within {timeout_s:g} s "
                                   f"({i} of {len(uploads)} decoded)")
        try:
            images.append(classifier.load_image(bytes(data)))
        except ImageDecodeError as e:
            raise _http_error(415, f"{_describe_upload(i, name, multipart)}: {e.reason}") from None
        info = image_info(data)
        meta = getattr(classifier, "meta", None)
        notes.append(input_notes(meta, info[:2], info[2]) if info and meta is not None else [])
        data.clear()  # the encoded bytes are no longer needed: free them while the rest decode
    return _stack(images), notes


# -- static files: read once from the package, served from memory ---------------------------------
_MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".png": "image/png", ".svg": "image/svg+xml"}


def _load_static() -> dict[str, tuple[bytes, str]]:
    files = {}
    root = resources.files("imgrec.serve") / "static"
    for entry in root.iterdir():
        suffix = os.path.splitext(entry.name)[1]
        if entry.is_file() and suffix in _MEDIA_TYPES:
            files[entry.name] = (entry.read_bytes(), _MEDIA_TYPES[suffix])
    return files


def _load_swagger_assets() -> dict[str, tuple[bytes, str]]:
    """Swagger UI's script and stylesheet from the fastapi-offline package, when it is installed.

    FastAPI's own /docs page loads them from a CDN, which fails offline; fastapi-offline ships the same
    swagger-ui-dist@5 files (version 5 is needed to read FastAPI's OpenAPI 3.1 schema).
    """
    try:
        root = resources.files("fastapi_offline") / "static"
        return {"swagger-ui-bundle.js": ((root / "swagger-ui-bundle.js").read_bytes(), _MEDIA_TYPES[".js"]),
                "swagger-ui.css": ((root / "swagger-ui.css").read_bytes(), _MEDIA_TYPES[".css"])}
    except (ModuleNotFoundError, FileNotFoundError, OSError):
        return {}


_DOCS_UNAVAILABLE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>imgrec API</title>
<link rel="stylesheet" href="/static/style.css"></head><body><main class="page"><h1>imgrec API</h1>
<p>The interactive documentation needs the <code>fastapi-offline</code> package, which ships Swagger UI for use
without internet access: <code>pip install 'imgrec[serve]'</code>.</p>
<p>The machine-readable schema is at <a href="/openapi.json">/openapi.json</a>.</p></main></body></html>"""

# The page and the docs run only scripts from this server; uploads are shown from blob: URLs.
_CSP = ("default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
_DOCS_CSP = _CSP.replace("style-src 'self'", "style-src 'self' 'unsafe-inline'")  # Swagger UI injects styles


class _SecurityHeaders:
    """Plain ASGI middleware (cheaper than BaseHTTPMiddleware on every request): hardening headers."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        csp = (_DOCS_CSP if scope["path"] == "/docs" else _CSP).encode()

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + [
                    (b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                    (b"x-frame-options", b"DENY"), (b"content-security-policy", csp),
                    (b"cache-control", b"no-store")]
            await send(message)

        await self.app(scope, receive, send_with_headers)


# -- the app -------------------------------------------------------------------------------------
def create_app(classifier, settings: ServeSettings | None = None) -> FastAPI:
    """A FastAPI app serving ``classifier`` (``imgrec.infer.predictor.Classifier`` or, without PyTorch,
    ``imgrec.infer.ort.OnnxClassifier``: see ``load_classifier``).

    The batcher's worker starts, after a warm-up pass, in the app's lifespan: run the app with an
    ASGI server (uvicorn) or ``httpx``/Starlette test clients that run the lifespan.
    """
    settings = settings or ServeSettings()
    # python-multipart logs a warning for each malformed header it meets; we answer those with 400, and
    # a client sending thousands must not be able to fill the server's log.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    if not settings.unknown:
        classifier.set_accept_rate(None)
    elif settings.accept_rate is not None:
        classifier.set_accept_rate(settings.accept_rate)  # a model without the score refuses in one line
    state = _ServerState(classifier, settings)
    # multi-label: every label at or above its threshold, compared in float32 as the predictors do
    multilabel = classifier.multilabel
    thresholds = [float(np.float32(t)) for t in classifier.thresholds] if multilabel else None
    static = _load_static()
    swagger = _load_swagger_assets()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # warm-up failures abort start-up: the server never listens half-loaded
        await anyio.to_thread.run_sync(state.warm_up)
        state.batcher.start()
        state.ready = True
        try:
            yield
        finally:
            state.ready = False
            await anyio.to_thread.run_sync(state.batcher.stop)

    app = FastAPI(title="imgrec", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Image classification with an imgrec model. The web page is at `/`.")
    app.state.imgrec = state  # for tests and benchmarks

    # -- errors: always JSON {"detail": "..."} ---------------------------------------------------
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(x) for x in err.get("loc", ()) if x not in ("query", "body", "path"))
            parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
        return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("internal error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal server error"}, status_code=500)

    # -- API -------------------------------------------------------------------------------------
    @app.post("/v1/predict", response_model=PredictResponse, openapi_extra=PREDICT_BODY, tags=["predict"],
              responses=_errors(400, 408, 413, 415, 422, 503, 504), summary="Classify one or more images")
    async def predict(request: Request,
                      top_k: int | None = Query(None, ge=1, le=MAX_TOP_K,
                                                description="labels per image (default 5, capped at the number of "
                                                            "classes); not for a multi-label model, which returns "
                                                            "every label whose score reaches its threshold")):
        t0 = time.perf_counter()
        body = _Body(state)
        try:
            if multilabel and top_k is not None:
                raise _http_error(400, "top_k does not apply to a multi-label model: it returns every label "
                                       "whose score reaches that label's threshold")
            rows, notes = await _run_predict(request, body, t0)
        except StarletteHTTPException as e:
            if not body.finished:
                # Answered before the whole body was read. A short remainder is read and dropped so the
                # client can read the answer and keep its connection; a body over the limit (413), one
                # too slow (408), or one that keeps coming gets the answer and a closed connection instead.
                if e.status_code in (408, 413) or not await _drain(request, body, min(settings.read_timeout_s, 2.0)):
                    e.headers = {**(e.headers or {}), "Connection": "close"}
            raise
        classes = classifier.classes
        if multilabel:  # rows come sorted best first: keep every label at or above its threshold
            predictions = [[{"label": classes[j], "score": sc} for sc, j in zip(scores, idx) if sc >= thresholds[j]]
                           for scores, idx, _ in rows]
        else:
            top_k = 5 if top_k is None else top_k
            predictions = [[{"label": classes[j], "score": sc} for sc, j in zip(scores[:top_k], idx[:top_k])]
                           for scores, idx, _ in rows]
        answer = {"model": classifier.name, "predictions": predictions, "input_notes": notes}
        flags = classifier.mark_unknown(predictions, None if not rows or rows[0][2] is None else
                                        np.array([r[2] for r in rows]))
        if flags and "unknown" in flags[0]:
            answer.update(unknown=[f["unknown"] for f in flags], ood_scores=[f["ood_score"] for f in flags])
        answer["time_ms"] = round((time.perf_counter() - t0) * 1000, 3)
        return JSONResponse(answer)

    async def _run_predict(request: Request, body: _Body, t0: float
                           ) -> tuple[list[tuple[list[float], list[int]]], list[list[str]]]:
        if not state.ready or not state.batcher.alive:
            raise _http_error(503, "the model is not ready", retry_after=1)
        if state.active >= state.max_concurrent:
            raise _http_error(503, f"server busy: {state.active} requests in progress; retry shortly", retry_after=1)
        state.active += 1
        state.batcher.announce()  # the batcher may hold a batch open for this request
        announced = True
        try:
            body.check_declared(request)
            try:
                uploads, multipart = await _with_timeout(_read_uploads(request, body, settings.max_files),
                                                         settings.read_timeout_s)
            except TimeoutError:
                raise _http_error(408, f"the request body did not arrive within {settings.read_timeout_s:g} s") \
                    from None
            except ClientDisconnect:
                raise _http_error(400, "the client disconnected before sending the whole body") from None
            images, notes = await anyio.to_thread.run_sync(_decode_all, classifier, uploads, multipart,
                                                           t0 + settings.timeout_s, settings.timeout_s,
                                                           limiter=state.decode_limiter)
            del uploads
            body.release()
            remaining = settings.timeout_s - (time.perf_counter() - t0)
            try:
                announced = False
                result = state.batcher.enqueue(images, announced=True, within=remaining)
            except QueueFull:
                raise _http_error(503, "server busy: the model's queue is full; retry shortly", retry_after=1) from None
            except BatcherStopped as e:
                raise _http_error(503, str(e), retry_after=1) from None
            try:
                # on timeout wait_for cancels the future: the worker skips it, or drops its finished rows
                return await asyncio.wait_for(result, max(remaining, 0.0)), notes
            except TimeoutError:
                raise _http_error(504, f"inference did not finish within {settings.timeout_s:g} s") from None
            except BatcherStopped as e:
                raise _http_error(503, str(e), retry_after=1) from None
        finally:
            if announced:
                state.batcher.withdraw()
            body.release()
            state.active -= 1

    @app.get("/v1/model", response_model=ModelInfo, tags=["model"], summary="The served model")
    async def model_info():
        metrics = {k: v for k, v in classifier.meta.metrics.items()
                   if v is None or isinstance(v, (int, float, bool))}  # numbers only: no paths or free text
        return JSONResponse({
            "name": classifier.name, "classes": list(classifier.classes), "num_classes": len(classifier.classes),
            "image_size": classifier.image_size, "channels": classifier.channels, "metrics": metrics,
            "limits": {"max_upload_bytes": settings.max_upload_bytes, "max_files": settings.max_files,
                       "max_batch": settings.max_batch, "max_top_k": MAX_TOP_K},
            "task": "multilabel" if multilabel else "classification", "thresholds": thresholds,
            "unknown": None if classifier.unknown_threshold is None else
            {"score": classifier.unknown["score"], "threshold": classifier.unknown_threshold}})

    @app.get("/healthz", response_model=Status, tags=["health"], summary="Liveness: the server answers")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", response_model=Status, responses=_errors(503), tags=["health"],
             summary="Readiness: the model is loaded, warmed up, and its worker runs")
    async def readyz():
        if state.ready and state.batcher.alive:
            return {"status": "ready"}
        raise _http_error(503, "not ready: the model worker is starting, stopping or stopped", retry_after=1)

    # -- the page, its files, and the offline API docs ---------------------------------------------
    def asset(name: str) -> Response:
        content, media_type = static[name]
        return Response(content, media_type=media_type)

    @app.get("/", include_in_schema=False)
    async def index():
        return asset("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static_file(name: str):
        if name not in static or name.endswith(".html"):
            raise _http_error(404, "not found")
        return asset(name)

    @app.get("/static/swagger/{name}", include_in_schema=False)
    async def swagger_file(name: str):
        if name not in swagger:
            raise _http_error(404, "not found")
        content, media_type = swagger[name]
        return Response(content, media_type=media_type)

    @app.get("/docs", include_in_schema=False)
    async def docs():
        return asset("docs.html") if swagger else HTMLResponse(_DOCS_UNAVAILABLE)

    app.add_middleware(_SecurityHeaders)
    return app


def _version() -> str:
    from imgrec import __version__
    return __version__


# -- running it ----------------------------------------------------------------------------------
_ENV_CONFIG = "IMGREC_SERVE_CONFIG"  # how the parent hands the model and settings to --workers processes
_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def load_classifier(model_dir: str | os.PathLike, which: str = "best", device: str = "auto",
                    backend: str = "auto", threads: int | None = None):
    """Load a model directory (or an exported .onnx file with ``backend`` onnxruntime/auto) and run one image
    through it, so a broken model fails before listening."""
    from imgrec.errors import ModelFileError
    from imgrec.infer.backends import load_classifier as load_backend

    clf = load_backend(model_dir, backend=backend, which=which, device=device, threads=threads)
    try:
        clf.probabilities(blank_batch(clf, 1))
    except Exception as e:  # noqa: BLE001 - any failure here means the directory cannot serve
        raise ModelFileError(f"{model_dir}: the model fails on a test image ({str(e).splitlines()[0][:200]})") from None
    return clf


def _set_threads(threads: int | None, workers: int, backend: str = "torch") -> int:
    """The threads for one worker process's model: set as PyTorch's when ``backend`` is torch; returned
    either way (ONNX Runtime sessions get it as their intra-op thread count)."""
    from imgrec.infer.files import usable_cores  # imgrec.device has it too, but imports torch
    n = int(threads) if threads else max(1, usable_cores() // max(1, workers))
    if backend == "torch":
        from imgrec.device import set_threads
        set_threads(n)
    return n


def app_from_env() -> FastAPI:
    """App factory for ``--workers N`` (uvicorn imports it in each worker process)."""
    import json
    cfg = json.loads(os.environ[_ENV_CONFIG])
    backend = cfg.get("backend", "auto")
    n = _set_threads(cfg["threads"], cfg["workers"], resolve_backend(cfg["model"], backend))
    clf = load_classifier(cfg["model"], cfg["which"], cfg["device"], backend, n)
    settings = ServeSettings(**cfg["settings"])
    _HEADER_TIMEOUT_S[0] = float(settings.header_timeout_s)  # this worker process's protocols read it
    return create_app(clf, settings)


# -- connections: a deadline for the request line and headers ---------------------------------------
# uvicorn's h11 protocol starts its keep-alive timer only after a response, so a connection that sends nothing,
# or half a request line, stays open for ever: 1,030 such sockets held every connection slot (/healthz
# answered 503), and a half-sent header was still open after 45 s. This subclass gives every request head a
# deadline, from the connection's start (or the first byte after a keep-alive response) and not extended by
# further bytes, so a client dribbling one byte a second is cut off too. Bodies have their own deadline in the
# app (read_timeout_s → 408). One value per process (uvicorn builds protocols from its Config, which holds
# no custom fields): set by _uvicorn_options and, in --workers processes, by app_from_env.
_HEADER_TIMEOUT_S = [ServeSettings.header_timeout_s]

try:
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError:  # pragma: no cover - the serve extra is not installed: create_app still works in tests
    H11Protocol = None

if H11Protocol is not None:
    class HeaderDeadlineH11Protocol(H11Protocol):
        """uvicorn's h11 protocol with a deadline for each request's line and headers (see above)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._head_timer: asyncio.TimerHandle | None = None

        def _arm_head_deadline(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(_HEADER_TIMEOUT_S[0], self._head_deadline_passed)

        def _disarm_head_deadline(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_head_deadline()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            # IDLE on the client's side: the request line and headers are not complete yet
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self._arm_head_deadline()
            else:
                self._disarm_head_deadline()

        def connection_lost(self, exc) -> None:
            self._disarm_head_deadline()
            super().connection_lost(exc)

        def _head_deadline_passed(self) -> None:
            self._head_timer = None
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self.transport.close()  # h11 cannot answer before a request exists: close, as keep-alive does


def _open_file_budget(want: int) -> int:
    """File descriptors this process may open: the soft limit raised towards ``want`` (up to the hard limit)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not POSIX
        return want
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    return want if soft == resource.RLIM_INFINITY else int(soft)


def _uvicorn_options(host: str, port: int, settings: ServeSettings, log_level: str, access_log: bool) -> dict:
    _HEADER_TIMEOUT_S[0] = float(settings.header_timeout_s)
    # uvicorn answers 503 past limit_concurrency open connections: keep that under the open-file limit (with
    # room for the model's files and the thread pools), so a flood gets 503s rather than failed accepts
    fds = _open_file_budget(settings.max_connections + 256)
    options = dict(
        host=host, port=port, log_level=log_level, access_log=access_log, lifespan="on", ws="none",
        server_header=False,  # do not advertise the server software
        proxy_headers=False,  # no client may claim another address through X-Forwarded-For
        timeout_keep_alive=5,
        h11_max_incomplete_event_size=16 * 1024,  # request line and headers: 16 KiB at most
        limit_concurrency=max(64, min(settings.max_connections, fds - 128)))
    if H11Protocol is not None:
        options["http"] = HeaderDeadlineH11Protocol
    return options


def bind_socket(host: str, port: int):
    """A listening TCP socket for uvicorn; ConfigError when the address cannot be used.

    The protocol must be given as IPPROTO_TCP: asyncio sets TCP_NODELAY only on sockets that say so, and
    without it the response body waits behind Nagle's algorithm and the client's delayed ACK (a 40 ms
    stall on every keep-alive request, measured here).
    """
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, int(port)))
    except (OSError, UnicodeError, OverflowError) as e:  # address in use, not this machine's, unknown host name
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {getattr(e, 'strerror', None) or e}") from None
    sock.set_inheritable(True)  # for --workers: the worker processes share it
    return sock


def serve(model_dir: str | os.PathLike, settings: ServeSettings | None = None, *, host: str = "127.0.0.1",
          port: int = 8000, workers: int = 1, which: str = "best", device: str = "auto",
          threads: int | None = None, log_level: str = "info", access_log: bool = True,
          backend: str = "auto") -> None:
    """Load ``model_dir``, check it, and serve it until interrupted (``imgrec serve``).

    ``backend``: "auto" (ONNX Runtime for a .onnx file, else PyTorch), "torch" or "onnxruntime" (the model
    directory's exported model.onnx); the batching is the same for both.

    Raises ModelFileError/ConfigError before listening when the model or the settings are unusable.
    """
    import uvicorn

    settings = settings or ServeSettings()
    if not 0 <= int(port) <= 65535:
        raise ConfigError(f"port must be in 0..65535, got {port}")
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be at least 1, got {threads}")
    n = _set_threads(threads, workers, resolve_backend(model_dir, backend))
    clf = load_classifier(model_dir, which, device, backend, n)
    if host not in _LOOPBACK:
        log.warning("listening on %s: anyone who can reach this address can use the model", host)

    sock = bind_socket(host, port)  # here, so that a busy port is a one-line error rather than a uvicorn log line
    bound_port = sock.getsockname()[1]
    print(f"imgrec: serving {clf.name} ({len(clf.classes)} classes) from {model_dir} on "
          f"http://{host if ':' not in host else f'[{host}]'}:{bound_port}/ (API docs at /docs)", flush=True)

    options = _uvicorn_options(host, bound_port, settings, log_level, access_log)
    if workers == 1:
        server = uvicorn.Server(uvicorn.Config(create_app(clf, settings), **options))
        server.run(sockets=[sock])
        return
    # Several processes, each with its own model and batcher, sharing our socket (uvicorn.run would bind
    # its own, without TCP_NODELAY): what uvicorn.run does for workers > 1, with that one difference.
    import inspect
    import json

    from uvicorn.supervisors import Multiprocess
    del clf
    os.environ[_ENV_CONFIG] = json.dumps({"model": os.fspath(model_dir), "which": which, "device": device,
                                          "backend": backend, "threads": threads, "workers": workers,
                                          "settings": dataclasses.asdict(settings)})
    config = uvicorn.Config("imgrec.serve.app:app_from_env", factory=True, workers=workers, **options)
    # uvicorn < 0.30 wanted the server's run method as `target`; later versions build it themselves
    target = {"target": uvicorn.Server(config).run} if "target" in inspect.signature(Multiprocess).parameters else {}
    Multiprocess(config, sockets=[sock], **target).run()

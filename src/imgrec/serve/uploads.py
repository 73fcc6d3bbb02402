"""Reading uploads: a request body bounded, counted and kept in memory; multipart parsed as it streams; each
image's header checked against the pixel limits before any is decoded; then the decode, in worker threads.

Every refusal is an HTTP error (schemas.http_error) whose words name the upload, never echo its bytes.
"""
from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import anyio
import anyio.to_thread
import numpy as np
from fastapi import Request
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect

from imgrec.errors import ImageDecodeError
from imgrec.serve.schemas import http_error
from imgrec.serve.settings import MAX_OTHER_FIELDS, ServeSettings
from imgrec.serve.state import ServerState, stack_images

if TYPE_CHECKING:
    import torch

__all__ = ["Body", "MultipartFiles", "Uploads", "read_uploads", "check_headers", "drain", "decode_all",
           "describe_upload"]


class Body:
    """Counts one request's bytes against its own limit and against all requests' shared budget."""

    def __init__(self, state: ServerState):
        self.state = state
        self.limit = state.settings.max_upload_bytes
        self.total = 0  # bytes received
        self.held = 0  # bytes counted into the shared budget
        self.finished = False  # the whole body was read

    def check_declared(self, request: Request) -> None:
        declared = request.headers.get("content-length")
        if declared is not None and declared.strip().isdigit() and int(declared) > self.limit:
            # refused before a byte of the body is read
            raise http_error(413, f"upload too large: {int(declared)} bytes, limit {self.limit}")

    def count(self, n: int) -> None:
        self.total += n
        if self.total > self.limit:  # a chunked body, or one longer than its Content-Length said
            raise http_error(413, f"upload too large: more than {self.limit} bytes")
        if self.state.buffered + n > self.state.settings.max_buffered_bytes:
            raise http_error(503, "server busy: too many uploads in progress; retry shortly", retry_after=1)
        self.state.buffered += n
        self.held += n

    def release(self) -> None:
        self.state.buffered -= self.held
        self.held = 0


class MultipartFiles:
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
            raise http_error(400, f"too many form fields (limit {self.max_parts})")
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
            raise http_error(400, f"too many files (limit {self.max_files} per request)")
        filename = params.get(b"filename")
        name = filename.decode("utf-8", "replace") if filename else None
        self._target = bytearray()
        self.files.append((name, self._target))

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._target is not None:
            self._target += data[start:end]

    def _end(self) -> None:
        self.complete = True


def describe_upload(index: int, name: str | None, multipart: bool) -> str:
    if not multipart:
        return "request body"
    if name:  # a client-chosen name: printable, short, and only ever inside a JSON string
        name = "".join(ch if ch.isprintable() else "?" for ch in name)[:80]
        return f"files[{index}] ({name!r})"
    return f"files[{index}]"


Uploads = list[tuple[str | None, bytearray]]  # (client file name, encoded bytes) per image


async def read_uploads(request: Request, body: Body, max_files: int) -> tuple[Uploads, bool]:
    """The request's images as (client file name, bytes), and whether they came as multipart."""
    ctype, params = parse_options_header(request.headers.get("content-type"))
    if ctype == b"multipart/form-data":
        boundary = params.get(b"boundary")
        if not boundary:
            raise http_error(400, "multipart/form-data without a boundary")
        try:
            form = MultipartFiles(boundary, max_files)
        except FormParserError as e:  # e.g. a boundary longer than the parser allows
            raise http_error(400, f"malformed multipart body ({e})") from None
        try:
            async for chunk in request.stream():
                if chunk:
                    body.count(len(chunk))
                    form.write(chunk)
            body.finished = True
        except FormParserError as e:  # MultipartParseError and its relatives
            raise http_error(400, f"malformed multipart body ({str(e)[:120]})") from None
        if not form.complete:
            raise http_error(400, "malformed multipart body (it ends before its closing boundary)")
        if not form.files:
            raise http_error(400, "no image: send one or more multipart fields named 'files'")
        await check_headers(body.state, form.files, True)
        return form.files, True
    data = bytearray()
    async for chunk in request.stream():
        if chunk:
            body.count(len(chunk))
            data += chunk
    body.finished = True
    await check_headers(body.state, [(None, data)], False)
    return [(None, data)], False


async def check_headers(state: ServerState, uploads: Uploads, multipart: bool) -> None:
    """Refuse the request from its images' headers, before any is decoded (in a worker thread: a PNG's chunks
    are walked in Python), against the per-image and per-request pixel limits."""
    await anyio.to_thread.run_sync(check_headers_sync, state.settings, uploads, multipart,
                                   limiter=state.decode_limiter)


def check_headers_sync(settings: ServeSettings, uploads: Uploads, multipart: bool) -> None:
    from imgrec.data.decode import ImageTooLargeError, image_header
    total = 0
    for i, (name, data) in enumerate(uploads):
        try:
            _, w, h = image_header(bytes(data), max_pixels=settings.max_pixels, max_side=settings.max_side,
                                   max_aspect=settings.max_aspect)
        except ImageTooLargeError as e:
            status = 422 if e.kind == "aspect" else 413
            raise http_error(status, f"{describe_upload(i, name, multipart)}: {e.reason}") from None
        except ImageDecodeError as e:
            raise http_error(415, f"{describe_upload(i, name, multipart)}: {e.reason}") from None
        total += w * h
        if total > settings.request_pixels:
            raise http_error(413, f"the request's images hold more than {settings.request_pixels} pixels together "
                                   f"(the first {i + 1} of {len(uploads)}); send fewer or smaller images")


async def drain(request: Request, body: Body, timeout_s: float) -> bool:
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


def decode_all(classifier, uploads: Uploads, multipart: bool, deadline: float | None = None,
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
            raise http_error(504, f"decoding the images did not finish within {timeout_s:g} s "
                                   f"({i} of {len(uploads)} decoded)")
        try:
            images.append(classifier.load_image(bytes(data)))
        except ImageDecodeError as e:
            raise http_error(415, f"{describe_upload(i, name, multipart)}: {e.reason}") from None
        info = image_info(data)
        meta = getattr(classifier, "meta", None)
        notes.append(input_notes(meta, info[:2], info[2]) if info and meta is not None else [])
        data.clear()  # the encoded bytes are no longer needed: free them while the rest decode
    return stack_images(images), notes

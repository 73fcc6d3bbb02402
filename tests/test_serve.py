"""imgrec serve: the HTTP API against a real uvicorn server on 127.0.0.1 (limits, bad uploads, overload,
timeouts), dynamic batching seen over HTTP, the CLI, and a schemathesis run over the OpenAPI schema.
The batcher alone is tested in test_batcher.py; the live-server helper is tests/liveserver.py."""
from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

from imgrec.serve.app import ServeSettings, create_app, load_classifier  # noqa: E402
from liveserver import LiveServer, SlowClassifier, wait_until  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]


# -- fixtures -------------------------------------------------------------------------------------
SMALL_LIMITS = dict(max_upload_mb=1.0, max_files=4)


@pytest.fixture(scope="session")
def classifier(trained_run):
    return load_classifier(trained_run[0])


@pytest.fixture(scope="session")
def images(fmnist_arrays):
    """Eight real Fashion-MNIST test images as PNG bytes, and their raw arrays."""
    _, _, xt, _ = fmnist_arrays
    out = []
    for i in range(8):
        buf = io.BytesIO()
        Image.fromarray(xt[i]).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


@pytest.fixture(scope="module")
def server(classifier):
    settings = ServeSettings(**SMALL_LIMITS, queue_size=64)
    with LiveServer(create_app(classifier, settings), settings) as s:
        yield s


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def oracle(classifier, image: bytes, top_k: int = 5):
    return classifier.predict(image, top_k=top_k)


def assert_same_predictions(got, want):
    """The same labels with the same scores, sorted by score; labels whose scores tie within the tolerance may
    come in either order (a batched pass and a single-image pass round the tail of a top-10 differently)."""
    assert len(got) == len(want)
    scores = {p["label"]: p["score"] for p in want}
    assert set(scores) == {p["label"] for p in got}
    assert np.allclose([p["score"] for p in got], [scores[p["label"]] for p in got], atol=1e-5)
    assert all(a["score"] >= b["score"] - 1e-6 for a, b in zip(got, got[1:]))


def assert_json_error(resp, status: int) -> str:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    detail = resp.json()["detail"]
    assert isinstance(detail, str) and detail
    return detail


def raw_request(port: int, head: bytes, body_chunks=(), read_timeout: float = 10.0):
    """Send a hand-made request over a socket (what httpx will not send); returns (response bytes, body bytes sent)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=read_timeout)
    sent = 0
    response = b""
    try:
        s.sendall(head)
        for chunk in body_chunks:
            try:
                s.sendall(chunk)
                sent += len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break  # the server answered and closed: exactly what a limit should do
            s.setblocking(False)
            try:
                data = s.recv(65536)
                response += data
                if response or data == b"":
                    break
            except BlockingIOError:
                pass
            finally:
                s.setblocking(True)
                s.settimeout(read_timeout)
        try:
            while True:
                data = s.recv(65536)
                if not data:
                    break
                response += data
        except (socket.timeout, ConnectionResetError):
            pass
    finally:
        s.close()
    return response, sent


def _status_of(response: bytes) -> int:
    m = re.match(rb"HTTP/1\.1 (\d{3}) ", response)
    assert m, response[:200]
    return int(m.group(1))


class PeakMemory:
    """Growth of this process's peak RSS (the server runs in a thread of this process) over a block."""

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
            self.supported = True
        except OSError:
            self.supported = False
        self.start = self._read("VmRSS")
        return self

    def __exit__(self, *exc):
        self.growth_mb = (self._read("VmHWM") - self.start) / 1024 if self.supported else 0.0

    @staticmethod
    def _read(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])  # kB
        return 0


# -- endpoints ------------------------------------------------------------------------------------
def test_health_and_ready(client):
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json() == {"status": "ready"}


def test_model_info(client, classifier, trained_run):
    r = client.get("/v1/model")
    assert r.status_code == 200
    info = r.json()
    assert info["name"] == "simple_cnn"
    assert info["classes"] == classifier.classes and info["num_classes"] == 10
    assert info["image_size"] == 28 and info["channels"] == 1
    assert 0 < info["metrics"]["val_acc"] <= 1
    assert info["limits"] == {"max_upload_bytes": 1024 * 1024, "max_files": 4, "max_batch": 32, "max_top_k": 1000}
    assert str(trained_run[0]) not in r.text  # no paths from the model directory leak out


def test_predict_multipart_matches_the_library(client, classifier, images):
    files = [("files", (f"{i}.png", images[i], "image/png")) for i in range(3)]
    r = client.post("/v1/predict", files=files, params={"top_k": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "simple_cnn" and body["time_ms"] > 0
    assert len(body["predictions"]) == 3
    for got, image in zip(body["predictions"], images):
        assert len(got) == 3
        assert [p["score"] for p in got] == sorted((p["score"] for p in got), reverse=True)
        assert_same_predictions(got, oracle(classifier, image, 3))


@pytest.mark.parametrize("content_type", ["image/png", "application/octet-stream", None])
def test_predict_raw_body(client, classifier, images, content_type):
    headers = {"content-type": content_type} if content_type else {}
    r = client.post("/v1/predict", content=images[4], headers=headers)
    assert r.status_code == 200, r.text
    (got,) = r.json()["predictions"]
    assert_same_predictions(got, oracle(classifier, images[4]))


def test_predict_rgb_jpeg_into_a_grayscale_model(client, classifier, fmnist_arrays):
    _, _, xt, _ = fmnist_arrays
    buf = io.BytesIO()
    Image.fromarray(np.stack([xt[5]] * 3, axis=-1)).resize((300, 300)).save(buf, format="JPEG", quality=95)
    r = client.post("/v1/predict", files={"files": ("photo.jpg", buf.getvalue(), "image/jpeg")})
    assert r.status_code == 200, r.text
    assert_same_predictions(r.json()["predictions"][0], oracle(classifier, buf.getvalue()))


def test_top_k(client, images):
    r = client.post("/v1/predict", content=images[0], params={"top_k": 1})
    assert len(r.json()["predictions"][0]) == 1
    r = client.post("/v1/predict", content=images[0], params={"top_k": 1000})  # capped at the class count
    assert len(r.json()["predictions"][0]) == 10
    assert abs(sum(p["score"] for p in r.json()["predictions"][0]) - 1) < 1e-4
    for bad in ("0", "-1", "1001", "abc", "2.5", ""):
        detail = assert_json_error(client.post("/v1/predict", content=images[0], params={"top_k": bad}), 422)
        assert "top_k" in detail


# -- bad images: 415 with a message, never the upload echoed back ----------------------------------------
def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb_png(side: int = 100_000) -> bytes:
    """A few hundred bytes whose header claims side×side pixels (10 gigapixels)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
            + _png_chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + _png_chunk(b"IEND", b""))


def _tiff() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="TIFF")
    return buf.getvalue()


BAD_IMAGES = {
    "zero bytes": b"",
    "text": b"hello, I am not an image\n" * 4,
    "random bytes": bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8)),
    "eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
    "pdf": b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF",
    "tiff": None,  # built at test time
    "bomb": None,
    "truncated png": None,
}


@pytest.mark.parametrize("name", sorted(BAD_IMAGES))
@pytest.mark.parametrize("as_multipart", [True, False], ids=["multipart", "raw"])
def test_bad_images_are_415(client, images, name, as_multipart):
    data = BAD_IMAGES[name]
    if name == "tiff":
        data = _tiff()
    elif name == "bomb":
        data = _bomb_png()
    elif name == "truncated png":
        data = images[0][: len(images[0]) // 2]
    if as_multipart:
        r = client.post("/v1/predict", files={"files": ("upload.png", data, "image/png")})
    else:
        r = client.post("/v1/predict", content=data, headers={"content-type": "image/png"})
    detail = assert_json_error(r, 415)
    assert ("files[0]" if as_multipart else "request body") in detail
    if len(data) >= 16:  # the upload is never echoed back
        assert data[:16].decode("latin-1") not in r.text


def test_png_with_appended_html_is_classified_not_echoed(client, classifier, images):
    payload = images[1] + b"<html><script>alert('x')</script></html>" + b"PK\x03\x04" + b"\0" * 64
    r = client.post("/v1/predict", files={"files": ("x.png", payload, "image/png")})
    assert r.status_code == 200, r.text
    assert "<script>" not in r.text and "alert" not in r.text
    assert_same_predictions(r.json()["predictions"][0], oracle(classifier, images[1]))


def test_one_bad_file_among_good_ones_names_it(client, images):
    files = [("files", ("a.png", images[0], "image/png")), ("files", ("b.png", b"nope", "image/png"))]
    detail = assert_json_error(client.post("/v1/predict", files=files), 415)
    assert detail.startswith("files[1] ('b.png')")


# -- malformed requests: 400 ------------------------------------------------------------------------
def test_multipart_without_files_field(client):
    detail = assert_json_error(client.post("/v1/predict", files={"image": ("a.png", b"x", "image/png")}), 400)
    assert "files" in detail


def test_multipart_without_boundary(client):
    r = client.post("/v1/predict", content=b"--x\r\n", headers={"content-type": "multipart/form-data"})
    assert "boundary" in assert_json_error(r, 400)


@pytest.mark.parametrize("body", [
    b"this is not multipart at all",
    b"--XyZ\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n\r\nabc",  # never closed
    b"--XyZ\r\n" + b"X-Header: " + b"a" * 5000 + b"\r\n\r\nabc\r\n--XyZ--\r\n",  # a 5 KB part header
    b"--XyZ\r\n" + b"".join(b"H%d: v\r\n" % i for i in range(50)) + b"\r\nabc\r\n--XyZ--\r\n",  # 50 part headers
], ids=["garbage", "unterminated", "long-header", "many-headers"])
def test_malformed_multipart_is_400(client, body):
    r = client.post("/v1/predict", content=body, headers={"content-type": "multipart/form-data; boundary=XyZ"})
    assert_json_error(r, 400)


def test_too_many_files_is_400(client, images):
    files = [("files", (f"{i}.png", images[0], "image/png")) for i in range(5)]  # the limit is 4
    assert "too many files" in assert_json_error(client.post("/v1/predict", files=files), 400)


@pytest.mark.parametrize("field", ["files", "other"])
def test_thousands_of_parts_are_400_with_flat_memory(server, client, field):
    boundary = "b0undary"
    part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"a.png\"\r\n\r\n"
            "x\r\n").encode()
    body = part * 10_000 + f"--{boundary}--\r\n".encode()  # 10k parts in ~0.9 MB: under the size limit
    assert len(body) < 1024 * 1024
    with PeakMemory() as mem:  # the budget: memory, and no inference pass for a refused request
        passes = server.state.batcher.batches_run
        r = client.post("/v1/predict", content=body,
                        headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert "too many" in assert_json_error(r, 400)
    assert server.state.batcher.batches_run == passes
    assert mem.growth_mb < 40, f"peak RSS grew {mem.growth_mb:.0f} MB"


# -- upload size: 413 before reading (Content-Length) and while streaming (counted bytes) --------------
def test_declared_content_length_over_the_limit_is_413_before_reading(server):
    head = (b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            b"Content-Length: 100000000000\r\n\r\n")
    response, _ = raw_request(server.port, head)  # not a byte of the body is sent: answered from the header
    assert _status_of(response) == 413
    assert b"connection: close" in response.lower()
    assert b'"detail":"upload too large' in response


@pytest.mark.parametrize("kind", ["raw", "multipart"])
def test_streamed_upload_over_the_limit_is_413_with_flat_memory(server, kind):
    """A chunked body (no Content-Length) of up to 200 MB: the server stops at ~1 MB and closes."""
    if kind == "raw":
        head = b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\nTransfer-Encoding: chunked\r\n\r\n"
        first = b""
    else:
        head = (b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                b"Content-Type: multipart/form-data; boundary=B\r\n\r\n")
        first = b'--B\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n\r\n'
    payload = first + b"\0" * (64 * 1024 - len(first))
    chunk = b"%x\r\n" % len(payload) + payload + b"\r\n"
    filler = b"%x\r\n" % (64 * 1024) + b"\0" * (64 * 1024) + b"\r\n"
    chunks = [chunk] + [filler] * 3199  # 200 MB if nobody stops us
    with PeakMemory() as mem:
        response, sent = raw_request(server.port, head, chunks)
    assert _status_of(response) == 413, response[:300]
    assert b"upload too large" in response
    assert sent < 100 * 1024 * 1024, f"the server read {sent / 2**20:.0f} MB before refusing"
    assert mem.growth_mb < 40, f"peak RSS grew {mem.growth_mb:.0f} MB"


def test_upload_just_under_the_limit_is_read(client):
    # 1 MB minus a little: read in full, then refused as an image (not as too large)
    r = client.post("/v1/predict", content=b"\0" * (1024 * 1024 - 10))
    assert_json_error(r, 415)


# -- no files or models named by requests; no management endpoints ------------------------------------
def test_requests_cannot_name_files_or_models(client, images):
    detail = assert_json_error(client.post("/v1/predict", content=b"/etc/passwd"), 415)
    assert "root:" not in detail
    assert_json_error(client.post("/v1/predict", content=str(ROOT / "README.md").encode()), 415)
    # unknown query parameters are ignored: the model was chosen when the server started
    r = client.post("/v1/predict", content=images[0],
                    params={"model": "/tmp", "path": "/etc/passwd", "url": "http://x"})
    assert r.status_code == 200 and r.json()["model"] == "simple_cnn"
    for path in ("/static/../../../../etc/passwd", "/static/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/static/index.html",
                 "/static/..%2fapp.py", "/static/swagger/..%2f..%2fapp.py", "/v1/model/../../etc/passwd"):
        r = client.get(path)
        assert r.status_code == 404, path
        assert "root:" not in r.text


def test_only_the_documented_endpoints_exist(client):
    schema = client.get("/openapi.json").json()
    assert set(schema["paths"]) == {"/v1/predict", "/v1/model", "/healthz", "/readyz"}
    params = [p for ops in schema["paths"].values() for op in ops.values() for p in op.get("parameters", [])]
    assert [p["name"] for p in params] == ["top_k", "neighbours"]
    # whole numbers only: nothing that could name a file, URL or model
    assert all("integer" in json.dumps(p["schema"]) and "string" not in json.dumps(p["schema"]) for p in params)
    for path in ("/admin", "/shutdown", "/reload", "/v1/models", "/metrics", "/debug", "/redoc"):
        assert_json_error(client.get(path), 404)
        assert client.post(path).status_code in (404, 405)
    assert_json_error(client.delete("/v1/model"), 405)
    assert_json_error(client.get("/v1/predict"), 405)


def test_default_bind_address_is_loopback():
    import inspect

    from imgrec.cli import build_parser
    from imgrec.serve.app import serve
    args = build_parser().parse_args(["serve", "--model", "x"])
    assert args.host == "127.0.0.1" and args.port == 8000 and args.workers == 1
    assert inspect.signature(serve).parameters["host"].default == "127.0.0.1"


# -- the page and the docs work offline --------------------------------------------------------------------
_EXTERNAL = re.compile(r"""(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}""", re.I)


def test_page_is_self_contained(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert not re.search(r"<script(?![^>]*\bsrc=)", html)  # no inline scripts,
    assert not re.search(r"\son[a-z]+=", html)  # and no inline event handlers (the CSP forbids both)
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "default-src 'self'" in csp
    assert r.headers["x-content-type-options"] == "nosniff"
    refs = re.findall(r"""(?:src|href)="([^"]+)\"""", html)
    assert refs, html
    for ref in refs:
        assert not _EXTERNAL.match(ref), ref
        if ref.startswith("/"):
            assert client.get(ref).status_code == 200, ref
    for asset in ("/static/app.js", "/static/style.css"):
        text = client.get(asset).text
        assert not _EXTERNAL.search(text), asset
    assert '<label for="file-input"' in html and 'role="alert"' in html and 'name="viewport"' in html


def test_docs_work_offline(client):
    r = client.get("/docs")
    assert r.status_code == 200
    html = r.text
    if "fastapi-offline" in html:  # the optional package is missing: a page that says so, no CDN
        pytest.skip("fastapi-offline is not installed")
    refs = re.findall(r"""(?:src|href)="([^"]+)\"""", html)
    assert "/static/swagger/swagger-ui-bundle.js" in refs and "/static/docs.js" in refs
    for ref in refs:
        assert not _EXTERNAL.match(ref), ref
        if ref.startswith("/"):
            assert client.get(ref).status_code == 200, ref
    assert "validatorUrl: null" in client.get("/static/docs.js").text
    assert client.get("/openapi.json").json()["openapi"].startswith("3.")


# -- overload, timeouts, and the worker's survival ---------------------------------------------------------
@pytest.fixture()
def slow_server(classifier):
    """A server whose forward pass the test can hold (``slow.gate``), with a small queue and short timeouts."""
    slow = SlowClassifier(classifier)
    settings = ServeSettings(max_batch=2, max_wait_ms=1, queue_size=4, max_concurrent=8, timeout_s=1.0,
                             read_timeout_s=1.0, **SMALL_LIMITS)
    with LiveServer(create_app(slow, settings), settings) as s:
        yield s, slow


def test_more_requests_than_the_queue_holds_get_503_quickly(classifier, images):
    slow = SlowClassifier(classifier)
    # accepted requests wait for the held model, so the timeout is far beyond anything the test waits for
    settings = ServeSettings(max_batch=2, max_wait_ms=1, queue_size=4, max_concurrent=8, timeout_s=300.0,
                             **SMALL_LIMITS)
    with LiveServer(create_app(slow, settings), settings) as server:
        _check_overload(server, slow, classifier, images)


def _check_overload(server, slow, classifier, images):
    """24 requests at once against a held model: the queue (4 images) and the admission limit (8 requests)
    take a few, and every other request is refused with 503 while the model is still held — refusals never
    wait for the model. Once it is let go, every accepted request gets its own, correct answer."""
    slow.gate.clear()

    def one(i):
        with httpx.Client(base_url=server.url, timeout=300) as c:
            return i, c.post("/v1/predict", content=images[i % 8])

    with ThreadPoolExecutor(24) as pool:
        futures = [pool.submit(one, i) for i in range(24)]
        # at most max_concurrent (8) requests can be in progress, so at least 16 answers must come back
        # while the model is held; all of them must be refusals
        wait_until(lambda: sum(f.done() for f in futures) >= 16, "16 requests answered while the model is held")
        early = [f.result() for f in futures if f.done()]
        assert not slow.gate.is_set()
        for _, r in early:
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "1"
            assert "busy" in assert_json_error(r, 503)
        slow.gate.set()
        results = [f.result() for f in futures]
    statuses = [r.status_code for _, r in results]
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 2, statuses  # the pass that was held, and the queue behind it
    for i, r in results:
        if r.status_code == 200:  # accepted requests get their own, correct answer
            assert_same_predictions(r.json()["predictions"][0], oracle(classifier, images[i % 8]))
    with httpx.Client(base_url=server.url, timeout=30) as c:
        assert c.post("/v1/predict", content=images[0]).status_code == 200
    wait_until(lambda: server.state.active == 0 and server.state.buffered == 0, "all requests finished")


def test_inference_slower_than_the_timeout_is_504_and_the_worker_survives(slow_server, images):
    server, slow = slow_server
    slow.gate.clear()  # the model is held: an answer can only come from the 1 s timeout
    with httpx.Client(base_url=server.url, timeout=60) as c:
        r = c.post("/v1/predict", content=images[0])
        assert "did not finish" in assert_json_error(r, 504)
        assert slow.entered.is_set() and not slow.gate.is_set()  # answered while the pass was still held
        slow.gate.set()
        # the held pass ends; the same worker then serves new requests (a request that meets the end of
        # the held pass may itself still time out: poll for the first success)
        deadline = time.monotonic() + 120
        while True:
            r = c.post("/v1/predict", content=images[1])
            if r.status_code == 200 or time.monotonic() > deadline:
                break
        assert r.status_code == 200, r.text
        assert c.get("/readyz").status_code == 200
    assert server.state.batcher.alive


def test_a_body_that_never_arrives_is_408(slow_server):
    server, _ = slow_server
    head = b"POST /v1/predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\nContent-Length: 1000\r\n\r\n"
    response, _ = raw_request(server.port, head, [b"\x89PNG"])
    assert _status_of(response) == 408  # (raw_request gives up after 10 s: an answer came before that)
    # answered by the read deadline (the server's own words), not by a connection that broke early
    assert b"did not arrive within 1 s" in response, response


def test_not_ready_is_503(classifier, images):
    settings = ServeSettings(**SMALL_LIMITS)
    with LiveServer(create_app(classifier, settings), settings) as server:
        server.state.batcher.stop()  # as when shutting down or after the worker died
        with httpx.Client(base_url=server.url, timeout=30) as c:
            assert c.get("/healthz").status_code == 200  # alive, but
            assert_json_error(c.get("/readyz"), 503)  # not ready,
            assert_json_error(c.post("/v1/predict", content=images[0]), 503)  # and says so


# -- dynamic batching -------------------------------------------------------------------------------------------
def test_concurrent_requests_share_batches_and_get_their_own_rows(classifier, images):
    spy = SlowClassifier(classifier)
    # max_wait_ms is huge: a batch that waited for company that is not coming would time the client out
    settings = ServeSettings(max_batch=8, max_wait_ms=600_000, **SMALL_LIMITS)
    with LiveServer(create_app(spy, settings), settings) as server:
        spy.batch_sizes.clear()
        spy.gate.clear()  # hold the first pass so that the others queue up behind it

        def one(i):
            with httpx.Client(base_url=server.url, timeout=120) as c:
                return c.post("/v1/predict", content=images[i], params={"top_k": 10})

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(one, i) for i in range(8)]
            wait_until(lambda: spy.entered.is_set() and server.state.batcher._queued_images
                       + sum(spy.batch_sizes) >= 8, "all 8 images in the held pass or queued behind it")
            spy.gate.set()
            responses = [f.result() for f in futures]
        for i, r in enumerate(responses):
            assert r.status_code == 200, r.text
            assert_same_predictions(r.json()["predictions"][0], oracle(classifier, images[i], 10))
        assert sum(spy.batch_sizes) == 8 and max(spy.batch_sizes) <= 8
        assert max(spy.batch_sizes) >= 2, spy.batch_sizes  # the ones that queued were batched

        # a lone request does not wait max_wait_ms (10 minutes) for company that is not coming
        spy.batch_sizes.clear()
        with httpx.Client(base_url=server.url, timeout=60) as c:
            assert c.post("/v1/predict", content=images[0]).status_code == 200
        assert spy.batch_sizes == [1]


# -- the command line ------------------------------------------------------------------------------------
def _cli(capsys, *args) -> tuple[int, str]:
    """``imgrec`` in this process (these all fail before serving, so no subprocess start-up is needed)."""
    from imgrec.cli import main
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_cli_refuses_bad_models_and_settings_in_one_line(tmp_path, trained_run, capsys):
    code, err = _cli(capsys, "serve", "--model", tmp_path / "missing")
    assert code == 2 and err.count("\n") == 1 and "missing" in err and err.startswith("imgrec: error:")

    broken = tmp_path / "broken"
    broken.mkdir()
    for f in trained_run[0].iterdir():
        if f.is_file():
            (broken / f.name).write_bytes(f.read_bytes())
    weights = broken / "best.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, err = _cli(capsys, "serve", "--model", broken, "--port", "0")
    assert code == 2 and err.count("\n") == 1 and "best.safetensors" in err

    for flag, value in (("--max-batch", "0"), ("--max-upload-mb", "-1"), ("--timeout-s", "nan"),
                        ("--queue-size", "0"), ("--workers", "0"), ("--port", "70000")):
        code, err = _cli(capsys, "serve", "--model", trained_run[0], flag, value)
        assert code == 2 and err.count("\n") == 1, (flag, err)
        assert flag.lstrip("-").split("-")[0] in err, (flag, err)


def test_cli_port_in_use_is_one_line(trained_run, capsys):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        code, err = _cli(capsys, "serve", "--model", trained_run[0], "--port", taken.getsockname()[1])
    finally:
        taken.close()
    assert code == 2 and "cannot listen" in err and err.count("\n") == 1


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_cli_serves_on_loopback_and_stops_cleanly(trained_run, images, workers):
    """The real command: a free port, 127.0.0.1 only, answers (one process or several), exits 0 on Ctrl-C."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "imgrec.cli", "serve", "--model", str(trained_run[0]), "--port", "0",
                             "--workers", str(workers), "--no-access-log"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert m, line + proc.stderr.read() if proc.poll() is not None else line
        port = int(m.group(1))
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if c.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline and proc.poll() is None, "the server did not become ready"
                time.sleep(0.1)
            for image in images[:4]:  # several requests: with --workers 2 both processes get some
                assert c.post("/v1/predict", content=image).json()["model"] == "simple_cnn"
                # every process has the model's bank of training features (the thumbnails come once read)
                near = c.post("/v1/predict?neighbours=2", content=image).json()["neighbours"][0]
                assert len(near) == 2 and all(0 < n["similarity"] <= 1 and n["label"] for n in near)
        # the listening socket is bound to 127.0.0.1 only (0100007F in /proc/net/tcp)
        with open("/proc/net/tcp") as f:
            listening = [ln.split()[1] for ln in f.readlines()[1:] if ln.split()[3] == "0A"]
        assert f"0100007F:{port:04X}" in listening
        assert not any(addr.endswith(f":{port:04X}") and addr != f"0100007F:{port:04X}" for addr in listening)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stderr.read()


# -- schemathesis over the OpenAPI schema ---------------------------------------------------------------------
@pytest.mark.slow
def test_schemathesis(server):
    """Random valid and invalid requests to every operation: never a 5xx, always the documented shapes.

    Driven through Hypothesis directly: schemathesis' pytest plugin (from_fixture) does not run under pytest 9.
    """
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode
    from schemathesis import checks as sc

    checks = [sc.not_a_server_error, sc.status_code_conformance, sc.content_type_conformance,
              sc.response_schema_conformance, sc.response_headers_conformance, sc.negative_data_rejection]
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    tested = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=30, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            def run(case):
                case.call_and_validate(checks=checks)

            try:
                run()
            except Unsatisfiable:  # nothing invalid to send (an operation without parameters or body)
                continue
            tested.append((operation.label, mode.name))
    assert {label for label, _ in tested} == {"GET /healthz", "GET /readyz", "GET /v1/model", "POST /v1/predict"}
    assert ("POST /v1/predict", "NEGATIVE") in tested

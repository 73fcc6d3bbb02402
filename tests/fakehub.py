"""A Hugging Face Hub for tests: http.server on 127.0.0.1 in a thread, serving ``/{repo}/resolve/{revision}/{file}``
with the headers huggingface_hub reads (huggingface_hub/file_download.py: ``get_hf_file_metadata`` and ``http_get``):
``X-Repo-Commit``, ``X-Linked-Etag`` (an LFS file's SHA-256), ``X-Linked-Size``, ``ETag``, ``Content-Length``, and
``Range`` requests answered with 206 and ``Content-Range`` (huggingface_hub resumes a broken download with them).

``fault`` makes it misbehave as real servers and proxies do:

- ``"short-body"``: every GET promises the whole file in Content-Length, sends half of it and closes;
- ``"short-body-once"``: the first GET does that, later ones (huggingface_hub's resumes) are served whole;
- ``"short-file"``: GET serves a shorter file, with a matching Content-Length, than HEAD announced;
- ``"wrong-hash"``: GET serves other bytes of the same length under the announced SHA-256;
- ``"cdn"``: not a fault: as the Hub serves LFS files, HEAD answers 302 with the metadata and a ``Location`` on
  another host name (``localhost``: a CDN, to huggingface_hub), where GET ``/cdn/<sha256>`` serves the file.

    with FakeHub() as hub:
        hub.add("timm/x.in1k", "model.safetensors", data)
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
"""
from __future__ import annotations

import hashlib
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "1234567890abcdef1234567890abcdef12345678"
_PATH = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$")


class FakeHub:
    """The server; ``requests`` lists (method, path, Range header) of every request it answered."""

    def __init__(self, fault: str | None = None):
        self.files: dict[tuple[str, str], bytes] = {}
        self.fault = fault
        self.requests: list[tuple[str, str, str | None]] = []
        self._gets = 0
        self._lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def add(self, repo: str, filename: str, data: bytes) -> str:
        """Serve ``data`` as ``repo``'s ``filename``; returns its SHA-256 (the etag huggingface_hub names the blob by)."""
        self.files[(repo, filename)] = data
        return hashlib.sha256(data).hexdigest()

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()  # returns once serve_forever has stopped
        self.server.server_close()
        self.thread.join()

    def _body(self, data: bytes, first_get: bool) -> tuple[bytes, int]:
        """(bytes sent, Content-Length announced) of a GET of the whole file, as the fault says."""
        if self.fault == "short-body" or (self.fault == "short-body-once" and first_get):
            return data[: len(data) // 2], len(data)
        if self.fault == "short-file":
            return data[: len(data) - 1000], len(data) - 1000
        if self.fault == "wrong-hash":
            flipped = bytearray(data)
            flipped[-100:] = bytes(b ^ 0xFF for b in flipped[-100:])  # tensor bytes: the header stays valid
            return bytes(flipped), len(data)
        return data, len(data)

    def _handler(self):
        return type("Handler", (_Handler,), {"hub": self})


class _Handler(BaseHTTPRequestHandler):
    """One request to the fake hub; ``hub`` is set on a subclass per server."""

    hub: FakeHub

    def log_message(self, *args):  # quiet test output
        pass

    def _lookup(self):
        with self.hub._lock:
            self.hub.requests.append((self.command, self.path, self.headers.get("Range")))
        m = _PATH.match(self.path)
        data = self.hub.files.get((m["repo"], m["file"])) if m else None
        if self.path.startswith("/cdn/"):
            data = next((d for d in self.hub.files.values()
                         if hashlib.sha256(d).hexdigest() == self.path[5:]), None)
        if data is None:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
        return data

    def _meta_headers(self, data: bytes) -> None:
        sha = hashlib.sha256(data).hexdigest()
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{sha}"')
        self.send_header("X-Linked-Etag", f'"{sha}"')
        self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("Accept-Ranges", "bytes")

    def do_HEAD(self):
        data = self._lookup()
        if data is None:
            return
        if self.hub.fault == "cdn" and not self.path.startswith("/cdn/"):
            self.send_response(302)
            self._meta_headers(data)
            port = self.hub.server.server_address[1]
            self.send_header("Location", f"http://localhost:{port}/cdn/{hashlib.sha256(data).hexdigest()}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self._meta_headers(data)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()

    def do_GET(self):
        data = self._lookup()
        if data is None:
            return
        with self.hub._lock:
            self.hub._gets += 1
            first = self.hub._gets == 1
        start = _range_start(self.headers.get("Range"))
        if start and self.hub.fault != "short-body":
            self.send_response(206)
            self._meta_headers(data)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            body, length = data[start:], len(data) - start
        else:  # no Range, or a server that ignores it: the whole file (huggingface_hub restarts)
            self.send_response(200)
            self._meta_headers(data)
            body, length = self.hub._body(data, first)
        self.send_header("Content-Length", str(length))
        self.end_headers()
        self.wfile.write(body)
        self.wfile.flush()
        self.close_connection = True  # HTTP/1.0: a short body ends with the connection


def _range_start(header: str | None) -> int:
    m = re.match(r"bytes=(\d+)-$", header or "")
    return int(m.group(1)) if m else 0

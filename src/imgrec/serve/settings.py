"""Serving limits (``ServeSettings``): one place for every bound the HTTP server enforces."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from imgrec.errors import ConfigError
from imgrec.serve.guard import check_origin_spec

__all__ = ["ServeSettings", "MAX_TOP_K", "MAX_OTHER_FIELDS"]

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
    # GET /metrics in Prometheus' text format. Off by default: request counts and latencies tell a stranger how
    # busy the server is, so an operator turns it on where only the scraper can reach the port
    metrics: bool = False
    # where the training images are when they moved since training (``--neighbours-data``): the folder of a
    # named dataset's files, or the folder, CSV list or pack in place of the one model.json records
    neighbours_data: str | None = None
    # who may use the server from a browser (imgrec.serve.guard): requests whose Host is not 127.0.0.1,
    # localhost, [::1], the address it listens on (``bound_host``, set by ``imgrec serve``) or one of
    # ``allowed_hosts`` get 403 (DNS rebinding), and so do requests from a web page of another origin than
    # the server's own unless it is one of ``allowed_origins``; "*" in either turns that check off
    bound_host: str | None = None
    allowed_hosts: list[str] = field(default_factory=list)
    allowed_origins: list[str] = field(default_factory=list)

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
        self._check_hosts_and_origins()

    def _check_hosts_and_origins(self) -> None:
        self.allowed_hosts, self.allowed_origins = list(self.allowed_hosts), list(self.allowed_origins)
        for h in self.allowed_hosts:
            if not isinstance(h, str) or not h.strip("[]") or any(c in h for c in "/@?# \t"):
                raise ConfigError(f"allow-host: not a host name or address: {h!r} (e.g. myserver.lan, 10.0.0.5, *)")
        for o in self.allowed_origins:
            try:
                check_origin_spec(o if isinstance(o, str) else repr(o))
            except ValueError as e:
                raise ConfigError(f"allow-origin: {e}") from None

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

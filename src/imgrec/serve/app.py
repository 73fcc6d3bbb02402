"""The HTTP API and web page: ``create_app(Classifier.load("runs/x"), ServeSettings())``.

Endpoints (see /docs, served offline):

    POST /v1/predict   one or more images → top-k {label, score} per image (?neighbours=K: the nearest
                       training images too, from the model directory's bank of training features)
    GET  /v1/model     name, classes, input size, metrics, request limits
    GET  /healthz      liveness: the process answers
    GET  /readyz       readiness: the model is loaded, warmed up, and its worker runs
    GET  /             the web page (static/index.html, app.js, style.css; no external URLs)

Every request first passes the Host and Origin checks (guard.py): a Host that is not 127.0.0.1, localhost,
[::1], the listening address or one of ``--allow-host``, and a request from a web page of another origin
than ``--allow-origin`` names, get 403.

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

Where each part lives (this module builds the app from them, and keeps the names other code imports):

    settings.py  ServeSettings, the limits            schemas.py   response models, error table, http_error
    state.py     ServerState: batcher, counts          uploads.py   body limits, multipart, header checks, decode
    routes.py    the handlers and their URLs           page.py      static files, Swagger UI, security headers
    metrics.py   /metrics (Prometheus)                 runner.py    model loading, sockets, uvicorn, --workers
    neighbours.py  ?neighbours=K: the bank, the training images' thumbnails
    guard.py     Host and Origin checks: a foreign Host (DNS rebinding) or another site's page → 403
"""
from __future__ import annotations

import contextlib
import logging
import os

import anyio
import anyio.to_thread
from fastapi import FastAPI

from imgrec.serve import runner
from imgrec.serve.guard import HostOriginGuard, HostPolicy
from imgrec.serve.metrics import MetricsMiddleware, create_metrics
from imgrec.serve.neighbours import ServeNeighbours
from imgrec.serve.page import SecurityHeaders
from imgrec.serve.routes import Routes, register
from imgrec.serve.settings import ServeSettings
from imgrec.serve.state import ServerState

# Names this module held before it was split into the modules above, still imported from here by the CLI and
# the tests: re-exported, not used here.
from imgrec.serve.runner import (  # noqa: F401, E402
    _set_threads, _uvicorn_options, bind_socket, load_classifier, resolve_backend)
from imgrec.serve.uploads import decode_all as _decode_all  # noqa: F401, E402

__all__ = ["ServeSettings", "create_app", "load_classifier", "serve", "bind_socket", "app_from_env"]


def create_app(classifier, settings: ServeSettings | None = None, neighbours: ServeNeighbours | None = None) -> FastAPI:
    """A FastAPI app serving ``classifier`` (``imgrec.infer.predictor.Classifier`` or, without PyTorch,
    ``imgrec.infer.ort.OnnxClassifier``: see ``load_classifier``); ``neighbours``
    (``imgrec.serve.neighbours.open_neighbours``) answers ``?neighbours=K``, which without it is a 400.

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
    metrics = create_metrics(settings.max_batch) if settings.metrics else None
    state = ServerState(classifier, settings, metrics, neighbours)
    if metrics is not None:
        metrics.watch_queue(state.queued_images)

    app = FastAPI(title="imgrec", version=_version(), lifespan=_lifespan(state), docs_url=None, redoc_url=None,
                  description="Image classification with an imgrec model. The web page is at `/`.")
    app.state.imgrec = state  # for tests and benchmarks
    register(app, Routes(state), metrics=settings.metrics)
    # a foreign Host (DNS rebinding) or a page of another origin: 403 before any route runs
    app.add_middleware(HostOriginGuard, policy=HostPolicy(settings.bound_host, settings.allowed_hosts,
                                                          settings.allowed_origins))
    app.add_middleware(SecurityHeaders)
    # added last, so it runs first and counts every answer; an exception no handler took counts as its 500
    if metrics is not None:
        app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def _lifespan(state: ServerState):
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        # warm-up failures abort start-up: the server never listens half-loaded
        await anyio.to_thread.run_sync(state.warm_up)
        state.batcher.start()
        state.ready = True
        if state.neighbours is not None:
            # the training images are read after start-up, so the model answers meanwhile (thumbnails null)
            state.neighbours.start_reading()
        try:
            yield
        finally:
            state.ready = False
            await anyio.to_thread.run_sync(state.batcher.stop)
            if state.neighbours is not None:
                # a reader still inside torch when the interpreter exits aborts the process (SIGABRT, exit 134)
                await anyio.to_thread.run_sync(state.neighbours.finish_reading)

    return lifespan


def _version() -> str:
    from imgrec import __version__
    return __version__


def serve(model_dir: str | os.PathLike, settings: ServeSettings | None = None, *, host: str = "127.0.0.1",
          port: int = 8000, workers: int = 1, which: str = "best", device: str = "auto",
          threads: int | None = None, log_level: str = "info", access_log: bool = True,
          backend: str = "auto") -> None:
    """Load ``model_dir``, check it, and serve it until interrupted (``imgrec serve``): runner.serve with this
    module's create_app. Raises ModelFileError/ConfigError before listening when the model or the settings
    are unusable."""
    runner.serve(model_dir, settings, host=host, port=port, workers=workers, which=which, device=device,
                 threads=threads, log_level=log_level, access_log=access_log, backend=backend, make_app=create_app)


def app_from_env() -> FastAPI:
    """App factory for ``--workers N`` (uvicorn imports it in each worker process)."""
    return create_app(*runner.classifier_from_env())

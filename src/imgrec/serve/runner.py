"""Running the server: loading and checking the model, the listening socket, uvicorn's options (with a
deadline for request heads), and ``--workers`` processes.

The app itself is built by imgrec.serve.app.create_app, handed in as ``make_app``: this module sits below the
app module, which re-exports its names.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import sys
from typing import Any, Callable

from imgrec.errors import ConfigError
from imgrec.infer.backends import resolve_backend
from imgrec.serve.settings import ServeSettings
from imgrec.serve.state import blank_batch

__all__ = ["load_classifier", "load_neighbours", "bind_socket", "serve", "classifier_from_env", "resolve_backend"]

log = logging.getLogger("imgrec.serve")


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


def load_neighbours(clf, model_dir: str | os.PathLike, settings: ServeSettings, quiet: bool = False):
    """The app's nearest-training-images lookup (imgrec.serve.neighbours), or None when the model has no bank.
    What is missing is said in one line on stderr, unless ``quiet`` (the ``--workers`` processes: the parent
    said it). A broken bank costs the lookup, not the server; ``--neighbours-data`` for a model without a bank is
    a ConfigError."""
    from imgrec.errors import ModelFileError
    from imgrec.serve.neighbours import open_neighbours
    try:
        nb = open_neighbours(clf, model_dir, settings.neighbours_data)
    except ModelFileError as e:
        nb, why = None, str(e)
    else:
        why = None
    if nb is None and settings.neighbours_data:
        raise ConfigError("--neighbours-data: " + (why or "this model has no bank of training features (an exported "
                                                   "ONNX file has none; a model directory gets one from imgrec train)"))
    if not quiet and nb is not None and nb.place:
        print(f"imgrec: nearest training images' pictures from {nb.place}", file=sys.stderr, flush=True)
    elif not quiet and (why or (nb is not None and nb.missing)):
        print(f"imgrec: nearest training images unavailable: {why}" if why else
              f"imgrec: nearest training images without pictures: {nb.missing} (--neighbours-data says where "
              "the training data is)", file=sys.stderr, flush=True)
    return nb


def _set_threads(threads: int | None, workers: int, backend: str = "torch") -> int:
    """The threads for one worker process's model: set as PyTorch's when ``backend`` is torch; returned
    either way (ONNX Runtime sessions get it as their intra-op thread count)."""
    from imgrec.infer.files import usable_cores  # imgrec.device has it too, but imports torch
    n = int(threads) if threads else max(1, usable_cores() // max(1, workers))
    if backend == "torch":
        from imgrec.device import set_threads
        set_threads(n)
    return n


def classifier_from_env():
    """The classifier, settings and neighbours of one ``--workers N`` process, as the parent left them in the
    environment (imgrec.serve.app.app_from_env, which uvicorn imports in each worker process, builds the app from
    them)."""
    cfg = json.loads(os.environ[_ENV_CONFIG])
    backend = cfg.get("backend", "auto")
    n = _set_threads(cfg["threads"], cfg["workers"], resolve_backend(cfg["model"], backend))
    clf = load_classifier(cfg["model"], cfg["which"], cfg["device"], backend, n)
    settings = ServeSettings(**cfg["settings"])
    _HEADER_TIMEOUT_S[0] = float(settings.header_timeout_s)  # this worker process's protocols read it
    return clf, settings, load_neighbours(clf, cfg["model"], settings, quiet=True)


# -- connections: a deadline for the request line and headers ---------------------------------------
# uvicorn's h11 protocol starts its keep-alive timer only after a response, so a connection that sends nothing,
# or half a request line, stays open for ever: 1,030 such sockets held every connection slot (/healthz
# answered 503), and a half-sent header was still open after 45 s. This subclass gives every request head a
# deadline, from the connection's start (or the first byte after a keep-alive response) and not extended by
# further bytes, so a client dribbling one byte a second is cut off too. Bodies have their own deadline in the
# app (read_timeout_s → 408). One value per process (uvicorn builds protocols from its Config, which holds
# no custom fields): set by _uvicorn_options and, in --workers processes, by classifier_from_env.
_HEADER_TIMEOUT_S = [ServeSettings.header_timeout_s]

try:
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError:  # pragma: no cover - the serve extra is not installed: the app still works in tests
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
    except (OSError, UnicodeError, OverflowError, TypeError) as e:  # address in use, not this machine's, unknown
        sock.close()                                                  # host name, one that is not text (TypeError)
        shown = host[:100].encode("utf-8", "backslashreplace").decode()
        raise ConfigError(f"cannot listen on {shown}:{port}: {getattr(e, 'strerror', None) or e}") from None
    sock.set_inheritable(True)  # for --workers: the worker processes share it
    return sock


def serve(model_dir: str | os.PathLike, settings: ServeSettings | None = None, *, host: str = "127.0.0.1",
          port: int = 8000, workers: int = 1, which: str = "best", device: str = "auto",
          threads: int | None = None, log_level: str = "info", access_log: bool = True,
          backend: str = "auto", make_app: Callable[..., Any]) -> None:
    """Load ``model_dir``, check it, and serve ``make_app(classifier, settings)`` until interrupted
    (``imgrec serve``, through imgrec.serve.app.serve, which passes its create_app).

    ``backend``: "auto" (ONNX Runtime for a .onnx file, else PyTorch), "torch" or "onnxruntime" (the model
    directory's exported model.onnx); the batching is the same for both.

    Raises ModelFileError/ConfigError before listening when the model or the settings are unusable.
    """
    import uvicorn

    settings = dataclasses.replace(settings or ServeSettings(), bound_host=host)  # a Host the guard answers
    _check_process_options(port, workers, threads)
    n = _set_threads(threads, workers, resolve_backend(model_dir, backend))
    clf = load_classifier(model_dir, which, device, backend, n)
    # bound before anything more is said, so that a busy port is a one-line error rather than a uvicorn log line
    sock = bind_socket(host, port)
    neighbours = load_neighbours(clf, model_dir, settings)
    if host not in _LOOPBACK:
        log.warning("listening on %s: anyone who can reach this address can use the model", host)
    bound_port = sock.getsockname()[1]
    print(f"imgrec: serving {clf.name} ({len(clf.classes)} classes) from {model_dir} on "
          f"http://{host if ':' not in host else f'[{host}]'}:{bound_port}/ (API docs at /docs)", flush=True)

    options = _uvicorn_options(host, bound_port, settings, log_level, access_log)
    if workers == 1:
        server = uvicorn.Server(uvicorn.Config(make_app(clf, settings, neighbours), **options))
        server.run(sockets=[sock])
        return
    del clf, neighbours  # each worker process loads its own
    os.environ[_ENV_CONFIG] = json.dumps({"model": os.fspath(model_dir), "which": which, "device": device,
                                          "backend": backend, "threads": threads, "workers": workers,
                                          "settings": dataclasses.asdict(settings)})
    _run_workers(sock, workers, options)


def _check_process_options(port: int, workers: int, threads: int | None) -> None:
    if not 0 <= int(port) <= 65535:
        raise ConfigError(f"port must be in 0..65535, got {port}")
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, got {workers}")
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be at least 1, got {threads}")


def _run_workers(sock, workers: int, options: dict) -> None:
    """Several processes, each with its own model and batcher, sharing our socket (uvicorn.run would bind
    its own, without TCP_NODELAY): what uvicorn.run does for workers > 1, with that one difference."""
    import inspect

    import uvicorn
    from uvicorn.supervisors import Multiprocess

    # a name, not an import: each worker process imports the app module itself and builds its app there
    config = uvicorn.Config("imgrec.serve.app:app_from_env", factory=True, workers=workers, **options)
    # uvicorn < 0.30 wanted the server's run method as `target`; later versions build it themselves
    target = {"target": uvicorn.Server(config).run} if "target" in inspect.signature(Multiprocess).parameters else {}
    Multiprocess(config, sockets=[sock], **target).run()

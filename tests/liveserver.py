"""A real imgrec server for tests: uvicorn in a thread on a free 127.0.0.1 port, configured as ``imgrec serve``
configures it, a classifier that can be held at a gate, and polling for an event instead of sleeping.

Used by the HTTP tests (test_serve, test_security, test_export's ONNX serving, the browser tests)::

    from liveserver import LiveServer
    with LiveServer(create_app(classifier, settings), settings) as server:
        httpx.get(server.url + "/healthz")
"""
from __future__ import annotations

import threading
import time


class LiveServer:
    """uvicorn, configured as ``imgrec serve`` configures it, on a free 127.0.0.1 port, in a thread."""

    def __init__(self, app, settings):
        import uvicorn

        from imgrec.serve.app import _uvicorn_options, bind_socket
        self.sock = bind_socket("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = app
        options = _uvicorn_options("127.0.0.1", self.port, settings, "warning", False)
        self.server = uvicorn.Server(uvicorn.Config(app, **options))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def state(self):
        return self.app.state.imgrec

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


class SlowClassifier:
    """A real Classifier whose forward pass can be held at a gate and whose batch sizes are recorded.

    The tests hold the model with ``gate.clear()`` and let it go with ``gate.set()``: what they check then
    follows from the order of events (what was answered while the model was held), not from how fast this
    machine happens to be. ``entered`` is set when a forward pass has started.
    """

    def __init__(self, clf):
        self._clf = clf
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.batch_sizes: list[int] = []

    def __getattr__(self, name):
        return getattr(self._clf, name)

    def scored(self, batch, batch_size=256):  # what the server runs
        self.batch_sizes.append(int(batch.shape[0]))
        self.entered.set()
        assert self.gate.wait(120), "the test never opened the gate"
        return self._clf.scored(batch, batch_size)


def wait_until(condition, what: str, limit_s: float = 120.0) -> None:
    """Poll for an event (not a guess of how long it takes); the limit only turns a hang into a failure."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.005)

"""The server on the ONNX Runtime backend never imports PyTorch, and batches as it does with PyTorch.

Each test runs the server in a fresh interpreter, so that nothing the test process imported (pytest's
fixtures train the model with torch) can hide an import: one builds the app the way ``imgrec serve`` does
and checks ``sys.modules`` after serving a batch of concurrent requests; the other runs the whole
``imgrec serve`` command with torch made unimportable, as on a machine without PyTorch.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402

N_CONCURRENT = 8


@pytest.fixture(scope="module")
def exported(exported_run):
    """The session's trained simple_cnn exported to ONNX (fp32) by the library, checked against PyTorch
    (conftest.exported_run, shared with test_export.py)."""
    assert exported_run[1].check.passed
    return exported_run[0]


@pytest.fixture(scope="module")
def uploads(fmnist_arrays, tmp_path_factory):
    """Real Fashion-MNIST test images as files: PNG at 28 px, and JPEG upscaled and tinted (RGB into a gray model)."""
    _, _, xt, _ = fmnist_arrays
    root = tmp_path_factory.mktemp("serve-onnx-images")
    paths = []
    for i in range(N_CONCURRENT):
        im = Image.fromarray(xt[i])
        if i % 2:
            tint = np.array([1.0, 0.85, 0.6], np.float32)
            big = np.asarray(im.resize((96, 96), Image.Resampling.BICUBIC), np.float32)
            im = Image.fromarray((big[..., None] * tint).clip(0, 255).astype(np.uint8))
        path = root / f"{i}.{'jpg' if i % 2 else 'png'}"
        im.save(path, quality=95) if i % 2 else im.save(path)
        paths.append(path)
    return paths


def reference_top3(trained_run, paths):
    from imgrec.infer.predictor import Classifier
    clf = Classifier.load(trained_run[0], device="cpu", amp="none")  # fp32, as the exported graph
    return [clf.predict(p.read_bytes(), top_k=3) for p in paths]


def assert_same_predictions(got, want):
    assert [p["label"] for p in got] == [p["label"] for p in want]
    assert np.allclose([p["score"] for p in got], [p["score"] for p in want], atol=1e-4)


# Built as `imgrec serve --backend onnxruntime` builds it (imgrec.serve.app.serve), with the model held at a
# gate so that the concurrent requests queue behind one pass: what is checked follows from the order of events.
SERVE_APP = textwrap.dedent("""
    import json, sys, threading, time
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    import httpx
    import uvicorn

    import imgrec.cli  # everything the command imports before it runs
    from imgrec.serve.app import (ServeSettings, _set_threads, _uvicorn_options, bind_socket, create_app,
                                  load_classifier, resolve_backend)

    model, paths = sys.argv[1], [Path(p) for p in sys.argv[2:]]
    n = _set_threads(None, 1, resolve_backend(model, "onnxruntime"))
    clf = load_classifier(model, backend="onnxruntime", threads=n)


    class Gated:
        def __init__(self, clf):
            self._clf, self.gate, self.entered, self.batch_sizes = clf, threading.Event(), threading.Event(), []
            self.gate.set()

        def __getattr__(self, name):
            return getattr(self._clf, name)

        def scored(self, batch, batch_size=256):  # what the server runs
            self.batch_sizes.append(int(batch.shape[0]))
            self.batch_types.add(type(batch).__module__.split(".")[0])
            self.entered.set()
            assert self.gate.wait(120), "never opened"
            return self._clf.scored(batch, batch_size)


    def wait_until(condition, what, limit_s=120.0):  # an event, polled; the limit only turns a hang into a failure
        deadline = time.monotonic() + limit_s
        while not condition():
            assert time.monotonic() < deadline, "never happened: " + what
            time.sleep(0.005)


    spy = Gated(clf)
    spy.batch_types = set()
    settings = ServeSettings(max_batch=len(paths), max_wait_ms=600_000, max_upload_mb=1.0, max_files=4)
    app = create_app(spy, settings)
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, **_uvicorn_options("127.0.0.1", port, settings, "warning", False)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_until(lambda: server.started, "the server started")
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            assert c.get("/readyz").status_code == 200
            info = c.get("/v1/model").json()
            multipart = c.post("/v1/predict", params={"top_k": 3},
                               files=[("files", (p.name, p.read_bytes())) for p in paths[:2]])
            assert multipart.status_code == 200, multipart.text
            bad = c.post("/v1/predict", content=b"not an image at all")
        spy.batch_sizes.clear()
        spy.entered.clear()
        spy.gate.clear()  # hold the next pass: the other requests queue up behind it

        def one(path):
            with httpx.Client(base_url=url, timeout=120) as c:
                return c.post("/v1/predict", content=path.read_bytes(), params={"top_k": 3})

        state = app.state.imgrec
        with ThreadPoolExecutor(len(paths)) as pool:
            futures = [pool.submit(one, p) for p in paths]
            wait_until(lambda: spy.entered.is_set() and state.batcher._queued_images + sum(spy.batch_sizes)
                       >= len(paths), "every image in the held pass or queued behind it")
            spy.gate.set()
            responses = [f.result() for f in futures]
        batches_run = state.batcher.batches_run
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
    print(json.dumps({
        "torch_loaded": "torch" in sys.modules,
        "backend": type(clf).__name__,
        "classes": info["classes"],
        "multipart": multipart.json()["predictions"],
        "bad_status": bad.status_code,
        "statuses": [r.status_code for r in responses],
        "predictions": [r.json()["predictions"][0] if r.status_code == 200 else r.text for r in responses],
        "batch_sizes": spy.batch_sizes, "batch_types": sorted(spy.batch_types), "batches_run": batches_run,
    }))
""")


def test_server_on_onnxruntime_never_imports_torch_and_batches(exported, trained_run, uploads):
    r = subprocess.run([sys.executable, "-c", SERVE_APP, str(exported), *map(str, uploads)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["backend"] == "OnnxClassifier"
    assert not out["torch_loaded"], "serving with the ONNX Runtime backend imported torch"
    assert out["batch_types"] == ["numpy"]
    # batching: the held pass and the requests queued behind it, every image exactly once, several per pass
    assert out["statuses"] == [200] * N_CONCURRENT, out["predictions"]
    assert sum(out["batch_sizes"]) == N_CONCURRENT and 2 <= max(out["batch_sizes"]) <= N_CONCURRENT
    assert len(out["batch_sizes"]) < N_CONCURRENT
    # the answers are PyTorch's (fp32), whichever request they rode with
    want = reference_top3(trained_run, uploads)
    for got, w in zip(out["predictions"], want):
        assert_same_predictions(got, w)
    for got, w in zip(out["multipart"], want[:2]):
        assert_same_predictions(got, w)
    assert out["bad_status"] == 415
    from imgrec.infer.predictor import Classifier
    assert out["classes"] == Classifier.load(trained_run[0], device="cpu").classes


# The whole command on an interpreter where `import torch` fails, as where PyTorch is not installed.
WITHOUT_TORCH = textwrap.dedent("""
    import sys
    sys.modules["torch"] = None  # `import torch` now raises ImportError
    from imgrec.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_cli_serve_onnxruntime_runs_without_torch(exported, trained_run, uploads, tmp_path):
    d = tmp_path / "run"  # a model directory whose model.onnx is served with --backend onnxruntime
    shutil.copytree(trained_run[0], d)
    shutil.copy(exported, d / "model.onnx")
    proc = subprocess.Popen([sys.executable, "-c", WITHOUT_TORCH, "serve", "--model", str(d), "--backend",
                             "onnxruntime", "--port", "0", "--no-access-log", "--max-wait-ms", "50"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        line = proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert m, line + (proc.stderr.read() if proc.poll() is not None else "")
        with httpx.Client(base_url=f"http://127.0.0.1:{m.group(1)}", timeout=60) as c:
            deadline = time.monotonic() + 120
            while True:  # readiness is an event the server reports, polled; the limit only turns a hang into a failure
                try:
                    if c.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline and proc.poll() is None, "the server did not become ready"
                time.sleep(0.1)
            r = c.post("/v1/predict", params={"top_k": 3},
                       files=[("files", (p.name, p.read_bytes())) for p in uploads[:4]])
            assert r.status_code == 200, r.text
            got = r.json()["predictions"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stderr.read()
    for g, w in zip(got, reference_top3(trained_run, uploads[:4])):
        assert_same_predictions(g, w)


def test_cli_serve_torch_backend_without_torch_is_one_line(exported, tmp_path):
    """Where PyTorch is missing, the PyTorch backend says so in one line and points to the exported model."""
    from conftest import assert_clean_error
    r = subprocess.run([sys.executable, "-c", WITHOUT_TORCH, "serve", "--model", str(tmp_path), "--backend", "torch",
                        "--port", "0"], capture_output=True, text=True, timeout=120)
    assert_clean_error(r, "torch", "--backend onnxruntime")

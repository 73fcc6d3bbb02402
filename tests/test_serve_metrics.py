"""GET /metrics (Prometheus text format): request counts by route and status, the predict latency histogram,
batch sizes, queue depth and requests in progress; off by default; and the route handlers called without HTTP.

Every count checked follows from the requests the test sent and the order of events (a model held at a
gate), never from how fast this machine is.
"""
from __future__ import annotations

import asyncio
import io
import json
import sys
import threading
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("fastapi")
prometheus = pytest.importorskip("prometheus_client")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from imgrec.infer.base import BasePredictor  # noqa: E402
from imgrec.serve.app import ServeSettings, create_app, load_classifier  # noqa: E402
from liveserver import LiveServer, SlowClassifier, wait_until  # noqa: E402


@pytest.fixture(scope="module")
def classifier(trained_run):
    return load_classifier(trained_run[0], device="cpu")


@pytest.fixture(scope="module")
def pngs(fmnist_arrays):
    out = []
    for i in range(3):
        buf = io.BytesIO()
        Image.fromarray(fmnist_arrays[2][i]).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """Prometheus text → {(sample name, sorted labels): value}."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def requests_of(got, route: str, status: int) -> float:
    return got.get(("imgrec_http_requests_total", (("route", route), ("status", str(status)))), 0.0)


def test_metrics_count_requests_latency_batches_and_queue(classifier, pngs):
    with TestClient(create_app(classifier, ServeSettings(metrics=True)), base_url="http://127.0.0.1") as client:
        two = client.post("/v1/predict", files=[("files", (f"{i}.png", pngs[i], "image/png")) for i in range(2)])
        one = client.post("/v1/predict", content=pngs[2], headers={"content-type": "image/png"})
        bad = client.post("/v1/predict", content=b"not an image at all")
        assert (two.status_code, one.status_code, bad.status_code) == (200, 200, 415)
        assert client.get("/healthz").status_code == 200
        assert client.get("/no/such/page").status_code == 404
        r = client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        got = samples(r.text)
        assert "/metrics" not in client.get("/openapi.json").json()["paths"]

    assert requests_of(got, "/v1/predict", 200) == 2 and requests_of(got, "/v1/predict", 415) == 1
    assert requests_of(got, "/healthz", 200) == 1
    assert requests_of(got, "unmatched", 404) == 1  # by route template, never the raw path
    assert got[("imgrec_predict_latency_seconds_count", ())] == 3  # every predict request, errors included
    # one pass per good request (each was answered before the next was sent): 2 images, then 1; the
    # warm-up passes are not counted
    assert got[("imgrec_batch_size_count", ())] == 2 and got[("imgrec_batch_size_sum", ())] == 3
    assert got[("imgrec_batch_size_bucket", (("le", "1.0"),))] == 1
    assert got[("imgrec_batch_size_bucket", (("le", "2.0"),))] == 2
    assert got[("imgrec_queue_images", ())] == 0
    assert got[("imgrec_http_requests_in_progress", ())] == 1  # the scrape itself


def test_two_apps_in_one_process_keep_their_own_counts(classifier, pngs):
    with TestClient(create_app(classifier, ServeSettings(metrics=True)), base_url="http://127.0.0.1") as a, \
            TestClient(create_app(classifier, ServeSettings(metrics=True)), base_url="http://127.0.0.1") as b:
        assert a.post("/v1/predict", content=pngs[0]).status_code == 200
        assert requests_of(samples(a.get("/metrics").text), "/v1/predict", 200) == 1
        assert requests_of(samples(b.get("/metrics").text), "/v1/predict", 200) == 0


def test_queue_depth_and_requests_in_progress_while_the_model_is_held(classifier, pngs):
    httpx = pytest.importorskip("httpx")
    slow = SlowClassifier(classifier)
    settings = ServeSettings(metrics=True)
    with LiveServer(create_app(slow, settings), settings) as server:
        slow.entered.clear()
        slow.gate.clear()  # the first request's pass waits here; the second queues behind it
        answers: list = []

        def post(data: bytes) -> None:
            answers.append(httpx.post(server.url + "/v1/predict", content=data, timeout=120).status_code)

        first = threading.Thread(target=post, args=(pngs[0],))
        first.start()
        wait_until(slow.entered.is_set, "the first request's pass started")
        second = threading.Thread(target=post, args=(pngs[1],))
        second.start()
        try:
            wait_until(lambda: server.state.queued_images() == 1, "the second request queued")
            got = samples(httpx.get(server.url + "/metrics", timeout=30).text)
        finally:
            slow.gate.set()
            first.join(120)
            second.join(120)
        assert got[("imgrec_queue_images", ())] == 1
        assert got[("imgrec_http_requests_in_progress", ())] == 3  # the two held requests and the scrape
        assert answers == [200, 200]
        after = samples(httpx.get(server.url + "/metrics", timeout=30).text)
    assert after[("imgrec_queue_images", ())] == 0
    assert requests_of(after, "/v1/predict", 200) == 2 and after[("imgrec_predict_latency_seconds_count", ())] == 2
    assert after[("imgrec_batch_size_count", ())] == 2


def test_metrics_are_off_by_default(classifier):
    with TestClient(create_app(classifier, ServeSettings()), base_url="http://127.0.0.1") as client:
        r = client.get("/metrics")
        assert r.status_code == 404 and isinstance(r.json()["detail"], str)


def test_without_prometheus_client_metrics_is_a_json_404_and_the_rest_works(classifier, pngs, monkeypatch):
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # `import prometheus_client` raises ImportError
    with TestClient(create_app(classifier, ServeSettings(metrics=True)), base_url="http://127.0.0.1") as client:
        r = client.get("/metrics")
        assert r.status_code == 404 and "prometheus-client" in r.json()["detail"]
        assert client.post("/v1/predict", content=pngs[0]).status_code == 200


# -- the handlers without HTTP -------------------------------------------------------------------------
class StubClassifier(BasePredictor):
    """Three classes and fixed outputs: what the server's forward pass and answer are built from."""

    def __init__(self, probs, ood=None, multilabel=False, thresholds=None, unknown_threshold=None):
        self.meta = SimpleNamespace(name="stub", metrics={"val_acc": 0.5, "note": "free text"})
        self.classes, self.channels, self.image_size = ["cat", "dog", "owl"], 1, 4
        self.multilabel, self.thresholds, self.unknown_threshold = multilabel, thresholds, unknown_threshold
        self.unknown = {"score": "msp"} if unknown_threshold is not None else None
        self._probs, self._ood = np.asarray(probs, np.float32), ood

    def scored(self, batch, batch_size=256):
        return self._probs[:len(batch)], None if self._ood is None else np.asarray(self._ood[:len(batch)])


def _rows(clf, n: int):
    from imgrec.serve.state import ServerState
    return ServerState(clf, ServeSettings()).run_batch(np.zeros((n, 1, 4, 4), np.uint8))


def test_predict_answer_top_k_multilabel_and_unknown_without_http():
    from imgrec.serve.routes import predict_answer
    clf = StubClassifier([[0.2, 0.7, 0.1], [0.5, 0.25, 0.25]], ood=[0.2, 0.9], unknown_threshold=0.5)
    answer = predict_answer(clf, _rows(clf, 2), [[], ["a note"]], top_k=2)
    assert answer["predictions"] == [[{"label": "dog", "score": pytest.approx(0.7)},
                                      {"label": "cat", "score": pytest.approx(0.2)}],
                                     [{"label": "cat", "score": 0.5}, {"label": "dog", "score": 0.25}]]  # ties: class order
    assert answer["unknown"] == [True, False] and answer["ood_scores"] == pytest.approx([0.2, 0.9])
    assert list(answer) == ["model", "predictions", "input_notes", "unknown", "ood_scores"]
    # multi-label: every label at or above its own threshold, best first, possibly none
    ml = StubClassifier([[0.6, 0.31, 0.95], [0.1, 0.2, 0.3]], multilabel=True, thresholds=[0.5, 0.3, 0.99])
    answer = predict_answer(ml, _rows(ml, 2), [[], []], top_k=None)
    assert [[p["label"] for p in image] for image in answer["predictions"]] == [["cat", "dog"], []]
    assert "unknown" not in answer


def test_route_handlers_called_directly():
    from starlette.exceptions import HTTPException

    from imgrec.serve.routes import Routes
    from imgrec.serve.state import ServerState
    clf = StubClassifier([[0.2, 0.7, 0.1]])
    routes = Routes(ServerState(clf, ServeSettings(max_files=3)), static={}, swagger={})
    assert asyncio.run(routes.healthz()) == {"status": "ok"}
    with pytest.raises(HTTPException) as e:
        asyncio.run(routes.readyz())  # the batcher was never started
    assert e.value.status_code == 503
    info = json.loads(asyncio.run(routes.model_info()).body)
    assert info["classes"] == ["cat", "dog", "owl"] and info["limits"]["max_files"] == 3
    assert info["metrics"] == {"val_acc": 0.5}  # numbers only
    with pytest.raises(HTTPException) as e:
        asyncio.run(routes.metrics())  # this state has no metrics
    assert e.value.status_code == 404


def test_cli_flags_reach_the_settings(monkeypatch):
    """`imgrec serve --metrics --accept-rate 0.9` hands those to the server's settings; the default is off."""
    import imgrec.serve.app as app_mod
    from imgrec.cli import build_parser
    seen = []
    monkeypatch.setattr(app_mod, "serve", lambda model, settings, **kw: seen.append(settings))
    for argv, metrics, rate, unknown in ((["--metrics", "--accept-rate", "0.9"], True, 0.9, True),
                                         ([], False, None, True), (["--no-unknown"], False, None, False)):
        args = build_parser().parse_args(["serve", "--model", "x", *argv])
        assert args.func(args) == 0
        s = seen[-1]
        assert (s.metrics, s.accept_rate, s.unknown) == (metrics, rate, unknown)

"""Host and Origin checks of ``imgrec serve`` (imgrec.serve.guard): a foreign Host header (DNS rebinding) and
a request from another site's page get 403 with a JSON message; this machine's names, the address the server
listens on, same-origin requests and what --allow-host / --allow-origin name are answered. The page itself
keeps working (tests/test_serve_browser.py drives it in Chromium)."""
from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from conftest import assert_clean_error, run_cli  # noqa: E402
from imgrec.serve.app import ServeSettings, create_app  # noqa: E402
from imgrec.serve.guard import HostPolicy  # noqa: E402
from liveserver import LiveServer  # noqa: E402


@pytest.fixture(scope="module")
def classifier(trained_run):
    from imgrec.infer import Classifier
    return Classifier.load(trained_run[0], device="cpu")


@pytest.fixture(scope="module")
def png(fmnist_arrays):
    buf = io.BytesIO()
    Image.fromarray(fmnist_arrays[2][0]).save(buf, format="PNG")
    return buf.getvalue()


def _refused(r, *needles):
    assert r.status_code == 403, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    detail = r.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail
    for n in needles:
        assert n in detail, detail


def _predict(c, png, **headers):
    return c.post("/v1/predict", files=[("files", ("a.png", png, "image/png"))], headers=headers)


def test_live_server_refuses_foreign_host_and_cross_origin_post(classifier, png):
    settings = ServeSettings()
    with LiveServer(create_app(classifier, settings), settings) as s, httpx.Client(base_url=s.url, timeout=60) as c:
        port = s.port
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST", "localhost."):
            assert c.get("/healthz", headers={"host": host}).status_code == 200, host
        for host in (f"evil.example:{port}", "evil.example", "127.0.0.1.evil.example", "10.1.2.3", "localhost.evil"):
            _refused(c.get("/v1/model", headers={"host": host}), "not this server's")
            _refused(c.get("/", headers={"host": host}))
            _refused(_predict(c, png, host=host))
        # the page's own requests (a browser sends Origin on a POST) are answered; another site's are not
        same = _predict(c, png, origin=f"http://127.0.0.1:{port}")
        assert same.status_code == 200 and same.json()["predictions"]
        for origin in ("http://evil.example", f"http://localhost:{port + 1}", f"https://127.0.0.1:{port}", "null",
                       "http://127.0.0.1"):
            _refused(_predict(c, png, origin=origin), "cross-origin", "--allow-origin")
        assert c.get("/readyz").status_code == 200 and c.get("/").status_code == 200


def test_a_request_without_a_usable_host_is_refused():
    policy = HostPolicy()
    scope = {"type": "http", "scheme": "http"}
    assert policy.refusal(scope, {})[0] == "the request has no valid Host header"
    for bad in (b"a b", b"[::1", b"host:99999", b"user@127.0.0.1", b"127.0.0.1/x"):
        assert policy.refusal(scope, {b"host": bad})[0], bad


def test_allow_host_and_allow_origin_widen_the_checks(classifier, png):
    settings = ServeSettings(allowed_hosts=["imgrec.lan"], allowed_origins=["https://app.example:8443"])
    with TestClient(create_app(classifier, settings), base_url="http://imgrec.lan") as c:
        assert c.get("/v1/model").status_code == 200
        _refused(c.get("/v1/model", headers={"host": "other.lan"}))
        r = _predict(c, png, origin="https://app.example:8443")
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://app.example:8443"
        pre = c.options("/v1/predict", headers={"origin": "https://app.example:8443",
                                                "access-control-request-method": "POST"})
        assert pre.status_code == 204 and "POST" in pre.headers["access-control-allow-methods"]
        _refused(_predict(c, png, origin="https://app.example"))  # another port: another origin
        assert "access-control-allow-origin" not in c.get("/v1/model").headers  # same-origin: no CORS headers
    anything = ServeSettings(allowed_hosts=["*"], allowed_origins=["*"])
    with TestClient(create_app(classifier, anything), base_url="http://whatever.example") as c:
        assert _predict(c, png, origin="http://elsewhere.example").status_code == 200


def test_listening_on_every_address_answers_ip_hosts_not_names(classifier):
    settings = ServeSettings(bound_host="0.0.0.0")
    with TestClient(create_app(classifier, settings), base_url="http://192.168.7.9:8000") as c:
        assert c.get("/healthz").status_code == 200
        assert c.get("/healthz", headers={"host": "[fe80::1]:8000"}).status_code == 200
        _refused(c.get("/healthz", headers={"host": "rebound.example:8000"}))
    with TestClient(create_app(classifier, ServeSettings(bound_host="192.168.7.9")),
                    base_url="http://192.168.7.9:8000") as c:
        assert c.get("/healthz").status_code == 200
        _refused(c.get("/healthz", headers={"host": "192.168.7.10:8000"}))


@pytest.mark.parametrize("option,value,needle", [
    ("--allow-origin", "evil.example", "not an origin"), ("--allow-origin", "ftp://x.example", "not an origin"),
    ("--allow-origin", "https://x.example/path", "not an origin"), ("--allow-host", "a/b", "allow-host"),
    ("--allow-host", "", "allow-host")])
def test_bad_allow_options_are_one_line(trained_run, option, value, needle):
    r = run_cli("serve", "--model", trained_run[0], option, value, "--port", "0")
    assert_clean_error(r, needle)


def test_settings_travel_to_worker_processes():
    """--workers N hands the settings to each process as JSON (runner.app_from_env): the lists survive."""
    import dataclasses
    import json
    s = ServeSettings(bound_host="0.0.0.0", allowed_hosts=["a.lan"], allowed_origins=["http://b.lan:3000"])
    again = ServeSettings(**json.loads(json.dumps(dataclasses.asdict(s))))
    assert again == s
    assert np.all([again.allowed_hosts == ["a.lan"], again.allowed_origins == ["http://b.lan:3000"]])

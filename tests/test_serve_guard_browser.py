"""The Host and Origin checks in a real browser (Chromium via Playwright): the page works when opened as
127.0.0.1 or localhost, its own POSTs carry its origin and are answered; a page of another origin cannot use
the API (its POST is refused with 403 and it reads nothing) unless that origin is allowed with
--allow-origin, and then it reads the answer through the CORS headers."""
from __future__ import annotations

import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("fastapi")

from PIL import Image  # noqa: E402

from imgrec.serve.app import ServeSettings, create_app, load_classifier  # noqa: E402
from liveserver import LiveServer  # noqa: E402

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@pytest.fixture(scope="module")
def clf(trained_run):
    return load_classifier(trained_run[0])


@pytest.fixture(scope="module")
def png(fmnist_arrays):
    buf = io.BytesIO()
    Image.fromarray(fmnist_arrays[2][0]).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def other_site():
    """Another origin on this machine (a second port): a blank page to run scripts in."""
    class Blank(BaseHTTPRequestHandler):
        def do_GET(self):
            body = b"<!doctype html><title>another site</title><p>another site</p>"
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Blank)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    t.join(10)


@pytest.fixture()
def browser():
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield b
        b.close()


# the page of the other site posts an image to the server and reports what it could read
POST_FROM_PAGE = """async ([url, bytes]) => {
    const form = new FormData();
    form.append("files", new Blob([new Uint8Array(bytes)], {type: "image/png"}), "a.png");
    try {
        const r = await fetch(url + "/v1/predict", {method: "POST", body: form});
        return {status: r.status, body: await r.text()};
    } catch (e) {
        return {error: String(e)};
    }
}"""


@pytest.mark.parametrize("name", ["127.0.0.1", "localhost"])
def test_the_page_works_under_this_machines_names(browser, clf, png, name):
    settings = ServeSettings()
    with LiveServer(create_app(clf, settings), settings) as server:
        page = browser.new_page()
        posts = []
        page.on("response", lambda r: posts.append(r) if r.request.method == "POST" else None)
        page.goto(f"http://{name}:{server.port}/")
        sync_api.expect(page.locator("#model-line")).to_contain_text("simple_cnn")
        page.set_input_files("#file-input", files=[{"name": "a.png", "mimeType": "image/png", "buffer": png}])
        sync_api.expect(page.locator("#predictions li")).to_have_count(5)
        assert page.locator("#error").is_hidden()
        assert [r.status for r in posts] == [200]
        assert posts[0].request.all_headers().get("origin") == f"http://{name}:{server.port}"  # checked, and same


class Answers:
    """ASGI wrapper that records (method, path, status) of every answer the app gives."""

    def __init__(self, app):
        self.app, self.seen = app, []

    async def __call__(self, scope, receive, send):
        async def record(message):
            if message["type"] == "http.response.start":
                self.seen.append((scope["method"], scope["path"], message["status"]))
            await send(message)
        await self.app(scope, receive, record) if scope["type"] == "http" else await self.app(scope, receive, send)


def test_another_sites_page_cannot_use_the_api(browser, clf, png, other_site):
    settings = ServeSettings()
    app = Answers(create_app(clf, settings))
    with LiveServer(app, settings) as server:
        page = browser.new_page()
        page.goto(other_site + "/")
        got = page.evaluate(POST_FROM_PAGE, [server.url, list(png)])
        assert "error" in got  # nothing read: no CORS headers
        # and the server refused the request itself, before running the model
        assert [a for a in app.seen if a[1] == "/v1/predict"] == [("POST", "/v1/predict", 403)]


def test_an_allowed_origin_reads_the_answer(browser, clf, png, other_site):
    settings = ServeSettings(allowed_origins=[other_site])
    with LiveServer(create_app(clf, settings), settings) as server:
        page = browser.new_page()
        page.goto(other_site + "/")
        got = page.evaluate(POST_FROM_PAGE, [server.url, list(png)])
        assert got.get("status") == 200, got
        assert '"predictions"' in got["body"]

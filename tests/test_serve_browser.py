"""The web page in a real browser: Debian's Chromium driven by Playwright loads the page from a live
server, uploads an image, reads the predicted label and the training images it looks like, and saves
screenshots (desktop and phone size).

Set IMGREC_SCREENSHOTS=/some/dir to keep the screenshots; they go to pytest's tmp_path otherwise.
Playwright never downloads a browser here: it is pointed at /usr/bin/chromium.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from urllib.parse import urlsplit

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")
pytest.importorskip("fastapi")

from PIL import Image  # noqa: E402

from imgrec.serve.app import ServeSettings, create_app, load_classifier  # noqa: E402
from imgrec.serve.runner import load_neighbours  # noqa: E402
from liveserver import LiveServer, wait_until  # noqa: E402

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


@pytest.fixture(scope="module")
def live(trained_run):
    """The page's server as ``imgrec serve`` builds it, the nearest training images included (their pictures
    are read in the background after start-up: the fixture waits for that)."""
    clf = load_classifier(trained_run[0])
    settings = ServeSettings(max_upload_mb=1.0)
    neighbours = load_neighbours(clf, trained_run[0], settings)
    with LiveServer(create_app(clf, settings, neighbours), settings) as server:
        wait_until(lambda: neighbours.info()["pictures_ready"], "the training images read")
        yield server, clf


@pytest.fixture(scope="module")
def sample(fmnist_arrays, live):
    """The test image the model is surest about, as PNG bytes, with the library's own top-5 for it."""
    _, clf = live
    _, _, xt, _ = fmnist_arrays
    best = None
    for i in range(20):
        buf = io.BytesIO()
        Image.fromarray(xt[i]).save(buf, format="PNG")
        preds = clf.predict(buf.getvalue(), top_k=5)
        if best is None or preds[0]["score"] > best[1][0]["score"]:
            best = (buf.getvalue(), preds)
    return best


@pytest.fixture()
def page(live):
    server, _ = live
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1024, "height": 720})
        pg = context.new_page()
        pg.problems = []  # console errors, page errors, and any request that leaves the server
        pg.on("console", lambda m: pg.problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        pg.on("pageerror", lambda e: pg.problems.append(f"page error: {e}"))

        def only_this_server(route):
            if urlsplit(route.request.url).netloc != urlsplit(server.url).netloc and \
                    not route.request.url.startswith(("data:", "blob:")):
                pg.problems.append(f"external request: {route.request.url}")
                return route.abort()
            return route.continue_()

        pg.route("**/*", only_this_server)
        yield pg
        browser.close()


def _shots(tmp_path) -> Path:
    out = Path(os.environ.get("IMGREC_SCREENSHOTS") or tmp_path)
    out.mkdir(parents=True, exist_ok=True)
    return out


def test_upload_shows_the_top5_labels(page, live, sample, tmp_path):
    server, _ = live
    png, want = sample
    page.goto(server.url + "/")
    sync_api.expect(page.locator("#model-line")).to_contain_text("simple_cnn")
    page.set_input_files("#file-input", files=[{"name": "sample.png", "mimeType": "image/png", "buffer": png}])
    items = page.locator("#predictions li")
    sync_api.expect(items).to_have_count(5)
    labels = [t.strip() for t in page.locator("#predictions .label").all_text_contents()]
    assert labels == [p["label"] for p in want]
    first_pct = page.locator("#predictions li").first.locator(".pct").text_content()
    assert first_pct == f"{want[0]['score'] * 100:.1f}%"
    sync_api.expect(page.locator("#timing")).to_contain_text("ms")
    sync_api.expect(page.locator("#preview")).to_be_visible()
    assert page.locator("#error").is_hidden()
    page.screenshot(path=str(_shots(tmp_path) / "serve-page-desktop.png"), full_page=True)
    assert not page.problems, page.problems


def test_bad_file_shows_an_error_in_words(page, live, tmp_path):
    server, _ = live
    page.goto(server.url + "/")
    page.set_input_files("#file-input", files=[{"name": "notes.png", "mimeType": "image/png",
                                                "buffer": b"these are my notes, not a picture"}])
    error = page.locator("#error")
    sync_api.expect(error).to_be_visible()
    sync_api.expect(error).to_contain_text("not an image")
    assert page.locator("#predictions").is_hidden()
    page.screenshot(path=str(_shots(tmp_path) / "serve-page-error.png"), full_page=True)
    # console errors here would only be the 415 itself, which the page reports in words
    assert not [p for p in page.problems if "415" not in p], page.problems


def test_phone_size_and_keyboard(page, live, sample, tmp_path):
    server, _ = live
    png, want = sample
    page.set_viewport_size({"width": 375, "height": 740})
    page.goto(server.url + "/")
    # the page fits the phone's width: nothing scrolls sideways
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    # the file chooser is the first thing Tab reaches, and its focus is visible on its label
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "file-input"
    outline = page.evaluate("getComputedStyle(document.querySelector('label[for=file-input]')).outlineStyle")
    assert outline != "none"
    # the focused element is a real, enabled <input type=file>, so Space and Enter open the browser's own chooser.
    # Opening it is Chromium's behaviour, not this page's: headless Chromium sometimes never reports the chooser
    # for a synthesised Space (a fresh-clone `make test` under load timed out waiting for it once in 3 runs, at
    # this line), so the file goes to the focused input directly.
    assert page.evaluate("(e => e.type === 'file' && !e.disabled)(document.activeElement)")
    page.set_input_files("#file-input:focus", files=[{"name": "sample.png", "mimeType": "image/png", "buffer": png}])
    sync_api.expect(page.locator("#predictions li")).to_have_count(5)
    assert page.locator("#predictions .label").first.text_content() == want[0]["label"]
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    page.screenshot(path=str(_shots(tmp_path) / "serve-page-phone.png"), full_page=True)
    assert not page.problems, page.problems


def test_paste_and_drop(page, live, sample):
    server, _ = live
    png, want = sample
    page.goto(server.url + "/")
    sync_api.expect(page.locator("#model-line")).to_contain_text("simple_cnn")
    # a drop and a paste are synthesised with a real File built from the same bytes
    for event in ("drop", "paste"):
        page.evaluate("""([event, bytes]) => {
            const file = new File([new Uint8Array(bytes)], "x.png", {type: "image/png"});
            const dt = new DataTransfer();
            dt.items.add(file);
            const e = event === "drop" ? new DragEvent("drop", {dataTransfer: dt, bubbles: true, cancelable: true})
                                       : new ClipboardEvent("paste", {clipboardData: dt, bubbles: true, cancelable: true});
            document.getElementById("drop-zone").dispatchEvent(e);
            document.getElementById("predictions").replaceChildren();
        }""", [event, list(png)])
        sync_api.expect(page.locator("#predictions li")).to_have_count(5)
        assert page.locator("#predictions .label").first.text_content() == want[0]["label"]
    assert not page.problems, page.problems


def test_docs_page_renders_offline(page, live, tmp_path):
    server, _ = live
    page.goto(server.url + "/docs")
    sync_api.expect(page.locator(".swagger-ui .opblock-summary-path").first).to_be_visible(timeout=20_000)
    paths = page.locator(".opblock-summary-path").all_text_contents()
    assert any("/v1/predict" in p for p in paths)
    page.screenshot(path=str(_shots(tmp_path) / "serve-docs.png"))
    assert not page.problems, page.problems


def test_noise_is_answered_unknown_on_the_page(page, live, sample, tmp_path):
    import numpy as np
    server, clf = live
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8)).save(buf, format="PNG")
    assert clf.unknown_threshold is not None  # the served model answers "unknown"
    page.goto(server.url + "/")
    page.set_input_files("#file-input", files=[{"name": "noise.png", "mimeType": "image/png", "buffer": buf.getvalue()}])
    unknown = page.locator("#unknown")
    sync_api.expect(unknown).to_be_visible()
    sync_api.expect(unknown).to_contain_text("Unknown")
    sync_api.expect(page.locator("#predictions li")).to_have_count(5)  # the closest labels stay listed
    page.screenshot(path=str(_shots(tmp_path) / "serve-page-unknown.png"), full_page=True)
    # a real image afterwards clears it
    page.set_input_files("#file-input", files=[{"name": "sample.png", "mimeType": "image/png", "buffer": sample[0]}])
    sync_api.expect(page.locator("#timing")).to_contain_text("ms")
    sync_api.expect(unknown).to_be_hidden()
    assert not page.problems, page.problems


def test_the_training_images_it_looks_like(page, live, sample, tmp_path):
    """Under the answer, the 6 nearest training images: thumbnails (data: URIs the page's Content-Security-Policy
    allows) with their label as alt text, label and similarity, the same as the API answers."""
    import httpx
    server, _ = live
    png, _ = sample
    want = httpx.post(server.url + "/v1/predict?neighbours=6",
                      files=[("files", ("s.png", png, "image/png"))], timeout=30).json()["neighbours"][0]
    page.goto(server.url + "/")
    sync_api.expect(page.locator("#model-line")).to_contain_text("simple_cnn")
    page.set_input_files("#file-input", files=[{"name": "sample.png", "mimeType": "image/png", "buffer": png}])
    panel = page.locator("#neighbours")
    sync_api.expect(panel).to_be_visible()
    sync_api.expect(panel.locator("h3")).to_have_text("Looks like (training images)")
    images = panel.locator("#neighbours-list img")
    sync_api.expect(images).to_have_count(6)
    assert [img.get_attribute("alt") for img in images.all()] == [n["label"] for n in want]
    assert [t.strip() for t in panel.locator(".label").all_text_contents()] == [n["label"] for n in want]
    assert panel.locator(".sim").first.text_content() == f"similarity {want[0]['similarity']:.3f}"
    # every thumbnail was decoded (a blocked or broken image has no natural size)
    sync_api.expect(images.last).to_have_js_property("complete", True)
    assert page.evaluate("[...document.querySelectorAll('#neighbours-list img')].every(i => i.naturalWidth > 0)")
    page.screenshot(path=str(_shots(tmp_path) / "neighbours.png"), full_page=True)
    # an error afterwards hides the panel with the rest of the answer
    page.set_input_files("#file-input", files=[{"name": "x.png", "mimeType": "image/png", "buffer": b"not a picture"}])
    sync_api.expect(page.locator("#error")).to_be_visible()
    assert panel.is_hidden()
    assert not [p for p in page.problems if "415" not in p], page.problems

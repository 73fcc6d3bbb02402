"""The web page says next to the answer how the image differs from the training images (the server's
``input_notes``), and says nothing for an image like them. A real browser, as in test_serve_browser."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from test_serve_browser import live, page, sample, sync_api  # noqa: F401  (fixtures; skips without chromium)

pytestmark = pytest.mark.browser


def test_notes_appear_under_the_answer_only_when_the_image_differs(page, live, sample):  # noqa: F811
    server, _ = live
    buf = io.BytesIO()
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (427, 640, 3), dtype=np.uint8)).save(buf, "PNG")
    page.goto(server.url + "/")
    sync_api.expect(page.locator("#model-line")).to_contain_text("simple_cnn")
    page.set_input_files("#file-input", files=[{"name": "photo.png", "mimeType": "image/png",
                                                "buffer": buf.getvalue()}])
    sync_api.expect(page.locator("#predictions li")).to_have_count(5)
    notes = page.locator("#input-notes li")
    sync_api.expect(notes.first).to_contain_text("colour image into a model trained on grey images")
    sync_api.expect(page.locator("#input-notes")).to_contain_text("640×427")

    png, _ = sample  # a 28×28 grey test image: like the training images, no notes
    page.set_input_files("#file-input", files=[{"name": "sample.png", "mimeType": "image/png", "buffer": png}])
    # choosing a file hides the last answer at once (before the request): wait for the new one
    sync_api.expect(page.locator("#preview-caption")).to_contain_text("sample.png")
    sync_api.expect(page.locator("#predictions")).to_be_visible()
    sync_api.expect(page.locator("#input-notes")).to_be_hidden()
    assert not page.problems, page.problems

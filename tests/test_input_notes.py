"""input_notes: how an input differs much from the training images (imgrec.infer.inputs), from the model's
recorded training image sizes or, without them, its input size and channels; and the server's
``input_notes`` field next to each answer."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from imgrec.infer.inputs import image_info, input_notes
from imgrec.modeldir import ModelMeta


def _meta(channels=1, size=28, sizes=None) -> ModelMeta:
    data = {"image_sizes": sizes} if sizes is not None else {}
    return ModelMeta(model={"name": "simple_cnn"}, classes=["a", "b"], image_size=size, channels=channels,
                     mean=[0.5] * channels, std=[0.25] * channels, data=data)


PHOTOS = {"min_side": 41, "max_side": 394, "aspect_min": 0.66, "aspect_max": 1.5, "channels_seen": 3}
GREY28 = {"min_side": 28, "max_side": 28, "aspect_min": 1.0, "aspect_max": 1.0, "channels_seen": 1}


def test_like_the_training_data_gives_no_note():
    assert input_notes(_meta(1, 28, GREY28), (28, 28), "L") == []
    assert input_notes(_meta(3, 64, PHOTOS), (640, 427), "RGB") == []  # 427 px is within 41–394 × 3
    assert input_notes(_meta(1, 28), (50, 60), "L") == []  # no recorded sizes: judged against 28 px only


def test_colour_into_a_grey_model():
    (note,) = input_notes(_meta(1, 28, GREY28), (28, 28), "RGB")
    assert "colour image into a model trained on grey images" in note
    # a grey model trained on colour images (--channels 1): colour is what it saw
    assert input_notes(_meta(1, 28, {**GREY28, "channels_seen": 3}), (28, 28), "RGB") == []
    assert "grey image into a model trained on colour" in input_notes(_meta(3, 64, PHOTOS), (100, 100), "L")[0]


def test_much_larger_or_smaller_and_far_aspect():
    notes = input_notes(_meta(1, 28, GREY28), (640, 427), "L")
    assert notes == ["640×427: 15× larger than the training images (28 px), resized to 28×28",
                     "aspect ratio 1.50 far from the training images' 1.00, squashed to a square"]
    (small,) = input_notes(_meta(3, 64, PHOTOS), (12, 12), "RGB")
    assert small == "12×12: 3× smaller than the training images (41–394 px), resized to 64×64"
    (wide,) = input_notes(_meta(3, 64, PHOTOS), (400, 100), "RGB")
    assert wide.startswith("aspect ratio 4.00 far from the training images' 0.66–1.50")
    # without recorded sizes: the model's input size, and no judgement of aspect
    assert input_notes(_meta(1, 28), (400, 100), "L") == \
        ["400×100: 4× larger than the model's input (28 px), resized to 28×28"]


def test_image_info_reads_the_header_of_files_and_bytes(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((30, 50, 3), np.uint8)).save(buf, format="JPEG")
    assert image_info(buf.getvalue()) == (50, 30, "RGB")
    Image.fromarray(np.zeros((7, 9), np.uint8)).save(tmp_path / "g.png")
    assert image_info(tmp_path / "g.png") == (9, 7, "L")
    assert image_info(b"not an image") is None and image_info(tmp_path / "missing.png") is None


def test_serve_answers_carry_input_notes(trained_run, fmnist_arrays):
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    from imgrec.serve.app import ServeSettings, create_app, load_classifier

    def png(arr) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        return buf.getvalue()

    grey = png(fmnist_arrays[2][0])
    colour = png(np.random.RandomState(0).randint(0, 256, (427, 640, 3), dtype=np.uint8))
    app = create_app(load_classifier(trained_run[0], device="cpu"), ServeSettings())
    with TestClient(app, base_url="http://127.0.0.1") as client:
        r = client.post("/v1/predict", files=[("files", ("a.png", grey, "image/png")),
                                              ("files", ("b.png", colour, "image/png"))])
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["predictions"]) == 2 and len(body["input_notes"]) == 2
    assert body["input_notes"][0] == []
    notes = " ".join(body["input_notes"][1])
    assert "colour image" in notes and "640×427" in notes and "28 px" in notes

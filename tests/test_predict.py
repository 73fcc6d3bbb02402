"""Classifier.load(...).predict(...): inputs of every kind, sorted scores, identical after reloading."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from imgrec import Classifier, evaluate
from imgrec.errors import ImageDecodeError, ModelFileError


@pytest.fixture(scope="module")
def sample_images(tmp_path_factory, fmnist_arrays):
    _, _, xt, yt = fmnist_arrays
    d = tmp_path_factory.mktemp("imgs")
    paths = []
    for i in range(6):
        p = d / f"{i}_{yt[i]}.png"
        Image.fromarray(xt[i]).save(p)
        paths.append(p)
    return paths, xt[:6], yt[:6]


def test_predict_sorted_topk_and_labels(trained_run, sample_images):
    out, _ = trained_run
    paths, _, labels = sample_images
    clf = Classifier.load(out)
    res = clf.predict(str(paths[0]), top_k=3)
    assert len(res) == 3 and [set(r) for r in res] == [{"label", "score"}] * 3
    scores = [r["score"] for r in res]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001
    assert all(r["label"] in clf.classes for r in res)
    many = clf.predict([str(p) for p in paths], top_k=10)
    assert len(many) == 6 and all(abs(sum(r["score"] for r in p) - 1) < 1e-4 for p in many)
    # a model well above chance gets most of these real test images right
    correct = sum(p[0]["label"] == clf.classes[int(y)] for p, y in zip(many, labels))
    assert correct >= 4


def test_same_scores_for_every_input_kind_and_after_reload(trained_run, sample_images):
    out, _ = trained_run
    paths, arrays, _ = sample_images
    a = Classifier.load(out)
    ref = a.predict(str(paths[1]), top_k=10)
    as_bytes = a.predict(paths[1].read_bytes(), top_k=10)
    as_pil = a.predict(Image.open(paths[1]), top_k=10)
    as_np = a.predict(arrays[1], top_k=10)
    as_tensor = a.predict(torch.from_numpy(arrays[1])[None], top_k=10)
    b = Classifier.load(out)
    again = b.predict(str(paths[1]), top_k=10)
    for other in (as_bytes, as_pil, as_np, as_tensor, again):
        assert other == ref


def test_rgb_input_to_grayscale_model(trained_run, sample_images):
    out, _ = trained_run
    paths, arrays, _ = sample_images
    rgb = np.repeat(arrays[2][:, :, None], 3, axis=2)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    clf = Classifier.load(out)
    assert clf.predict(buf.getvalue(), top_k=10) == clf.predict(str(paths[2]), top_k=10)


def test_bad_inputs(trained_run, tmp_path):
    out, _ = trained_run
    clf = Classifier.load(out)
    with pytest.raises(ImageDecodeError):
        clf.predict(b"")
    (tmp_path / "x.png").write_text("hello")
    with pytest.raises(ImageDecodeError):
        clf.predict(str(tmp_path / "x.png"))
    with pytest.raises(ModelFileError, match="missing model.json"):
        Classifier.load(tmp_path)
    with pytest.raises(ModelFileError, match="no such model directory"):
        Classifier.load(tmp_path / "nope")


def test_eval_matches_logits(trained_run, fmnist_arrays):
    out, summary = trained_run
    _, _, xt, yt = fmnist_arrays
    clf = Classifier.load(out)
    res = evaluate(clf, torch.from_numpy(xt)[:, None], torch.from_numpy(yt)).metrics
    assert res["top1"] == pytest.approx(summary["test_acc"])
    assert res["n"] == 10000 and sum(sum(r) for r in res["confusion_matrix"]) == 10000

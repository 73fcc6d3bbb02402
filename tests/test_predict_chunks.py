"""Folders that span several chunks, predicted by a model with flip-TTA and the "unknown" score (the
combination the small-data default produces): every image gets the answer it gets alone.

Regression for issue 36: on a CPU ``predict_files`` runs chunks side by side in threads, and the forward
hooks that read the tapped layers' statistics for the multi-layer "unknown" score belonged to the module,
so one chunk's statistics were overwritten by another chunk's pass (80 files: a 64-image chunk beside a
16-image one crashed under flip-TTA; chunks of equal size silently got each other's scores).
"""
from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import run_cli

CHUNK = 8


@pytest.fixture(scope="module")
def tta_unknown_run(trained_run, tmp_path_factory):
    """The shared trained model with flip-TTA switched on; it keeps its multi-layer "unknown" score."""
    d = tmp_path_factory.mktemp("tta-unknown") / "run"
    shutil.copytree(trained_run[0], d)
    meta = json.loads((d / "model.json").read_text())
    meta["inference"]["tta_flip"] = True
    (d / "model.json").write_text(json.dumps(meta))
    assert meta["inference"]["unknown"]["score"] == "mahalanobis_layers" and meta["inference"]["unknown"]["layers"]
    return d


@pytest.fixture(scope="module")
def images(fmnist_arrays, tmp_path_factory):
    """80 real test images of mixed sizes and modes (grey PNG, tinted colour JPEG), and a few noise images
    (answered "unknown")."""
    _, _, xt, _ = fmnist_arrays
    root = tmp_path_factory.mktemp("chunk-images")
    rng = np.random.default_rng(0)
    for i in range(80):
        if i % 10 == 9:
            Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(root / f"{i:03d}.png")
        elif i % 3 == 1:
            big = np.asarray(Image.fromarray(xt[i]).resize((40, 33)), np.float32)[..., None]
            Image.fromarray((big * np.array([1.0, 0.8, 0.6], np.float32)).astype(np.uint8)).save(
                root / f"{i:03d}.jpg", quality=92)
        else:
            Image.fromarray(xt[i]).save(root / f"{i:03d}.png")
    return sorted(root.iterdir())


@pytest.fixture
def two_threads():
    """Two intra-op threads: predict_files runs two chunks side by side (imgrec.infer.files.cpu_streams)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def alone(tta_unknown_run, images):
    """Each image's answer predicted on its own (one file, one chunk, nothing beside it)."""
    from imgrec.infer import Classifier
    clf = Classifier.load(tta_unknown_run, device="cpu", amp="none")
    return {str(f): clf.predict_files([f], top_k=3, batch_size=1, warn=False).entries()[0] for f in images}


def _assert_same(got: list[dict], alone: dict, threshold: float):
    assert [g["file"] for g in got] == sorted(g["file"] for g in got)
    assert any(g["unknown"] for g in got) or len(got) < 10  # the noise images are among them
    for g in got:
        a = alone[g["file"]]
        assert [p["label"] for p in g["predictions"]] == [p["label"] for p in a["predictions"]], g["file"]
        assert np.allclose([p["score"] for p in g["predictions"]], [p["score"] for p in a["predictions"]],
                           atol=1e-5), g["file"]
        assert g["ood_score"] == pytest.approx(a["ood_score"], rel=1e-4, abs=1e-4), g["file"]
        if abs(a["ood_score"] - threshold) > 1e-3:
            assert g["unknown"] == a["unknown"], g["file"]


@pytest.mark.parametrize("n", [1, CHUNK, CHUNK + 1, CHUNK + 5, 3 * CHUNK + 3, 80],
                         ids=["one", "a-chunk", "chunk+1", "chunk+partial", "several-chunks", "80"])
def test_every_batch_shape_answers_as_one_image_alone(n, tta_unknown_run, images, alone, two_threads):
    from imgrec.infer import Classifier
    clf = Classifier.load(tta_unknown_run, device="cpu", amp="none")
    assert clf.tta_flip and clf.unknown_score is not None
    res = clf.predict_files(images[:n], top_k=3, batch_size=CHUNK, warn=False)
    assert len(res.results) == n and not res.skipped
    _assert_same(res.entries(), alone, clf.unknown_threshold)


def test_cli_predict_a_folder_of_80_images(tta_unknown_run, images, alone, two_threads):
    """The reported crash: `imgrec predict` on a folder of 80 files (its default chunk of 64, then 16)."""
    from imgrec.infer import Classifier
    r = run_cli("predict", "--model", tta_unknown_run, images[0].parent, "--json", "--top-k", "3",
                "--device", "cpu", "--amp", "none")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert len(got) == 80
    _assert_same(got, alone, Classifier.load(tta_unknown_run, device="cpu").unknown_threshold)


def test_layer_taps_keep_only_the_passes_of_their_own_thread():
    """A pass of the same network on another thread while the taps are open is not recorded by them."""
    from imgrec.infer.unknown import LayerTaps
    from imgrec.models import create_model
    torch.manual_seed(0)
    model = create_model("simple_cnn", num_classes=3, in_chans=1, image_size=28).eval()
    mine, theirs = torch.rand(2, 1, 28, 28), torch.rand(5, 1, 28, 28)
    other_started, other_done = threading.Event(), threading.Event()

    def other_pass():
        other_started.wait(timeout=60)
        with torch.inference_mode():
            model.forward_features(theirs)
        other_done.set()

    t = threading.Thread(target=other_pass)
    t.start()
    with torch.inference_mode(), LayerTaps(model, ["features.1", "features.4"]) as taps:
        model.forward_features(mine)
        other_started.set()
        assert other_done.wait(timeout=60)
        stats = taps.stats()
    t.join()
    assert [s.shape[0] for s in stats] == [2, 2]
    with torch.inference_mode(), LayerTaps(model, ["features.1", "features.4"]) as taps:
        model.forward_features(mine)
        want = taps.stats()
    assert all(torch.equal(a, b) for a, b in zip(stats, want))

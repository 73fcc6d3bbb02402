"""predict_files on a CPU: whole batches run side by side (streams), large images in smaller passes, and the
results, their order and the bad-image rules are those of one batch after the other."""
from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from imgrec.errors import ImageDecodeError
from imgrec.infer.files import cpu_pass_size, cpu_streams, run_batches


# -- the pieces -----------------------------------------------------------------------------------------
def test_cpu_streams_and_pass_size():
    assert cpu_streams(1) == (1, 1)
    assert cpu_streams(2) == (2, 1)
    assert cpu_streams(16) == (4, 4)  # at most 4 batches in flight; the other cores as each one's threads
    assert cpu_pass_size(28, 64) == 64  # small images: the batch as asked
    assert cpu_pass_size(224, 64) == 8 and cpu_pass_size(224, 4) == 4 and cpu_pass_size(4096, 64) == 1


def test_run_batches_keeps_order_and_runs_batches_at_once():
    both_running = threading.Barrier(2, timeout=60)  # passes only when two calls of `run` are in flight together

    def run(images):
        if images[0] < 2:
            both_running.wait()
        return [v * 10 for v in images]

    batches = [([f"f{i}"], [i]) for i in range(7)]
    out = list(run_batches(iter(batches), run, streams=2))
    assert out == [([f"f{i}"], [i * 10]) for i in range(7)]
    assert list(run_batches(iter(batches), lambda im: im, streams=1)) == batches


def test_run_batches_raises_in_order():
    def run(images):
        if images[0] == 3:
            raise ValueError("model failed on batch 3")
        return images

    seen = []
    with pytest.raises(ValueError, match="batch 3"):
        for files, _ in run_batches(iter([([i], [i]) for i in range(8)]), run, streams=3):
            seen.append(files[0])
    assert seen == [0, 1, 2]  # the batches before the failing one were handed back, in order

    def decode_errors():
        yield ["a"], [0]
        raise ImageDecodeError("unreadable", "b.png")

    with pytest.raises(ImageDecodeError, match="b.png"):
        list(run_batches(decode_errors(), lambda im: im, streams=2))


# -- Classifier and OnnxClassifier ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folder(fmnist_arrays, tmp_path_factory):
    """30 real test images (PNG and upscaled, tinted JPEG) with two unreadable files among them."""
    _, _, xt, _ = fmnist_arrays
    root = tmp_path_factory.mktemp("streams")
    for i in range(30):
        im = Image.fromarray(xt[i])
        if i % 2:
            big = np.asarray(im.resize((96, 96), Image.Resampling.BICUBIC), np.float32)[..., None]
            Image.fromarray((big * np.array([1.0, 0.8, 0.6], np.float32)).astype(np.uint8)).save(
                root / f"{i:03d}.jpg", quality=92)
        else:
            im.save(root / f"{i:03d}.png")
    (root / "008.png").write_bytes(b"not an image")
    (root / "020.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    return root


def _check_against_one_stream(predict, folder):
    one = predict(decode_threads=0, streams=1)
    many = predict(decode_threads=3, streams=None)
    assert [r["file"] for r in many.results] == [r["file"] for r in one.results] == \
        sorted(str(p) for p in folder.iterdir() if p.name not in ("008.png", "020.png"))
    for a, b in zip(many.results, one.results):  # fp32: the same labels and scores whatever ran beside them
        assert [p["label"] for p in a["predictions"]] == [p["label"] for p in b["predictions"]]
        assert np.allclose([p["score"] for p in a["predictions"]], [p["score"] for p in b["predictions"]], atol=1e-5)
    assert [s[0] for s in many.skipped] == [str(folder / "008.png"), str(folder / "020.png")]


def test_classifier_streams_match_one_batch_at_a_time(trained_run, folder, monkeypatch):
    from imgrec.infer import base
    from imgrec.infer.predictor import Classifier
    clf = Classifier.load(trained_run[0], device="cpu", amp="none")
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # two streams of one thread each, whatever this machine has
    try:
        calls = []
        real = base.run_batches

        def spy(batches, run, streams):
            calls.append(streams)
            return real(batches, run, streams)

        monkeypatch.setattr(base, "run_batches", spy)  # the loop both backends share

        def predict(decode_threads, streams):
            if streams == 1:
                torch.set_num_threads(1)
            try:
                return clf.predict_files([folder], top_k=3, batch_size=4, on_bad_image="skip", warn=False,
                                         decode_threads=decode_threads)
            finally:
                torch.set_num_threads(2)

        _check_against_one_stream(predict, folder)
        assert calls == [1, 2]
        assert torch.get_num_threads() == 2  # lowered to one per stream during the call, restored after
        with pytest.raises(ImageDecodeError, match="008.png"):  # the first bad file in input order
            clf.predict_files([folder], batch_size=3)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_onnx_classifier_streams_match_one_batch_at_a_time(trained_run, folder, tmp_path):
    pytest.importorskip("onnxruntime")
    from imgrec.infer.export import export_model
    from imgrec.infer.ort import OnnxClassifier
    path = export_model(trained_run[0], tmp_path / "m.onnx", check_limit=200).path
    clients = {1: OnnxClassifier(path, device="cpu", threads=1), None: OnnxClassifier(path, device="cpu", threads=2)}

    def predict(decode_threads, streams):
        return clients[streams].predict_files([folder], top_k=3, batch_size=4, on_bad_image="skip", warn=False,
                                              decode_threads=decode_threads)

    _check_against_one_stream(predict, folder)
    with pytest.raises(ImageDecodeError, match="008.png"):
        clients[None].predict_files([folder], batch_size=3)


def test_large_images_go_through_in_smaller_passes(tmp_path, fmnist_arrays):
    """A 224 px model on a CPU runs passes of 8 images however large ``batch_size`` is; results unchanged."""
    from imgrec.infer.predictor import Classifier
    from imgrec.modeldir import ModelMeta, RunDir, write_meta
    from imgrec.models import create_model
    from imgrec.safeio import save_weights
    torch.manual_seed(0)
    model = create_model("lenet5", num_classes=4, in_chans=1, image_size=224)
    d = tmp_path / "big"
    d.mkdir()
    save_weights(RunDir(d).weights("best"), model.state_dict())
    write_meta(d, ModelMeta(model={"name": "lenet5", "kwargs": {}}, classes=list("abcd"), image_size=224,
                            channels=1, mean=[0.5], std=[0.25]))
    images = tmp_path / "imgs"
    images.mkdir()
    for i in range(20):
        Image.fromarray(fmnist_arrays[2][i]).resize((224, 224)).save(images / f"{i:02d}.png")
    clf = Classifier.load(d, device="cpu", amp="none")
    sizes = []
    real = clf.probabilities
    clf.probabilities = lambda batch, batch_size=256: sizes.append(len(batch)) or real(batch, batch_size)
    res = clf.predict_files([images], top_k=2, batch_size=64)
    assert sorted(sizes, reverse=True) == [8, 8, 4]
    clf.probabilities = real
    want = clf.predict([str(images / f"{i:02d}.png") for i in range(20)], top_k=2)
    assert [r["predictions"][0]["label"] for r in res.results] == [w[0]["label"] for w in want]
    shutil.rmtree(images)


def test_cli_predict_amp_none_gives_fp32_scores(trained_run, folder):
    """``imgrec predict --amp none`` runs PyTorch in fp32 (the benchmark's "PyTorch fp32" rows rely on it)."""
    import json

    from conftest import run_cli
    from imgrec.infer.predictor import Classifier
    r = run_cli("predict", "--model", trained_run[0], folder, "--amp", "none", "--on-bad-image", "skip", "--json",
                "--top-k", "2", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    want = Classifier.load(trained_run[0], device="cpu", amp="none").predict_files(
        [folder], top_k=2, on_bad_image="skip", warn=False).entries()  # unreadable files keep an error row
    assert [g["file"] for g in got] == [w["file"] for w in want]
    for g, w in zip(got, want):
        assert [p["label"] for p in g["predictions"]] == [p["label"] for p in w["predictions"]]
        assert np.allclose([p["score"] for p in g["predictions"]], [p["score"] for p in w["predictions"]], atol=1e-5)

"""The "unknown" answer end to end: fitted by `imgrec train`, stored in the model directory without pickle,
and returned by the Python API, `imgrec predict`, the server's JSON, the web page and the exported ONNX graph.

The model is the shared one trained on a Fashion-MNIST subset (conftest.trained_run); out-of-distribution
images are uniform noise, which no class of it looks like.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_clean_error, run_cli


def _noise(n: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 1, 28, 28), dtype=np.uint8))


@pytest.fixture(scope="module")
def clf(trained_run):
    from imgrec.infer import Classifier
    return Classifier.load(trained_run[0], device="cpu", amp="none")


@pytest.fixture(scope="module")
def folder(tmp_path_factory, fmnist_arrays):
    """Two test images and two noise images as files."""
    _, _, xt, yt = fmnist_arrays
    root = tmp_path_factory.mktemp("unknown")
    for i in range(2):
        Image.fromarray(xt[i]).save(root / f"real{i}.png")
        Image.fromarray(_noise(1, seed=i)[0, 0].numpy()).save(root / f"noise{i}.png")
    return root


def test_train_stores_the_score_and_threshold(trained_run):
    from imgrec.infer.ood import load_stats
    from imgrec.modeldir import read_meta
    out, summary = trained_run
    entry = read_meta(out).unknown
    assert entry["score"] == "mahalanobis_layers" and entry["accept_rate"] == 0.95
    assert entry["layers"] and all(isinstance(n, str) for n in entry["layers"])  # features.i of simple_cnn
    assert entry["threshold"] == summary["unknown_threshold"]
    table = entry["val_quantiles"]
    assert table == sorted(table) and table[0] <= entry["threshold"] <= table[-1]
    from safetensors.numpy import load_file
    arrays = load_file(str(out / entry["file"]))
    assert "bank" not in arrays  # only what the score reads: class means, precisions, standardisation
    for prefix in [""] + [f"layer{i}." for i in range(len(entry["layers"]))]:
        d = arrays[prefix + "means"].shape[1]
        assert arrays[prefix + "precision"].shape == (d, d) and arrays[prefix + "means"].shape[0] == 10
        assert arrays[prefix + "loc_scale"][1] > 0
    assert (out / entry["file"]).stat().st_size < 2_000_000


def test_noise_is_unknown_and_test_images_are_answered(clf, fmnist_arrays):
    _, _, xt, _ = fmnist_arrays
    test = torch.from_numpy(xt[:1000])[:, None]
    _, s_in = clf.scored(test)
    _, s_out = clf.scored(_noise(300))
    t = clf.unknown_threshold
    accepted = float((s_in >= t).mean())
    assert 0.88 <= accepted <= 1.0, accepted  # 95% of the validation images; the test split is alike
    assert float((s_out < t).mean()) >= 0.9
    # a lower accept rate turns more test images away; None turns "unknown" off
    clf.set_accept_rate(0.5)
    try:
        assert float((s_in >= clf.unknown_threshold).mean()) < accepted - 0.2
    finally:
        clf.set_accept_rate(0.95)
    assert clf.unknown_threshold == pytest.approx(clf.unknown["threshold"])
    clf.set_accept_rate(None)
    try:
        assert clf.scored(test[:4])[1] is None
    finally:
        clf.set_accept_rate(0.95)


def test_predict_files_marks_unknown(clf, folder):
    out = clf.predict_files([folder], top_k=3)
    by_name = {Path(r["file"]).name: r for r in out.results}
    assert by_name["noise0.png"]["unknown"] and by_name["noise1.png"]["unknown"]
    assert all(isinstance(r["ood_score"], float) and len(r["predictions"]) == 3 for r in out.results)


def test_cli_predict_answers_unknown(trained_run, folder, tmp_path):
    model = str(trained_run[0])
    r = run_cli("predict", "--model", model, str(folder), "--json")
    assert r.returncode == 0, r.stderr
    rows = {Path(e["file"]).name: e for e in json.loads(r.stdout)}
    assert rows["noise0.png"]["unknown"] is True and "ood_score" in rows["noise0.png"]
    table = run_cli("predict", "--model", model, str(folder / "noise0.png"))
    assert "answer" in table.stdout and "unknown (score" in table.stdout
    off = run_cli("predict", "--model", model, str(folder), "--json", "--no-unknown")
    assert all("unknown" not in e for e in json.loads(off.stdout))
    csv_path = tmp_path / "p.csv"
    run_cli("predict", "--model", model, str(folder), "--csv", str(csv_path))
    assert csv_path.read_text().splitlines()[0].endswith(",unknown,ood_score")
    bad = run_cli("predict", "--model", model, str(folder), "--accept-rate", "1.5")
    assert_clean_error(bad, "accept-rate")


def test_a_broken_statistics_file_is_one_line(trained_run, tmp_path):
    import shutil
    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    (run / "ood.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    r = run_cli("predict", "--model", str(run), str(run / "model.json"))
    assert_clean_error(r, "ood.safetensors")
    meta = json.loads((run / "model.json").read_text())
    meta["inference"]["unknown"]["file"] = "../elsewhere.safetensors"
    (run / "model.json").write_text(json.dumps(meta))
    r = run_cli("predict", "--model", str(run), str(run / "model.json"))
    assert_clean_error(r, "plain file name")


def test_serve_json_and_model_info(clf, folder):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from imgrec.serve.app import ServeSettings, create_app
    files = [("files", ("n.png", (folder / "noise0.png").read_bytes(), "image/png")),
             ("files", ("r.png", (folder / "real0.png").read_bytes(), "image/png"))]
    with TestClient(create_app(clf, ServeSettings()), base_url="http://127.0.0.1") as client:
        body = client.post("/v1/predict", files=files).json()
        assert body["unknown"][0] is True and len(body["ood_scores"]) == 2
        info = client.get("/v1/model").json()
        assert info["unknown"]["score"] == "mahalanobis_layers"
    with TestClient(create_app(clf, ServeSettings(unknown=False)), base_url="http://127.0.0.1") as client:
        body = client.post("/v1/predict", files=files).json()
        assert "unknown" not in body and client.get("/v1/model").json()["unknown"] is None
    clf.set_accept_rate(0.95)


def test_onnx_graph_computes_the_same_score(trained_run, clf, folder, tmp_path):
    pytest.importorskip("onnxruntime")
    from imgrec.infer.export import export_model
    from imgrec.infer.ort import OnnxClassifier
    path = tmp_path / "m.onnx"
    res = export_model(trained_run[0], path, check_limit=300)
    assert res.check.max_dood is not None and res.check.max_dood <= 1e-3 and res.check.unknown_agreement == 1.0
    onnx_clf = OnnxClassifier(path)
    x = torch.cat([_noise(8), torch.from_numpy(np.stack([np.asarray(Image.open(folder / "real0.png"))]))[:, None]])
    _, ref = clf.scored(x)
    _, got = onnx_clf.scored(x.numpy())
    assert np.allclose(got, ref, rtol=1e-3, atol=1e-3)
    assert onnx_clf.unknown_threshold == pytest.approx(clf.unknown_threshold)
    r = run_cli("predict", "--model", str(path), str(folder), "--json")
    rows = {Path(e["file"]).name: e for e in json.loads(r.stdout)}
    assert rows["noise0.png"]["unknown"] is True


def test_each_score_kind_fits_and_answers(trained_run, clf, fmnist_arrays, tmp_path):
    """Every score imgrec can store works through the same path (fit, save, load, score)."""
    import shutil
    from imgrec.infer import Classifier
    from imgrec.infer.unknown import fit_unknown
    from imgrec.modeldir import read_meta, write_meta
    x, y, xt, _ = fmnist_arrays
    train, labels = torch.from_numpy(x[:2000])[:, None], torch.from_numpy(y[:2000]).long()
    for kind in ("msp", "energy", "knn", "mahalanobis", "mahalanobis_layers"):
        run = tmp_path / kind
        shutil.copytree(trained_run[0], run)
        meta = read_meta(run)
        meta.inference["unknown"] = fit_unknown(clf, run, train, labels, torch.from_numpy(xt[:500])[:, None], kind=kind)
        write_meta(run, meta)
        c = Classifier.load(run, device="cpu", amp="none")
        _, s_in = c.scored(torch.from_numpy(xt[500:800])[:, None])
        _, s_out = c.scored(_noise(100))
        assert c.unknown["score"] == kind and np.isfinite(s_in).all() and np.isfinite(s_out).all()
        assert 0.8 <= float((s_in >= c.unknown_threshold).mean()) <= 1.0, kind


def test_model_json_refuses_a_bad_unknown_entry():
    from imgrec.errors import ModelFileError
    from imgrec.modeldir import ModelMeta
    base = dict(model={"name": "lenet5"}, classes=["a", "b"], image_size=28, channels=1, mean=[0.5], std=[0.5])
    good = {"score": "energy", "threshold": 1.5, "accept_rate": 0.9, "val_quantiles": [0.0, 1.0, 2.0]}
    ModelMeta(**base, inference={"unknown": good}).check()
    for bad in ({**good, "score": "vibes"}, {**good, "threshold": float("nan")}, {**good, "accept_rate": 0},
                {**good, "score": "knn", "file": "/etc/passwd"}, {**good, "val_quantiles": ["x"]}):
        with pytest.raises(ModelFileError, match="inference.unknown"):
            ModelMeta(**base, inference={"unknown": bad}).check()


# -- the training images behind an answer ------------------------------------------------------------
def test_a_training_image_is_its_own_nearest_neighbour(trained_run, clf):
    from imgrec.eval.neighbours import Neighbours
    from imgrec.modeldir import read_meta
    entry = read_meta(trained_run[0]).inference["neighbours"]
    finder = Neighbours(clf, trained_run[0])
    assert entry["rows"] == len(finder.bank) and (trained_run[0] / entry["file"]).is_file()
    rows = [0, len(finder.bank) // 2, len(finder.bank) - 1]
    idx = [int(finder.bank.index[r]) for r in rows]
    found = finder.lookup(finder.train_images[idx], 4)
    for want, near in zip(idx, found):
        assert near[0]["index"] == want and near[0]["similarity"] == pytest.approx(1.0, abs=2e-3)
        sims = [nb["similarity"] for nb in near]
        assert sims == sorted(sims, reverse=True) and all(nb["label"] in clf.classes for nb in near)


def test_explain_neighbours_cli(trained_run, folder, tmp_path):
    out = tmp_path / "x.png"
    r = run_cli("explain", "--model", str(trained_run[0]), str(folder / "real0.png"), "--out", str(out),
                "--neighbours", "5", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert len(s["neighbours"]) == 5 and Path(s["neighbours_out"]).is_file()
    assert Image.open(s["neighbours_out"]).size[0] > 500
    assert_clean_error(run_cli("explain", "--model", str(trained_run[0]), str(folder / "real0.png"), "--out",
                               str(out), "--neighbours", "0"), "--neighbours")


def test_embed_files_and_a_split(trained_run, folder, tmp_path):
    model = str(trained_run[0])
    r = run_cli("embed", "--model", model, str(folder), "--out", str(tmp_path / "e.npy"))
    assert r.returncode == 0, r.stderr
    a = np.load(tmp_path / "e.npy", allow_pickle=False)
    index = (tmp_path / "e.index.csv").read_text().splitlines()
    assert a.shape[0] == 4 and len(index) == 5 and index[0] == "row,file"
    assert np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-5)
    # the same rows as the Python API's features, normalised
    from imgrec.infer import Classifier
    c = Classifier.load(model, device="cpu")
    f = c.logits_and_features(c.load_image(index[1].split(",", 1)[1])[None])[1].numpy()
    assert np.allclose(a[0], f[0] / np.linalg.norm(f[0]), atol=1e-4)
    r = run_cli("embed", "--model", model, "--split", "val", "--out", str(tmp_path / "v.safetensors"), "--json")
    assert r.returncode == 0, r.stderr
    from safetensors.numpy import load_file
    arrays = load_file(str(tmp_path / "v.safetensors"))
    assert arrays["features"].shape[0] == json.loads(r.stdout)["rows"] == len(arrays["labels"])
    assert_clean_error(run_cli("embed", "--model", model, str(folder), "--out", str(tmp_path / "e.txt")), ".npy")
    assert_clean_error(run_cli("embed", "--model", model, str(folder), "--split", "val", "--out",
                               str(tmp_path / "e.npy")), "not both")


def test_one_validation_pass_chooses_the_same_temperature_and_threshold(trained_run, fmnist_arrays, tmp_path):
    """`imgrec train` forwards the validation images once for the temperature and the "unknown" score; what it
    chooses is what two passes of their own choose."""
    import shutil
    from types import SimpleNamespace

    from imgrec.engine.choices import choose_temperature, choose_unknown, validation_pass
    from imgrec.modeldir import read_meta, write_meta
    x, y, xt, yt = fmnist_arrays
    split = lambda a, b: SimpleNamespace(images=torch.from_numpy(a)[:, None], labels=torch.from_numpy(b).long())
    bundle = SimpleNamespace(train=split(x[:3000], y[:3000]), val=split(xt[:600], yt[:600]))
    dev = torch.device("cpu")
    chosen = []
    for shared_pass in (False, True):
        run = tmp_path / f"shared{shared_pass}"
        shutil.copytree(trained_run[0], run)
        meta = read_meta(run)
        shared = validation_pass(run, bundle, dev, "none") if shared_pass else None
        t = choose_temperature(run, bundle, meta, dev, "none", shared)
        write_meta(run, meta)
        th = choose_unknown(run, bundle, meta, dev, "none", 0.95, shared)
        if shared_pass:
            assert shared[0].temperature == t != 1.0  # the score reads through the temperature chosen after the pass
        chosen.append((t, th))
    (t0, th0), (t1, th1) = chosen
    assert t1 == pytest.approx(t0, rel=1e-4) and th1 == pytest.approx(th0, rel=1e-4, abs=1e-4)

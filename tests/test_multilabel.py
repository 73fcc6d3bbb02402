"""Multi-label classification on real data: Fashion-MNIST images tiled two at a time into one image labelled
with both classes, written as a ``path,labels,split`` CSV; metrics checked against scikit-learn.

One small model is trained once for the module (a few hundred 28×56 images, 4 labels, 4 epochs).
"""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from imgrec.errors import ConfigError, DatasetError, ModelFileError

sk = pytest.importorskip("sklearn.metrics")

LABELS = {1: "trouser", 2: "pullover", 7: "sneaker", 8: "bag"}  # Fashion-MNIST class → label


def tiled_csv(root, x, y, n_train=480, n_test=120, seed=0):
    """Each image: two Fashion-MNIST images of different classes side by side (one in five has a black half),
    labelled with the classes it shows, e.g. ``img/3.png,bag;trouser,train``."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    pools = {c: np.nonzero(y == c)[0] for c in LABELS}
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = ["path,labels,split"]
    for i in range(n_train + n_test):
        a, b = rng.choice(list(LABELS), 2, replace=False)
        left = x[rng.choice(pools[a])]
        right = x[rng.choice(pools[b])] if rng.random() > 0.2 else np.zeros_like(left)
        labels = {LABELS[a]} | ({LABELS[b]} if right.any() else set())
        if rng.random() < 0.5:
            left, right = right, left
        Image.fromarray(np.concatenate([left, right], 1)).save(root / "img" / f"{i}.png")
        rows.append(f"img/{i}.png,{';'.join(sorted(labels))},{'train' if i < n_train else 'test'}")
    path = root / "list.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="module")
def ml_csv(tmp_path_factory, fmnist_arrays):
    x, y, _, _ = fmnist_arrays
    return tiled_csv(tmp_path_factory.mktemp("ml-data"), x, y)


@pytest.fixture(scope="module")
def ml_run(tmp_path_factory, ml_csv):
    from imgrec.engine.train import resolve_config, train
    out = tmp_path_factory.mktemp("ml-runs") / "tiled"
    cfg = resolve_config(None, None, {"data": str(ml_csv), "name": "simple_cnn", "epochs": 4, "batch_size": 32,
                                      "lr": 3e-3, "val_split": 0.2, "image_size": 32, "seed": 0})
    summary = train(cfg, out, progress=False)
    return out, summary


def _cli(capsys, *args) -> tuple[int, str, str]:
    from imgrec.cli import main
    code = main([str(a) for a in args])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _one_error_line(code, err, *needles):
    assert code == 2 and err.count("\n") == 1 and err.startswith("imgrec: error:"), err
    for n in needles:
        assert n in err, err


# -- metrics and thresholds against scikit-learn ---------------------------------------------------------
def _random_case(n=300, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    target = (torch.rand(n, k, generator=g) < torch.tensor([0.1, 0.3, 0.5, 0.7, 0.05])).float()
    target[0] = 1  # every label has a positive
    logits = torch.randn(n, k, generator=g) + 1.5 * (target * 2 - 1)
    logits[:40] = logits[:40].round()  # ties among scores
    return logits, target


def test_metrics_match_sklearn():
    from imgrec.eval.multilabel import average_precision, summarize_multilabel
    logits, target = _random_case()
    thr = [0.3, 0.5, 0.42, 0.6, 0.2]
    res = summarize_multilabel(logits, target, list("abcde"), thr)
    probs, y = torch.sigmoid(logits).numpy(), target.numpy().astype(int)
    pred = (probs >= np.float32(thr)).astype(int)
    ap = sk.average_precision_score(y, probs, average=None)
    assert [r["ap"] for r in res["per_class"]] == pytest.approx(ap, abs=1e-9)
    assert res["map_macro"] == pytest.approx(sk.average_precision_score(y, probs, average="macro"), abs=1e-9)
    assert res["map_micro"] == pytest.approx(sk.average_precision_score(y, probs, average="micro"), abs=1e-9)
    p, r, f, s = sk.precision_recall_fscore_support(y, pred, average=None, zero_division=0)
    for j, row in enumerate(res["per_class"]):
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx((p[j], r[j], f[j], s[j]))
    assert res["exact_match"] == pytest.approx(sk.accuracy_score(y, pred))
    assert res["hamming_loss"] == pytest.approx(sk.hamming_loss(y, pred))
    assert res["f1_macro"] == pytest.approx(sk.f1_score(y, pred, average="macro", zero_division=0))
    assert res["f1_micro"] == pytest.approx(sk.f1_score(y, pred, average="micro", zero_division=0))
    assert res["loss"] == pytest.approx(sk.log_loss(y.ravel(), probs.ravel().astype(np.float64)), rel=1e-4)
    assert math.isnan(average_precision(torch.rand(10), torch.zeros(10)))  # no positive: undefined


def test_thresholds_maximise_validation_f1():
    from imgrec.eval.multilabel import choose_thresholds
    logits, target = _random_case(seed=1)
    target[:, 4] = 0  # a label without positives keeps the default
    probs = torch.sigmoid(logits)
    thr = choose_thresholds(probs, target)
    assert thr[4] == 0.5 and all(0 <= t <= 1 for t in thr)
    y, p = target.numpy().astype(int), probs.numpy()
    for j in range(4):
        # brute force over every cut the validation scores allow: F1 = 2TP / (2TP + FP + FN) = 2TP / (predicted + true)
        cuts = p[:, j][None, :] >= np.unique(p[:, j])[:, None]
        tp = (cuts & (y[:, j] == 1)).sum(1)
        best = (2 * tp / (cuts.sum(1) + y[:, j].sum())).max()
        assert sk.f1_score(y[:, j], (p[:, j] >= thr[j]).astype(int)) == pytest.approx(best)


def test_loss_smoothing_and_pos_weight():
    from imgrec.engine.losses import build_loss
    logits, target = _random_case(n=20)
    pw = torch.tensor([1.0, 2.0, 0.5, 1.0, 3.0])
    got = build_loss("multilabel", 0.2, pw)(logits, target)
    smooth = target * 0.8 + 0.1
    want = torch.nn.functional.binary_cross_entropy_with_logits(logits, smooth, pos_weight=pw)
    assert float(got) == pytest.approx(float(want))
    assert isinstance(build_loss("classification", 0.1), torch.nn.CrossEntropyLoss)


# -- data ------------------------------------------------------------------------------------------------
def test_csv_detected_as_multilabel_and_split_keeps_every_label(ml_csv):
    from imgrec.data.dataset import ImageData, load_data, split_off
    b = load_data(str(ml_csv), image_size=16, val_split=0.2, progress=False)
    assert b.task == "multilabel" and b.classes == sorted(LABELS.values())
    assert b.train.labels.shape[1] == 4 and b.train.labels.dtype == torch.float32
    assert set(b.train.labels.sum(1).tolist()) == {1.0, 2.0}
    assert b.counts["test"] == b.test.labels.sum(0).long().tolist()
    assert all(c > 0 for c in b.counts["val"])
    # a rare label still reaches the validation split (stratified on each image's rarest label)
    labels = torch.zeros(200, 3)
    labels[:, 0] = 1
    labels[:6, 2] = 1
    train, val = split_off(ImageData(torch.zeros(200, 1, 2, 2, dtype=torch.uint8), labels), 0.1, seed=0)
    assert val.labels[:, 2].sum() >= 1 and len(val) + len(train) == 200


@pytest.mark.parametrize("row,needle", [
    ("img/0.png,bag;cat,train", "label 'cat' is not in the class list"),
    ("img/0.png,,train", "row 3: expected 'path,label'"),
    ("img/0.png,bag;;trouser,train", "row 3: empty label"),
])
def test_bad_csv_rows_give_one_line(ml_csv, tmp_path, capsys, row, needle):
    bad = ml_csv.parent / f"bad-{abs(hash(row))}.csv"
    bad.write_text(f"path,labels,split\nimg/1.png,bag;trouser,train\n{row}\n")
    from imgrec.data.dataset import load_data
    with pytest.raises(DatasetError, match=re.escape(needle)):
        load_data(str(bad), classes=sorted(LABELS.values()), task="multilabel", progress=False)
    if "cat" not in row:  # the class list comes from the CSV itself when training
        code, _, err = _cli(capsys, "train", "--data", bad, "--model", "simple_cnn", "--out", tmp_path / "r",
                            "--quiet")
        _one_error_line(code, err, needle)



def test_unknown_label_for_a_trained_model_names_the_row(ml_run, ml_csv, capsys):
    bad = ml_csv.parent / "unknown-label.csv"
    bad.write_text("path,labels,split\nimg/1.png,bag;trouser,test\nimg/2.png,bag;cat,test\n")
    code, _, err = _cli(capsys, "eval", "--model", ml_run[0], "--data", bad)
    _one_error_line(code, err, "row 3", "'cat' is not in the class list")


def test_task_on_single_label_sources_refused():
    from imgrec.data.dataset import load_data
    with pytest.raises(ConfigError, match="CSV list"):
        load_data("fashion-mnist", task="multilabel")


def test_model_json_thresholds_checked():
    from imgrec.modeldir import ModelMeta
    base = {"format": "imgrec-model", "format_version": 2, "model": {"name": "simple_cnn"}, "classes": ["a", "b"],
            "image_size": 28, "channels": 1, "mean": [0.5], "std": [0.2]}
    assert ModelMeta.from_dict(base).task == "classification"  # files without the fields still load
    assert ModelMeta.from_dict({**base, "format_version": 1}).thresholds is None
    ok = ModelMeta.from_dict({**base, "task": "multilabel", "thresholds": [0.2, 0.7]})
    assert ok.multilabel and ok.thresholds == [0.2, 0.7]
    for bad, msg in (({"task": "multilabel", "thresholds": [0.2, 1.5]}, "0..1"),
                     ({"task": "multilabel", "thresholds": [0.2]}, "1 thresholds for 2"),
                     ({"thresholds": [0.2, 0.3]}, "only used by multilabel"),
                     ({"task": "detection"}, "not supported")):
        with pytest.raises(ModelFileError, match=msg):
            ModelMeta.from_dict({**base, **bad})


# -- training, evaluation, prediction --------------------------------------------------------------------
def test_training_records_task_thresholds_and_learns(ml_run):
    out, summary = ml_run
    meta = json.loads((out / "model.json").read_text())
    assert meta["task"] == "multilabel" and meta["classes"] == sorted(LABELS.values())
    assert len(meta["thresholds"]) == 4 and all(0 < t < 1 for t in meta["thresholds"])
    assert meta["config"]["data"]["task"] == "multilabel"
    # chance mAP is the label frequency (~0.4); a few epochs on 384 images get well above it
    assert summary["test_map_macro"] > 0.75 and summary["val_map_macro"] > 0.75, summary
    assert meta["metrics"]["test_map_macro"] == pytest.approx(summary["test_map_macro"])


def test_eval_json_matches_sklearn_on_the_test_split(ml_run, ml_csv, capsys):
    from imgrec.data.dataset import load_eval_split
    from imgrec.infer.predictor import Classifier
    out, summary = ml_run
    code, stdout, _ = _cli(capsys, "eval", "--model", out, "--json")
    assert code == 0
    res = json.loads(stdout)
    clf = Classifier.load(out, device="cpu")
    _, test = load_eval_split(clf.meta, None, None, "test")
    probs = clf.probabilities(test.images).numpy()
    y = test.labels.numpy().astype(int)
    pred = (probs >= np.float32(clf.thresholds)).astype(int)
    assert res["map_macro"] == pytest.approx(sk.average_precision_score(y, probs, average="macro"), abs=1e-6)
    assert res["map_micro"] == pytest.approx(sk.average_precision_score(y, probs, average="micro"), abs=1e-6)
    assert res["exact_match"] == pytest.approx(sk.accuracy_score(y, pred))
    assert res["hamming_loss"] == pytest.approx(sk.hamming_loss(y, pred))
    assert [r["f1"] for r in res["per_class"]] == pytest.approx(list(sk.f1_score(y, pred, average=None)))
    assert res["exact_match"] == pytest.approx(summary["test_acc"])
    code, _, err = _cli(capsys, "eval", "--model", out, "--top-k", "3")
    _one_error_line(code, err, "--top-k does not apply to a multi-label model")


def test_predict_returns_labels_above_thresholds(ml_run, ml_csv, capsys):
    from imgrec.infer.predictor import Classifier
    out, _ = ml_run
    files = [ml_csv.parent / "img" / f"{i}.png" for i in (480, 481, 482, 483)]
    code, stdout, _ = _cli(capsys, "predict", "--model", out, *files, "--json")
    assert code == 0
    got = json.loads(stdout)
    clf = Classifier.load(out, device="cpu")
    probs = clf.probabilities(torch.stack([clf.load_image(f) for f in files]))
    for row, p in zip(got, probs):
        want = sorted(((float(p[j]), clf.classes[j]) for j in range(4) if p[j] >= np.float32(clf.thresholds[j])),
                      reverse=True)
        assert [q["label"] for q in row["predictions"]] == [w[1] for w in want]
        assert [q["score"] for q in row["predictions"]] == pytest.approx([w[0] for w in want])
    # thresholds overridden at predict time: 0 for every label gives all four, then bag=1 drops bag
    code, stdout, _ = _cli(capsys, "predict", "--model", out, files[0], "--json", "--threshold", "0",
                           "--threshold", "bag=1")
    assert code == 0 and sorted(p["label"] for p in json.loads(stdout)[0]["predictions"]) == \
        ["pullover", "sneaker", "trouser"]
    for args, needle in ((["--top-k", "3"], "--top-k does not apply"), (["--threshold", "1.5"], "from 0 to 1"),
                         (["--threshold", "cat=0.3"], "'cat' is not one of the model's labels"),
                         (["--threshold", "x"], "expected a number")):
        code, _, err = _cli(capsys, "predict", "--model", out, files[0], *args)
        _one_error_line(code, err, needle)


def test_serve_answers_every_label_above_its_threshold(ml_run, ml_csv):
    from fastapi.testclient import TestClient

    from imgrec.infer.predictor import Classifier
    from imgrec.serve.app import create_app
    out, _ = ml_run
    clf = Classifier.load(out, device="cpu")
    png = (ml_csv.parent / "img" / "481.png").read_bytes()
    with TestClient(create_app(clf), base_url="http://127.0.0.1") as client:
        r = client.post("/v1/predict", files={"files": ("a.png", png, "image/png")})
        assert r.status_code == 200
        got, want = r.json()["predictions"][0], clf.predict(png)
        assert [p["label"] for p in got] == [p["label"] for p in want]
        assert [p["score"] for p in got] == pytest.approx([p["score"] for p in want], abs=1e-6)
        r = client.post("/v1/predict?top_k=2", files={"files": ("a.png", png, "image/png")})
        assert r.status_code == 400 and "multi-label" in r.json()["detail"]
        info = client.get("/v1/model").json()
        assert info["task"] == "multilabel" and info["thresholds"] == pytest.approx(clf.thresholds)


def test_report_shows_multilabel_metrics(ml_run, tmp_path, capsys):
    pytest.importorskip("jinja2")
    out, _ = ml_run
    html_path = tmp_path / "r.html"
    code, stdout, _ = _cli(capsys, "report", "--model", out, "--out", html_path, "--json")
    assert code == 0
    numbers = json.loads(stdout)
    code, ev, _ = _cli(capsys, "eval", "--model", out, "--json")
    ev = json.loads(ev)
    assert numbers["eval"]["map_macro"] == ev["map_macro"] and numbers["eval"]["exact_match"] == ev["exact_match"]
    html = html_path.read_text()
    assert "mAP (macro)" in html and "Hamming loss" in html and 'id="per-label"' in html
    assert "http://" not in html and "https://" not in html


def test_onnx_export_keeps_sigmoid_and_thresholds(ml_run, ml_csv):
    pytest.importorskip("onnxruntime")
    from imgrec.infer.export import export_model
    from imgrec.infer.ort import OnnxClassifier
    from imgrec.infer.predictor import Classifier
    out, _ = ml_run
    res = export_model(out, out / "ml.onnx")
    assert res.check.passed
    onnx_clf = OnnxClassifier.load(out / "ml.onnx", device="cpu")
    clf = Classifier.load(out, device="cpu", amp="none")  # fp32, as the exported graph
    assert onnx_clf.multilabel and onnx_clf.thresholds == pytest.approx(clf.thresholds)
    files = [ml_csv.parent / "img" / f"{i}.png" for i in range(480, 490)]
    a = [r["predictions"] for r in onnx_clf.predict_files(files).results]
    b = [r["predictions"] for r in clf.predict_files(files).results]
    assert [[p["label"] for p in r] for r in a] == [[p["label"] for p in r] for r in b]
    assert [p["score"] for r in a for p in r] == pytest.approx([p["score"] for r in b for p in r], abs=1e-5)
    with pytest.raises(ConfigError, match="from 0 to 1"):
        onnx_clf.set_thresholds(-0.1)


def test_thresholds_refused_for_a_single_label_model(tmp_path, ml_csv, capsys):
    from imgrec.engine.checkpoint import write_weights
    from imgrec.infer.predictor import Classifier
    from imgrec.modeldir import ModelMeta, write_meta
    from imgrec.models import create_model
    single = tmp_path / "single"  # an untrained single-label model directory is enough here
    write_weights(single, "best", create_model("simple_cnn", num_classes=2, in_chans=1, image_size=16))
    write_meta(single, ModelMeta(model={"name": "simple_cnn", "kwargs": {}}, classes=["a", "b"], image_size=16,
                                 channels=1, mean=[0.5], std=[0.25]))
    with pytest.raises(ConfigError, match="single-label"):
        Classifier.load(single, device="cpu").set_thresholds(0.3)
    code, _, err = _cli(capsys, "predict", "--model", single, ml_csv.parent / "img" / "0.png", "--threshold", "0.3")
    _one_error_line(code, err, "thresholds apply to multi-label models")


@pytest.mark.browser
def test_web_page_shows_every_label_above_its_threshold(ml_run, ml_csv, tmp_path):
    from pathlib import Path
    if not Path("/usr/bin/chromium").exists():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    from liveserver import LiveServer

    from imgrec.serve.app import ServeSettings, create_app, load_classifier
    clf = load_classifier(ml_run[0])
    png = (ml_csv.parent / "img" / "484.png").read_bytes()
    want = [p["label"] for p in clf.predict(png)]
    settings = ServeSettings()
    with LiveServer(create_app(clf, settings), settings) as server, sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                     args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(server.url + "/")
        sync_api.expect(page.locator("#model-line")).to_contain_text("several per image")
        page.set_input_files("#file-input", files=[{"name": "two.png", "mimeType": "image/png", "buffer": png}])
        sync_api.expect(page.locator("#predictions li")).to_have_count(len(want))
        assert [t.strip() for t in page.locator("#predictions .label").all_text_contents()] == want
        assert page.locator("#error").is_hidden() and not errors
        page.screenshot(path=str(tmp_path / "multilabel-page.png"), full_page=True)
        browser.close()

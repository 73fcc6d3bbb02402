"""Confident learning against hand-computed and independent oracles, and `imgrec data audit` end to end: flipped labels
in a folder of real Fashion-MNIST images are found, and the cleaned CSV trains with `imgrec train`."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import assert_clean_error, run_cli
from imgrec.data import confident

# ---------------------------------------------------------------------------------------------------
# The method on a hand-made probability matrix (every number below worked out by hand from the paper's
# equations 1-3)

LABELS = np.array([0, 0, 0, 1, 1, 2])
PROBS = np.array([
    [0.90, 0.05, 0.05],
    [0.60, 0.30, 0.10],
    [0.20, 0.70, 0.10],   # labelled 0, confidently 1: the label error
    [0.10, 0.80, 0.10],
    [0.30, 0.60, 0.10],   # above no threshold: not counted in the confident joint
    [0.10, 0.10, 0.80],
])


def test_thresholds_and_confident_joint_by_hand():
    t = confident.per_class_thresholds(LABELS, PROBS)
    np.testing.assert_allclose(t, [(0.9 + 0.6 + 0.2) / 3, (0.8 + 0.6) / 2, 0.8])
    # x1: p0 = 0.6 ≥ t0 = 0.567 → (0, 0); x2: p1 = 0.7 ≥ t1 = 0.7 (the mean, up to float rounding) → (0, 1);
    # x4: 0.3 < t0, 0.6 < t1, 0.1 < t2 → not counted
    cj = confident.confident_joint(LABELS, PROBS)
    np.testing.assert_array_equal(cj, [[2, 1, 0], [0, 1, 0], [0, 0, 1]])
    # calibration: row 1 has one confident example but two labels → [0, 2, 0]; then / 6
    q = confident.estimate_joint(LABELS, PROBS)
    np.testing.assert_allclose(q, np.array([[2, 1, 0], [0, 2, 0], [0, 0, 1]]) / 6)


@pytest.mark.parametrize("method", ["prune_by_noise_rate", "prune_by_class", "both", "confident_joint", "argmax"])
def test_find_label_issues_by_hand(method):
    res = confident.find_label_issues(LABELS, PROBS, method=method)
    # n·Q[0,1] = 1 example labelled 0 is pruned: by noise rate, the one with the largest p1 − p0 (x2); by class,
    # the lowest self-confidence p0 (x2 again); argmax also flags x2 only
    assert res.issues.tolist() == [2]
    assert res.suggested[2] == 1
    assert res.estimated_noise_rate == pytest.approx(1 / 6)


def test_rankings():
    sc = confident.label_quality(LABELS, PROBS, "self_confidence")
    np.testing.assert_allclose(sc, [0.9, 0.6, 0.2, 0.8, 0.6, 0.8])
    nm = confident.label_quality(LABELS, PROBS, "normalized_margin")
    np.testing.assert_allclose(nm, (np.array([0.85, 0.3, -0.5, 0.7, 0.3, 0.7]) + 1) / 2)
    with pytest.raises(ValueError):
        confident.label_quality(LABELS, PROBS, "loss")


def _oof_centroid_probs(x: np.ndarray, labels: np.ndarray, folds: int = 5) -> np.ndarray:
    """An independent, training-free scorer: out-of-fold nearest-class-mean probabilities on raw pixels."""
    x = x.reshape(len(x), -1).astype(np.float64) / 255
    fold = np.arange(len(x)) % folds
    probs = np.zeros((len(x), 10))
    for k in range(folds):
        fit, held = fold != k, fold == k
        mu = np.stack([x[fit & (labels == c)].mean(0) for c in range(10)])
        d2 = ((x[held, None, :] - mu[None]) ** 2).sum(-1)
        logits = -d2 / 4.0
        logits -= logits.max(1, keepdims=True)
        p = np.exp(logits)
        probs[held] = p / p.sum(1, keepdims=True)
    return probs


def test_flipped_labels_rank_at_the_top(fmnist_arrays):
    """Flip 5% of 2,000 real labels; with an independent, training-free out-of-sample scorer (nearest class mean,
    69% accurate), confident learning finds most of them and ranks them first. The scorer is weak, so its own
    confusions are flagged too: precision is judged against chance (5%), the ranking by its top 50."""
    x, y = fmnist_arrays[0][:2000], fmnist_arrays[1][:2000].copy()
    rng = np.random.default_rng(0)
    flipped = rng.choice(len(y), size=100, replace=False)
    noisy = y.copy()
    noisy[flipped] = (noisy[flipped] + rng.integers(1, 10, size=100)) % 10
    probs = _oof_centroid_probs(x, noisy)
    res = confident.find_label_issues(noisy, probs)
    found = set(res.issues.tolist())
    tp = len(found & set(flipped.tolist()))
    assert tp / 100 >= 0.6, (tp, len(found))
    assert tp / len(found) >= 0.15  # precision three times chance
    top = set(res.issues[:50].tolist())
    assert len(top & set(flipped.tolist())) >= 30  # the top of the ranking is mostly flipped images (chance: 2.5)
    # the suggested label of a found flipped image is usually its true label
    hits = [i for i in flipped if i in found]
    assert np.mean(res.suggested[hits] == y[hits]) >= 0.6


def test_stratified_folds_cover_each_class_evenly():
    from imgrec.engine.audit import stratified_folds
    labels = np.repeat(np.arange(3), [10, 7, 4])
    f = stratified_folds(labels, 3, seed=1)
    assert set(f) == {0, 1, 2}
    for c in range(3):
        counts = np.bincount(f[labels == c], minlength=3)
        assert counts.max() - counts.min() <= 1
    assert (stratified_folds(labels, 3, seed=1) == f).all()


# ---------------------------------------------------------------------------------------------------
# The audit end to end (a few seconds of training per fold)

CLASSES = {1: "Trouser", 8: "Bag", 7: "Sneaker"}


@pytest.fixture(scope="module")
def noisy_folder(tmp_path_factory, fmnist_arrays):
    """train/ (60 per class, 9 of them filed under a wrong class) and test/ (20 per class) of real images."""
    x, y, xt, yt = fmnist_arrays
    root = tmp_path_factory.mktemp("audit") / "data"
    names = list(CLASSES.values())
    flipped = set()
    rng = np.random.default_rng(0)
    for c, name in CLASSES.items():
        idx = np.nonzero(y == c)[0][:60]
        for k, i in enumerate(idx):
            wrong = k % 20 == 7  # 3 per class
            target = names[(names.index(name) + 1 + int(rng.integers(0, 2))) % 3] if wrong else name
            (root / "train" / target).mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i]).save(root / "train" / target / f"{i}.png")
            if wrong:
                flipped.add(f"train/{target}/{i}.png")
        for i in np.nonzero(yt == c)[0][:20]:
            (root / "test" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(xt[i]).save(root / "test" / name / f"t{i}.png")
    return root, flipped


AUDIT_OPTS = ("--folds", "3", "--epochs", "6", "--batch-size", "32", "--image-size", "28", "--threads", "2")


def test_audit_cli_finds_flipped_and_writes_everything(noisy_folder, tmp_path):
    root, flipped = noisy_folder
    out = tmp_path / "out"
    r = run_cli("data", "audit", root, *AUDIT_OPTS, "--csv", out / "suspects.csv", "--json-out", out / "audit.json",
                "--html", out / "gallery.html", "--write-clean", out / "clean.csv")
    assert r.returncode == 0, r.stderr
    assert "suspects" in r.stdout and "wrote" in r.stdout
    d = json.loads((out / "audit.json").read_text())
    assert d["audited"] == 180 and len(d["folds"]) == 3 and d["settings"]["recipe"] in ("fast-bf16", "fast-fp32", "fast-gpu")
    found = {str(Path(s["path"]).relative_to(root)) for s in d["suspects"]}
    tp = len(found & flipped)
    assert tp >= 6, (sorted(found), sorted(flipped))          # recall ≥ 2/3 (chance: 9/180)
    assert tp / max(len(found), 1) >= 0.4, sorted(found)      # precision 8× chance
    rows = list(csv.DictReader((out / "suspects.csv").open()))
    assert len(rows) == len(d["suspects"]) and rows[0]["rank"] == "1"
    assert float(rows[0]["score"]) <= float(rows[-1]["score"])
    page = (out / "gallery.html").read_text()
    assert page.count("data:image/png;base64,") == len(d["suspects"]) and "https://" not in page
    # the cleaned list: suspects removed, test rows copied
    clean = list(csv.DictReader((out / "clean.csv").open()))
    assert len(clean) == 180 - len(found) + 60
    assert {r["split"] for r in clean} == {"train", "test"}
    kept = {str((out / r["path"]).resolve().relative_to(root.resolve())) for r in clean}
    assert not kept & found
    # imgrec train reads it
    run = tmp_path / "run"
    r = run_cli("train", "--data", out / "clean.csv", "--model", "simple_cnn", "--epochs", "1", "--image-size", "28",
                "--batch-size", "32", "--out", run, "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["test_acc"] is not None and (run / "model.json").is_file()


def test_audit_relabel_and_json(noisy_folder, tmp_path):
    root, flipped = noisy_folder
    quick = ("--folds", "2", "--epochs", "2", "--batch-size", "32", "--image-size", "28", "--threads", "2")
    r = run_cli("data", "audit", root, *quick, "--json", "--write-clean", tmp_path / "relabelled.csv",
                "--clean", "relabel", "--method", "both", "--rank-by", "normalized_margin")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["cleaned"]["relabelled"] == d["suspects_total"] and d["cleaned"]["removed"] == 0
    rows = list(csv.DictReader((tmp_path / "relabelled.csv").open()))
    assert len(rows) == 240
    by_path = {str((tmp_path / r["path"]).resolve()): r["label"] for r in rows}
    for s in d["suspects"]:
        assert by_path[str(Path(s["path"]).resolve())] == s["suggested"]


def test_audit_python_api(noisy_folder):
    from imgrec.engine.audit import audit
    root, flipped = noisy_folder
    res = audit(str(root), folds=2, overrides={"epochs": 1, "batch_size": 64, "threads": 2}, image_size=28,
                splits=("train", "test"), progress=False, force=True)  # 1 epoch: weak fold models, ranked anyway
    assert res.settings["quality"]["weak"] and "skill" in res.settings["quality"]["weak"]
    assert len(res.audited) == 240 and res.probs.shape == (240, 3)
    np.testing.assert_allclose(res.probs.sum(1), 1, atol=1e-6)
    assert res.settings["splits"] == ["train", "test"]


def test_audit_bad_input(tmp_path, noisy_folder):
    root, _ = noisy_folder
    assert_clean_error(run_cli("data", "audit", tmp_path / "missing"), "no such dataset")
    assert_clean_error(run_cli("data", "audit", root, "--folds", "1"), "--folds must be at least 2")
    assert_clean_error(run_cli("data", "audit", root, "--splits", "holdout"), "--splits")
    assert_clean_error(run_cli("data", "audit", root, "--recipe", "nope"), "unknown recipe")
    assert_clean_error(run_cli("data", "audit", root, "--write-clean", tmp_path / "x.txt"), ".csv")
    one = tmp_path / "one" / "only"
    one.mkdir(parents=True)
    shutil.copy(next((root / "train" / "Bag").iterdir()), one / "a.png")
    assert_clean_error(run_cli("data", "audit", tmp_path / "one"), "at least 2 classes")


def test_audit_named_dataset_writes_images_for_the_cleaned_list(tmp_path, fmnist_arrays):
    """A named dataset (IDX files in --data-dir): the cleaned list points at PNG files written next to it."""
    import gzip
    x, y, xt, yt = fmnist_arrays
    d = tmp_path / "fm"
    d.mkdir()
    for name, arr in (("train-images-idx3-ubyte", x[:120]), ("train-labels-idx1-ubyte", y[:120]),
                      ("t10k-images-idx3-ubyte", xt[:30]), ("t10k-labels-idx1-ubyte", yt[:30])):
        header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
        (d / f"{name}.gz").write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))
    out = tmp_path / "clean" / "fm.csv"
    r = run_cli("data", "audit", "fashion-mnist", "--data-dir", d, "--folds", "2", "--epochs", "1", "--batch-size",
                "32", "--threads", "2", "--json", "--write-clean", out, "--force")  # 1 epoch: weak
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["audited"] == 120 and res["settings"]["image_size"] == 28
    assert all("index" in s and s["split"] == "train" for s in res["suspects"])
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 150 - res["suspects_total"]
    first = out.parent / rows[0]["path"]
    assert first.is_file() and first.suffix == ".png"
    np.testing.assert_array_equal(np.asarray(Image.open(first)), x[int(first.stem)])

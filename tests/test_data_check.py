"""`imgrec data check`: planted exact and near duplicates, leakage, conflicting labels and corrupt files in a folder
of real Fashion-MNIST images are all found, nothing else is; every CLI path as a subprocess."""
from __future__ import annotations

import gzip
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from conftest import assert_clean_error, run_cli

# three varied classes; the class with markup in its name checks that the HTML escapes user strings
CLASSES = {0: "T-shirt", 8: "Bag<i>&co", 5: "Sandal"}
PER_CLASS = 70   # train images per class (plus 30 test): 300 distinct real images


def _save(arr: np.ndarray, path, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kw)


def build_folder(root, fmnist_arrays, plant: bool = True) -> dict:
    """train/ and test/ ImageFolder trees of distinct real images; with ``plant``, the planted cases. Returns
    what was planted (relative paths)."""
    x, y, xt, yt = fmnist_arrays
    for c, name in CLASSES.items():
        for i in np.nonzero(y == c)[0][:PER_CLASS]:
            _save(x[i], root / "train" / name / f"{i}.png")
        for i in np.nonzero(yt == c)[0][:30]:
            _save(xt[i], root / "test" / name / f"t{i}.png")
    if not plant:
        return {}
    tee, bag, sandal = (np.nonzero(y == c)[0] for c in (0, 8, 5))
    planted = {}
    # exact duplicate across splits: the same file copied, and the same pixels saved as BMP
    src = root / "train" / "T-shirt" / f"{tee[0]}.png"
    shutil.copy(src, root / "test" / "T-shirt" / "copy.png")
    _save(x[tee[0]], root / "test" / "T-shirt" / "copy.bmp")
    planted["exact_across"] = {f"train/T-shirt/{tee[0]}.png", "test/T-shirt/copy.png", "test/T-shirt/copy.bmp"}
    # near duplicates across splits: re-encoded as JPEG at quality 85, resized by 3 pixels, brightened by 10%
    buf = io.BytesIO()
    Image.fromarray(x[bag[1]]).save(buf, "JPEG", quality=85)
    (root / "test" / "Bag<i>&co" / "reencoded.jpg").write_bytes(buf.getvalue())
    _save(np.asarray(Image.fromarray(x[sandal[2]]).resize((31, 31), Image.Resampling.BILINEAR)),
          root / "test" / "Sandal" / "resized.png")
    _save(np.asarray(ImageEnhance.Brightness(Image.fromarray(x[tee[3]])).enhance(1.1)),
          root / "test" / "T-shirt" / "brighter.png")
    planted["near_across"] = {
        frozenset({f"train/Bag<i>&co/{bag[1]}.png", "test/Bag<i>&co/reencoded.jpg"}),
        frozenset({f"train/Sandal/{sandal[2]}.png", "test/Sandal/resized.png"}),
        frozenset({f"train/T-shirt/{tee[3]}.png", "test/T-shirt/brighter.png"}),
    }
    # a duplicate with a conflicting label, inside train: a T-shirt image filed under Sandal
    shutil.copy(root / "train" / "T-shirt" / f"{tee[4]}.png", root / "train" / "Sandal" / "mislabelled.png")
    planted["conflict"] = {f"train/T-shirt/{tee[4]}.png", "train/Sandal/mislabelled.png"}
    # corrupt files: truncated PNG, text named .jpg, zero bytes
    data = (root / "train" / "Sandal" / f"{sandal[5]}.png").read_bytes()
    (root / "train" / "Sandal" / "truncated.png").write_bytes(data[: len(data) // 2])
    (root / "train" / "Bag<i>&co" / "notes.jpg").write_text("not an image")
    (root / "test" / "Sandal" / "empty.png").write_bytes(b"")
    planted["bad"] = {"train/Sandal/truncated.png", "train/Bag<i>&co/notes.jpg", "test/Sandal/empty.png"}
    return planted


def _rel(root, m) -> str:
    return str(Path(m["path"]).relative_to(root))


@pytest.fixture(scope="module")
def planted_folder(tmp_path_factory, fmnist_arrays):
    root = tmp_path_factory.mktemp("check") / "data"
    planted = build_folder(root, fmnist_arrays)
    return root, planted


def test_every_planted_case_found_and_nothing_else(planted_folder):
    import imgrec.data
    root, planted = planted_folder
    report = imgrec.data.check(str(root), progress=False)
    d = report.to_dict()
    assert d["images"] == 3 * (PER_CLASS + 30) + 2 + 3 + 1 + 3
    # corrupt files, each with the decoder's reason
    bad = {_rel(root, b): b["reason"] for b in d["unreadable"]}
    assert set(bad) == planted["bad"]
    assert "truncated" in bad["train/Sandal/truncated.png"]
    assert "not a supported image" in bad["train/Bag<i>&co/notes.jpg"] or "format" in bad["train/Bag<i>&co/notes.jpg"]
    assert "empty" in bad["test/Sandal/empty.png"] or "0 bytes" in bad["test/Sandal/empty.png"]
    # exact groups: the across-split copy (PNG and BMP) and the conflicting one — no other
    groups = {frozenset(_rel(root, m) for m in g["members"]): g for g in d["exact_duplicates"]}
    assert set(groups) == {frozenset(planted["exact_across"]), frozenset(planted["conflict"])}
    g = groups[frozenset(planted["exact_across"])]
    assert g["across_splits"] and not g["conflicting"]
    g = groups[frozenset(planted["conflict"])]
    assert g["conflicting"] and not g["across_splits"]
    # near pairs: exactly the three planted edits, across splits (no false pair among the 300 real images)
    pairs = {frozenset({_rel(root, p["a"]), _rel(root, p["b"])}): p for p in d["near_duplicates"]}
    assert set(pairs) == planted["near_across"], sorted(map(sorted, pairs))
    assert all(p["across_splits"] and not p["conflicting"] and p["similarity"] >= 0.995 for p in pairs.values())
    # leakage: the 2 exact copies and the 3 edited copies in test have a twin in train
    assert d["leakage"] == {"exact_groups": 1, "near_pairs": 3, "eval_images_with_train_twin": 5}
    assert d["conflicting_labels"] == {"exact_groups": 1, "near_pairs": 0}
    assert report.leakage and report.conflicts and len(report.problems) == 2
    # class counts per split, readable images only
    assert d["class_counts"]["train"] == {"T-shirt": PER_CLASS, "Bag<i>&co": PER_CLASS, "Sandal": PER_CLASS + 1}
    assert d["class_counts"]["test"]["T-shirt"] == 30 + 3
    assert d["imbalance"]["train"] == pytest.approx((PER_CLASS + 1) / PER_CLASS, abs=1e-3)
    sizes = d["sizes"]
    assert sizes["width"]["median"] == 28 and sizes["formats"]["PNG"] > 300 and sizes["formats"]["BMP"] == 1
    assert {o["width"] for o in sizes["outliers"]} == set()  # 31 px is not an outlier
    assert sizes["channels"] == {"grayscale": d["readable"]}


def test_no_false_pairs_among_distinct_images(tmp_path, fmnist_arrays):
    root = tmp_path / "clean"
    build_folder(root, fmnist_arrays, plant=False)
    from imgrec.data.datacheck import check
    d = check(str(root), progress=False).to_dict()
    assert d["readable"] == 300
    assert d["exact_duplicates"] == [] and d["near_duplicates"] == [] and d["unreadable"] == []


def test_fingerprints_oracle(fmnist_arrays):
    """pHash moves little under a JPEG re-encode and much between different products; the thumbnail correlation
    equals numpy's Pearson correlation of the same thumbnails."""
    from imgrec.data.datacheck import fingerprint, thumbnail_vector
    x = fmnist_arrays[0]
    a = x[0][:, :, None]
    buf = io.BytesIO()
    Image.fromarray(x[0]).save(buf, "JPEG", quality=80)
    b = np.asarray(Image.open(buf))[:, :, None]
    da, ha, va = fingerprint(a)
    db, hb, vb = fingerprint(b)
    dc, hc, vc = fingerprint(x[1][:, :, None])
    assert da != db and da == fingerprint(a.copy())[0]
    assert bin(ha ^ hb).count("1") <= 6 < bin(ha ^ hc).count("1")
    assert float(va @ vb) > 0.995 > float(va @ vc)
    small = [np.asarray(Image.fromarray(v).resize((16, 16), Image.Resampling.BILINEAR), float).ravel()
             for v in (x[0], x[1])]
    assert float(va @ vc) == pytest.approx(np.corrcoef(small[0], small[1])[0, 1], abs=1e-5)
    assert not thumbnail_vector(Image.new("L", (20, 20), 7)).any()  # a flat image matches nothing


def test_cli_report_json_html_strict(planted_folder, tmp_path):
    root, _ = planted_folder
    r = run_cli("data", "check", root)
    assert r.returncode == 0, r.stderr
    assert "exact duplicates: 2 group(s) (1 across splits, 1 with conflicting labels)" in r.stdout
    assert "leakage: 5 evaluation image(s)" in r.stdout and "unreadable files: 3" in r.stdout

    r = run_cli("data", "check", root, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["leakage"]["eval_images_with_train_twin"] == 5 and len(d["unreadable"]) == 3

    page = tmp_path / "report.html"
    r = run_cli("data", "check", root, "--html", page)
    assert r.returncode == 0, r.stderr
    text = page.read_text()
    assert text.count("data:image/png;base64,") >= 2 * 3 + 3 + 2  # every pair and group member shown
    assert "Bag&lt;i&gt;&amp;co" in text and "Bag<i>" not in text  # user strings escaped
    assert "http://" not in text and "https://" not in text  # self-contained
    assert "truncated.png" in text

    r = run_cli("data", "check", root, "--strict")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "data check failed" in r.stderr and "duplicated in training" in r.stderr and "conflicting" in r.stderr


def test_cli_strict_passes_on_clean_data(tmp_path, fmnist_arrays):
    root = tmp_path / "clean"
    build_folder(root, fmnist_arrays, plant=False)
    r = run_cli("data", "check", root, "--strict", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["leakage"]["near_pairs"] == 0


def test_csv_source_with_val_leak(tmp_path, fmnist_arrays):
    x, y, _, _ = fmnist_arrays
    rows = ["path,label,split"]
    for k in range(40):
        _save(x[k], tmp_path / f"{k}.png")
        rows.append(f"{k}.png,{y[k]},{'train' if k < 30 else 'val'}")
    _save(x[3], tmp_path / "again.png")
    rows.append(f"again.png,{y[3]},val")
    (tmp_path / "list.csv").write_text("\n".join(rows) + "\n")
    r = run_cli("data", "check", tmp_path / "list.csv", "--json", "--strict")
    assert r.returncode == 1, r.stderr
    d = json.loads(r.stdout)
    assert d["kind"] == "csv" and d["split_sizes"] == {"train": 30, "val": 11}
    assert d["leakage"]["eval_images_with_train_twin"] == 1


def _write_idx(path, arr):
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))


def test_named_dataset_leak(tmp_path, fmnist_arrays):
    """A named dataset (IDX files) with one test image copied from train and one brightened."""
    x, y, xt, yt = fmnist_arrays
    tx, ty = x[:200].copy(), y[:200].copy()
    ex, ey = xt[:50].copy(), yt[:50].copy()
    ex[7], ey[7] = tx[11], ty[11]
    ex[8] = np.clip(tx[12].astype(int) + 12, 0, 255)
    ey[8] = (ty[12] + 1) % 10  # and give it another label: a conflicting near duplicate
    d = tmp_path / "fm"
    d.mkdir()
    for name, arr in (("train-images-idx3-ubyte", tx), ("train-labels-idx1-ubyte", ty),
                      ("t10k-images-idx3-ubyte", ex), ("t10k-labels-idx1-ubyte", ey)):
        _write_idx(d / f"{name}.gz", arr)
    r = run_cli("data", "check", "fashion-mnist", "--data-dir", d, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["kind"] == "named" and out["images"] == 250
    assert [[m["index"] for m in g["members"]] for g in out["exact_duplicates"]] == [[11, 7]]
    near = [(p["a"]["index"], p["b"]["index"], p["conflicting"]) for p in out["near_duplicates"]]
    assert (12, 8, True) in near
    assert out["leakage"]["eval_images_with_train_twin"] == 2


def test_bad_input_one_clear_line(tmp_path, fmnist_arrays):
    assert_clean_error(run_cli("data", "check", tmp_path / "missing"), "no such dataset")
    (tmp_path / "empty").mkdir()
    assert_clean_error(run_cli("data", "check", tmp_path / "empty"), "no class subfolders")
    one = tmp_path / "one" / "only"
    _save(fmnist_arrays[0][0], one / "a.png")
    _save(fmnist_arrays[0][1], one / "b.png")
    assert_clean_error(run_cli("data", "check", tmp_path / "one"), "at least 2 classes")
    bad = tmp_path / "bad"
    for c in ("a", "b"):
        (bad / c).mkdir(parents=True)
        (bad / c / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    assert_clean_error(run_cli("data", "check", bad), "none of its 2 images is readable")
    assert_clean_error(run_cli("data", "check", tmp_path / "one", "--near-threshold", "2"), "--near-threshold")

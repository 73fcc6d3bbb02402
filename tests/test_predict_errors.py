"""imgrec predict over folders with unreadable files: each becomes an error entry (file, reason) in the table,
--json and --csv, the rest is predicted, and the exit code says some failed (1; 0 with --on-bad-image skip;
--on-bad-image fail stops at the first with exit 2). Each answer carries its input notes."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from conftest import assert_clean_error, run_cli, write_image_folder


@pytest.fixture(scope="module")
def grey_run(tmp_path_factory, fmnist_arrays):
    """A tiny model trained on a 2-class folder of 28 px grey images, and a folder to predict: two good
    images, a corrupt JPEG, an empty PNG, and a 640×427 colour photo-sized image."""
    x, y, xt, _ = fmnist_arrays
    root = tmp_path_factory.mktemp("predict-errors")
    data = write_image_folder(root / "data", x, y, ["T-shirt", "Trouser"], per_class=20)
    out = root / "run"
    r = run_cli("train", "--data", data, "--model", "simple_cnn", "--epochs", "1", "--image-size", "16",
                "--batch-size", "16", "--out", out)
    assert r.returncode == 0, r.stderr
    d = root / "in"
    d.mkdir()
    Image.fromarray(xt[0]).save(d / "a.png")
    (d / "b-corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 50)
    (d / "c-empty.png").write_bytes(b"")
    Image.fromarray(np.random.RandomState(0).randint(0, 256, (427, 640, 3), dtype=np.uint8)).save(d / "d-photo.jpg")
    Image.fromarray(xt[1]).save(d / "e.png")
    return out, d


BAD = ["b-corrupt.jpg", "c-empty.png"]


def _names(entries):
    return [e["file"].rsplit("/", 1)[-1] for e in entries]


@pytest.mark.slow
def test_default_reports_error_rows_and_exits_1(grey_run, tmp_path):
    out, d = grey_run
    r = run_cli("predict", "--model", out, d, "--json")
    assert r.returncode == 1, r.stderr
    entries = json.loads(r.stdout)
    assert _names(entries) == ["a.png", "b-corrupt.jpg", "c-empty.png", "d-photo.jpg", "e.png"]  # input order
    for e in entries:
        if _names([e])[0] in BAD:
            assert e["predictions"] == [] and e["error"], e
        else:
            assert "error" not in e and len(e["predictions"]) == 2
    # the last stderr line says how many failed, that the rest was predicted, and names the option
    assert_clean_error(r, "2 of 5 file(s) could not be read", "b-corrupt.jpg", "--on-bad-image skip")

    table = run_cli("predict", "--model", out, d)
    assert table.returncode == 1
    rows = {ln.split()[0].rsplit("/", 1)[-1]: ln for ln in table.stdout.splitlines()[2:]}
    assert set(rows) == {"a.png", "b-corrupt.jpg", "c-empty.png", "d-photo.jpg", "e.png"}
    assert "error:" in rows["b-corrupt.jpg"] and "error:" in rows["c-empty.png"] and "%" in rows["a.png"]

    r = run_cli("predict", "--model", out, d, "--csv", tmp_path / "p.csv")
    assert r.returncode == 1
    got = list(csv.DictReader((tmp_path / "p.csv").open()))
    # (the "unknown" answer's two columns come after these when the model has an out-of-distribution score)
    assert set(got[0]) - {"unknown", "ood_score"} == {"file", "rank", "label", "score", "error", "input_notes"}
    errors = {row["file"].rsplit("/", 1)[-1]: row for row in got if row["error"]}
    assert set(errors) == set(BAD) and all(row["label"] == "" for row in errors.values())
    assert len(got) == 3 * 2 + 2  # two labels for each readable file, one row for each unreadable one


@pytest.mark.slow
def test_skip_keeps_the_error_rows_and_exits_0(grey_run, tmp_path):
    out, d = grey_run
    r = run_cli("predict", "--model", out, d, "--on-bad-image", "skip", "--json", "--csv", tmp_path / "s.csv")
    assert r.returncode == 0, r.stderr
    entries = json.loads(r.stdout)
    assert [n for n, e in zip(_names(entries), entries) if "error" in e] == BAD
    rows = list(csv.DictReader((tmp_path / "s.csv").open()))
    assert {row["file"].rsplit("/", 1)[-1] for row in rows if row["error"]} == set(BAD)
    assert "warning" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_fail_stops_at_the_first_and_names_the_option(grey_run, tmp_path):
    out, d = grey_run
    r = run_cli("predict", "--model", out, d, "--on-bad-image", "fail", "--csv", tmp_path / "f.csv")
    assert_clean_error(r, "b-corrupt.jpg", "--on-bad-image report")
    assert r.returncode == 2 and r.stdout == "" and not (tmp_path / "f.csv").exists()


@pytest.mark.slow
def test_answers_carry_input_notes(grey_run):
    out, d = grey_run
    r = run_cli("predict", "--model", out, d / "a.png", d / "d-photo.jpg", "--json")
    assert r.returncode == 0, r.stderr
    a, photo = json.loads(r.stdout)
    assert a["input_notes"] == []
    notes = " | ".join(photo["input_notes"])
    assert "colour image into a model trained on grey images" in notes
    if json.loads((out / "model.json").read_text())["data"].get("image_sizes"):
        # the training images' recorded sizes: all 28×28
        assert "640×427: 15× larger than the training images (28 px)" in notes
        assert "aspect ratio 1.50" in notes
    else:  # an older model directory: judged against its 16 px input only
        assert "640×427: 27× larger than the model's input (16 px)" in notes
    table = run_cli("predict", "--model", out, d / "a.png", d / "d-photo.jpg")
    assert "input notes" in table.stdout.splitlines()[0] and "colour image" in table.stdout

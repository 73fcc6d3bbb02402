"""Outputs people open elsewhere (reliability.md, "Outputs people open elsewhere"; issue 36): spreadsheet
formulas in class or file names are escaped in `predict --csv` and embed's index CSV, file names whose bytes
are not UTF-8 are written escaped, an output path that is one of the model's own files is refused, an
atomically rewritten file keeps its mode, and NaN options are refused in one line."""
from __future__ import annotations

import csv
import json
import os
import shutil
import stat
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_clean_error, run_cli, run_cli_process
from imgrec.modeldir import ModelMeta, RunDir, write_meta
from imgrec.models import create_model
from imgrec.safeio import atomic_write_json, atomic_write_text, csv_cell, save_weights

HOSTILE_CLASSES = ['=HYPERLINK("http://evil.example","click")', "+SUM(1,2)", "-2+3", "@cmd", "plain"]
NON_UTF8 = b"caf\xe9.png"  # Latin-1 bytes: not UTF-8


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """An untrained simple_cnn whose class names are spreadsheet formulas."""
    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("formula-model") / "m"
    d.mkdir()
    net = create_model("simple_cnn", num_classes=len(HOSTILE_CLASSES), in_chans=1, image_size=28)
    save_weights(RunDir(d).weights("best"), net.state_dict())
    write_meta(d, ModelMeta(model={"name": "simple_cnn", "kwargs": {}}, classes=HOSTILE_CLASSES, image_size=28,
                            channels=1, mean=[0.5], std=[0.25]))
    return d


@pytest.fixture(scope="module")
def images(tmp_path_factory, fmnist_arrays):
    root = tmp_path_factory.mktemp("formula-images")
    names = ["=1+1.png", "@x.png", "ok.png"]
    for i, n in enumerate(names):
        Image.fromarray(fmnist_arrays[2][i]).save(root / n)
    Image.fromarray(fmnist_arrays[2][3]).save(os.path.join(os.fsencode(root), NON_UTF8))
    return root


def _cells(path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:  # strict: the file is valid UTF-8
        return list(csv.reader(f))


def _no_formula(rows: list[list[str]]) -> None:
    for row in rows:
        for c in row:
            if c[:1] in ("=", "+", "-", "@"):
                float(c)  # only plain numbers may start so (a negative score)


def test_csv_cell_escapes_formulas_and_keeps_numbers():
    assert csv_cell("=1+1") == "'=1+1" and csv_cell("@SUM(A1)") == "'@SUM(A1)" and csv_cell("\t=x") == "'\t=x"
    assert csv_cell("-12.5") == "-12.5" and csv_cell("+3") == "+3" and csv_cell(-2) == -2 and csv_cell("a=b") == "a=b"
    assert csv_cell(NON_UTF8.decode("utf-8", "surrogateescape")) == "caf\\xe9.png"


def test_predict_csv_escapes_formulas_and_non_utf8_names(model, images, tmp_path):
    out = tmp_path / "p.csv"
    # relative names (run in the folder): a cell then starts with the file name itself
    r = run_cli("predict", "--model", model, ".", "--csv", out, "--top-k", "5", "--device", "cpu", cwd=images)
    assert r.returncode == 0, r.stderr
    rows = _cells(out)
    _no_formula(rows)
    labels = {row[2] for row in rows[1:]}
    assert labels == {"'" + c if c[0] in "=+-@" else c for c in HOSTILE_CLASSES}
    assert {row[0] for row in rows[1:]} == {"'=1+1.png", "'@x.png", "ok.png", "caf\\xe9.png"}


def test_predict_table_and_json_with_a_non_utf8_name_in_a_real_process(model, images):
    """A fresh interpreter writes stdout as strict UTF-8: the name is printed escaped, not a traceback."""
    env = {"PYTHONIOENCODING": "utf-8", "LC_ALL": "C.UTF-8"}
    table = run_cli_process("predict", "--model", model, images, "--device", "cpu", env=env)
    assert table.returncode == 0 and "Traceback" not in table.stderr, table.stderr
    assert "caf\\xe9.png" in table.stdout
    as_json = run_cli_process("predict", "--model", model, images, "--device", "cpu", "--json", env=env)
    assert as_json.returncode == 0, as_json.stderr
    assert len(json.loads(as_json.stdout)) == 4


def test_embed_index_escapes_formulas_and_non_utf8_names(model, images, tmp_path):
    out = tmp_path / "e.npy"
    r = run_cli("embed", "--model", model, ".", "--out", out, "--device", "cpu", cwd=images)
    assert r.returncode == 0, r.stderr
    rows = _cells(tmp_path / "e.index.csv")
    _no_formula(rows)
    assert {row[1] for row in rows[1:]} == {"'=1+1.png", "'@x.png", "ok.png", "caf\\xe9.png"}
    assert np.load(out).shape[0] == 4


def test_outputs_that_are_the_models_own_files_are_refused(model, images, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(model, d)
    (d / RunDir.NEIGHBOURS).write_bytes(b"the model's own bank")
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    for args, needle in [(["embed", "--model", d, images, "--out", d / RunDir.NEIGHBOURS], "model's own files"),
                         (["embed", "--model", d, images, "--out", d / ".." / "m" / RunDir.BEST], "model's own files"),
                         (["predict", "--model", d, images, "--csv", d / RunDir.META], "--csv")]:
        assert_clean_error(run_cli(*args, "--device", "cpu"), needle)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    if sys.platform != "win32":
        link = tmp_path / "link.safetensors"
        link.symlink_to(d / RunDir.NEIGHBOURS)
        assert_clean_error(run_cli("embed", "--model", d, images, "--out", link, "--device", "cpu"), "own files")
        assert (d / RunDir.NEIGHBOURS).read_bytes() == b"the model's own bank"


def test_atomic_writes_keep_the_files_mode(tmp_path):
    p = tmp_path / "model.json"
    atomic_write_json(p, {"a": 1})
    for mode in (0o600, 0o640, 0o444):
        os.chmod(p, mode)
        atomic_write_json(p, {"a": 2})
        assert stat.S_IMODE(p.stat().st_mode) == mode and json.loads(p.read_text()) == {"a": 2}
    new = tmp_path / "new.txt"
    atomic_write_text(new, "x")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(new.stat().st_mode) == 0o666 & ~umask


@pytest.mark.slow
def test_calibrate_keeps_model_json_private(trained_run, tmp_path):
    d = tmp_path / "run"
    shutil.copytree(trained_run[0], d)
    os.chmod(d / RunDir.META, 0o600)
    r = run_cli("calibrate", "--model", d, "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE((d / RunDir.META).stat().st_mode) == 0o600


@pytest.mark.parametrize("option,value,needle", [("--lr", "nan", "lr must be a finite number"),
                                                 ("--lr", "inf", "lr must be a finite number"),
                                                 ("--val-split", "nan", "val_split must be a finite number")])
def test_nan_options_are_one_line(tmp_path, option, value, needle):
    r = run_cli("train", "--model", "simple_cnn", option, value, "--out", tmp_path / "run", "--quiet")
    assert_clean_error(r, needle)
    assert not (tmp_path / "run" / RunDir.CHECKPOINT).exists()


def test_config_file_numbers_of_the_wrong_type_are_one_line(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  epochs: many\n")
    assert_clean_error(run_cli("train", "--config", cfg, "--out", tmp_path / "run", "--quiet"), "epochs must be a number")

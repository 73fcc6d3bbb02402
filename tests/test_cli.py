"""Every CLI command, good input and bad: exit codes and one-line errors, no tracebacks. The commands run in this
process through imgrec.cli.main (conftest.run_cli); a few run as real processes, one through the installed
console script, so that what a user's shell sees (exit code, stderr) is checked on a process too."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import assert_clean_error, run_cli, run_cli_process, write_image_folder


def test_models_lists_registry():
    r = run_cli("models", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    names = {row["name"] for row in rows}
    assert {"simple_cnn", "lenet5", "alexnet", "vgg11", "vgg16", "resnet18", "resnet34", "resnet50",
            "efficientnet_b0", "vit_tiny", "vit_b_16", "fastnet"} <= names
    r18 = next(row for row in rows if row["name"] == "resnet18")
    assert r18["pretrained"] and r18["params"] > 10_000_000
    table = run_cli("models")
    assert table.returncode == 0 and "resnet18" in table.stdout


def test_console_script_runs_and_fails_in_one_line(tmp_path):
    """The installed ``imgrec`` command (the console script pip wrote), as a user's shell runs it."""
    exe = Path(sys.executable).with_name("imgrec")
    r = subprocess.run([str(exe), "models"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "resnet18" in r.stdout, r.stderr
    r = subprocess.run([str(exe), "predict", "--model", str(tmp_path / "nomodel"), str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert_clean_error(r, "no such model directory")
    assert r.returncode == 2 and r.stdout == ""


def test_unknown_model_lists_choices(tmp_path):
    r = run_cli_process("train", "--model", "resnet19", "--out", tmp_path / "x")
    assert_clean_error(r, "unknown model 'resnet19'", "resnet18")
    assert r.returncode == 2


def test_missing_dataset_says_how_to_get_it(tmp_path):
    r = run_cli("train", "--data", "mnist", "--data-dir", tmp_path, "--model", "simple_cnn", "--out", tmp_path / "x",
                env={"IMGREC_OFFLINE": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert_clean_error(r, "dataset 'mnist' not found", "download")


def test_folder_with_no_images(tmp_path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "b").mkdir(parents=True)
    r = run_cli("train", "--data", tmp_path / "empty", "--model", "simple_cnn", "--out", tmp_path / "x")
    assert_clean_error(r, "empty class folder")
    r = run_cli("predict", "--model", tmp_path / "nomodel", tmp_path / "empty")
    assert_clean_error(r, "no such model directory")


@pytest.mark.slow
def test_train_eval_predict_on_image_folder(tmp_path, fmnist_arrays):
    """The same command trains on a folder of PNG/JPEG files as on a named dataset."""
    x, y, xt, yt = fmnist_arrays
    classes = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
    root = tmp_path / "fm"
    write_image_folder(root / "train", x, y, classes, 120)
    write_image_folder(root / "test", xt, yt, classes, 20)
    out = tmp_path / "run"
    r = run_cli("train", "--data", root, "--model", "simple_cnn", "--epochs", "3", "--image-size", "28",
                "--val-split", "0.2", "--lr", "3e-3", "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["test_acc"] > 0.5, s  # chance is 0.1

    r = run_cli("eval", "--model", out, "--data", root, "--split", "test", "--json")
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout)
    assert ev["top1"] == pytest.approx(s["test_acc"]) and ev["n"] == 200
    assert len(ev["per_class"]) == 10 and len(ev["confusion_matrix"]) == 10
    table = run_cli("eval", "--model", out, "--data", root)
    assert table.returncode == 0 and "precision" in table.stdout and "confusion matrix" in table.stdout

    r = run_cli("predict", "--model", out, root / "test" / "bag", "--top-k", "3", "--json")
    assert r.returncode == 0, r.stderr
    preds = json.loads(r.stdout)
    assert len(preds) == 20 and all(len(p["predictions"]) == 3 for p in preds)
    assert sum(p["predictions"][0]["label"] == "bag" for p in preds) >= 10

    r = run_cli("predict", "--model", out, root / "test" / "bag", "--csv", tmp_path / "p.csv")
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert len(rows) == 20 * 5 and set(rows[0]) - {"unknown", "ood_score"} == {"file", "rank", "label", "score", "error", "input_notes"}


@pytest.mark.slow
def test_predict_table_and_bad_images(trained_run, tmp_path, fmnist_arrays):
    out, _ = trained_run
    _, _, xt, _ = fmnist_arrays
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(3):
        Image.fromarray(xt[i]).save(d / f"{i}.png")
    r = run_cli("predict", "--model", out, d, "--top-k", "2")
    assert r.returncode == 0, r.stderr
    assert "0.png" in r.stdout and "%" in r.stdout

    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 50)
    r = run_cli("predict", "--model", out, d)
    assert_clean_error(r, "corrupt.jpg", "--on-bad-image skip")
    assert r.returncode == 1 and "0.png" in r.stdout  # the rest was predicted
    r = run_cli("predict", "--model", out, d, "--on-bad-image", "skip", "--json")
    assert r.returncode == 0
    entries = json.loads(r.stdout)
    assert len(entries) == 4 and [e["file"].endswith("corrupt.jpg") for e in entries if "error" in e] == [True]
    assert "corrupt.jpg" in r.stderr and "Traceback" not in r.stderr

    r = run_cli("predict", "--model", out, tmp_path / "missing.png")
    assert_clean_error(r, "missing.png")


@pytest.mark.slow
def test_eval_cli_on_named_dataset(trained_run):
    out, summary = trained_run
    r = run_cli("eval", "--model", out, "--data", "fashion-mnist", "--split", "test", "--json")
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout)
    assert ev["n"] == 10000 and ev["top1"] == pytest.approx(summary["test_acc"])
    assert ev["classes"][0] == "T-shirt/top"


def test_train_bad_options(tmp_path):
    r = run_cli("train", "--model", "simple_cnn", "--epochs", "0", "--out", tmp_path / "x")
    assert_clean_error(r, "epochs must be at least 1")
    r = run_cli("train", "--data", tmp_path / "nope", "--model", "simple_cnn", "--out", tmp_path / "x")
    assert_clean_error(r, "no such dataset")


def test_train_unwritable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run_cli_process("train", "--model", "simple_cnn", "--out", blocker / "run")
    assert_clean_error(r, "not writable")


def test_export_samples(tmp_path):
    r = run_cli("export-samples", "--data", "fashion-mnist", "--count", "3", "--out", tmp_path / "s")
    assert r.returncode == 0, r.stderr
    files = sorted((tmp_path / "s").glob("*.png"))
    assert len(files) == 3 and np.asarray(Image.open(files[0])).shape == (28, 28)


def test_every_train_flag_named_like_a_config_field_sets_it():
    """The flag → config key table is built from the config dataclasses: each field with a flag of its name
    (or a renamed one) is set by it, and no field is left without a way from the command line but kwargs."""
    from dataclasses import fields

    from imgrec.cli import build_parser
    from imgrec.cli.train import RENAMED_FLAGS, train_options
    from imgrec.config import DataConfig, ModelConfig, TrainConfig
    dests = set(vars(build_parser().parse_args(["train"])))
    options = train_options(dests)
    keys = {f.name for c in (DataConfig, ModelConfig, TrainConfig) for f in fields(c)}
    # val_files is written by a run that held validation out by groups (config.yaml carries it to --resume)
    assert set(options.values()) == keys - {"kwargs", "val_files"}
    assert all(options[flag] == key for flag, key in RENAMED_FLAGS.items())
    assert {"epochs", "lr", "accept_rate", "unknown", "tensorboard", "calibrate"} <= set(options)

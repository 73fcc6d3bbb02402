"""One file policy for every command that walks a folder: hidden and system entries (.ipynb_checkpoints/,
.DS_Store, AppleDouble ._* files, __MACOSX/) are skipped and counted, and symbolic links that lead out of the
dataset's folder are not followed. Files named on the command line are taken as they are."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgrec.cli import main
from imgrec.data.folder import scan_class_folders, scan_images


def cli(*args) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def _png(path: Path, value: int, side: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    Image.fromarray(np.clip(rng.normal(value, 20, (side, side)), 0, 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture()
def junk_folder(tmp_path) -> Path:
    """Two classes of 6 real images each, and the junk real folders carry."""
    root = tmp_path / "photos"
    for c, v in (("cat", 60), ("dog", 190)):
        for i in range(6):
            _png(root / c / f"{i}.png", v + i)
        _png(root / c / ".ipynb_checkpoints" / "0-checkpoint.png", v)     # a notebook's copy
        (root / c / f"._{c}0.png").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 60)  # AppleDouble: not an image
    (root / ".DS_Store").write_bytes(b"Bud1" + b"\x00" * 30)
    _png(root / "__MACOSX" / "cat" / "._0.png", 1)
    (root / ".hidden_class").mkdir()
    return root


def test_scans_skip_hidden_and_system_entries(junk_folder):
    paths, labels, classes = scan_class_folders(junk_folder)
    assert classes == ["cat", "dog"] and len(paths) == 12 and labels == [0] * 6 + [1] * 6
    assert all(not part.startswith(".") for p in paths for part in p.relative_to(junk_folder).parts)
    # __MACOSX, .hidden_class, and per class: .ipynb_checkpoints/ and ._x.png
    assert paths.skipped["hidden"] == 2 + 2 * 2 and paths.skipped["outside"] == 0
    files = scan_images(junk_folder)  # predict over a folder: the same policy
    assert len(files) == 12 and files.skipped["hidden"] >= 5  # .DS_Store counted too


def test_links_out_of_the_dataset_are_not_followed(tmp_path):
    outside = tmp_path / "home"
    secret = _png(outside / "private.png", 7)
    _png(outside / "album" / "a.png", 9)
    root = tmp_path / "handed"
    for c in ("a", "b"):
        for i in range(2):
            _png(root / c / f"{i}.png", 30 * i + (0 if c == "a" else 120))
    (root / "a" / "link.png").symlink_to(secret)                 # a file link out
    (root / "linked_class").symlink_to(outside / "album")        # a class folder link out
    (root / "b" / "alias.png").symlink_to(root / "a" / "0.png")  # a link inside the dataset: kept
    paths, _, classes = scan_class_folders(root)
    assert classes == ["a", "b"] and paths.skipped["outside"] == 2
    assert root / "b" / "alias.png" in paths and all(outside not in p.parents for p in paths)
    assert not any(p.name == "link.png" for p in paths)
    # the split layout: links between train/ and val/ stay inside the dataset's folder
    split = tmp_path / "split"
    _png(split / "train" / "a" / "0.png", 1)
    _png(split / "train" / "b" / "0.png", 200)
    _png(split / "val" / "a" / "0.png", 3)
    (split / "train" / "b" / "v.png").symlink_to(split / "val" / "a" / "0.png")
    tr, _, _ = scan_class_folders(split / "train")
    assert len(tr) == 3 and tr.skipped["outside"] == 0
    allowed, _, _ = scan_class_folders(root, follow_links_out=True)
    assert len(allowed) == len(paths) + 2


def test_train_check_and_predict_skip_the_junk(junk_folder, tmp_path):
    rc, out, err = cli("data", "check", junk_folder)
    assert rc == 0, err
    assert "skipped: 6 hidden or system entries" in out and "unreadable files: 0" in out

    run = tmp_path / "run"
    rc, out, err = cli("train", "--data", junk_folder, "--model", "simple_cnn", "--epochs", 1, "--batch-size", 4,
                       "--image-size", 16, "--val-split", 0.25, "--out", run)
    assert rc == 0, err  # the ._ files would have stopped it (unreadable images)
    assert "Traceback" not in err
    classes = json.loads((run / "model.json").read_text())["classes"]
    assert classes == ["cat", "dog"]

    rc, out, err = cli("predict", "--model", run, junk_folder, "--json")
    assert rc == 0, err
    listed = json.loads(out)
    names = [str(r.get("file") or r.get("path")) for r in (listed if isinstance(listed, list) else
                                                          listed.get("predictions", []))]
    assert len(names) == 12 and not any("/." in n or "__MACOSX" in n for n in names)
    # a junk file named on the command line is taken as asked (and fails to decode, in one line)
    rc, out, err = cli("predict", "--model", run, junk_folder / "cat" / "._cat0.png")
    assert rc != 0 and "Traceback" not in err and "._cat0.png" in err

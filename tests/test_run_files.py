"""RunDir names every file of a run directory, and ``--overwrite`` leaves none of the previous run's files:
an old model.onnx, ood.safetensors or neighbours.safetensors beside a new model.json would be served or
scored as if it belonged to the new network (issue 36)."""
from __future__ import annotations

import ast
import os
import shutil
from pathlib import Path

import pytest

from conftest import assert_clean_error, run_cli
from imgrec.modeldir import RunDir

SRC = Path(__file__).resolve().parents[1] / "src" / "imgrec"

# literals of run-directory names still spelled outside modeldir.py, in files being changed elsewhere;
# each entry goes when that file takes the name from RunDir
PENDING: set = set()


def test_only_rundir_spells_a_run_directory_file_name():
    """No module but modeldir.py has a run directory's file name as a string of its own (a name written in
    two places drifts, and --overwrite then misses a file)."""
    found = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        if rel == "modeldir.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Constant) and node.value in RunDir.FILES:
                found.append((rel, node.value))
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) and \
                    isinstance(node.right, ast.Constant) and node.right.value in RunDir.FOLDERS:
                found.append((rel, node.right.value))
    assert set(found) <= PENDING, found


def test_writers_take_their_names_from_rundir():
    from imgrec.infer.backends import EXPORTED_NAME
    from imgrec.infer.export import FORMATS
    from imgrec.infer.neighbours import NEIGHBOURS_FILE
    from imgrec.infer.ood import STATS_FILE
    assert STATS_FILE == RunDir.OOD and NEIGHBOURS_FILE == RunDir.NEIGHBOURS and EXPORTED_NAME == RunDir.ONNX
    exported = {n for f in FORMATS.values() for n in (f.default_name, f.int8_name) if n}
    assert exported <= set(RunDir.FILES)


def test_run_files_and_clear_cover_every_file_and_keep_the_rest(tmp_path):
    rd = RunDir(tmp_path)
    for name in RunDir.FILES:
        (tmp_path / name).write_bytes(b"old")
    (tmp_path / "tensorboard" / "sub").mkdir(parents=True)
    (tmp_path / "tensorboard" / "events.out.tfevents.1").write_bytes(b"old")
    (tmp_path / "tensorboard" / "sub" / "events.out.tfevents.2").write_bytes(b"old")
    (tmp_path / "notes.txt").write_text("the user's own file")
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / "a.png").write_bytes(b"x")
    listed = set(rd.run_files())
    assert {tmp_path / n for n in RunDir.FILES} <= listed
    assert tmp_path / "tensorboard" / "sub" / "events.out.tfevents.2" in listed
    assert tmp_path / "notes.txt" not in listed and tmp_path / "samples" / "a.png" not in listed
    rd.clear()
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == \
        ["notes.txt", "samples", "samples/a.png"]
    rd.clear()  # nothing left to remove: no error


def test_clear_does_not_follow_a_linked_folder(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("not the run's")
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(outside, run / "tensorboard")
    assert all(outside not in p.parents for p in RunDir(run).run_files())
    RunDir(run).clear()
    assert (outside / "keep.txt").read_text() == "not the run's" and not (run / "tensorboard").exists()


@pytest.mark.slow
def test_overwrite_leaves_no_file_of_the_previous_run(trained_run, exported_run, tmp_path):
    """A run with every optional file (the "unknown" statistics, the neighbours bank, TensorBoard events,
    exported models) retrained into the same folder with --overwrite and --no-unknown: every file there is
    the new run's, and what the new run does not write is gone (not served as if it were the new model)."""
    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    shutil.copy(exported_run[0], run / RunDir.ONNX)
    shutil.copy(exported_run[0], run / RunDir.ONNX_INT8)
    (run / RunDir.TENSORBOARD).mkdir(exist_ok=True)  # the shared run may have its own events
    (run / RunDir.TENSORBOARD / "events.out.tfevents.0.old").write_bytes(b"old events")
    assert (run / RunDir.OOD).is_file() and (run / RunDir.NEIGHBOURS).is_file()
    # hard links keep each old file's inode alive: a file still there afterwards is the same file
    witness = tmp_path / "witness"
    witness.mkdir()
    old = [p for p in run.rglob("*") if p.is_file()]
    for i, p in enumerate(old):
        os.link(p, witness / str(i))
    r = run_cli("train", "--data", "fashion-mnist", "--model", "simple_cnn", "--epochs", "1", "--train-limit", "600",
                "--val-split", "200", "--batch-size", "100", "--no-unknown", "--no-calibrate", "--no-tensorboard",
                "--out", run, "--overwrite", "--quiet", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    now = [p for p in run.rglob("*") if p.is_file()]
    assert not [p for p in now for i in range(len(old)) if os.path.samefile(p, witness / str(i))]
    names = {p.relative_to(run).as_posix() for p in now}
    assert {RunDir.META, RunDir.BEST, RunDir.LAST, RunDir.CONFIG, RunDir.METRICS} <= names
    assert not names & {RunDir.OOD, RunDir.NEIGHBOURS, *RunDir.EXPORTS}
    assert not any(n.startswith(RunDir.TENSORBOARD + "/") for n in names)
    # what reads those files now refuses, instead of running the old network beside the new model.json
    assert_clean_error(run_cli("predict", "--model", run, "--backend", "onnxruntime", witness / "0"), "model.onnx")

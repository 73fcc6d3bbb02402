"""eval, report and export reuse the run's own data settings (model.json): a run trained with
``--on-bad-image skip`` on a folder without a test split is evaluated and exported with no flags; the
validation split stands in for the missing test split with a note; top-k accuracy only where k is below
the number of classes."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import assert_clean_error, run_cli, write_image_folder

from imgrec.eval.metrics import has_topk, summarize

CLASSES = ["T-shirt", "Trouser"]


@pytest.fixture(scope="module")
def skip_run(tmp_path_factory, fmnist_arrays):
    """A 2-class folder with one unreadable image, trained with --on-bad-image skip (no test split)."""
    x, y, _, _ = fmnist_arrays
    root = tmp_path_factory.mktemp("reuse")
    photos = write_image_folder(root / "photos", x, y, CLASSES, per_class=30)
    (photos / "Trouser" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = root / "runs" / "mine"
    r = run_cli("train", "--data", photos, "--model", "simple_cnn", "--epochs", "1", "--image-size", "16",
                "--batch-size", "16", "--on-bad-image", "skip", "--out", out, cwd=root)
    assert r.returncode == 0, r.stderr
    return out, photos, root


@pytest.mark.slow
def test_eval_with_no_flags_reuses_the_run_and_falls_back_to_val(skip_run):
    out, photos, root = skip_run
    meta = json.loads((out / "model.json").read_text())
    r = run_cli("eval", "--model", out, "--json", cwd=root)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["split"] == "val" and res["n"] == sum(meta["data"]["counts"]["val"])
    notes = [ln for ln in r.stderr.splitlines() if "no test split" in ln]
    assert len(notes) == 1 and "validation split" in notes[0]
    # 2 classes: every label is in the "top 5", so top-5 accuracy is not reported
    assert res["top5"] is None
    assert "skipped" in r.stderr and "broken.jpg" in r.stderr  # the run's skip policy, not a failure

    r = run_cli("eval", "--model", out, cwd=root)
    assert r.returncode == 0, r.stderr
    assert "split val" in r.stdout and "top-5 accuracy -" in r.stdout


@pytest.mark.slow
def test_explicit_test_split_suggests_val(skip_run):
    out, _, root = skip_run
    r = run_cli("eval", "--model", out, "--split", "test", cwd=root)
    assert_clean_error(r, "no 'test' split", "--split val")


@pytest.mark.slow
def test_explicit_options_override_the_run(skip_run):
    out, _, root = skip_run
    r = run_cli("eval", "--model", out, "--split", "val", "--on-bad-image", "fail", cwd=root)
    assert_clean_error(r, "1 unreadable image(s)", "broken.jpg", "--on-bad-image skip")


@pytest.mark.slow
def test_export_with_no_flags_and_with_eval_options(skip_run):
    pytest.importorskip("onnxruntime")
    out, _, root = skip_run
    r = run_cli("export", "--model", out, "--check-limit", "20", "--json", cwd=root)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert (out / "model.onnx").is_file() and res["check"]["passed"]
    n_val = sum(json.loads((out / "model.json").read_text())["data"]["counts"]["val"])
    assert "validation split" in res["check"]["data"] and res["check"]["n"] == min(20, n_val)

    r = run_cli("export", "--model", out, "--check", "--on-bad-image", "skip", "--split", "train",
                "--check-limit", "8", "--json", cwd=root)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["n"] == 8 and "train split" in json.loads(r.stdout)["data"]

    r = run_cli("export", "--model", out, "--check", "--split", "test", cwd=root)
    assert_clean_error(r, "--split val")


@pytest.mark.slow
def test_report_has_no_top5_for_two_classes(skip_run):
    pytest.importorskip("jinja2")
    pytest.importorskip("matplotlib")
    out, _, root = skip_run
    html = root / "r.html"
    r = run_cli("report", "--model", out, "--out", html, "--json", cwd=root)
    assert r.returncode == 0, r.stderr
    numbers = json.loads(r.stdout)
    assert "top5" not in numbers["accuracy"] and numbers["eval"]["top5"] is None
    assert numbers["eval"]["split"] == "val"
    page = html.read_text()
    assert 'id="card-top1"' in page and 'id="card-topk"' not in page


def test_summarize_reports_top_k_only_below_the_class_count():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 2.0, 1.0], [1.0, 0.0, 2.0], [2.0, 0.0, 1.0]])
    target = torch.tensor([0, 2, 1, 1])
    assert summarize(logits, target, list("abc"), top_k=2)["top2"] == pytest.approx(0.5)
    assert summarize(logits, target, list("abc"), top_k=3)["top3"] is None
    assert summarize(logits[:, :2], target.clamp(max=1), list("ab"), top_k=5)["top5"] is None
    assert [has_topk(k, 5) for k in (1, 2, 4, 5, 6)] == [False, True, True, False, False]
    assert summarize(logits, target, list("abc"), top_k=1)["top1"] == pytest.approx(0.25)  # not overwritten

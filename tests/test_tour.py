"""docs/make_tour.py builds the guided tour from a fresh run: its pictures exist, and the numbers it quotes are
the run's own (model.json, eval/explain/export JSON), so the tour cannot drift from what imgrec does."""
from __future__ import annotations

import csv
import importlib.util
import json
import re
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "docs" / "make_tour.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _module():
    spec = importlib.util.spec_from_file_location("make_tour", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tour(tmp_path_factory):
    """The script's main() in this process, each of its `imgrec` commands through imgrec.cli.main in the work
    folder (conftest.run_cli) instead of a fresh interpreter: the same commands, arguments and outputs, without a
    torch import per command. A failed command still stops the script with its exit code and output."""
    from conftest import run_cli

    out = tmp_path_factory.mktemp("tour")
    work = out / "work"
    mod = _module()

    def in_process(self, *args):
        t0 = time.perf_counter()
        r = run_cli(*args, cwd=self.work, env={"MPLBACKEND": "Agg"})
        self.seconds[args[0]] = self.seconds.get(args[0], 0.0) + time.perf_counter() - t0
        if r.returncode != 0:
            raise AssertionError(f"`imgrec {' '.join(args)}` failed ({r.returncode}): {r.stdout}{r.stderr}")
        return r

    mod.Imgrec.__call__ = in_process
    assert mod.main(["--out", str(out), "--work", str(work)]) == 0
    md = (out / "tour.md").read_text(encoding="utf-8")
    return out, work, md


def _one(pattern: str, text: str, flags: int = 0) -> re.Match:
    found = list(re.finditer(pattern, text, flags))
    assert len(found) == 1, f"{pattern!r} found {len(found)} times"
    return found[0]


def _code_after(md: str, marker: str) -> str:
    """The first fenced code block after ``marker`` (which must appear once)."""
    assert md.count(marker) == 1, marker
    return _one(re.escape(marker) + r".*?```\n(.*?)\n```", md, re.S).group(1)


@pytest.mark.slow
def test_tour_md_sections_in_order(tour):
    out, _, md = tour
    assert (out / "tour.md").is_file()
    headings = re.findall(r"^## (.+)$", md, flags=re.M)
    assert headings == _module().SECTIONS
    bodies = re.split(r"^## .+$", md, flags=re.M)[1:]
    topics = (["pixel", "numbers"], ["filter", "feature map", "ReLU", "pool"],
              ["logit", "softmax", "CrossEntropyLoss", "gradient", "SGD"], ["epoch", "metrics.csv"],
              ["test split", "confusion", "ECE", "temperature"], ["Vision Transformer", "not"],
              ["imgrec predict", "imgrec export", "onnxruntime", "imgrec serve"])
    for heading, body, words in zip(headings, bodies, topics, strict=True):
        for w in words:
            assert w.lower() in body.lower(), (heading, w)


@pytest.mark.slow
def test_every_picture_exists_and_is_a_real_png(tour):
    out, _, md = tour
    from PIL import Image

    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(links) >= 6
    made = [l for l in links if l.startswith("tour/")]
    assert len(made) >= 5 and sorted(made) == sorted(f"tour/{p.name}" for p in (out / "tour").glob("*.png"))
    for link in links:
        path = (out / link).resolve()
        assert path.is_file(), link
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5_000, (link, len(data))
        with Image.open(path) as im:
            im.verify()
    for link in made:
        assert (out / link).stat().st_size < 300_000, link
    # the one picture not made by the run is the measured CNN-vs-ViT figure, and the text says so
    others = [l for l in links if not l.startswith("tour/")]
    assert [Path(l).name for l in others] == ["cnn_vs_vit.png"]
    assert "**not** made by this tour's run" in md


@pytest.mark.slow
def test_numbers_are_the_runs_own(tour):
    out, work, md = tour
    meta = json.loads((work / "run" / "model.json").read_text())
    ev = json.loads((work / "eval.json").read_text())
    ex = json.loads((work / "explain.json").read_text())
    exp = json.loads((work / "export.json").read_text())

    # evaluation: the test accuracy equals the run's final test and `imgrec eval`'s
    m = _one(r"Test accuracy: \*\*([\d.]+)%\*\* \(the run's own final test in `model.json`: ([\d.]+)%\)", md)
    assert m.group(1) == f"{ev['top1'] * 100:.2f}"
    assert m.group(2) == f"{meta['metrics']['test_acc'] * 100:.2f}"
    assert f"**test split**\n({ev['n']:,} images)" in md
    cal = ev["calibration"]
    assert _one(r"the test ECE is\n?\s*([\d.]+)", md).group(1) == f"{cal['before']['ece']:.4f}"
    assert _one(r"the test ECE drops to \*\*([\d.]+)\*\*", md).group(1) == f"{cal['after']['ece']:.4f}"
    t = _one(r"temperature T = ([\d.]+) on the validation split", md).group(1)
    assert t == f"{cal['temperature']:.3f}" == f"{meta['inference']['temperature']['T']:.3f}"
    cm = np.asarray(ev["confusion_matrix"])
    np.fill_diagonal(cm, 0)
    i, j = np.unravel_index(cm.argmax(), cm.shape)
    assert f"{cm[i, j]} images of **{ev['classes'][i]}** called **{ev['classes'][j]}**" in md

    # explain --steps: the loss is -log p of the true label, and one SGD step's numbers
    tr = ex["training"]
    k = tr["label_index"]
    m = _one(r"−log\(([\d.]+)\) = \*\*([\d.]+)\*\*", md)
    assert m.group(1) == f"{tr['probabilities'][k]:.4f}" and m.group(2) == f"{tr['loss']:.4f}"
    assert abs(-np.log(tr["probabilities"][k]) - tr["loss"]) < 1e-4
    assert f"**{tr['step']['loss_after']:.4f}**" in md
    assert f"the logit of {tr['label']} is **{tr['classifier']['logits'][k]:.3f}**" in md
    for layer in tr["layers"]:
        assert f"| `{layer['name']}` | {'×'.join(map(str, layer['shape']))} | {layer['grad_norm']:.4f} |" in md

    # epochs: the table is metrics.csv
    with open(work / "run" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        assert re.search(rf"^\| {r['epoch']} \| {float(r['train_loss']):.4f} \|.*\| {float(r['val_loss']):.4f} \|",
                         md, flags=re.M), r
    assert f"The best validation accuracy was {meta['metrics']['val_acc'] * 100:.2f}% at epoch " \
           f"{meta['metrics']['best_epoch']}" in md

    # export: the check's numbers
    assert f"agree on {exp['check']['agreement'] * 100:.2f}% of the top-1 labels" in md
    assert f"({exp['bytes'] / 1e6:.1f} MB)" in md


@pytest.mark.slow
def test_pixel_table_is_the_image(tour):
    _, work, md = tour
    from PIL import Image

    first = sorted((work / "samples").glob("*.png"))[0]
    img = np.asarray(Image.open(first))
    table = np.array([[int(v) for v in line.split()] for line in _code_after(md, "numbers, row by row:").splitlines()])
    assert table.shape == img.shape == (28, 28)
    assert (table == img).all()
    assert f"`{first.name}`" in md


@pytest.mark.slow
def test_commands_shown_are_the_commands_run(tour):
    _, work, md = tour
    mod = _module()
    train = " ".join(["imgrec train", *mod.TRAIN_ARGS, "--out", mod.RUN])
    assert train in md
    cfg = json.loads((work / "run" / "model.json").read_text())["config"]["train"]
    assert str(cfg["epochs"]) == mod.TRAIN_ARGS[mod.TRAIN_ARGS.index("--epochs") + 1]
    with open(work / "predict.csv", newline="") as f:
        top = [r for r in csv.DictReader(f) if r["rank"] == "1"]
    assert len(top) == mod.N_SAMPLES
    table = md.split("## " + mod.SECTIONS[6], 1)[1].split("imgrec export --model", 1)[0]  # PyTorch's table
    for r in top:  # its top-1 column, to one decimal
        m = _one(rf"^{re.escape(r['file'])} .*?{re.escape(r['label'])} \(([\d.]+)%\)", table, re.M)
        assert abs(float(m.group(1)) - float(r["score"]) * 100) <= 0.051, (r, m.group(0))

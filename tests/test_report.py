"""The HTML evaluation report: its numbers are `imgrec eval --json`'s, it is valid and self-contained HTML,
its ECE and confidence intervals match independent computations, and it works in Chromium."""
from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli

from imgrec.data.dataset import ImageData
from imgrec.eval.report import build_report, wilson_interval
from imgrec.infer.predictor import Classifier

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Page(HTMLParser):
    """A strict reading of the report: every element closed in order, unique ids, and an index of the
    elements (tag, attributes, text) for the number checks."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.errors: list[str] = []
        self.stack: list[tuple[str, dict]] = []
        self.elements: list[dict] = []     # in document order; "text" filled when the element closes
        self.ids: dict[str, dict] = {}
        self.doctype = None
        self.feed(html)
        self.close()
        if self.stack:
            self.errors.append(f"unclosed: {[t for t, _ in self.stack]}")

    def handle_decl(self, decl):
        self.doctype = decl

    def handle_starttag(self, tag, attrs):
        self._separate()
        a = dict(attrs)
        if len(a) != len(attrs):
            self.errors.append(f"<{tag}> repeats an attribute")
        el = {"tag": tag, "attrs": a, "text": "", "children": []}
        if self.stack:
            self.stack[-1][1]["children"].append(el)
        self.elements.append(el)
        if "id" in a:
            if a["id"] in self.ids:
                self.errors.append(f"duplicate id {a['id']!r}")
            self.ids[a["id"]] = el
        if tag not in VOID:
            self.stack.append((tag, el))

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if tag not in VOID:
            self.errors.append(f"self-closing non-void <{tag}/>")
            self.stack.pop()

    def _separate(self):
        # element boundaries separate words, as a browser's layout mostly does ("80.00%" then "95% CI")
        for _, el in self.stack:
            el["text"] += " "

    def handle_endtag(self, tag):
        self._separate()
        if tag in VOID:
            self.errors.append(f"end tag for void element </{tag}>")
            return
        if not self.stack or self.stack[-1][0] != tag:
            self.errors.append(f"</{tag}> does not close {self.stack[-1][0] if self.stack else 'anything'}")
            return
        self.stack.pop()

    def handle_data(self, data):
        for _, el in self.stack:
            el["text"] += data


def text(el) -> str:
    return " ".join(el["text"].split())


def rows(table) -> list[list[dict]]:
    """Cells (th and td) of each tr of a table element, in order."""
    out = []

    def walk(el):
        if el["tag"] == "tr":
            out.append([c for c in el["children"] if c["tag"] in ("td", "th")])
        for c in el["children"]:
            walk(c)
    walk(table)
    return out


@pytest.fixture(scope="module")
def report_and_eval(trained_run, tmp_path_factory):
    """`imgrec report` and `imgrec eval --json` on the same model and data, through the CLI."""
    run_dir, _ = trained_run
    model = f"{run_dir}/"  # as a user may type it: the report names the model exactly as eval does
    out = tmp_path_factory.mktemp("report") / "report.html"
    r = run_cli("report", "--model", model, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout
    e = run_cli("eval", "--model", model, "--json")
    assert e.returncode == 0, e.stderr
    return out.read_text(encoding="utf-8"), json.loads(e.stdout)


@pytest.mark.slow
def test_report_numbers_equal_eval_json(report_and_eval):
    html, ev = report_and_eval
    page = Page(html)
    numbers = json.loads(page.ids["report-numbers"]["text"])
    assert numbers["eval"] == ev  # every number, bit for bit (JSON floats round-trip)

    # ... and what a reader sees is those numbers, formatted
    assert text(page.ids["card-top1"]).startswith(f"top-1 accuracy {ev['top1'] * 100:.2f}%")
    assert text(page.ids["card-topk"]).startswith(f"top-5 accuracy {ev['top5'] * 100:.2f}%")
    assert f"{ev['loss']:.4f}" in text(page.ids["card-loss"])
    assert f"{ev['macro_f1']:.4f}" in text(page.ids["card-f1"])
    table = rows(page.ids["per-class"])
    assert [text(c) for c in table[0]] == ["class", "precision", "recall", "F1", "support"]
    assert len(table) - 1 == len(ev["per_class"])
    for cells, expected in zip(table[1:], ev["per_class"]):
        assert text(cells[0]) == expected["class"]
        for cell, key in zip(cells[1:4], ("precision", "recall", "f1")):
            assert float(cell["attrs"]["data-sort"]) == expected[key]       # the exact value, for sorting
            assert text(cell) == f"{expected[key]:.4f}"                      # the shown value
        assert int(cells[4]["attrs"]["data-sort"]) == expected["support"] == int(text(cells[4]))
    cm = [[int(text(c)) for c in r[1:]] for r in rows(page.ids["confusion-matrix"])[1:]]
    assert cm == ev["confusion_matrix"]
    # the test split's class counts are the supports; the top-1 count is the matrix's diagonal
    counts = rows(page.ids["class-counts"])
    col = [text(c) for c in counts[0]].index("test")
    assert [int(text(r[col])) for r in counts[1:-1]] == [row["support"] for row in ev["per_class"]]
    # the counts beside them: top-1 hits and mistakes both agree with the matrix and with top-1 accuracy
    diagonal = sum(ev["confusion_matrix"][i][i] for i in range(len(cm)))
    assert numbers["accuracy"]["top1"]["correct"] == diagonal == round(ev["top1"] * ev["n"])
    assert numbers["misclassified"] == ev["n"] - diagonal


@pytest.mark.slow
def test_misclassified_gallery_shows_the_nearest_training_images(report_and_eval):
    html, _ = report_and_eval
    gallery = html[html.index('id="misclassified"'):]
    gallery = gallery[:gallery.index("</section>")]
    assert gallery.count('class="thumb"') == gallery.count('class="neighbours"') > 0
    assert gallery.count("alt=\"nearest training image:") == 3 * gallery.count('class="neighbours"')
    assert 'id="note-neighbours"' in html
    # every chart has its sentence on how to read it (the run has a temperature: two reliability diagrams)
    for note in ("note-curves", "note-calibration", "note-calibration-after"):
        assert f'id="{note}"' in html


@pytest.mark.slow
def test_report_is_valid_self_contained_html(report_and_eval):
    html, ev = report_and_eval
    page = Page(html)
    assert page.errors == []
    assert page.doctype and page.doctype.lower() == "doctype html"
    assert page.elements[0]["tag"] == "html" and page.elements[0]["attrs"].get("lang") == "en"
    assert any(e["tag"] == "meta" and e["attrs"].get("charset") == "utf-8" for e in page.elements)
    # nothing outside the file: no network address anywhere, no external script, stylesheet or image
    outside_data = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", html)  # base64 may hold "//"
    found = re.search(r"(https?:|ftp:|file:)?//[a-z0-9]\S{0,40}", outside_data, re.I)
    assert found is None, found
    assert "@import" not in html and "url(" not in html
    assert not any(e["tag"] in ("link", "iframe", "object", "embed", "base") for e in page.elements)
    assert all("src" not in e["attrs"] for e in page.elements if e["tag"] == "script")
    images = [e for e in page.elements if e["tag"] == "img"]
    assert len(images) > 100  # plots, confusion examples, mistakes, per-class samples
    for e in images:
        assert e["attrs"]["src"].startswith("data:image/png;base64,") and e["attrs"].get("alt")
    png = base64.b64decode(images[0]["attrs"]["src"].split(",", 1)[1])
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    for e in page.elements:
        if e["tag"] == "a":
            assert e["attrs"]["href"].startswith("#") and e["attrs"]["href"][1:] in page.ids
    # the galleries: mistakes worst first, each one really a mistake
    gallery = [c for c in page.ids["misclassified"]["children"] if c["tag"] == "figure"]
    assert len(gallery) == min(60, ev["n"] - sum(ev["confusion_matrix"][i][i] for i in range(len(ev["classes"]))))
    confidences = [float(re.search(r"pred: .* ([\d.]+)%", text(f)).group(1)) for f in gallery]
    assert confidences == sorted(confidences, reverse=True)
    for f in gallery:
        true, pred = re.search(r"true: (.*) [\d.]+% pred: (.*) [\d.]+%", text(f)).groups()
        assert true != pred and true in ev["classes"] and pred in ev["classes"]


def test_ece_and_intervals_match_independent_computations(trained_run, fmnist_arrays):
    run_dir, _ = trained_run
    clf = Classifier.load(run_dir, device="cpu")
    _, _, xt, yt = fmnist_arrays
    data = ImageData(torch.from_numpy(xt[:3000]).unsqueeze(1), torch.from_numpy(yt[:3000]).long())
    report = build_report(clf, data, split="test", data_name="fashion-mnist (first 3000)", model_dir=run_dir,
                          max_gallery=10, samples_per_class=2)
    numbers = report.numbers

    # ECE from scratch: numpy softmax of the model's logits, a Python loop over 15 bins (lo, hi]
    logits = clf.logits(data.images, 1024).double().numpy()
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    conf, pred = p.max(1), p.argmax(1)
    correct = pred == yt[:3000]
    ece, counts = 0.0, []
    for b in range(15):
        lo, hi = b / 15, (b + 1) / 15
        inside = (conf > lo) & (conf <= hi) if b else (conf <= hi)
        counts.append(int(inside.sum()))
        if inside.any():
            ece += inside.mean() * abs(correct[inside].mean() - conf[inside].mean())
    assert numbers["calibration"]["ece"] == pytest.approx(ece, abs=1e-6)
    assert numbers["calibration"]["bins"]["count"] == counts
    assert f"{ece:.4f}" in report.html

    # Wilson intervals against scipy's
    from scipy.stats import binomtest
    for key in ("top1", "top5"):
        acc = numbers["accuracy"][key]
        assert acc["value"] == numbers["eval"][key]
        assert acc["correct"] == round(acc["value"] * 3000)
        ci = binomtest(acc["correct"], 3000).proportion_ci(confidence_level=0.95, method="wilson")
        assert (acc["ci_low"], acc["ci_high"]) == pytest.approx((ci.low, ci.high), abs=1e-9)
        assert acc["ci_low"] < acc["value"] < acc["ci_high"]
    # the interval stays inside [0, 1] at the extremes, where the normal approximation collapses
    assert wilson_interval(0, 20)[0] == 0 and wilson_interval(0, 20)[1] > 0.1
    assert wilson_interval(20, 20)[1] == 1 and wilson_interval(20, 20)[0] < 0.9


def test_report_escapes_names_and_works_without_a_run_directory(tmp_path):
    """Class and file names come from the user's folders: they are text, never markup. A model directory
    without metrics.csv still gets a report."""
    from imgrec.models import create_model
    classes = ["<b>bold</b>", "a & b", 'say "hi"']
    torch.manual_seed(0)
    model = create_model("lenet5", num_classes=3, in_chans=1, image_size=28)
    from imgrec.modeldir import ModelMeta
    meta = ModelMeta(model={"name": "lenet5"}, classes=classes, image_size=28, channels=1,
                     mean=[0.5], std=[0.5], data={"source": "my-folder"})
    clf = Classifier(model, meta, device="cpu")
    rng = np.random.RandomState(0)
    images = torch.from_numpy(rng.randint(0, 256, (30, 1, 28, 28), dtype=np.uint8))
    labels = torch.arange(30) % 3
    paths = [f"/data/{classes[int(y)]}/img<{i}>.png" for i, y in enumerate(labels)]
    report = build_report(clf, ImageData(images, labels, paths), split="val", model_dir=tmp_path)
    html = report.html
    assert "<b>bold</b>" not in html and "&lt;b&gt;bold&lt;/b&gt;" in html
    assert "img&lt;" in html and "img<" not in html
    page = Page(html)
    assert page.errors == []
    assert "No metrics.csv" in html
    assert json.loads(page.ids["report-numbers"]["text"])["eval"]["classes"] == classes
    out = report.save(tmp_path / "sub" / "r.html")
    assert out.read_text(encoding="utf-8") == html


def test_report_cli_errors_are_one_line(tmp_path):
    r = run_cli("report", "--model", tmp_path / "nope", "--out", tmp_path / "r.html")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "no such model directory" in r.stderr
    assert not (tmp_path / "r.html").exists()


@pytest.mark.browser
def test_report_in_chromium(report_and_eval, tmp_path):
    """Open the report in Debian's Chromium with no network: it makes no request, logs no error, and the
    per-class table sorts when a heading is clicked."""
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip("Debian's chromium is not installed")
    sync_playwright = pytest.importorskip("playwright.sync_api").sync_playwright
    html, ev = report_and_eval
    path = tmp_path / "report.html"
    path.write_text(html, encoding="utf-8")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(chromium), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            requests, problems = [], []
            page.on("request", lambda req: requests.append(req.url))
            page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
            page.on("pageerror", lambda e: problems.append(str(e)))
            page.goto(path.as_uri())
            page.wait_for_load_state("load")
            assert [u for u in requests if not u.startswith("data:")] == [path.as_uri()]
            assert problems == []
            # every image decoded (a broken data URI has naturalWidth 0)
            assert page.evaluate("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")

            def column(i):
                return page.eval_on_selector_all(
                    "#per-class tbody tr", f"rows => rows.map(r => r.cells[{i}].textContent.trim())")
            page.click("#per-class th:nth-child(3)")   # recall, ascending
            recalls = [float(v) for v in column(2)]
            assert recalls == sorted(recalls)
            page.click("#per-class th:nth-child(3)")   # and descending
            assert [float(v) for v in column(2)] == sorted(recalls, reverse=True)
            assert column(0)[0] == max(ev["per_class"], key=lambda r: r["recall"])["class"]
            page.click("#per-class th:nth-child(1)")   # class names sort as text
            assert column(0) == sorted(column(0), key=str.lower)
            page.screenshot(path=str(tmp_path / "report.png"), full_page=True)
            assert (tmp_path / "report.png").stat().st_size > 50_000
        finally:
            browser.close()


def test_chart_notes_follow_the_run_settings_and_the_bins():
    from imgrec.eval.report import chart_notes
    from imgrec.modeldir import ModelMeta
    meta = ModelMeta(model={"name": "lenet5"}, classes=["a", "b"], image_size=28, channels=1, mean=[0.5],
                     std=[0.5], config={"train": {"label_smoothing": 0.1, "crop_padding": 2, "val_last": 2}})
    over = {"bins": {"count": [10, 30], "confidence": [0.6, 0.95], "accuracy": [0.5, 0.8]}}
    notes = chart_notes(meta, over)
    assert "label smoothing 0.1" in notes["curves"] and "last 2 epochs" in notes["curves"]
    assert "augmented" in notes["curves"]
    assert "over-confident" in notes["calibration"] and notes["calibration_gap"] == pytest.approx(0.1375)
    under = {"bins": {"count": [10], "confidence": [0.6], "accuracy": [0.9]}}
    plain = ModelMeta(model={"name": "lenet5"}, classes=["a", "b"], image_size=28, channels=1, mean=[0.5],
                      std=[0.5])
    notes = chart_notes(plain, under, after={"bins": {"count": [10], "confidence": [0.85], "accuracy": [0.9]},
                                             "temperature": 0.7})
    assert "under-confident" in notes["calibration"] and "because" not in notes["curves"]
    assert "T = 0.7" in notes["calibration_after"] and "−5.0 points" in notes["calibration_after"]


def test_many_classes_are_capped_on_the_page_and_in_eval_text(tmp_path, capsys):
    """2,000 classes printed 22 MB (eval) and a 56 MB page (report): the worst and best classes, a line for the
    rest, no confusion matrix beyond 30 classes; ``Report.numbers`` (report --json) keeps every class."""
    from imgrec.cli.evaluate import print_per_class_and_matrix
    from imgrec.modeldir import ModelMeta
    from imgrec.models import create_model
    k = 300
    classes = [f"class{i:04d}" for i in range(k)]
    torch.manual_seed(0)
    meta = ModelMeta(model={"name": "lenet5"}, classes=classes, image_size=28, channels=1, mean=[0.5], std=[0.5],
                     data={"source": "synthetic"})
    clf = Classifier(create_model("lenet5", num_classes=k, in_chans=1, image_size=28), meta, device="cpu")
    rng = np.random.RandomState(0)
    images = torch.from_numpy(rng.randint(0, 256, (2 * k, 1, 28, 28), dtype=np.uint8))
    report = build_report(clf, ImageData(images, torch.arange(2 * k) % k), split="val", model_dir=tmp_path)
    page = Page(report.html)
    assert page.errors == []
    assert len(rows(page.ids["per-class"])) <= 41  # heading + 20 worst + 20 best
    assert "260 more classes (all in --json)" in text(page.ids["per-class-more"])
    assert "confusion-matrix" not in page.ids and "confusion-left-out" in page.ids
    embedded = json.loads(page.ids["report-numbers"]["text"])
    assert len(embedded["eval"]["per_class"]) == 40 and "confusion_matrix" not in embedded["eval"]
    assert len(report.numbers["eval"]["per_class"]) == k and len(report.numbers["eval"]["confusion_matrix"]) == k

    # eval's text with 2,000 classes, from synthetic numbers: tens of lines, not 22 MB
    k = 2000
    f1 = np.linspace(0, 1, k)[np.random.RandomState(1).permutation(k)]
    res = {"classes": [f"c{i}" for i in range(k)], "confusion_matrix": [[0] * k for _ in range(k)],
           "per_class": [{"class": f"c{i}", "precision": f, "recall": f, "f1": f, "support": 3}
                         for i, f in enumerate(f1)]}
    capsys.readouterr()
    print_per_class_and_matrix(res)
    out = capsys.readouterr().out
    assert len(out) < 5000 and "… 1,960 more classes (all in --json)" in out
    assert "too many to print (all in --json)" in out
    shown = [ln.split()[0] for ln in out.splitlines()[2:42]]
    assert shown[0] == f"c{int(np.argmin(f1))}" and shown[-1] == f"c{int(np.argmax(f1))}"

    # up to 30 classes: every row and the matrix, as before
    res = {"classes": ["a", "b"], "confusion_matrix": [[1, 0], [0, 1]],
           "per_class": [{"class": c, "precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1} for c in "ab"]}
    print_per_class_and_matrix(res)
    out = capsys.readouterr().out
    assert "more classes" not in out and "confusion matrix (rows: true, columns: predicted)" in out

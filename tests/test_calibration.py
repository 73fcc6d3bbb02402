"""Temperature scaling: the fit minimises the NLL (checked against a grid search), gives T ≈ 3 back for logits
made 3× over-confident, is stored in model.json by training and by `imgrec calibrate`, and is applied alike by
Classifier, the exported ONNX graph, eval and the report."""
from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

from conftest import assert_clean_error, run_cli
from imgrec.errors import DatasetError, ModelFileError
from imgrec.eval.calibration import (TEMPERATURE_PRIOR, TEMPERATURE_PRIOR_SIGMA, T_BOUNDS, calibration_summary,
                                     ece_bootstrap, ece_noise_floor, fit_temperature, temperature_entry)
from imgrec.eval.metrics import expected_calibration_error
from imgrec.infer.predictor import Classifier
from imgrec.modeldir import ModelMeta, read_meta, write_meta


def _synthetic(n=20000, k=10, seed=0):
    """Logits and labels drawn from softmax(logits): calibrated by construction (T = 1 is right)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, generator=g) * 2.0
    y = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)
    return z, y


def _np_nll(z: np.ndarray, y: np.ndarray, t: float) -> float:
    s = z / t
    s = s - s.max(1, keepdims=True)
    return float(np.mean(np.log(np.exp(s).sum(1)) - s[np.arange(len(y)), y]))


def test_fitted_temperature_minimises_nll_against_a_grid_search():
    z, y = _synthetic(5000, seed=1)
    z = z * 1.7 + 0.3 * torch.randn(z.shape, generator=torch.Generator().manual_seed(2))
    t = fit_temperature(z, y, prior=None)
    zn, yn = z.double().numpy(), y.numpy()
    grid = np.exp(np.linspace(np.log(0.2), np.log(10), 3001))  # steps of 0.13% in T
    values = [_np_nll(zn, yn, g) for g in grid]
    best = int(np.argmin(values))
    assert abs(t - grid[best]) <= grid[best] * 0.0027
    assert _np_nll(zn, yn, t) <= values[best] + 1e-12
    assert fit_temperature(z, y, prior=None) == t  # deterministic
    # on 5,000 images the prior moves the fit little even for a T twice its centre (measured: 1.4%)
    assert fit_temperature(z, y) == pytest.approx(t, rel=0.02)


def test_the_prior_makes_a_map_fit_that_holds_a_tiny_split_near_its_centre():
    z, y = _synthetic(40, seed=3)
    z = z * 1.7
    t0, sigma = TEMPERATURE_PRIOR, TEMPERATURE_PRIOR_SIGMA
    zn, yn = z.double().numpy(), y.numpy()
    grid = np.exp(np.linspace(np.log(0.2), np.log(10), 3001))
    objective = [_np_nll(zn, yn, g) + (np.log(g) - np.log(t0)) ** 2 / (2 * sigma ** 2 * len(yn)) for g in grid]
    best = grid[int(np.argmin(objective))]
    t_map, t_ml = fit_temperature(z, y), fit_temperature(z, y, prior=None)
    assert t_map == pytest.approx(best, rel=0.003)
    # the MAP fit lies between the NLL's own T and the prior's centre
    assert min(t_ml, t0) <= t_map <= max(t_ml, t0) and abs(np.log(t_map / t0)) < abs(np.log(t_ml / t0))
    assert fit_temperature(z, y, prior=(2.0, 0.01)) == pytest.approx(2.0, rel=0.01)  # a narrow prior wins
    entry = temperature_entry(z, y, "val")
    assert entry["T"] == pytest.approx(t_map, abs=1e-6) and entry["T_nll"] == pytest.approx(t_ml, abs=1e-6)
    assert entry["prior"] == {"T": t0, "sigma_log": sigma}
    assert "prior" not in temperature_entry(z, y, "val", prior=None)
    with pytest.raises(ValueError, match="sigma > 0"):
        fit_temperature(z, y, prior=(1.0, 0.0))


def test_overconfident_logits_get_their_factor_back():
    z, y = _synthetic()
    assert fit_temperature(z, y) == pytest.approx(1.0, abs=0.05)
    assert fit_temperature(z * 3, y) == pytest.approx(3.0, rel=0.05)
    assert fit_temperature(z / 2, y) == pytest.approx(0.5, rel=0.05)
    entry = temperature_entry(z * 3, y, "val")
    assert entry["split"] == "val" and entry["n"] == len(y)
    assert entry["nll_after"] < entry["nll_before"] and entry["ece_after"] < entry["ece_before"] / 5
    assert entry["brier_after"] < entry["brier_before"]
    s = calibration_summary(z * 3, y, entry["T"])
    assert s["after"]["nll"] == pytest.approx(entry["nll_after"], abs=1e-6)
    assert s["before"]["nll"] == pytest.approx(_np_nll((z * 3).double().numpy(), y.numpy(), 1.0), abs=1e-9)


def test_fit_edge_cases():
    # perfectly separable logits: the NLL keeps falling as T shrinks, so the NLL alone stops at the lower bound;
    # the prior keeps a T near its centre (a split of 40 right answers is no proof of certainty)
    z = torch.eye(4).repeat(10, 1) * 5
    y = torch.arange(4).repeat(10)
    assert fit_temperature(z, y, prior=None) == pytest.approx(T_BOUNDS[0])
    assert 0.5 * TEMPERATURE_PRIOR < fit_temperature(z, y) < TEMPERATURE_PRIOR
    with pytest.raises(DatasetError, match="at least one image"):
        fit_temperature(torch.empty(0, 3), torch.empty(0, dtype=torch.long))
    with pytest.raises(DatasetError, match="non-finite"):
        fit_temperature(torch.tensor([[float("nan"), 0.0]]), torch.tensor([0]))


def test_model_json_round_trips_the_temperature_and_refuses_a_bad_one(trained_run, tmp_path):
    meta = read_meta(trained_run[0])
    entry = meta.inference["temperature"]
    again = ModelMeta.from_dict(json.loads(json.dumps(meta.to_dict())))
    assert again.inference == meta.inference and again.temperature == entry["T"]
    # an older imgrec reading it predicts the same labels (only the scores differ): no new format version
    assert meta.to_dict()["format_version"] == 2
    for bad in (0, -1.0, "2", None, float("inf")):
        d = meta.to_dict()
        d["inference"]["temperature"] = {"T": bad}
        with pytest.raises(ModelFileError, match="temperature.T must be a positive number"):
            ModelMeta.from_dict(d)
    d = meta.to_dict()
    del d["inference"]["temperature"]
    assert ModelMeta.from_dict(d).temperature == 1.0


def test_training_stores_t_and_every_score_uses_it(trained_run, fmnist_arrays):
    run_dir, summary = trained_run
    entry = read_meta(run_dir).inference["temperature"]
    assert entry["split"] == "val" and entry["n"] == 2000 and T_BOUNDS[0] < entry["T"] < T_BOUNDS[1]
    assert summary["temperature"] == entry["T"]
    assert entry["nll_after"] <= entry["nll_before"]
    clf = Classifier.load(run_dir, device="cpu")
    assert clf.temperature == entry["T"]
    _, _, xt, _ = fmnist_arrays
    images = torch.from_numpy(xt[:64]).unsqueeze(1)
    logits = clf.logits(images)
    expected = torch.softmax(logits / entry["T"], 1)
    assert torch.allclose(clf.probabilities(images), expected, atol=1e-6)
    preds = clf.predict([xt[i] for i in range(8)], top_k=3)
    for i, row in enumerate(preds):
        top = expected[i].topk(3)
        assert [p["label"] for p in row] == [clf.classes[j] for j in top.indices.tolist()]
        assert [p["score"] for p in row] == pytest.approx(top.values.tolist(), abs=1e-6)


def test_exported_onnx_gives_the_classifiers_calibrated_probabilities(trained_run, tmp_path, fmnist_arrays):
    pytest.importorskip("onnxruntime")
    from imgrec.infer.export import export_model
    from imgrec.infer.ort import OnnxClassifier
    # a copy with a temperature far from 1, so that a graph without it would fail by far more than the tolerance
    d = tmp_path / "run"
    shutil.copytree(trained_run[0], d)
    meta = read_meta(d)
    meta.inference["temperature"] = {**meta.inference["temperature"], "T": 2.5}
    write_meta(d, meta)
    result = export_model(d, tmp_path / "m.onnx", check_limit=200)
    assert result.check.passed and result.check.max_dprob <= 1e-3
    onnx = OnnxClassifier(tmp_path / "m.onnx", device="cpu")
    assert onnx.temperature == 2.5
    _, _, xt, _ = fmnist_arrays
    images = torch.from_numpy(xt[:200]).unsqueeze(1)
    clf = Classifier.load(d, device="cpu", amp="none")
    p_torch, p_onnx = clf.probabilities(images), onnx.probabilities(images)
    assert float((p_torch - p_onnx).abs().max()) <= 1e-3
    raw = torch.softmax(clf.logits(images), 1)
    assert float((raw - p_onnx).abs().max()) > 0.05  # the temperature really is in the graph
    # the "logits" output stays undivided, as Classifier.logits
    assert float((onnx.logits(images) - clf.logits(images)).abs().max()) <= 1e-3


def test_eval_json_and_text_show_calibration_before_and_after(trained_run):
    run_dir, _ = trained_run
    r = run_cli("eval", "--model", run_dir, "--split", "val", "--json")
    assert r.returncode == 0, r.stderr
    cal = json.loads(r.stdout)["calibration"]
    entry = read_meta(run_dir).inference["temperature"]
    assert cal["temperature"] == entry["T"]
    # the split T was fitted on: the numbers eval shows are those stored at training
    assert cal["before"]["nll"] == pytest.approx(entry["nll_before"], abs=1e-5)
    assert cal["after"]["nll"] == pytest.approx(entry["nll_after"], abs=1e-5)
    assert cal["after"]["nll"] <= cal["before"]["nll"]
    assert cal["after"]["ece"] <= cal["before"]["ece"]
    r = run_cli("eval", "--model", run_dir, "--split", "val")
    assert r.returncode == 0, r.stderr
    assert f"ECE {cal['before']['ece']:.4f} → {cal['after']['ece']:.4f}" in r.stdout


def test_report_shows_both_calibrations(trained_run, fmnist_arrays):
    pytest.importorskip("matplotlib")
    from imgrec.data.dataset import ImageData
    from imgrec.eval.report import build_report
    run_dir, _ = trained_run
    clf = Classifier.load(run_dir, device="cpu")
    _, _, xt, yt = fmnist_arrays
    data = ImageData(torch.from_numpy(xt[:1000]).unsqueeze(1), torch.from_numpy(yt[:1000]).long())
    report = build_report(clf, data, split="test", model_dir=run_dir, max_gallery=5, samples_per_class=1)
    n = report.numbers
    assert n["calibration_after"]["temperature"] == clf.temperature
    cal = n["eval"]["calibration"]
    # the report bins the float32 probabilities predict gives, eval's summary float64 ones
    assert n["calibration"]["ece"] == pytest.approx(cal["before"]["ece"], abs=1e-6)
    assert n["calibration_after"]["ece"] == pytest.approx(cal["after"]["ece"], abs=1e-6)
    assert 'id="calibration-summary"' in report.html
    assert report.html.count("reliability diagram") >= 2
    assert f"{cal['after']['ece']:.4f}" in report.html and f"{cal['before']['ece']:.4f}" in report.html


def test_no_calibrate_then_imgrec_calibrate(tmp_path):
    out = tmp_path / "run"
    r = run_cli("train", "--data", "fashion-mnist", "--model", "simple_cnn", "--epochs", "1", "--train-limit",
                "2000", "--val-split", "1000", "--no-calibrate", "--threads", "1", "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    meta = read_meta(out)
    assert "temperature" not in meta.inference and meta.temperature == 1.0
    assert meta.config["train"]["calibrate"] is False
    assert "temperature" not in json.loads(r.stdout)
    before = meta.to_dict()

    r = run_cli("calibrate", "--model", out, "--json")
    assert r.returncode == 0, r.stderr
    entry = json.loads(r.stdout)["temperature"]
    after = read_meta(out)
    assert after.inference["temperature"] == entry and entry["split"] == "val" and entry["n"] == 1000
    assert after.temperature == entry["T"] != 1.0
    # the stored T is the prior's MAP fit; on 1,000 images it stays close to the NLL's own
    assert entry["prior"]["T"] == TEMPERATURE_PRIOR and entry["T"] == pytest.approx(entry["T_nll"], rel=0.05)
    # nothing else in model.json changed
    d = after.to_dict()
    d["inference"].pop("temperature")
    assert d == before

    r = run_cli("calibrate", "--model", out, "--split", "test")
    assert r.returncode == 0, r.stderr
    assert "warning" in r.stderr and "test split" in r.stderr
    assert read_meta(out).inference["temperature"]["split"] == "test"
    assert "T = " in r.stdout and "ECE" in r.stdout and "the NLL alone" in r.stdout

    r = run_cli("calibrate", "--model", tmp_path / "nothing")
    assert_clean_error(r, "no such model directory")


def test_calibrate_config_value_is_checked(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  calibrate: maybe\n")
    r = run_cli("train", "--config", cfg, "--out", tmp_path / "x")
    assert_clean_error(r, "calibrate must be true or false")


def test_brier_and_nll_match_numpy():
    z, y = _synthetic(3000, seed=4)
    s = calibration_summary(z, y, 1.7)["after"]
    zn, yn = z.double().numpy() / 1.7, y.numpy()
    p = np.exp(zn - zn.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(p.shape[1])[yn]
    assert s["brier"] == pytest.approx(float(((p - onehot) ** 2).sum(1).mean()), abs=1e-12)
    assert s["nll"] == pytest.approx(-float(np.mean(np.log(p[np.arange(len(yn)), yn]))), abs=1e-12)
    assert math.isfinite(s["ece"])


def test_ece_noise_floor_is_what_calibrated_labels_give():
    # a calibrated model's ECE on 1,000 images, measured on many independent label draws (the full label, not
    # only right/wrong), against the floor computed from the scores alone
    z, _ = _synthetic(1000, seed=5)
    probs = torch.softmax(z, 1)
    g = torch.Generator().manual_seed(6)
    seen = [expected_calibration_error(probs, torch.multinomial(probs, 1, generator=g).squeeze(1))["ece"]
            for _ in range(300)]
    floor = ece_noise_floor(probs, draws=300)
    assert floor["n"] == 1000 and floor["p05"] < floor["mean"] < floor["p95"]
    assert floor["mean"] == pytest.approx(float(np.mean(seen)), rel=0.08)
    assert floor["p95"] == pytest.approx(float(np.percentile(seen, 95)), rel=0.15)
    assert ece_noise_floor(probs, draws=50) == ece_noise_floor(probs, draws=50)  # seeded
    # the floor falls as 1/sqrt(n): four times the images, about half the floor
    z4, _ = _synthetic(4000, seed=5)
    ratio = floor["mean"] / ece_noise_floor(torch.softmax(z4, 1), draws=100)["mean"]
    assert 1.6 < ratio < 2.5
    # a model sure of every answer and calibrated (always right) has no floor
    assert ece_noise_floor(torch.eye(3).repeat(50, 1), draws=20)["p95"] == 0.0


def test_ece_bootstrap_interval_holds_the_ece_and_narrows_with_more_images():
    z, y = _synthetic(4000, seed=7)
    probs = torch.softmax(z * 1.5, 1)  # over-confident: a real ECE well above the noise
    point = expected_calibration_error(probs, y)["ece"]
    lo, hi = ece_bootstrap(probs, y, draws=200)
    assert lo < point < hi
    lo2, hi2 = ece_bootstrap(probs[:500], y[:500], draws=200)
    assert hi2 - lo2 > 1.8 * (hi - lo)
    assert ece_bootstrap(probs, y, draws=50) == ece_bootstrap(probs, y, draws=50)


def test_server_answers_with_the_calibrated_scores(trained_run, fmnist_arrays):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    httpx = pytest.importorskip("httpx")
    import io

    from PIL import Image

    from imgrec.serve.app import ServeSettings, create_app, load_classifier
    from liveserver import LiveServer
    clf = load_classifier(trained_run[0])
    assert clf.temperature != 1.0
    _, _, xt, _ = fmnist_arrays
    buf = io.BytesIO()
    Image.fromarray(xt[3]).save(buf, format="PNG")
    settings = ServeSettings()
    with LiveServer(create_app(clf, settings), settings) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        r = client.post("/v1/predict", content=buf.getvalue(), params={"top_k": 3})
    assert r.status_code == 200, r.text
    (got,) = r.json()["predictions"]
    expected = torch.softmax(clf.logits(clf.load_image(buf.getvalue())[None]) / clf.temperature, 1)[0].topk(3)
    assert [p["label"] for p in got] == [clf.classes[j] for j in expected.indices.tolist()]
    assert [p["score"] for p in got] == pytest.approx(expected.values.tolist(), abs=1e-5)

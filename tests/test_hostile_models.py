"""A corpus of hostile model directories (issue 36; docs: reliability.md, "Handed model directories"): every
one is refused in one line or served correctly, by `imgrec predict` and by the server — never a traceback,
a NaN in JSON output, or a 500.

Each case is the shared trained run (simple_cnn with the multi-layer "unknown" score and the neighbours
bank) with one file changed: model.json nested thousands of levels deep, numbers out of range or too large
for a float, ood.safetensors and neighbours.safetensors whose contents lie."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from conftest import assert_clean_error, run_cli
from imgrec.errors import ImgrecError, ModelFileError

BIG = 10 ** 400  # a 401-digit integer: valid JSON, too large for a float


def _meta(key_path: list, value):
    def change(d):
        for k in key_path[:-1]:
            d = d[k]
        d[key_path[-1]] = value
    return ("model.json", change)


def _raw_meta(text_of):
    """model.json replaced by a text (for what json.dumps cannot write: 1e999, deep nesting)."""
    return ("model.json.raw", text_of)


def _arrays(name: str, change):
    return (name, change)


def _deep(levels: int):
    return lambda d: json.dumps({**d, "training": {}})[:-1] + ', "x": ' + "[" * levels + "]" * levels + "}"


def _not_pd(a):
    a["precision"] = -a["precision"]


def _other_width(a):
    a["means"], a["precision"] = a["means"][:, :-1], a["precision"][:-1, :-1]


def _nan_means(a):
    a["layer0.means"] = a["layer0.means"].copy()
    a["layer0.means"][0, 0] = np.nan


def _keep_out_of_range(a):
    width = a["layer0.means"].shape[1]
    a["layer0.keep"] = np.arange(width, dtype=np.int64) + 10_000


def _zero_scale(a):
    a["layer1.loc_scale"] = np.array([0.0, 0.0])


def _bank(key, value_of):
    def change(a):
        a[key] = value_of(a[key])
    return change


def _label_too_big(v):
    v = v.copy()
    v[0] = 10
    return v


def _negative(v):
    v = v.copy()
    v[0] = -1
    return v


def _nan_rows(v):
    v = v.copy()
    v[0, 0] = np.nan
    return v


CASES = {
    "json-2000-deep": _raw_meta(_deep(2_000)),
    "json-200000-deep": _raw_meta(_deep(200_000)),
    "temperature-1e-320": _meta(["inference", "temperature"], {"T": 1e-320}),
    "temperature-401-digits": _meta(["inference", "temperature"], {"T": BIG}),
    "std-1e-320": _meta(["std"], [1e-320]),
    "mean-nan": _meta(["mean"], [float("nan")]),
    "mean-401-digits": _meta(["mean"], [BIG]),
    "threshold-401-digits": _meta(["inference", "unknown", "threshold"], BIG),
    "quantile-401-digits": _meta(["inference", "unknown", "val_quantiles"], [0.0, BIG]),
    "image-size-1e999": _raw_meta(lambda d: json.dumps(d).replace('"image_size": 28', '"image_size": 1e999')),
    "image-size-401-digits": _meta(["image_size"], BIG),
    "more-classes-than-the-head": _meta(["classes"], [f"c{i}" for i in range(11)]),
    "classes-a-string": _meta(["classes"], "abc"),
    "channels-a-string": _meta(["channels"], "three"),
    "layer-that-does-not-exist": _meta(["inference", "unknown", "layers"], ["features.1", "no.such.layer"]),
    "metrics-nan": _meta(["metrics"], {"val_loss": float("nan"), "val_acc": BIG, "test_acc": 0.8}),
    "ood-not-positive-definite": _arrays("ood.safetensors", _not_pd),
    "ood-rows-of-another-width": _arrays("ood.safetensors", _other_width),
    "ood-nan-means": _arrays("ood.safetensors", _nan_means),
    "ood-kept-columns-out-of-range": _arrays("ood.safetensors", _keep_out_of_range),
    "ood-zero-spread": _arrays("ood.safetensors", _zero_scale),
    "bank-label-past-the-classes": _arrays("neighbours.safetensors", _bank("labels", _label_too_big)),
    "bank-negative-label": _arrays("neighbours.safetensors", _bank("labels", _negative)),
    "bank-negative-index": _arrays("neighbours.safetensors", _bank("index", _negative)),
    "bank-float-index": _arrays("neighbours.safetensors", _bank("index", lambda v: v.astype(np.float32) * np.nan)),
    "bank-nan-rows": _arrays("neighbours.safetensors", _bank("features", _nan_rows)),
    "bank-rows-of-another-width": _arrays("neighbours.safetensors", _bank("features", lambda v: v[:, :-3])),
}


def _strict_json(text: str):
    """JSON as other programs read it: NaN and Infinity are not JSON."""
    def refuse(c):
        raise AssertionError(f"non-JSON constant {c} in the output")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def image(fmnist_arrays, tmp_path_factory):
    p = tmp_path_factory.mktemp("hostile-img") / "shoe.png"
    Image.fromarray(fmnist_arrays[2][0]).save(p)
    return p


@pytest.fixture
def hostile(request, trained_run, tmp_path):
    return _make(request.param, trained_run[0], tmp_path / "model")


def test_the_shared_run_has_every_file_the_corpus_changes(trained_run):
    meta = json.loads((trained_run[0] / "model.json").read_text())
    assert meta["inference"]["unknown"]["score"] == "mahalanobis_layers"
    assert meta["inference"]["unknown"]["layers"] == ["features.1", "features.4"]
    assert meta["inference"].get("neighbours") and meta["inference"].get("temperature")
    assert meta["image_size"] == 28 and len(meta["classes"]) == 10


@pytest.mark.parametrize("hostile", list(CASES), indirect=True)
def test_predict_refuses_in_one_line_or_answers(hostile, image):
    r = run_cli("predict", "--model", hostile, image, "--json", "--device", "cpu")
    if r.returncode == 0:
        out = _strict_json(r.stdout)
        assert out[0]["predictions"] and all(np.isfinite(p["score"]) for p in out[0]["predictions"])
    else:
        assert_clean_error(r)
        assert len(r.stderr) < 600, r.stderr


@pytest.mark.parametrize("hostile", list(CASES), indirect=True)
def test_server_refuses_to_start_in_one_line_or_answers_every_request(hostile, image):
    from fastapi.testclient import TestClient

    from imgrec.serve.app import ServeSettings, create_app
    from imgrec.serve.runner import load_classifier, load_neighbours
    settings = ServeSettings()
    try:
        clf = load_classifier(hostile, "best", "cpu", "torch", 1)
    except ImgrecError as e:
        assert "\n" not in str(e) and len(str(e)) < 600
        return
    nb = load_neighbours(clf, hostile, settings, quiet=True)  # a broken bank: the lookup off, the server up
    png = image.read_bytes()
    with TestClient(create_app(clf, settings, nb), base_url="http://127.0.0.1") as c:
        assert c.get("/readyz").status_code == 200
        info = c.get("/v1/model")
        assert info.status_code == 200
        _strict_json(info.text)
        for url in ("/v1/predict", "/v1/predict?neighbours=6"):
            r = c.post(url, files=[("files", ("shoe.png", png, "image/png"))])
            assert r.status_code < 500, (url, r.status_code, r.text)
            if r.status_code == 200:
                body = _strict_json(r.text)
                assert all(np.isfinite(p["score"]) for p in body["predictions"][0])
            else:
                assert isinstance(r.json()["detail"], str)


def test_model_json_size_is_bounded(trained_run, tmp_path, monkeypatch):
    from imgrec import modeldir
    d = tmp_path / "model"
    shutil.copytree(trained_run[0], d)
    monkeypatch.setattr(modeldir, "MAX_META_BYTES", 1000)
    with pytest.raises(ModelFileError, match="larger than 1000 bytes"):
        modeldir.read_meta(d)


def test_refusals_name_the_problem(trained_run, tmp_path):
    """What the one line says for the number and tensor cases (the corpus above only asks for one line)."""
    from imgrec.infer import Classifier
    from imgrec.modeldir import read_meta
    src = trained_run[0]
    for case, needle in [("json-200000-deep", "nested more than 64 levels"), ("temperature-1e-320", "temperature.T"),
                         ("std-1e-320", "std values"), ("mean-nan", "mean values"),
                         ("threshold-401-digits", "an integer of 401 digits"), ("image-size-1e999", "malformed"),
                         ("ood-not-positive-definite", "not positive definite"),
                         ("ood-kept-columns-out-of-range", "do not fit the network"),
                         ("layer-that-does-not-exist", "do not fit the network"),
                         ("ood-nan-means", "finite")]:
        d = _make(case, src, tmp_path / case)
        with pytest.raises(ModelFileError) as e:
            read_meta(d)
            Classifier.load(d, device="cpu")
        assert needle in str(e.value) and "\n" not in str(e.value), (case, str(e.value))


def _make(case: str, src, dst):
    from safetensors.numpy import load_file, save_file
    shutil.copytree(src, dst)
    target, change = CASES[case]
    if target == "model.json":
        meta = json.loads((dst / "model.json").read_text())
        change(meta)
        (dst / "model.json").write_text(json.dumps(meta))
    elif target == "model.json.raw":
        (dst / "model.json").write_text(change(json.loads((dst / "model.json").read_text())))
    else:
        arrays = dict(load_file(str(dst / target)))
        change(arrays)
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(dst / target))
    return dst


def test_bank_labels_and_width_checked_at_load(trained_run, tmp_path):
    from imgrec.infer.neighbours import load_bank
    entry = json.loads((trained_run[0] / "model.json").read_text())["inference"]["neighbours"]
    for case, needle in [("bank-label-past-the-classes", "names class 10"), ("bank-negative-label", "≥ 0"),
                         ("bank-negative-index", "≥ 0"), ("bank-float-index", "whole numbers"),
                         ("bank-nan-rows", "finite"), ("bank-rows-of-another-width", "wide")]:
        d = _make(case, trained_run[0], tmp_path / case)
        with pytest.raises(ModelFileError, match=needle):
            load_bank(d, entry, num_classes=10, width=load_bank(trained_run[0], entry).features.shape[1])


# what a model directory recorded of its data (run_data_settings), read by eval and explain: a list where a
# path goes, a string where a number goes
DATA_CASES = {
    "source-a-list": (["data", "source"], ["fashion-mnist", "mnist"]),
    "source-a-number": (["data", "source"], 3),
    "val-split-a-string": (["data", "val_split"], "0.1"),
    "val-split-nan": (["data", "val_split"], float("nan")),
    "config-val-split-a-string": (["config", "data", "val_split"], "many"),
    "config-data-a-list": (["config", "data", "data"], ["fashion-mnist"]),
    "on-bad-image-a-list": (["data", "on_bad_image"], ["skip"]),
    "split-seed-negative": (["data", "split_seed"], -3),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
@pytest.mark.parametrize("command", [("eval", "--split", "val"), ("explain", "--steps", "--neighbours", "2")])
def test_recorded_data_settings_refused_in_one_line(case, command, trained_run, image, tmp_path):
    dst = shutil.copytree(trained_run[0], tmp_path / "model")
    meta = json.loads((dst / "model.json").read_text())
    _meta(*DATA_CASES[case])[1](meta)
    (dst / "model.json").write_text(json.dumps(meta))
    extra = [image, "--out", tmp_path / "x.png"] if command[0] == "explain" else []
    r = run_cli(*command, "--model", dst, *extra, "--device", "cpu", cwd=tmp_path)
    assert_clean_error(r, "model.json")
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr

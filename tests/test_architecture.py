"""The house rules: layers checked by import-linter, prediction without training code, the typed and versioned
model directory, the registry without a circle, and a fast `imgrec models` from its catalogue."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, assert_clean_error, run_cli
from imgrec.errors import ModelFileError
from imgrec.modeldir import FORMAT_VERSION, ModelMeta, RunDir, default_run_dir, read_meta, write_meta


def _python(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=300)


# -- layers --------------------------------------------------------------------------------------------
def test_layer_contracts_hold():
    """The same check `make test` runs first; here too, so that a plain `pytest` run catches a broken layer."""
    exe = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(exe)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "0 broken" in r.stdout


def test_prediction_loads_no_training_code_and_no_torchvision(trained_run, fmnist_arrays, tmp_path):
    from PIL import Image
    out, _ = trained_run
    img = tmp_path / "x.png"
    Image.fromarray(fmnist_arrays[2][0]).save(img)
    code = (f"import sys, json\nfrom imgrec import Classifier\nclf = Classifier.load({str(out)!r})\n"
            f"p = clf.predict({str(img)!r})\n"
            "print(json.dumps({'label': p[0]['label'], 'mods': sorted(m for m in sys.modules if m.startswith(("
            "'imgrec.engine', 'torchvision')))}))")
    r = _python(code)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["label"]  # a real prediction came back
    assert res["mods"] == [], f"prediction imported {res['mods']}"


def test_registry_module_imports_no_model_module():
    src = (ROOT / "src/imgrec/models/registry.py").read_text()
    for mod in ("imgrec.models.small", "imgrec.models.zoo", "imgrec.models.fast", "from imgrec.models import"):
        assert mod not in src


# -- the model directory -------------------------------------------------------------------------------
def test_model_json_round_trips_and_records_the_recipe(trained_run):
    out, _ = trained_run
    meta = read_meta(out)
    assert isinstance(meta, ModelMeta) and meta.format_version == 2  # 3 only with a logit adjustment
    assert meta.task == "classification" and meta.resize == "squash-bilinear-antialias"
    assert meta.name == "simple_cnn" and len(meta.classes) == 10 and meta.channels == 1
    assert meta.training["device"] == "cpu" and meta.training["precision"] in ("fp32", "bfloat16")
    assert meta.metrics["test_acc"] > 0.5
    again = ModelMeta.from_dict(json.loads(RunDir(out).meta.read_text()))
    assert again == meta


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_format_1_model_directories_still_load(trained_run, tmp_path):
    """model.json as imgrec 0.1.0 wrote it (format 1: no task, resize or training keys) keeps loading."""
    from imgrec import Classifier
    out, _ = trained_run
    old = _copy_run(out, tmp_path / "old")
    d = json.loads((old / "model.json").read_text())
    d["format_version"] = 1
    for k in ("task", "resize", "training"):
        d.pop(k)
    (old / "model.json").write_text(json.dumps(d))
    new, legacy = Classifier.load(out, device="cpu"), Classifier.load(old, device="cpu")
    x = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
    assert torch.equal(new.logits(x), legacy.logits(x))
    assert legacy.meta.format_version == 1


@pytest.mark.parametrize("version,needle", [(FORMAT_VERSION + 1, "newer imgrec"), (0, "unknown model format"),
                                            ("two", "bad format_version")])
def test_unknown_or_newer_format_is_one_clear_line(trained_run, tmp_path, version, needle):
    out, _ = trained_run
    bad = _copy_run(out, tmp_path / "m")
    d = json.loads((bad / "model.json").read_text())
    d["format_version"] = version
    (bad / "model.json").write_text(json.dumps(d))
    with pytest.raises(ModelFileError, match=needle):
        read_meta(bad)
    r = run_cli("predict", "--model", bad, __file__)
    assert_clean_error(r, needle)
    assert r.returncode == 2


def test_malformed_fields_are_refused(trained_run, tmp_path):
    out, _ = trained_run
    d = json.loads((out / "model.json").read_text())
    for key, value, needle in [("std", [0.0], "positive"), ("mean", [0.1, 0.2], "one value per channel"),
                               ("channels", 2, "channels must be 1 or 3"), ("task", "detection", "not supported"),
                               ("image_size", "big", "malformed")]:
        with pytest.raises(ModelFileError, match=needle):
            ModelMeta.from_dict({**d, key: value})


def test_every_model_json_field_is_read_back():
    """from_dict reads every ModelMeta field (it is built from dataclasses.fields): none resets to its default."""
    import dataclasses
    sample = dict(model={"name": "lenet5", "kwargs": {"depth": 2}}, classes=["a", "b"], image_size=32, channels=3,
                  mean=[0.1, 0.2, 0.3], std=[0.4, 0.5, 0.6], task="multilabel", thresholds=[0.3, 0.6],
                  resize="some-policy", inference={"tta_flip": True}, training={"recipe": "r"},
                  data={"source": "s"}, config={"epochs": 3}, metrics={"best_epoch": 2}, train_time_s=12.5,
                  weights={"best": "b.safetensors", "last": "l.safetensors"},
                  imgrec_version="9.9", format_version=2)
    fields = {f.name: f for f in dataclasses.fields(ModelMeta)}
    assert set(sample) == set(fields), "give the new ModelMeta field a non-default sample value here"
    meta = ModelMeta(**sample)
    d = meta.to_dict()
    d["imgrec_version"] = "9.9"  # to_dict stamps the running version; the reader must keep what the file says
    again = ModelMeta.from_dict(json.loads(json.dumps(d)))
    for name, f in fields.items():
        assert getattr(again, name) == sample[name], name
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        assert sample[name] != default, f"the sample for {name} is its default: the test would not see a reset"


def test_write_meta_is_the_writer(tmp_path):
    meta = ModelMeta(model={"name": "lenet5", "kwargs": {}}, classes=["a", "b"], image_size=28, channels=1,
                     mean=[0.5], std=[0.25])
    write_meta(tmp_path, meta)
    assert read_meta(tmp_path) == ModelMeta.from_dict(meta.to_dict())
    assert not list(tmp_path.glob(".*.tmp"))


def test_default_run_dir_never_reuses_a_folder(tmp_path):
    first = default_run_dir("fashion-mnist", "fastnet", root=tmp_path)
    assert first == tmp_path / "fashion-mnist-fastnet"
    first.mkdir()
    # an empty folder holds nothing to lose (a failed start no longer leaves one): it is taken
    assert default_run_dir("fashion-mnist", "fastnet", root=tmp_path) == first
    (first / "model.json").write_text("{}")
    assert default_run_dir("fashion-mnist", "fastnet", root=tmp_path) == tmp_path / "fashion-mnist-fastnet-2"


# -- predict_files: the batching and bad-image policy `imgrec predict` uses ------------------------------
def test_predict_files_batches_and_skips(trained_run, fmnist_arrays, tmp_path):
    from PIL import Image

    from imgrec import Classifier
    out, _ = trained_run
    d = tmp_path / "imgs"
    d.mkdir()
    for i in range(5):
        Image.fromarray(fmnist_arrays[2][i]).save(d / f"{i}.png")
    (d / "3b.png").write_bytes(b"not an image")
    clf = Classifier.load(out, device="cpu")
    res = clf.predict_files([d], top_k=2, batch_size=2, on_bad_image="skip", warn=False)
    assert [Path(r["file"]).name for r in res.results] == ["0.png", "1.png", "2.png", "3.png", "4.png"]
    assert [Path(f).name for f, _ in res.skipped] == ["3b.png"]
    one_by_one = [clf.predict(str(d / f"{i}.png"), top_k=2) for i in range(5)]
    for r, single in zip(res.results, one_by_one):
        assert [p["label"] for p in r["predictions"]] == [p["label"] for p in single]
        assert r["predictions"][0]["score"] == pytest.approx(single[0]["score"], abs=1e-5)
    from imgrec.errors import ImageDecodeError
    with pytest.raises(ImageDecodeError, match="3b.png"):
        clf.predict_files([d], on_bad_image="fail")


# -- `imgrec models` -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_catalogue_counts_match_real_models(tmp_path, monkeypatch):
    """Parameters counted on the meta device equal those of the real networks, for every registered model."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    from imgrec.catalog import COUNT_AS, model_catalog
    from imgrec.models import create_model, list_models
    from imgrec.models.base import count_params
    rows = model_catalog()
    assert [r["name"] for r in rows] == list_models()
    for r in rows:
        real = create_model(r["name"], image_size=r["default_image_size"], **COUNT_AS)
        assert count_params(real) == r["params"], r["name"]


def test_models_command_from_the_cache_imports_no_torch(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    first = run_cli("models", "--json", env=env)
    assert first.returncode == 0, first.stderr
    assert list(tmp_path.glob("imgrec/models-*.json"))
    code = ("import sys, io, contextlib\nfrom imgrec.cli import main\nbuf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n    rc = main(['models', '--json'])\n"
            "print(rc, 'torch' in sys.modules)\nprint(buf.getvalue())")
    r = _python(code, env)
    assert r.returncode == 0, r.stderr
    head, _, body = r.stdout.partition("\n")
    assert head == "0 False"
    assert json.loads(body) == json.loads(first.stdout)

"""imgrec export and the ONNX Runtime backend: the exported graph (preprocessing inside) against PyTorch for every
registered model, a plain ONNX Runtime session that imports neither imgrec nor torch, the backend without
PyTorch (predict, eval, serve), int8, broken or hostile exported models, and the parallel file pipeline."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from PIL import Image  # noqa: E402

from conftest import assert_clean_error, run_cli  # noqa: E402
from imgrec.errors import ImageDecodeError, ModelFileError  # noqa: E402
from imgrec.infer import export as export_mod  # noqa: E402
from imgrec.infer.export import export_model  # noqa: E402
from imgrec.infer.ort import OnnxClassifier  # noqa: E402
from imgrec.infer.predictor import Classifier  # noqa: E402
from imgrec.models import create_model, list_models, model_info  # noqa: E402
from imgrec.modeldir import ModelMeta, RunDir, write_meta  # noqa: E402
from imgrec.safeio import save_weights  # noqa: E402

CHECK_LIMIT = 600  # validation images per check in these tests: enough for 99.9% to mean "all but none"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def exported(exported_run):
    """The shared trained model exported to ONNX (fp32) through the library, with its check (conftest)."""
    assert exported_run[1].check.n == CHECK_LIMIT
    return exported_run


@pytest.fixture(scope="module")
def varied_images(fmnist_arrays, tmp_path_factory):
    """Real Fashion-MNIST test images at other sizes than 28×28 (up and down, non-square), gray and colourised,
    PNG and JPEG; plus some at exactly 28×28. Returns the folder."""
    _, _, xt, _ = fmnist_arrays
    root = tmp_path_factory.mktemp("varied")
    sizes = [(28, 28), (56, 56), (37, 50), (100, 64), (21, 21), (224, 224), (30, 90), (28, 28)]
    for i in range(40):
        h, w = sizes[i % len(sizes)]
        im = Image.fromarray(xt[i]).resize((w, h), Image.Resampling.BICUBIC)
        if i % 3 == 1:  # colourised: a tint per image, as a colour photo of the garment
            tint = np.array([1.0, 0.8 + 0.05 * (i % 4), 0.6], np.float32)
            im = Image.fromarray((np.asarray(im, np.float32)[..., None] * tint).clip(0, 255).astype(np.uint8))
        name = root / f"{i:03d}.{'jpg' if i % 2 else 'png'}"
        im.save(name, quality=95) if i % 2 else im.save(name)
    return root


def make_model_dir(root: Path, name: str, channels: int, size: int, tta: bool = False, classes: int = 5) -> Path:
    """A model directory with freshly initialised weights (no training): what export reads."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=classes, in_chans=channels, image_size=size)
    with torch.no_grad():  # a larger head spreads the logits of random weights apart: no near-ties on top-1
        model.get_classifier().weight.mul_(8)
    d = root / f"{name}-c{channels}-{size}"
    d.mkdir(parents=True, exist_ok=True)
    save_weights(RunDir(d).weights("best"), model.state_dict())
    write_meta(d, ModelMeta(model={"name": name, "kwargs": {}}, classes=[f"class{i}" for i in range(classes)],
                            image_size=size, channels=channels, mean=[0.45] * channels, std=[0.25] * channels,
                            inference={"tta_flip": tta}))
    return d


# -- every registered model -------------------------------------------------------------------------
def _small_size(name: str) -> int:
    return 32 if model_info(name).family == "vit" else 28


@pytest.mark.slow
@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_exports_and_passes_check(name, tmp_path, varied_images):
    channels = 3 if list_models().index(name) % 2 else 1  # both channel counts across the registry
    d = make_model_dir(tmp_path, name, channels, _small_size(name), tta=name in ("fastnet", "resnet18"))
    result = export_model(d, tmp_path / f"{name}.onnx", check_data=str(varied_images), check_limit=8)
    assert result.check.passed, result.check.summary()
    assert result.check.n == 8 and result.check.agreement == 1.0
    assert result.check.max_dprob <= 1e-3
    # the same file takes other sizes and batch sizes (dynamic N, H, W)
    clf = OnnxClassifier(result.path)
    for shape in [(1, channels, 9, 13), (3, channels, 64, 40)]:
        x = torch.randint(0, 256, shape, dtype=torch.uint8)
        assert clf.probabilities(x).shape == (shape[0], 5)


# -- the trained model: metadata, check, plain ONNX Runtime -----------------------------------------
def test_export_metadata_and_check(exported, trained_run):
    path, result = exported
    assert result.check.passed and result.check.n == CHECK_LIMIT
    assert result.check.agreement >= 0.999 and result.check.max_dprob <= 1e-3
    assert result.check.accuracy_reference == pytest.approx(result.check.accuracy_exported, abs=2 / CHECK_LIMIT)
    proto = onnx.load(str(path))
    meta = {p.key: p.value for p in proto.metadata_props}
    run_meta = json.loads((trained_run[0] / "model.json").read_text())
    assert json.loads(meta["classes"]) == run_meta["classes"]
    assert meta["image_size"] == str(run_meta["image_size"]) and meta["channels"] == str(run_meta["channels"])
    assert meta["imgrec_format"] == "imgrec-onnx" and meta["imgrec_format_version"] == "1"
    assert meta["precision"] == "fp32" and "RGB" in meta["input_spec"]
    inp = proto.graph.input[0]
    assert inp.name == "pixels" and inp.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    dims = inp.type.tensor_type.shape.dim
    assert [bool(d.dim_param) for d in dims] == [True, True, True, False]  # dynamic N, H, W; fixed C
    assert dims[3].dim_value == run_meta["channels"]
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temporary file left


PLAIN_ORT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import onnxruntime as ort
    from PIL import Image
    model, files = sys.argv[1], sys.argv[2:]
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    classes, channels = json.loads(meta["classes"]), int(meta["channels"])
    out = {}
    for f in files:  # each image at its own size: the graph resizes
        pixels = np.asarray(Image.open(f).convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
        pixels = pixels.reshape(1, pixels.shape[0], pixels.shape[1], channels)
        probs = sess.run(["probabilities"], {"pixels": pixels})[0]
        out[f] = classes[int(probs[0].argmax())]
    assert "torch" not in sys.modules and not any(m.startswith("imgrec") for m in sys.modules)
    print(json.dumps(out))
""")


def test_plain_onnxruntime_session_matches_classifier(exported, trained_run, varied_images):
    """The exported file read by a bare ONNX Runtime session (no imgrec, no torch), fed each image's original
    pixels at its own size, predicts the labels Classifier predicts from the files."""
    files = sorted(str(p) for p in varied_images.iterdir())
    r = subprocess.run([sys.executable, "-c", PLAIN_ORT, str(exported[0]), *files], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "PYTHONPATH": ""}, cwd=str(varied_images))
    assert r.returncode == 0, r.stderr
    plain = json.loads(r.stdout)
    clf = Classifier.load(trained_run[0], device="cpu", amp="none")
    ours = {res["file"]: res["predictions"] for res in clf.predict_files(files, top_k=2).results}
    assert plain.keys() == ours.keys()
    differ = [f for f in files if plain[f] != ours[f][0]["label"]]
    # imgrec's decoder shrinks large JPEGs in the DCT (Pillow's draft) and then resamples with reducing_gap=3,
    # while the graph resamples the full image in one antialiased pass: the pixels differ by a few levels, which
    # can swap only a near-tie. Every other image gets the same label.
    near_ties = [f for f in differ if ours[f][0]["score"] - ours[f][1]["score"] < 0.2]
    assert differ == near_ties, {f: (plain[f], ours[f]) for f in differ}
    assert len(differ) <= 2, differ
    same_size = [f for f in files if Image.open(f).size == (28, 28)]
    assert len(same_size) == 10 and all(plain[f] == ours[f][0]["label"] for f in same_size)


# -- the ONNX Runtime backend -------------------------------------------------------------------------
NO_TORCH = textwrap.dedent("""
    import json, sys
    from imgrec.infer.backends import load_classifier
    from imgrec.cli import main
    model, folder = sys.argv[1], sys.argv[2]
    clf = load_classifier(model)
    res = clf.predict_files([folder], top_k=3)
    single = clf.predict(sorted(res.results, key=lambda r: r["file"])[0]["file"], top_k=3)
    assert main(["predict", "--model", model, folder, "--top-k", "3", "--csv", sys.argv[3]]) == 0
    assert "torch" not in sys.modules, "the ONNX Runtime path imported torch"
    print(json.dumps({"results": res.results, "single": single, "type": type(clf).__name__}))
""")


def test_onnxruntime_backend_never_imports_torch(exported, trained_run, varied_images, tmp_path):
    r = subprocess.run([sys.executable, "-c", NO_TORCH, str(exported[0]), str(varied_images),
                        str(tmp_path / "p.csv")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["type"] == "OnnxClassifier"
    clf = Classifier.load(trained_run[0], device="cpu", amp="none")
    ours = clf.predict_files([varied_images], top_k=3).results
    assert [x["file"] for x in out["results"]] == [x["file"] for x in ours]
    for a, b in zip(out["results"], ours):  # the same decoded pixels: the same labels, scores within fp32 noise
        assert [p["label"] for p in a["predictions"]] == [p["label"] for p in b["predictions"]]
        assert np.allclose([p["score"] for p in a["predictions"]], [p["score"] for p in b["predictions"]], atol=1e-4)
    assert out["single"] == out["results"][0]["predictions"]
    assert (tmp_path / "p.csv").read_text().count("\n") == 1 + 3 * len(ours)


def test_classifier_load_onnx_and_array_inputs(exported, trained_run, fmnist_arrays):
    onnx_clf = Classifier.load(exported[0])
    assert isinstance(onnx_clf, OnnxClassifier) and onnx_clf.classes == Classifier.load(trained_run[0]).classes
    torch_clf = Classifier.load(trained_run[0], device="cpu", amp="none")
    _, _, xt, _ = fmnist_arrays
    items = [xt[0], xt[1][:, :, None], torch.from_numpy(xt[2])[None], np.ascontiguousarray(xt[3][::2, ::2]),
             np.repeat(xt[4][:, :, None], 3, axis=2)]  # H×W, H×W×1, C×H×W tensor, 14×14, RGB into a gray model
    a, b = onnx_clf.predict(items, top_k=2), torch_clf.predict(items, top_k=2)
    for pa, pb in zip(a, b):
        assert [p["label"] for p in pa] == [p["label"] for p in pb]
        assert np.allclose([p["score"] for p in pa], [p["score"] for p in pb], atol=1e-4)
    batch = torch.from_numpy(xt[:16]).unsqueeze(1)
    assert torch.allclose(onnx_clf.probabilities(batch), torch_clf.probabilities(batch), atol=1e-4)
    assert isinstance(onnx_clf.probabilities(batch.numpy()), np.ndarray)
    with pytest.raises(ImageDecodeError):
        onnx_clf.predict(b"not an image")


@pytest.mark.slow
def test_cli_export_predict_eval_with_onnxruntime(trained_run, tmp_path, varied_images):
    out = tmp_path / "cli.onnx"
    r = run_cli("export", "--model", trained_run[0], "--out", out, "--check-limit", 300)
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}" in r.stdout and "top-1 agreement" in r.stdout and "Traceback" not in r.stderr
    r = run_cli("export", "--model", trained_run[0], "--out", out, "--check", "--check-data", varied_images, "--json")
    assert r.returncode == 0, r.stderr
    check = json.loads(r.stdout)
    assert check["passed"] and check["n"] == 40 and check["resize_agreement"] >= 0.95

    r = run_cli("predict", "--model", out, varied_images, "--json", "--top-k", "1")
    assert r.returncode == 0, r.stderr
    # against PyTorch in fp32 (the CLI's PyTorch default is bf16 autocast on this CPU, which may swap near-ties)
    clf = Classifier.load(trained_run[0], device="cpu", amp="none")
    assert [x["predictions"][0]["label"] for x in json.loads(r.stdout)] == \
        [x["predictions"][0]["label"] for x in clf.predict_files([varied_images], top_k=1).results]

    r = run_cli("eval", "--model", out, "--split", "val", "--json")
    t = run_cli("eval", "--model", trained_run[0], "--split", "val", "--json", "--device", "cpu")
    assert r.returncode == 0 and t.returncode == 0, r.stderr + t.stderr
    ro, to = json.loads(r.stdout), json.loads(t.stdout)
    assert ro["n"] == to["n"] and abs(ro["top1"] - to["top1"]) <= 2 / ro["n"]  # bf16 autocast vs fp32 ORT
    assert ro["loss"] == pytest.approx(to["loss"], rel=0.02)

    # --backend onnxruntime on the model directory means its model.onnx, with a hint when there is none
    r = run_cli("predict", "--model", trained_run[0], varied_images, "--backend", "onnxruntime")
    if not (trained_run[0] / "model.onnx").exists():
        assert_clean_error(r, "imgrec export")


@pytest.mark.slow
def test_torchscript_export(trained_run, tmp_path):
    r = run_cli("export", "--model", trained_run[0], "--format", "torchscript", "--out", tmp_path / "m.pt",
                "--check-limit", 200)
    assert r.returncode == 0, r.stderr
    module = torch.jit.load(str(tmp_path / "m.pt"))
    x = torch.randint(0, 256, (2, 40, 33, 1), dtype=torch.uint8)
    probs, logits = module(x)
    assert probs.shape == (2, 10) and torch.allclose(probs.sum(1), torch.ones(2))


# -- int8 ---------------------------------------------------------------------------------------------
def test_int8_export(trained_run, tmp_path, monkeypatch):
    # an x86 CPU without VNNI gets 7-bit weights (reduce_range) rather than a model that saturates
    monkeypatch.setattr(export_mod, "has_vnni", lambda: False)
    monkeypatch.setattr(export_mod, "_is_x86", lambda: True)
    out = tmp_path / "m.int8.onnx"
    result = export_model(trained_run[0], out, int8=True, calib_size=128, check_limit=CHECK_LIMIT)
    assert result.precision == "int8" and result.check.passed, result.check.summary()
    assert result.quantization["reduce_range"] is True and result.quantization["calibration_split"] == "train"
    drop = result.check.accuracy_reference - result.check.accuracy_exported
    assert drop <= 0.005, result.check.summary()
    proto = onnx.load(str(out))
    ops = {n.op_type for n in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["precision"] == "int8" and json.loads(meta["export"])["quantization"]["reduce_range"] is True
    assert OnnxClassifier(out).meta.precision == "int8"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    _assert_int8_unknown_refit(trained_run[0], out, result, meta)


def _assert_int8_unknown_refit(model_dir: Path, out: Path, result, meta: dict) -> None:
    """The int8 file's "unknown" threshold is the accept-rate quantile of the int8 graph's own ood_score over
    the validation images the check ran on (computed here with a plain ONNX Runtime session), the scheme says
    so, and at it the file accepts about the accept rate of them."""
    from imgrec.data.dataset import load_run_split
    from imgrec.infer.runtime import load_model
    _, model_meta = load_model(model_dir)
    assert model_meta.unknown, "the shared fixture should have an \"unknown\" score"
    rate, t32 = float(model_meta.unknown["accept_rate"]), float(model_meta.unknown["threshold"])
    images = load_run_split(model_meta, None, None, "val", None).data.images[:CHECK_LIMIT]
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    pixels = images.permute(0, 2, 3, 1).contiguous().numpy()
    scores = np.concatenate([sess.run(["ood_score"], {"pixels": pixels[i:i + 256]})[0]
                             for i in range(0, len(pixels), 256)]).astype(np.float64)
    entry = json.loads(meta["unknown"])
    want = float(np.quantile(scores, 1.0 - rate))
    assert entry["threshold"] == pytest.approx(want, rel=1e-4, abs=1e-4) and entry["accept_rate"] == rate
    assert entry["val_quantiles"][0] == pytest.approx(scores.min(), rel=1e-4, abs=1e-4)
    record = json.loads(meta["export"])["quantization"]["unknown_threshold"]
    assert record["refit"] is True and record["images"] == len(images) == result.check.n
    assert record["threshold"] == entry["threshold"] and record["fp32_threshold"] == pytest.approx(t32)
    accepted = float((scores >= entry["threshold"]).mean())
    assert abs(accepted - rate) <= 0.03, (accepted, rate)
    assert result.check.unknown_accept == pytest.approx(accepted, abs=1e-9)
    assert 0.0 <= result.check.unknown_agreement <= 1.0 and "refit on" in result.check.summary()
    clf = OnnxClassifier(out)  # what `imgrec predict --model model.int8.onnx` answers with
    assert clf.unknown_threshold == entry["threshold"]
    assert clf.set_accept_rate(rate) == pytest.approx(entry["threshold"], rel=1e-9)


def test_int8_unknown_refit_needs_enough_validation_images():
    entry = {"score": "mahalanobis_layers", "accept_rate": 0.95, "threshold": -3.0, "val_quantiles": [-9.0, 0.0]}
    few = export_mod._refit_unknown(entry, np.linspace(-20, -10, export_mod.MIN_REFIT_VAL - 1))
    assert few["refit"] is False and few["images"] == export_mod.MIN_REFIT_VAL - 1 and "entry" not in few
    assert "kept the fp32 threshold" in few["why"] and few["fp32_threshold"] == -3.0
    scores = np.linspace(-20, -10, 101)
    enough = export_mod._refit_unknown(entry, scores)
    assert enough["refit"] is True and enough["threshold"] == pytest.approx(np.quantile(scores, 0.05))
    assert enough["entry"]["threshold"] == enough["threshold"] and len(enough["entry"]["val_quantiles"]) > 2
    assert entry["threshold"] == -3.0  # the fp32 entry itself is left as it was


# -- broken or hostile exported models ----------------------------------------------------------------
@pytest.mark.slow
def test_bad_export_inputs_are_one_line(trained_run, tmp_path):
    r = run_cli("export", "--model", tmp_path / "missing")
    assert_clean_error(r, "no such model directory")
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "model.json").write_text("{not json")
    assert_clean_error(run_cli("export", "--model", bad), "model.json")
    broken = tmp_path / "broken"
    shutil.copytree(trained_run[0], broken)
    (broken / "best.safetensors").write_bytes(b"\x00" * 64)
    assert_clean_error(run_cli("export", "--model", broken, "--out", tmp_path / "x.onnx"), "best.safetensors")
    assert_clean_error(run_cli("export", "--model", trained_run[0], "--format", "tflite"), "unknown export format")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert_clean_error(run_cli("export", "--model", trained_run[0], "--out", blocker / "m.onnx"), "not writable")
    assert_clean_error(run_cli("export", "--model", trained_run[0], "--format", "torchscript", "--int8"), "--int8")
    assert not (tmp_path / "x.onnx").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "broken", "corrupt"]


@pytest.mark.slow
def test_failed_check_never_replaces_a_good_file(trained_run, exported, tmp_path, monkeypatch):
    """A model directory whose weights changed after export: ``--check`` fails with the agreement figure, and a
    re-export whose check fails leaves the good file in place, byte for byte."""
    good = tmp_path / "good.onnx"
    shutil.copy(exported[0], good)
    before = good.read_bytes()
    changed = tmp_path / "changed"
    shutil.copytree(trained_run[0], changed)
    from imgrec.safeio import load_weights
    state = load_weights(changed / "best.safetensors")
    torch.manual_seed(1)
    state = {k: (v + 0.5 * v.std() * torch.randn_like(v) if v.is_floating_point() and v.ndim > 1 else v)
             for k, v in state.items()}
    save_weights(changed / "best.safetensors", state)
    r = run_cli("export", "--model", changed, "--out", good, "--check", "--check-limit", 300)
    assert_clean_error(r, "check failed", "agreement")
    assert "top-1 agreement" in r.stdout

    monkeypatch.setattr(export_mod, "FP32_TOLERANCE", export_mod.Tolerance(min_agreement=1.01, max_dprob=1e-3))
    with pytest.raises(ModelFileError, match="not written.*agreement"):
        export_model(trained_run[0], good, check_limit=50)
    assert good.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["changed", "good.onnx"]


def _rewrite(src: Path, dst: Path, edit) -> Path:
    proto = onnx.load(str(src))
    edit(proto)
    onnx.save(proto, str(dst))
    return dst


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd", "sub/../../x.bin"])
def test_external_data_outside_the_folder_is_refused(exported, tmp_path, location):
    def point_outside(proto):
        init = max(proto.graph.initializer, key=lambda t: len(t.raw_data))
        init.data_location = onnx.TensorProto.EXTERNAL
        entry = init.external_data.add()
        entry.key, entry.value = "location", location
        init.ClearField("raw_data")

    (tmp_path / "m").mkdir()
    bad = _rewrite(exported[0], tmp_path / "m" / "bad.onnx", point_outside)
    with pytest.raises(ModelFileError, match="outside the model's folder"):
        OnnxClassifier(bad)
    assert_clean_error(run_cli("predict", "--model", bad, tmp_path), "refused")


def test_metadata_without_classes_or_newer_format_is_refused(exported, tmp_path, varied_images):
    def drop(key):
        def edit(proto):
            kept = [p for p in proto.metadata_props if p.key != key]
            del proto.metadata_props[:]
            proto.metadata_props.extend(kept)
        return edit

    def newer(proto):
        for p in proto.metadata_props:
            if p.key == "imgrec_format_version":
                p.value = "99"

    no_classes = _rewrite(exported[0], tmp_path / "no-classes.onnx", drop("classes"))
    assert_clean_error(run_cli("predict", "--model", no_classes, varied_images), "lacks classes")
    no_version = _rewrite(exported[0], tmp_path / "no-version.onnx", drop("imgrec_format_version"))
    assert_clean_error(run_cli("predict", "--model", no_version, varied_images), "imgrec_format_version")
    future = _rewrite(exported[0], tmp_path / "future.onnx", newer)
    assert_clean_error(run_cli("predict", "--model", future, varied_images), "newer imgrec")
    (tmp_path / "garbage.onnx").write_bytes(b"\x08\x07garbage" * 10)
    assert_clean_error(run_cli("predict", "--model", tmp_path / "garbage.onnx", varied_images), "garbage.onnx")


# -- the server on the ONNX Runtime backend -----------------------------------------------------------
def test_server_batches_the_same_with_onnxruntime(exported, trained_run, fmnist_arrays):
    pytest.importorskip("fastapi")
    import io
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from imgrec.serve.app import ServeSettings, create_app, load_classifier
    from liveserver import LiveServer, SlowClassifier, wait_until

    clf = load_classifier(exported[0])  # backend auto: ONNX Runtime for a .onnx file
    assert isinstance(clf, OnnxClassifier)
    reference = Classifier.load(trained_run[0], device="cpu", amp="none")
    _, _, xt, _ = fmnist_arrays
    images = []
    for i in range(8):
        buf = io.BytesIO()
        Image.fromarray(xt[i]).save(buf, format="PNG")
        images.append(buf.getvalue())
    spy = SlowClassifier(clf)
    settings = ServeSettings(max_batch=8, max_wait_ms=600_000, max_upload_mb=1.0, max_files=4)
    with LiveServer(create_app(spy, settings), settings) as server:
        spy.batch_sizes.clear()
        spy.gate.clear()  # hold the first pass so that the others queue up behind it

        def one(i):
            with httpx.Client(base_url=server.url, timeout=120) as c:
                return c.post("/v1/predict", content=images[i], params={"top_k": 3})

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(one, i) for i in range(8)]
            wait_until(lambda: spy.entered.is_set() and server.state.batcher._queued_images
                       + sum(spy.batch_sizes) >= 8, "all 8 images in the held pass or queued behind it")
            spy.gate.set()
            responses = [f.result() for f in futures]
        for i, r in enumerate(responses):
            assert r.status_code == 200, r.text
            want = reference.predict(images[i], top_k=3)
            got = r.json()["predictions"][0]
            assert [p["label"] for p in got] == [p["label"] for p in want]
            assert np.allclose([p["score"] for p in got], [p["score"] for p in want], atol=1e-4)
        assert sum(spy.batch_sizes) == 8 and 2 <= max(spy.batch_sizes) <= 8
        with httpx.Client(base_url=server.url, timeout=60) as c:
            info = c.get("/v1/model").json()
            assert info["classes"] == reference.classes and info["image_size"] == reference.image_size
            bad = c.post("/v1/predict", content=b"not an image at all")
            assert bad.status_code == 415


# -- predict_files: the decode pipeline ---------------------------------------------------------------
def test_predict_files_pipeline_keeps_order_and_bad_image_rules(trained_run, exported, varied_images, tmp_path):
    folder = tmp_path / "mixed"
    shutil.copytree(varied_images, folder)
    (folder / "010.png").write_bytes(b"not an image")  # a bad file in the middle
    (folder / "020.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    for clf in (Classifier.load(trained_run[0], device="cpu"), OnnxClassifier(exported[0])):
        inline = clf.predict_files([folder], batch_size=7, on_bad_image="skip", warn=False, decode_threads=0)
        piped = clf.predict_files([folder], batch_size=7, on_bad_image="skip", warn=False, decode_threads=3)
        assert [r["file"] for r in piped.results] == [r["file"] for r in inline.results] == \
            sorted(str(p) for p in folder.iterdir() if p.name not in ("010.png", "020.jpg"))
        assert [r["predictions"] for r in piped.results] == [r["predictions"] for r in inline.results]
        assert [s[0] for s in piped.skipped] == [str(folder / "010.png"), str(folder / "020.jpg")]
        with pytest.raises(ImageDecodeError, match="010.png"):  # the first bad file in input order
            clf.predict_files([folder], batch_size=4, decode_threads=4)


def test_cli_serve_with_onnxruntime_backend(exported, trained_run, tmp_path, fmnist_arrays):
    """``imgrec serve --backend onnxruntime --model DIR`` serves DIR/model.onnx and answers like PyTorch."""
    import io
    import re
    import signal
    import time

    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    d = tmp_path / "run"
    shutil.copytree(trained_run[0], d)
    shutil.copy(exported[0], d / "model.onnx")
    buf = io.BytesIO()
    Image.fromarray(fmnist_arrays[2][0]).save(buf, format="PNG")
    proc = subprocess.Popen([sys.executable, "-m", "imgrec.cli", "serve", "--model", str(d), "--backend",
                             "onnxruntime", "--port", "0", "--no-access-log"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    try:
        line = proc.stdout.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert m, line + (proc.stderr.read() if proc.poll() is not None else "")
        with httpx.Client(base_url=f"http://127.0.0.1:{m.group(1)}", timeout=30) as c:
            deadline = time.monotonic() + 120
            while True:  # readiness is an event the server reports, polled; the limit only turns a hang into a failure
                try:
                    if c.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline and proc.poll() is None, "the server did not become ready"
                time.sleep(0.1)
            got = c.post("/v1/predict", content=buf.getvalue(), params={"top_k": 2}).json()["predictions"][0]
        want = Classifier.load(trained_run[0], device="cpu", amp="none").predict(buf.getvalue(), top_k=2)
        assert [p["label"] for p in got] == [p["label"] for p in want]
        assert np.allclose([p["score"] for p in got], [p["score"] for p in want], atol=1e-4)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, proc.stderr.read()


@pytest.mark.slow
@pytest.mark.parametrize("source", ["named", "folder"])
def test_int8_calibration_brings_only_the_chosen_images_to_the_model_size(trained_run, tmp_path, fmnist_arrays,
                                                                          source):
    """The calibration sample is the same images, pixel for pixel, as picking from the whole training split at
    the model's size — without holding that split at the model's size (9 GB for Fashion-MNIST at 224 px)."""
    import dataclasses

    from conftest import write_image_folder
    from imgrec.data.dataset import load_eval_split
    from imgrec.infer.export import _calibration_images
    from imgrec.modeldir import read_meta

    meta = read_meta(trained_run[0])
    if source == "folder":
        x, y = fmnist_arrays[:2]
        names = ["a-top", "b-trouser", "c-pullover"]
        root = write_image_folder(tmp_path / "imgs", x, y, names, per_class=12)
        meta = dataclasses.replace(meta, classes=names,
                                   data={"source": str(root), "val_split": 0.25, "split_seed": 0})
    big = dataclasses.replace(meta, image_size=40, channels=3)
    calib = _calibration_images(big, None, 20)
    _, train = load_eval_split(big, None, None, "train")  # the old way: everything at 40 px first
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:20]
    assert calib.shape == (20, 40, 40, 3) and calib.dtype == np.uint8
    assert np.array_equal(calib, train.images[idx].permute(0, 2, 3, 1).numpy())


@pytest.mark.slow
@pytest.mark.parametrize("split", ["val", "test"])
def test_eval_split_brings_only_the_requested_split_to_the_model_size(trained_run, split):
    """eval/report/export --check of a model larger than its named dataset's images: the requested split comes at
    the model's size and channels, pixel for pixel what loading everything at that size gives, while the training
    split stays at the source's 28 px (at 224 px it would be more than 20 GB for Fashion-MNIST)."""
    import dataclasses

    from imgrec.data.dataset import load_data, load_eval_split
    from imgrec.modeldir import read_meta

    meta = read_meta(trained_run[0])
    big = dataclasses.replace(meta, image_size=40, channels=3)
    bundle, got = load_eval_split(big, None, None, split)
    d = meta.data
    old = load_data(d["source"], image_size=40, channels=3, val_split=d.get("val_split"),
                    split_seed=int(d.get("split_seed") or 0), progress=False)
    want = getattr(old, split)
    assert got.images.shape[1:] == (3, 40, 40)
    assert torch.equal(got.images, want.images) and torch.equal(got.labels, want.labels)
    assert bundle.train.images.shape[1:] == (1, 28, 28)  # not brought to 40 px
    assert torch.equal(bundle.train.labels, old.train.labels)

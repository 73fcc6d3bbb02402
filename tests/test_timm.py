"""timm models through imgrec: ``--model timm:NAME`` trains, evaluates, predicts and serves like a built-in model;
timm checkpoints load with ``--weights``, ``--pretrained`` goes through timm's own loader; ``imgrec models --timm``.

Kept small for speed: 200 Fashion-MNIST images in an image folder, one epoch, commands run in-process
(``imgrec.cli.main``) so timm and torch are imported once.
"""
from __future__ import annotations

import contextlib
import io
import json
import sys
from pathlib import Path

import pytest
import torch

timm = pytest.importorskip("timm")

from conftest import write_image_folder  # noqa: E402
from imgrec.cli import main  # noqa: E402
from imgrec.errors import ConfigError, ModelFileError  # noqa: E402
from imgrec.models import create_model, model_info  # noqa: E402
from imgrec.models.pretrained import load_pretrained  # noqa: E402

CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
VIT = "timm:vit_tiny_patch16_224"


def cli(*args) -> tuple[int, str, str]:
    """``imgrec ARGS`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err and lines and lines[-1].startswith("imgrec: error:"), err
    assert sum(ln.startswith("imgrec: error:") for ln in lines) == 1, err
    return lines[-1]


@pytest.fixture(scope="module", autouse=True)
def _restore_threads():
    # the runs below train with --threads 1 (steady on a busy 2-core machine, where two OpenMP threads
    # competing with other processes run many times slower); the setting is process-wide, so put it back
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fm_folder(tmp_path_factory, fmnist_arrays):
    x, y, xt, yt = fmnist_arrays
    root = tmp_path_factory.mktemp("timm-data") / "fm"
    write_image_folder(root / "train", x, y, CLASSES, 20)   # 200 training images
    write_image_folder(root / "test", xt, yt, CLASSES, 3)   # 30 test images
    return root


@pytest.fixture(scope="module")
def timm_runs(tmp_path_factory, fm_folder):
    """timm:resnet18 started from a timm checkpoint the test writes (5 classes, RGB: head and stem differ),
    and a timm ViT at 28 px (its depth cut to 2 through the config file's model kwargs, for speed)."""
    tmp = tmp_path_factory.mktemp("timm-runs")
    torch.manual_seed(0)
    source = timm.create_model("resnet18", num_classes=5)
    torch.save(source.state_dict(), tmp / "r18-timm.pth")
    common = ["--data", fm_folder, "--image-size", "28", "--epochs", "1", "--batch-size", "64",
              "--val-split", "0.2", "--threads", "1", "--json"]
    rc, out, err = cli("train", "--model", "timm:resnet18", "--weights", tmp / "r18-timm.pth",
                       "--out", tmp / "r18", *common)
    assert rc == 0, err
    r18 = json.loads(out)
    (tmp / "vit.yaml").write_text(f"model:\n  name: {VIT}\n  kwargs:\n    depth: 2\n")
    rc, out, err = cli("train", "--config", tmp / "vit.yaml", "--out", tmp / "vit", *common)
    assert rc == 0, err
    vit = json.loads(out)
    return {"r18": (tmp / "r18", r18, source), "vit": (tmp / "vit", vit, None)}


@pytest.mark.slow
@pytest.mark.parametrize("which", ["r18", "vit"])
def test_train_eval_predict_like_a_builtin_model(timm_runs, fm_folder, which):
    run, summary, _ = timm_runs[which]
    meta = json.loads((run / "model.json").read_text())
    assert meta["model"]["name"] == ("timm:resnet18" if which == "r18" else VIT)
    assert meta["image_size"] == 28 and meta["channels"] == 1
    assert summary["epochs_run"] == 1 and summary["test_n"] == 30
    if which == "vit":  # the architecture arguments ride with the weights and rebuild the model
        assert meta["model"]["kwargs"]["depth"] == 2

    rc, out, err = cli("eval", "--model", run, "--data", fm_folder, "--split", "test", "--json")
    assert rc == 0, err
    ev = json.loads(out)
    assert ev["n"] == 30 and ev["top1"] == pytest.approx(summary["test_acc"])

    rc, out, err = cli("predict", "--model", run, fm_folder / "test" / "bag", "--top-k", "3", "--json")
    assert rc == 0, err
    preds = json.loads(out)
    assert len(preds) == 3 and all(len(p["predictions"]) == 3 for p in preds)
    scores = [s["score"] for s in preds[0]["predictions"]]
    assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("which", ["r18", "vit"])
def test_serve_answers_like_predict(timm_runs, fm_folder, which):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from imgrec.serve.app import ServeSettings, create_app, load_classifier

    run = timm_runs[which][0]
    clf = load_classifier(run, device="cpu")
    image = next((fm_folder / "test" / "sneaker").glob("*.png")).read_bytes()
    with TestClient(create_app(clf, ServeSettings(max_batch=4)), base_url="http://127.0.0.1") as client:
        assert client.get("/v1/model").json()["name"] == clf.name == timm_runs[which][1]["model"]
        r = client.post("/v1/predict", files={"files": ("x.png", image, "image/png")}, params={"top_k": 3})
    assert r.status_code == 200, r.text
    assert r.json()["model"] == clf.name
    got = r.json()["predictions"][0]
    want = clf.predict(image, top_k=3)
    assert [p["label"] for p in got] == [p["label"] for p in want]
    assert [p["score"] for p in got] == pytest.approx([p["score"] for p in want], abs=1e-5)


@pytest.mark.slow
def test_weights_file_starts_training_and_the_head_is_replaced(timm_runs):
    """The checkpoint's backbone went into training (said on stderr); its 5-class head did not."""
    run, _, source = timm_runs["r18"]
    from imgrec.infer.runtime import load_model
    model, _ = load_model(run)
    assert model.get_classifier().out_features == 10
    # one epoch of AdamW moves each weight a little: the trained stem is still close to the file's summed RGB kernels
    start = source.conv1.weight.sum(1, keepdim=True)
    assert torch.nn.functional.cosine_similarity(model.conv1.weight.flatten(), start.flatten(), dim=0) > 0.9


def test_timm_checkpoint_loads_with_weights(tmp_path):
    """A state dict saved from timm (torch.save or safetensors): backbone copied exactly, RGB stem summed to grey,
    the classifier re-initialised for the new classes and reported; a ViT at 224 px resampled to 28 px."""
    from safetensors.torch import save_file
    torch.manual_seed(0)
    src = timm.create_model("resnet18", num_classes=5)
    torch.save(src.state_dict(), tmp_path / "r18.pth")
    model = create_model("timm:resnet18", num_classes=10, in_chans=1, image_size=28)
    report = load_pretrained(model, "timm:resnet18", weights_file=tmp_path / "r18.pth")
    assert set(report.skipped) == {"fc.weight", "fc.bias"}
    assert "classifier re-initialised" in str(report)
    assert torch.equal(model.layer4[1].conv2.weight, src.layer4[1].conv2.weight)
    assert torch.allclose(model.conv1.weight, src.conv1.weight.sum(1, keepdim=True), atol=1e-6)
    # same classes: the head loads too
    same = create_model("timm:resnet18", num_classes=5, in_chans=3, image_size=32)
    assert not load_pretrained(same, "timm:resnet18", weights_file=tmp_path / "r18.pth").skipped

    vit = timm.create_model("vit_tiny_patch16_224", depth=2)  # 16 px patches on a 14 x 14 grid
    save_file(vit.state_dict(), str(tmp_path / "vit.safetensors"))
    small = create_model(VIT, num_classes=10, in_chans=1, image_size=28, depth=2)
    assert small.patch_embed.grid_size == (7, 7)  # 4 px patches chosen for 28 px
    report = load_pretrained(small, VIT, weights_file=tmp_path / "vit.safetensors")
    assert set(report.skipped) == {"head.weight", "head.bias"}
    assert torch.equal(small.blocks[1].mlp.fc1.weight, vit.blocks[1].mlp.fc1.weight)
    assert small.pos_embed.shape == (1, 50, 192) and small(torch.randn(2, 1, 28, 28)).shape == (2, 10)

    with pytest.raises(ModelFileError, match="does not fit timm:vit_tiny_patch16_224") as err:
        load_pretrained(small, VIT, weights_file=tmp_path / "r18.pth")
    assert "\n" not in str(err.value)


def test_pickle_with_code_is_refused_for_timm(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"conv1.weight": Evil()}, tmp_path / "evil.pth")
    model = create_model("timm:resnet18", num_classes=10, in_chans=1, image_size=28)
    with pytest.raises(ModelFileError, match="refused"):
        load_pretrained(model, "timm:resnet18", weights_file=tmp_path / "evil.pth")


def test_pretrained_offline_is_a_local_file_and_timm_file_overrides_are_refused(tmp_path, monkeypatch):
    """Offline, timm weights come in through ``--weights FILE`` (the same transfer as ``--pretrained``);
    timm's own file override (``pretrained_cfg_overlay={"file": ...}``) would read any path a handed
    model.json names, so it is refused before timm sees it."""
    from safetensors.torch import save_file

    from imgrec.errors import ConfigError
    torch.manual_seed(1)
    imagenet_like = timm.create_model("resnet18")  # 1000 classes, as timm's weights
    save_file(imagenet_like.state_dict(), str(tmp_path / "r18-in1k.safetensors"))
    with pytest.raises(ConfigError, match="pretrained_cfg_overlay"):
        create_model("timm:resnet18", num_classes=10, in_chans=1, image_size=28,
                     pretrained_cfg_overlay={"file": str(tmp_path / "r18-in1k.safetensors")})
    model = create_model("timm:resnet18", num_classes=10, in_chans=1, image_size=28)
    report = load_pretrained(model, "timm:resnet18", weights_file=tmp_path / "r18-in1k.safetensors")
    assert {"fc.weight", "fc.bias"} <= set(report.skipped)
    assert torch.equal(model.layer3[0].conv1.weight, imagenet_like.layer3[0].conv1.weight)
    monkeypatch.setenv("IMGREC_OFFLINE", "1")  # no hub download attempted (it would retry for a minute)
    with pytest.raises(ModelFileError, match="--weights FILE"):
        load_pretrained(create_model("timm:resnet18", image_size=32), "timm:resnet18", pretrained=True)


def test_model_info_and_head_api():
    r18, vit = model_info("timm:resnet18"), model_info(VIT)
    assert (r18.family, vit.family) == ("cnn", "vit")
    assert r18.pretrained == "resnet18.a1_in1k" and r18.default_image_size == 224
    assert model_info("timm:resnet18.tv_in1k").pretrained == "resnet18.tv_in1k"
    m = create_model("timm:resnet18", num_classes=7, in_chans=3, image_size=32)
    x = torch.randn(2, 3, 32, 32)
    feats = m.forward_features(x)
    assert feats.ndim == 4 and torch.allclose(m.forward_head(feats), m(x))
    assert m.forward_head(feats, pre_logits=True).shape == (2, m.num_features)
    m.reset_classifier(3)
    assert m.get_classifier().out_features == 3


def test_unknown_timm_name_is_one_clear_line(tmp_path):
    rc, _, err = cli("train", "--model", "timm:resnet1800", "--out", tmp_path / "x")
    assert rc == 2
    line = one_error_line(err)
    assert "unknown timm model 'resnet1800'" in line and "timm:resnet18" in line
    with pytest.raises(ConfigError, match="no pretrained tag 'nope'"):
        model_info("timm:resnet18.nope")
    with pytest.raises(ConfigError, match="unknown model 'resnet19'.*timm:NAME"):
        model_info("resnet19")


def test_without_timm_installed_one_line_says_how(tmp_path, monkeypatch):
    from imgrec.models import timm_models
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    monkeypatch.setitem(sys.modules, "timm.models", None)
    timm_models.timm_model_info.cache_clear()
    try:
        rc, _, err = cli("train", "--model", "timm:convnext_atto", "--out", tmp_path / "x")
        assert rc == 2 and "pip install timm" in one_error_line(err)
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no cached listing
        rc, _, err = cli("models", "--timm", "resnet*")
        assert rc == 2 and "pip install timm" in one_error_line(err)
        assert model_info("resnet18").name == "resnet18"  # built-in models do not need timm
    finally:
        timm_models.timm_model_info.cache_clear()


def test_models_timm_lists_matching_architectures(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    rc, out, err = cli("models", "--timm", "resnet1*", "--json")
    assert rc == 0, err
    rows = {r["name"]: r for r in json.loads(out)}
    assert {"timm:resnet18", "timm:resnet101"} <= set(rows)
    assert all(n.startswith("timm:resnet1") for n in rows)
    assert rows["timm:resnet18"]["pretrained"][0] == "a1_in1k" and "tv_in1k" in rows["timm:resnet18"]["pretrained"]
    assert list(Path(tmp_path).glob("imgrec/timm-models-*.json"))  # cached: the next listing skips timm
    rc, out, _ = cli("models", "--timm", "vit_tiny_patch16")
    assert rc == 0 and "timm:vit_tiny_patch16_224" in out and "vit" in out
    assert "timm:resnet18" not in cli("models", "--json")[1]  # the registry listing stays imgrec's own

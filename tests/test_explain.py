"""Grad-CAM and the step-by-step view: sanity against a model that must look at a known patch, an oracle
(CAM) for global-average-pool models, every registered model, and the CLI."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from conftest import run_cli

from imgrec.eval.explain import VERTICAL_EDGE, explain, grad_cam, heat_mass
from imgrec.infer.predictor import Classifier
from imgrec.models import create_model, list_models, model_info
from imgrec.modeldir import ModelMeta

# -- a task whose answer sits in a known place ------------------------------------------------------
SIZE, PATCH, TOP, LEFT = 28, 10, 4, 14          # the class is decided by the 10×10 patch at (4, 14)
_yy, _xx = np.mgrid[0:PATCH, 0:PATCH]
PATTERNS = [(_xx % 2 == 0), (_yy % 2 == 0), ((_xx + _yy) % 2 == 0)]  # vertical, horizontal stripes, checks
CLASSES = ["vertical", "horizontal", "checks"]


def patch_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Uniform noise everywhere, one class pattern in the patch. The noise has the same pixel statistics
    as the patterns, so the patch is not more salient than the rest to a network that has learned nothing:
    only training can make the heat map go there."""
    rng = np.random.RandomState(seed)
    x = rng.uniform(0, 255, (n, SIZE, SIZE))
    y = rng.randint(0, len(CLASSES), n)
    for i in range(n):
        x[i, TOP:TOP + PATCH, LEFT:LEFT + PATCH] = PATTERNS[y[i]] * 255
    return x.astype(np.uint8), y


class TinyCNN(nn.Module):
    """Three 3×3 convs, one pool, global average pooling, linear: the head API of imgrec's models."""

    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                                      nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(32, num_classes)

    def forward_features(self, x):
        return self.features(x)

    def forward_head(self, feats, pre_logits: bool = False):
        pooled = feats.mean(dim=(2, 3))
        return pooled if pre_logits else self.head(pooled)

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def get_classifier(self):
        return self.head


def tiny_classifier(seed: int) -> Classifier:
    torch.manual_seed(seed)
    meta = ModelMeta(model={"name": "tiny_test_cnn"}, classes=CLASSES, image_size=SIZE, channels=1,
                     mean=[0.5], std=[0.5])
    return Classifier(TinyCNN(), meta, device="cpu", amp="none")


@pytest.fixture(scope="module")
def patch_model(one_thread):
    """(trained classifier, the same network before training, held-out images, labels)."""
    x, y = patch_images(768, seed=0)
    clf = tiny_classifier(0)
    model = clf.model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xs = clf.normalize(torch.from_numpy(x)[:, None]).contiguous()
    ys = torch.from_numpy(y)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for idx in torch.randperm(len(xs), generator=g).split(32):
            loss = F.cross_entropy(model(xs[idx]), ys[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    xv, yv = patch_images(16, seed=1)
    return clf, tiny_classifier(0), xv, yv


def test_gradcam_finds_the_patch_a_trained_model_uses(patch_model):
    clf, untrained, xv, yv = patch_model
    acc = (clf.probabilities(torch.from_numpy(xv)[:, None]).argmax(1).numpy() == yv).mean()
    assert acc == 1.0, "the tiny model should have learned the patch task"
    box = (TOP, LEFT, PATCH, PATCH)
    area = PATCH * PATCH / SIZE ** 2  # 13% of the image
    trained = np.array([heat_mass(explain(clf, im, steps=False)["heatmap"], box) for im in xv])
    before = [explain(untrained, im, steps=False)["heatmap"] for im in xv]
    random = np.array([heat_mass(h, box) for h in before])
    assert trained.mean() > 0.5, f"trained model: only {trained.mean():.2f} of the heat on the patch"
    assert (trained > area).all(), trained
    # before training the heat maps are not empty, they are just not on the patch
    assert sum(h.any() for h in before) >= len(before) // 2
    assert random.mean() < 0.25, f"untrained model: {random.mean():.2f} of the heat on the patch"
    # and for a class that is not in the image, the patch is not where the evidence is
    other = [heat_mass(explain(clf, im, target=(int(c) + 1) % 3, steps=False)["heatmap"], box)
             for im, c in zip(xv[:8], yv[:8])]
    assert np.mean(other) < trained.mean()


def test_gradcam_equals_cam_for_a_global_average_pool_model(patch_model):
    """Oracle: for GAP + linear, Grad-CAM is the class activation map of Zhou et al. 2016,
    relu(sum_c w[t, c] * A_c), because every gradient is w[t, c] / (h*w) at every position."""
    clf = patch_model[0]
    x = clf.normalize(torch.from_numpy(patch_images(1, seed=5)[0])[:, None]).contiguous()
    for t in range(3):
        heat, logits, layer = grad_cam(clf.model, x, t)
        with torch.no_grad():
            acts = clf.model.forward_features(x)[0]
            cam = torch.relu(torch.einsum("c,chw->hw", clf.model.head.weight[t], acts))
        cam = F.interpolate(cam[None, None], size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0, 0]
        cam = (cam - cam.min()) / (cam.max() - cam.min())
        assert layer == "forward_features"
        torch.testing.assert_close(heat, cam, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(logits, clf.model(x)[0].detach())


def test_explain_steps_are_the_networks_own_layers(trained_run, fmnist_arrays):
    run_dir, _ = trained_run
    clf = Classifier.load(run_dir, device="cpu")
    image = fmnist_arrays[2][0]  # an ankle boot
    r = explain(clf, image)
    s = r["steps"]
    # the probabilities are the ones predict reports
    top = clf.predict(image, top_k=1)[0]
    assert r["predicted"] == top["label"] and r["predicted_probability"] == pytest.approx(top["score"], abs=1e-6)
    assert r["probabilities"].sum() == pytest.approx(1, abs=1e-5)
    # simple_cnn: conv -> ReLU -> max pool, recomputed here layer by layer
    first = clf.model.features[0]
    x = clf.normalize(torch.from_numpy(image)[None, None]).float()
    with torch.no_grad():
        conv = first(x)[0].numpy()
    np.testing.assert_allclose(s["conv"], conv, atol=1e-5)
    np.testing.assert_allclose(s["activation"], np.maximum(conv, 0), atol=1e-5)
    np.testing.assert_allclose(s["pool"], F.max_pool2d(torch.from_numpy(np.maximum(conv, 0)), 2).numpy(), atol=1e-5)
    assert s["activation_layer"] == "features.1" and s["pool_layer"] == "features.2"
    np.testing.assert_array_equal(s["filters"], first.weight.detach().numpy())
    # the window of numbers is the image's own pixels
    r0, c0 = s["patch_origin"]
    np.testing.assert_array_equal(s["patch"][0], image[r0:r0 + 8, c0:c0 + 8])
    assert s["patch"].std() > 0  # the busiest window, not a blank corner
    # the classic edge filter, checked against scipy's cross-correlation (what conv2d computes); a 1-pixel
    # symmetric border repeats the edge pixels
    from scipy.signal import correlate2d
    expected = correlate2d(image.astype(np.float32) / 255, VERTICAL_EDGE, mode="same", boundary="symm")
    np.testing.assert_allclose(s["edge_map"], expected, atol=1e-5)
    assert s["edge_map"].max() > 0.5  # an ankle boot has vertical edges
    assert -1 <= s["edge_like_correlation"] <= 1 and abs(s["edge_like_correlation"]) > 0.3
    # no gradient left behind on a model that may be serving requests
    assert all(p.grad is None for p in clf.model.parameters())


@pytest.mark.parametrize("name", list_models())
def test_explain_every_registered_model(name, one_thread):
    info = model_info(name)
    size = 32
    torch.manual_seed(0)
    model = create_model(name, num_classes=4, in_chans=3, image_size=size)
    # a non-zero head: ViTs start with a zero classifier, which gives every class a zero gradient
    nn.init.normal_(model.get_classifier().weight, std=0.05)
    meta = ModelMeta(model={"name": name}, classes=list("abcd"), image_size=size, channels=3,
                     mean=[0.5] * 3, std=[0.25] * 3)
    clf = Classifier(model, meta, device="cpu", amp="none")
    image = np.random.RandomState(0).randint(0, 256, (size, size, 3), dtype=np.uint8)
    r = explain(clf, image, target="c")
    heat = r["heatmap"]
    assert heat.shape == (size, size) and heat.dtype == np.float32
    assert np.isfinite(heat).all() and heat.min() >= 0 and heat.max() <= 1
    # a map with a where: scaled to its peak, and not flat (an empty map, all zeros, would say nothing)
    assert heat.max() == 1.0 and heat.std() > 0.01, (heat.min(), heat.max(), heat.std())
    assert r["target"] == "c" and r["target_index"] == 2
    assert r["probabilities"].shape == (4,)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert r["steps"]["filters"].shape == tuple(first_conv.weight.shape)
    assert r["steps"]["conv"].shape[0] == first_conv.out_channels
    assert r["family"] == info.family
    if info.family == "cnn":
        with torch.no_grad():
            side = min(model.forward_features(clf.normalize(torch.from_numpy(image).permute(2, 0, 1)[None])).shape[-2:])
        assert ("forward_features is only" in r["layer"]) == (side < 3), r["layer"]
    if info.family == "vit":
        att = r["attention"]
        assert att.shape == (size, size) and att.max() == pytest.approx(1) and att.min() >= 0
    assert all(p.grad is None for p in model.parameters())


def test_small_final_maps_fall_back_to_a_wider_layer(one_thread):
    """A network that pools its last map down to 1×1 (as FastNet and AlexNet do on small images) gives a
    Grad-CAM that can only say "everywhere"; the deepest activation at least 4×4 wide is used instead."""
    clf = tiny_classifier(0)
    clf.model.features.append(nn.AdaptiveMaxPool2d(1))  # forward_features: N×32×1×1
    image = patch_images(1, 0)[0][0]
    r = explain(clf, image, steps=False)
    assert r["layer"] == "features.6 (forward_features is only 1×1)"  # the last ReLU, 14×14
    heat = r["heatmap"]
    assert heat.max() == 1.0 and heat.min() < 0.5  # a map with a where, not a constant


def test_unknown_target_is_a_clear_error(patch_model):
    from imgrec.errors import ConfigError
    clf = patch_model[0]
    with pytest.raises(ConfigError, match="unknown target class 'diagonal'.*vertical"):
        explain(clf, patch_images(1, 0)[0][0], target="diagonal")
    with pytest.raises(ConfigError, match="outside 0..2"):
        explain(clf, patch_images(1, 0)[0][0], target=7)
    assert explain(clf, patch_images(1, 0)[0][0], target="CHECKS", steps=False)["target"] == "checks"


@pytest.mark.slow
def test_explain_cli(trained_run, fmnist_arrays, tmp_path):
    run_dir, _ = trained_run
    img = tmp_path / "boot.png"
    Image.fromarray(fmnist_arrays[2][0]).save(img)
    out = tmp_path / "steps.png"
    numbers = tmp_path / "steps.json"
    r = run_cli("explain", "--model", run_dir, img, "--out", out, "--steps", "--json", "--label", "Ankle boot",
                "--json-out", numbers)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    full = json.loads(numbers.read_text())
    assert summary["label"] == full["training"]["label"] == "Ankle boot"
    assert summary["loss"] == full["training"]["loss"] == pytest.approx(
        -np.log(full["training"]["probabilities"][full["training"]["label_index"]]), rel=1e-5)
    pred = Classifier.load(run_dir, device="cpu").predict(str(img), top_k=1)[0]  # what `imgrec predict` prints
    assert summary["predicted"] == pred["label"] and summary["probability"] == pytest.approx(pred["score"], abs=1e-6)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 1000  # the step-by-step figure, not the small one

    r = run_cli("explain", "--model", run_dir, img, "--out", tmp_path / "t.png", "--target", "Trouser")
    assert r.returncode == 0, r.stderr
    assert "explaining Trouser" in r.stdout and (tmp_path / "t.png").stat().st_size > 0

    r = run_cli("explain", "--model", run_dir, img, "--out", tmp_path / "x.png", "--target", "Hat")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "unknown target class 'Hat'" in r.stderr
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("name", list_models())
def test_explain_training_numbers_are_consistent(name, one_thread):
    """The training panels of every registered model: the logits are features × weights + bias, the loss is
    −log p of the true label, one SGD step on a copy lowers it for a small learning rate, and the model
    explained is left unchanged."""
    size = 32
    torch.manual_seed(0)
    model = create_model(name, num_classes=4, in_chans=3, image_size=size)
    nn.init.normal_(model.get_classifier().weight, std=0.05)
    meta = ModelMeta(model={"name": name}, classes=list("abcd"), image_size=size, channels=3,
                     mean=[0.5] * 3, std=[0.25] * 3)
    clf = Classifier(model, meta, device="cpu", amp="none")
    image = np.random.RandomState(1).randint(0, 256, (size, size, 3), dtype=np.uint8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = explain(clf, image, label="b")["training"]
    # a learning rate whose first-order effect is 1% of the loss: small for every model
    lr = 0.01 * probe["loss"] / max(probe["step"]["grad_norm"] ** 2, 1e-30)
    t = explain(clf, image, label="b", lr=lr)["training"]
    assert t["label"] == "b" and t["label_index"] == 1 and t["label_source"] == "given"
    x = clf.normalize(torch.from_numpy(image).permute(2, 0, 1)[None]).float()
    with torch.no_grad():
        logits = model(x)[0].double().numpy()
    np.testing.assert_allclose(t["classifier"]["logits"], logits, rtol=1e-4, atol=1e-4)
    c = t["classifier"]
    np.testing.assert_allclose(sum(c["contributions"][1]["products"]) + c["contributions"][1]["rest"]
                               + c["contributions"][1]["bias"], logits[1], rtol=1e-4, atol=1e-4)
    assert t["loss"] == pytest.approx(-np.log(t["probabilities"][1]), rel=1e-5, abs=1e-6)
    assert t["loss"] == pytest.approx(t["step"]["loss_before"], rel=1e-4, abs=1e-5)
    if t["loss"] > 1e-4:
        assert t["step"]["loss_after"] < t["step"]["loss_before"]
        assert t["step"]["probability_after"] > t["step"]["probability_before"]
    assert t["layers"] and all(np.isfinite(layer["grad_norm"]) for layer in t["layers"])
    assert t["saliency"].shape == (size, size) and t["saliency"].max() <= 1
    for k, v in model.state_dict().items():
        assert torch.equal(before[k], v), k
    assert all(p.grad is None for p in model.parameters())


def test_label_from_the_folder_name_and_json(patch_model, tmp_path):
    from imgrec.eval.explain import to_json
    clf = patch_model[0]
    folder = tmp_path / "Checks"
    folder.mkdir()
    Image.fromarray(patch_images(1, 0)[0][0]).save(folder / "a.png")
    r = explain(clf, str(folder / "a.png"))
    assert r["training"]["label"] == "checks" and r["training"]["label_source"] == "folder"
    assert explain(clf, patch_images(1, 0)[0][0])["training"]["label_source"] == "predicted"
    back = json.loads(json.dumps(to_json(r)))
    assert back["training"]["loss"] == r["training"]["loss"]
    from imgrec.errors import ConfigError
    with pytest.raises(ConfigError, match="unknown label 'diagonal'"):
        explain(clf, patch_images(1, 0)[0][0], label="diagonal")


def test_steps_figure_has_the_training_rows(patch_model):
    import io
    from imgrec.eval import plots
    r = explain(patch_model[0], patch_images(1, 0)[0][0], label="checks")
    with_training = Image.open(io.BytesIO(plots.steps_figure(r)))
    r.pop("training")
    without = Image.open(io.BytesIO(plots.steps_figure(r)))
    assert with_training.height > without.height * 1.3 and abs(with_training.width - without.width) < 20

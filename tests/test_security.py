"""Files people hand each other cannot run code or reach outside: one small crafted input per hole.

model.json / config kwargs into timm, pack chunk names for every location, idle and half-sent connections,
decode cost from the image header, TorchScript files, ONNX external data, YAML aliases, dependency floors.
Every bad case is one clear line (CLI: non-zero exit, no traceback; HTTP: a 4xx JSON message).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import socket
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgrec.cli import main
from imgrec.errors import ConfigError, DatasetError, ModelFileError
from liveserver import LiveServer, wait_until

ROOT = Path(__file__).resolve().parents[1]


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


class _Marker:
    """A pickle that creates a file when unpickled: if the file exists, foreign code ran."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# -- 1. model.kwargs never reach timm with file-loading keys ---------------------------------------------
def _model_dir(tmp_path: Path, kwargs: dict, name: str = "timm:resnet18") -> Path:
    d = tmp_path / "handed-model"
    d.mkdir()
    meta = {"format": "imgrec-model", "format_version": 2, "model": {"name": name, "kwargs": kwargs},
            "classes": ["a", "b"], "image_size": 32, "channels": 1, "mean": [0.5], "std": [0.25]}
    (d / "model.json").write_text(json.dumps(meta))
    return d


def test_model_json_with_checkpoint_path_is_refused_before_timm(tmp_path):
    evil = tmp_path / "evil.pth"
    marker = tmp_path / "ran"
    evil.write_bytes(pickle.dumps({"state_dict": _Marker(marker)}))
    model = _model_dir(tmp_path, {"checkpoint_path": str(evil)})
    (tmp_path / "x.png").write_bytes(_png(np.zeros((32, 32), np.uint8)))
    rc, _, err = cli("predict", "--model", model, tmp_path / "x.png")
    assert rc != 0
    assert "checkpoint_path" in one_error_line(err)
    assert not marker.exists()


@pytest.mark.parametrize("kwargs", [{"pretrained_cfg_overlay": {"file": "/etc/passwd"}},
                                    {"pretrained_cfg": {"url": "http://127.0.0.1:9/x.pth"}},
                                    {"drop_rate": {"nested": 1}}])
def test_model_json_with_non_architecture_kwargs_is_refused(tmp_path, kwargs):
    from imgrec.modeldir import read_meta
    with pytest.raises(ModelFileError, match=re.escape(next(iter(kwargs)))) as e:
        read_meta(_model_dir(tmp_path, kwargs))
    assert "\n" not in str(e.value)


def test_timm_builder_allows_only_architecture_kwargs(monkeypatch, tmp_path):
    timm = pytest.importorskip("timm")
    from imgrec.models import create_model

    calls = []
    monkeypatch.setattr(timm, "create_model", lambda *a, **k: calls.append(k))
    for bad in ({"checkpoint_path": str(tmp_path / "x.pth")}, {"pretrained_cfg_overlay": {"file": "x"}},
                {"pretrained_cfg": {}}, {"cache_dir": str(tmp_path)}, {"drop_rate": [{"a": 1}]}):
        with pytest.raises(ConfigError, match=re.escape(next(iter(bad)))):
            create_model("timm:resnet18", num_classes=2, in_chans=1, image_size=32, **bad)
    assert calls == []  # refused before timm was called
    monkeypatch.undo()
    m = create_model("timm:resnet18", num_classes=2, in_chans=1, image_size=32, drop_rate=0.1)
    assert m.imgrec_timm["kwargs"] == {"drop_rate": 0.1}


def test_config_file_kwargs_are_refused_in_one_line(tmp_path):
    pytest.importorskip("timm")
    data = tmp_path / "data"
    for c in ("a", "b"):
        (data / c).mkdir(parents=True)
        for i in range(4):
            (data / c / f"{i}.png").write_bytes(_png(np.full((16, 16), 40 * i, np.uint8)))
    marker = tmp_path / "ran"
    (tmp_path / "evil.pth").write_bytes(pickle.dumps(_Marker(marker)))
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model:\n  name: timm:resnet18\n  kwargs:\n    checkpoint_path: {tmp_path / 'evil.pth'}\n")
    rc, _, err = cli("train", "--config", cfg, "--data", data, "--epochs", 1, "--image-size", 32,
                     "--out", tmp_path / "run")
    assert rc != 0 and "checkpoint_path" in one_error_line(err)
    assert not marker.exists()


# -- 6. dependency floors exclude the versions with known holes; what is installed meets them ----------------
def test_dependency_floors():
    import tomllib
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    by_name = {r.name.lower(): r for r in reqs}
    excluded = {"pillow": ["10.0.0"], "timm": ["1.0.9", "1.0.25"], "python-multipart": ["0.0.9", "0.0.12"],
                "h11": ["0.14.0"]}
    for name, versions in excluded.items():
        for v in versions:
            assert not by_name[name].specifier.contains(v), (name, v)
    for r in reqs:
        try:
            have = version(r.name)
        except PackageNotFoundError:
            continue
        assert r.specifier.contains(have, prereleases=True), f"installed {r.name} {have} is outside {r}"


# -- 2. pack chunk names are plain file names, for every location ------------------------------------------
EVIL_CHUNK = "../../evil/chunk-0-0.bin"


def _evil_index(split_dir: Path, name: str = EVIL_CHUNK) -> Path:
    split_dir.mkdir(parents=True, exist_ok=True)
    index = {"config": {"data_format": ["tensor", "int"], "compression": None, "encryption": None,
                        "item_loader": "PyTreeLoader", "chunk_bytes": 1 << 20,
                        "data_spec": json.dumps([1, {"context": json.dumps(["image", "label"])}])},
             "chunks": [{"filename": name, "chunk_bytes": 64, "chunk_size": 1, "dim": None}],
             "updated_at": "1"}
    (split_dir / "index.json").write_text(json.dumps(index))
    return split_dir / "index.json"


@pytest.mark.parametrize("name", [EVIL_CHUNK, "/etc/passwd", "..", "a/b.bin", "a\\b.bin", "C:chunk.bin",
                                  "chunk\0.bin", "", None, 7])
def test_chunk_names_must_be_plain_file_names(name):
    from imgrec.data.stream import check_chunk_name
    with pytest.raises(DatasetError, match="refusing a shard"):
        check_chunk_name(name)
    assert check_chunk_name("chunk-0-12.bin") == "chunk-0-12.bin"


def test_chunk_names_are_checked_for_local_urls(tmp_path):
    pytest.importorskip("litdata")
    from imgrec.data.stream import check_index
    _evil_index(tmp_path / "pack" / "train")
    with pytest.raises(DatasetError, match=re.escape(repr(EVIL_CHUNK))):
        check_index(f"local:{tmp_path / 'pack' / 'train'}")
    assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize("scheme", ["s3://", "gs://", "hf://"])
def test_chunk_names_are_checked_for_object_stores_before_any_chunk(tmp_path, monkeypatch, scheme):
    from imgrec.data import stream
    index = _evil_index(tmp_path / "fetched")
    meta = tmp_path / "imgrec-pack.json"
    meta.write_text(json.dumps({"format": "imgrec-pack", "version": 1, "classes": ["a", "b"], "channels": 1,
                                "image_size": 8, "mean": [0.5], "std": [0.25], "splits": {"train": {"images": 1}}}))
    fetched = []

    def fake_fetch(url, name, into):  # the object store, answered from disk: no network
        fetched.append(name)
        return meta if name == "imgrec-pack.json" else index

    def no_dataset(*a, **k):
        raise AssertionError("a dataset was built over a refused index")

    monkeypatch.setattr(stream, "_fetch", fake_fetch)
    monkeypatch.setattr(stream, "_dataset", no_dataset)
    with pytest.raises(DatasetError, match="refusing a shard"):
        stream.read_split(f"{scheme}bucket/pack", "train")
    assert fetched == ["imgrec-pack.json", "index.json"]  # no chunk was asked for


# -- 7. YAML: no aliases, at most 1 MB ---------------------------------------------------------------------
BILLION_LAUGHS = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
recipe: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""


def test_yaml_alias_bomb_is_refused_in_one_line(tmp_path):
    from imgrec.config import load_yaml
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BILLION_LAUGHS)
    with pytest.raises(ConfigError, match="aliases") as e:
        load_yaml(bomb)
    assert "\n" not in str(e.value)
    rc, _, err = cli("train", "--config", bomb, "--out", tmp_path / "run")
    assert rc != 0 and "aliases" in one_error_line(err)
    assert not (tmp_path / "run").exists()


def test_yaml_size_and_depth_are_capped(tmp_path):
    from imgrec.config import load_yaml
    big = tmp_path / "big.yaml"
    big.write_text("lr: 0.1\n" + "# padding\n" * 120_000)
    with pytest.raises(ConfigError, match="larger than 1 MB"):
        load_yaml(big)
    deep = tmp_path / "deep.yaml"
    deep.write_text("recipe: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(ConfigError, match="cannot read config"):
        load_yaml(deep)
    ok = tmp_path / "ok.yaml"
    ok.write_text("train:\n  lr: 0.05\nmodel:\n  name: simple_cnn\n")
    assert load_yaml(ok) == {"train": {"lr": 0.05}, "model": {"name": "simple_cnn"}}


# -- 5. TorchScript files are never loaded --------------------------------------------------------------
def _tiny_model_dir(tmp_path: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    from imgrec.modeldir import ModelMeta, write_meta
    from imgrec.models import create_model

    d = tmp_path / "tiny-run"
    d.mkdir()
    meta = ModelMeta(model={"name": "simple_cnn", "kwargs": {}}, classes=["a", "b"], image_size=16, channels=1,
                     mean=[0.5], std=[0.25])
    torch.manual_seed(0)
    model = create_model("simple_cnn", **meta.model_kwargs())
    save_file(model.state_dict(), str(d / "best.safetensors"))
    write_meta(d, meta)
    return d


def _forbid_jit_load(monkeypatch):
    import torch
    loaded = []
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: loaded.append(a) or pytest.fail("torch.jit.load called"))
    return loaded


def test_a_foreign_torchscript_file_is_never_loaded(tmp_path, monkeypatch):
    import torch

    class Payload(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    foreign = tmp_path / "handed.pt"
    torch.jit.save(torch.jit.script(Payload()), str(foreign))
    model = _tiny_model_dir(tmp_path)
    loaded = _forbid_jit_load(monkeypatch)
    rc, _, err = cli("export", "--model", model, "--check", "--out", foreign)
    assert rc != 0 and "does not load TorchScript" in one_error_line(err)
    assert loaded == []


def test_torchscript_export_is_checked_from_memory(tmp_path, monkeypatch):
    from imgrec.infer import export as export_mod
    model = _tiny_model_dir(tmp_path)
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        (imgs / f"{i}.png").write_bytes(_png(rng.integers(0, 256, (20, 18), dtype=np.uint8)))
    loaded = _forbid_jit_load(monkeypatch)
    res = export_mod.export_model(model, tmp_path / "m.pt", "torchscript", check_data=[str(imgs)])
    assert res.check.passed and res.check.n == 4 and (tmp_path / "m.pt").is_file()
    assert loaded == [] and export_mod._TRACED_HERE == {}


# -- 6. ONNX external data stays inside the model's folder (sparse initializers and links included) --------
def _onnx_model(path: Path, location: str | None, sparse: bool = False) -> Path:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper
    from onnx.external_data_helper import set_external_data

    values = helper.make_tensor("w_values" if sparse else "w", TensorProto.FLOAT, [2],
                                np.array([1.0, 2.0], np.float32).tobytes(), raw=True)
    if location is not None:
        set_external_data(values, location=location, offset=0, length=8)
        values.data_location = TensorProto.EXTERNAL
        values.ClearField("raw_data")
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4] if sparse else [2])
    if sparse:
        indices = helper.make_tensor("w_indices", TensorProto.INT64, [2], [0, 3])
        graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [], [out],
                                  sparse_initializer=[helper.make_sparse_tensor(values, indices, [4])])
    else:
        graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [], [out], initializer=[values])
    path.write_bytes(helper.make_model(graph).SerializeToString())
    return path


def test_onnx_external_data_outside_the_folder_is_refused(tmp_path):
    from imgrec.infer.ort import check_external_data
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"\0" * 8)
    models = tmp_path / "models"
    models.mkdir()
    # a sparse initializer's values, pointing up and out
    with pytest.raises(ModelFileError, match=re.escape("'../secret.bin'")):
        check_external_data(_onnx_model(models / "sparse.onnx", "../secret.bin", sparse=True))
    # a plain name inside the folder that is a symbolic link out of it
    (models / "data.bin").symlink_to(secret)
    with pytest.raises(ModelFileError, match="outside the model's folder"):
        check_external_data(_onnx_model(models / "linked.onnx", "data.bin"))
    for bad in (str(secret), "sub\\..\\..\\secret.bin"):
        with pytest.raises(ModelFileError, match="refused"):
            check_external_data(_onnx_model(models / "abs.onnx", bad))
    # a real file beside the model is fine
    (models / "inside.bin").write_bytes(b"\0" * 8)
    check_external_data(_onnx_model(models / "inside.onnx", "inside.bin"))


def test_onnx_check_skips_importing_onnx_without_external_data(tmp_path, monkeypatch):
    from imgrec.infer.ort import check_external_data
    plain = _onnx_model(tmp_path / "plain.onnx", None)
    ext = _onnx_model(tmp_path / "ext.onnx", "x.bin")
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` would raise
    check_external_data(plain)
    with pytest.raises(ConfigError, match="needs onnx"):
        check_external_data(ext)  # declares external data: onnx is needed (and said so in one line)


# -- 3 and 4. the server: idle and half-sent connections, decode cost judged from the header -------------
def _closed_by_peer(s: socket.socket, limit_s: float = 60.0) -> bool:
    s.settimeout(limit_s)
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    pytest.importorskip("fastapi")
    from imgrec.serve.app import load_classifier
    return load_classifier(_tiny_model_dir(tmp_path_factory.mktemp("serve")))


def _socket_budget() -> int:
    """Idle sockets this test may open (each costs two descriptors here: client and server in one process)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 2 * 1100 + 400
    if soft < want and (hard == resource.RLIM_INFINITY or hard > soft):
        resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return min(1100, (soft - 400) // 2)


def test_idle_and_half_sent_connections_do_not_shut_the_server_out(tiny_classifier):
    httpx = pytest.importorskip("httpx")
    from imgrec.serve.app import ServeSettings, create_app
    n = _socket_budget()
    if n < 300:
        pytest.skip(f"the open-file limit allows only {n} idle sockets")
    settings = ServeSettings(header_timeout_s=4.0)
    with LiveServer(create_app(tiny_classifier, settings), settings) as srv:
        idle = []
        try:
            for _ in range(n):
                idle.append(socket.create_connection(("127.0.0.1", srv.port), timeout=30))
            half = socket.create_connection(("127.0.0.1", srv.port), timeout=30)
            idle.append(half)
            half.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")  # the head never ends
            # every idle socket accepted and held by the server, then a real client still gets through
            wait_until(lambda: len(srv.server.server_state.connections) >= n, f"{n} connections accepted")
            assert httpx.get(srv.url + "/healthz", timeout=30).status_code == 200
            # the server ends the half-sent head and the silent connections itself (the limit only bounds a hang)
            assert _closed_by_peer(half)
            assert all(_closed_by_peer(s) for s in idle)
            assert httpx.get(srv.url + "/healthz", timeout=30).status_code == 200
        finally:
            for s in idle:
                s.close()


def _png_bytes(width: int, height: int, mode: int = 6) -> bytes:
    """A valid PNG of zeros (colour type 6: RGBA, 0: grey), compressed with zlib: tiny on disk, huge decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    row = b"\0" * (1 + width * (4 if mode == 6 else 1))
    c = zlib.compressobj(9)
    per = max(1, (1 << 21) // len(row))
    idat = b"".join(c.compress(row * min(per, height - y)) for y in range(0, height, per)) + c.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, mode, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


class _CountingClassifier:
    """A classifier that counts the images it is asked to decode."""

    def __init__(self, clf):
        self._clf = clf
        self.decoded = 0

    def __getattr__(self, name):
        return getattr(self._clf, name)

    def load_image(self, image):
        self.decoded += 1
        return self._clf.load_image(image)


def test_uploads_are_refused_from_the_header_before_decoding(tiny_classifier):
    httpx = pytest.importorskip("httpx")
    from imgrec.serve.app import ServeSettings, create_app
    square = _png_bytes(6320, 6320)            # 155 KB: 40 Mpx RGBA, 160 MB decoded
    strip = _png_bytes(1, 39_999_999, mode=0)  # 78 KB: a 1 × 40-million-pixel strip
    assert len(square) < 200_000 and len(strip) < 100_000
    wide = _png(np.zeros((40, 4000), np.uint8))  # 100:1
    small = _png(np.zeros((64, 64), np.uint8))
    counting = _CountingClassifier(tiny_classifier)
    settings = ServeSettings(max_request_pixels=64 * 64 * 2)
    with LiveServer(create_app(counting, settings), settings) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        counting.decoded = 0  # the warm-up's blank images
        for data, status, words in ((square, 413, "image too large"), (strip, 413, "image too large"),
                                    (wide, 422, "aspect ratio")):
            for multipart in (True, False):
                r = (c.post("/v1/predict", files={"files": ("x.png", data, "image/png")}) if multipart else
                     c.post("/v1/predict", content=data, headers={"content-type": "image/png"}))
                assert r.status_code == status, r.text
                assert r.headers["content-type"].startswith("application/json") and words in r.json()["detail"]
        assert counting.decoded == 0  # refused from the headers alone
        # the request's pixels together: two 64×64 fit, three do not (and none of the three is decoded)
        r = c.post("/v1/predict", files=[("files", (f"{i}.png", small, "image/png")) for i in range(3)])
        assert r.status_code == 413 and "together" in r.json()["detail"] and counting.decoded == 0
        r = c.post("/v1/predict", files=[("files", (f"{i}.png", small, "image/png")) for i in range(2)])
        assert r.status_code == 200, r.text
        assert len(r.json()["predictions"]) == 2 and counting.decoded == 2


def test_decoding_counts_against_the_request_deadline(tiny_classifier):
    """Decoding is part of the request's time: past its deadline no further upload is decoded and the request
    gets a 504 (a deadline already in the past here, so no clock is guessed)."""
    from starlette.exceptions import HTTPException

    from imgrec.serve.app import _decode_all
    small = _png(np.zeros((64, 64), np.uint8))
    counting = _CountingClassifier(tiny_classifier)
    with pytest.raises(HTTPException) as e:
        _decode_all(counting, [(f"{i}.png", bytearray(small)) for i in range(3)], True, deadline=0.0, timeout_s=10)
    assert e.value.status_code == 504 and "within 10 s" in str(e.value.detail) and counting.decoded == 0
    images, notes = _decode_all(counting, [("a.png", bytearray(small))], True, deadline=None)
    assert len(images) == 1 and counting.decoded == 1

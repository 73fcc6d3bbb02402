"""Pretrained ImageNet backbones: the short list imgrec knows, where their weights are, and how they get there.

Weights live where timm looks for them, the Hugging Face cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
``$XDG_CACHE_HOME/huggingface/hub``), laid out as huggingface_hub lays it out::

    models--timm--tf_efficientnet_lite0.in1k/
        blobs/<sha256>                                   the file, named by its content's SHA-256 (its LFS etag)
        snapshots/<commit>/model.safetensors -> ../../blobs/<sha256>
        refs/main                                        <commit>

so a user's existing cache, a mirror (``HF_ENDPOINT``) and the offline switch (``HF_HUB_OFFLINE``) work unchanged,
and ``timm.create_model(model, pretrained=True)`` finds what imgrec downloaded or added. torchvision's own downloads
of the same weights (resnet18, resnet50: ``$TORCH_HOME/hub/checkpoints/<name>-<sha256 prefix>.pth``) are found too:
checked against the hash prefix in their name, as torch hub checks them, and taken into the HF cache without network.

imgrec adds what huggingface_hub lacks. huggingface_hub checks a download's length, not its content:
:func:`verify_file` checks a blob against the SHA-256 its name promises, and the safetensors header against the
architecture's keys and shapes (header only: no tensor is read). :func:`add_weights` takes a local file into the
cache (an air-gapped machine); :func:`list_weights` says what is on this machine.

Licences: :attr:`Backbone.licence` is the SPDX name of the weights' licence (from timm's pretrained cfg). The
transfer recipe writes it into ``model.json``, so it travels with every model trained from those weights.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from imgrec.errors import ConfigError, ModelFileError, first_line

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Backbone", "BACKBONES", "backbone", "hub_cache", "cached_weights",
           "available_backbones", "fetch_weights", "verify_file", "add_weights", "list_weights", "DEFAULT_ENDPOINT"]

DEFAULT_ENDPOINT = "https://huggingface.co"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_TF_MEAN = _TF_STD = (0.5, 0.5, 0.5)  # TensorFlow's EfficientNet-Lite ports take inputs in [-1, 1]


@dataclass(frozen=True)
class Backbone:
    """One pretrained ImageNet backbone: where its weights are published and what they need."""

    name: str                          # imgrec's short name, e.g. "efficientnet_lite0"
    model: str                         # the imgrec model name, e.g. "timm:tf_efficientnet_lite0"
    hf_repo: str                       # Hugging Face repository of the weights, e.g. "timm/tf_efficientnet_lite0.in1k"
    filename: str                      # the weights file in that repository
    licence: str                       # SPDX name of the weights' licence: written into model.json
    size_mb: float                     # download size, MB (10^6 bytes): the float32 state dict
    params_m: float                    # parameters, millions (with the 1000-class ImageNet head)
    imagenet_top1: float               # ImageNet-1k top-1 %, timm's results-imagenet.csv (at its test size)
    image_size: int                    # the input size of timm's pretrained cfg
    mean: tuple[float, float, float]   # input normalisation the weights were trained with
    std: tuple[float, float, float]
    torch_file: str = ""               # torchvision's file of the same weights in torch hub's cache, if any


# Ordered by preference on 2 CPU cores: small and fast first. Ids, licences, sizes and resolutions from timm's
# pretrained cfgs (tests/test_weights.py checks every row against timm); resnet18/50 are torchvision's weights
# (tv/tv2 tags), the same tensors as torchvision's own downloads.
BACKBONES: dict[str, Backbone] = {b.name: b for b in (
    Backbone("efficientnet_lite0", "timm:tf_efficientnet_lite0", "timm/tf_efficientnet_lite0.in1k",
             "model.safetensors", "Apache-2.0", 18.8, 4.65, 74.83, 224, _TF_MEAN, _TF_STD),
    Backbone("mobilenetv3_large_100", "timm:mobilenetv3_large_100", "timm/mobilenetv3_large_100.ra_in1k",
             "model.safetensors", "Apache-2.0", 22.0, 5.48, 75.77, 224, IMAGENET_MEAN, IMAGENET_STD),
    Backbone("efficientnet_b0", "timm:efficientnet_b0", "timm/efficientnet_b0.ra_in1k",
             "model.safetensors", "Apache-2.0", 21.3, 5.29, 77.69, 224, IMAGENET_MEAN, IMAGENET_STD),
    Backbone("resnet18", "timm:resnet18.tv_in1k", "timm/resnet18.tv_in1k",
             "model.safetensors", "BSD-3-Clause", 46.8, 11.69, 69.76, 224, IMAGENET_MEAN, IMAGENET_STD,
             "resnet18-f37072fd.pth"),
    Backbone("convnext_atto", "timm:convnext_atto", "timm/convnext_atto.d2_in1k",
             "model.safetensors", "Apache-2.0", 14.8, 3.70, 77.01, 224, IMAGENET_MEAN, IMAGENET_STD),
    Backbone("efficientnet_lite1", "timm:tf_efficientnet_lite1", "timm/tf_efficientnet_lite1.in1k",
             "model.safetensors", "Apache-2.0", 21.9, 5.42, 76.64, 240, _TF_MEAN, _TF_STD),
    Backbone("resnet50", "timm:resnet50.tv2_in1k", "timm/resnet50.tv2_in1k",
             "model.safetensors", "BSD-3-Clause", 102.4, 25.56, 80.85, 176, IMAGENET_MEAN, IMAGENET_STD,
             "resnet50-11ad3fa6.pth"),
)}


def backbone(name: str) -> Backbone:
    """The backbone called ``name``: imgrec's short name, its model name (with or without ``timm:``), its
    Hugging Face repository, or the timm architecture without a tag. ConfigError listing the choices."""
    key = name.strip().removeprefix("timm:")
    if key in BACKBONES:
        return BACKBONES[key]
    for b in BACKBONES.values():
        timm_name = b.model.removeprefix("timm:")
        if key in (timm_name, timm_name.split(".")[0], b.hf_repo, b.hf_repo.removeprefix("timm/")):
            return b
    raise ConfigError(f"unknown pretrained backbone {name!r}; choose one of: {', '.join(BACKBONES)}")


# -- where the cache is ------------------------------------------------------------------------------------
def hub_cache() -> Path:
    """The Hugging Face hub cache folder, from the environment as huggingface_hub reads it (read at each call:
    huggingface_hub reads it once, at import)."""
    env = os.environ
    folder = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not folder:
        home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"),
                                                  "huggingface")
        folder = os.path.join(home, "hub")
    return Path(os.path.expandvars(os.path.expanduser(folder)))


def _repo_dir(b: Backbone) -> Path:
    return hub_cache() / ("models--" + b.hf_repo.replace("/", "--"))


def _snapshot_file(b: Backbone) -> Path | None:
    """The file huggingface_hub would return offline for revision main: refs/main -> snapshots/<commit>/file."""
    repo = _repo_dir(b)
    try:
        commit = (repo / "refs" / "main").read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not commit or "/" in commit or commit.startswith("."):
        return None
    path = repo / "snapshots" / commit / b.filename
    return path if path.is_file() else None


def cached_weights(name: str) -> Path | None:
    """The verified weights file of backbone ``name`` in the HF cache, or None when it is absent or not whole.
    Never touches the network."""
    b = backbone(name)
    path = _snapshot_file(b)
    if path is None:
        return None
    try:
        verify_file(path, name=b.name)
    except ModelFileError:
        return None
    return path


def available_backbones() -> list[tuple[Backbone, Path]]:
    """The backbones whose weights are on this machine, in preference order, with their files in the HF cache
    (a torchvision download found in torch hub's cache is taken into it first: once, no network)."""
    found = []
    for b in BACKBONES.values():
        path = cached_weights(b.name)
        if path is None and _torch_cached(b) is not None:
            path = _from_torch_cache(b)
        if path is not None:
            found.append((b, path))
    return found


def _torch_cached(b: Backbone) -> Path | None:
    """torchvision's download of the backbone's weights in torch hub's cache, when whole: its SHA-256 starts with
    the prefix in its name (torch hub's check_hash)."""
    if not b.torch_file:
        return None
    import torch.hub
    path = Path(torch.hub.get_dir()) / "checkpoints" / b.torch_file
    if not path.is_file():
        return None
    prefix = b.torch_file.rsplit("-", 1)[-1].split(".")[0]
    key = (str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns, "torch")
    if not _verified.get(key):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        if not h.hexdigest().startswith(prefix):
            return None
        _verified[key] = True
    return path


def _from_torch_cache(b: Backbone) -> Path | None:
    """The torch hub file taken into the HF cache (same key names in timm), or None when it does not fit."""
    try:
        return add_weights(_torch_cached(b), b.name)
    except (ModelFileError, OSError):
        return None


def list_weights() -> list[dict]:
    """Every backbone, for ``imgrec weights``: name, model, source ("hf-cache", "torch-cache": torchvision's
    download, or "absent"), size_mb, licence, path (None when absent), image_size, imagenet_top1."""
    rows = []
    for b in BACKBONES.values():
        path = cached_weights(b.name)
        source = "hf-cache" if path else "absent"
        if path is None and _torch_cached(b) is not None:
            path, source = _torch_cached(b), "torch-cache"
        size = round(path.stat().st_size / 1e6, 1) if path is not None else b.size_mb
        rows.append({"name": b.name, "model": b.model, "source": source,
                     "size_mb": size, "licence": b.licence, "path": str(path) if path else None,
                     "image_size": b.image_size, "imagenet_top1": b.imagenet_top1})
    return rows


# -- verification --------------------------------------------------------------------------------------------
_SAFETENSORS_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                       "BOOL": 1}
_MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
_verified: dict[tuple, bool] = {}  # (real path, size, mtime) -> checked: hashing 100 MB on every call is wasteful


def verify_file(path: str | Path, *, name: str | None = None) -> None:
    """Check a weights file: a blob named by a 64-hex SHA-256 (or a 40-hex git SHA-1) must hash to its name; it
    must be a whole safetensors file whose keys and shapes fit the backbone's architecture (``name``, else the
    backbone whose cache folder holds it). Reads the header only, besides the hash. ModelFileError in one line."""
    path = Path(path)
    try:
        real = path.resolve(strict=True)
        st = real.stat()
    except OSError as e:
        raise ModelFileError(f"{path}: weights file not found ({e.strerror or e})") from None
    b = backbone(name) if name else _backbone_of(real)
    key = (str(real), st.st_size, st.st_mtime_ns, b.name if b else None)
    if _verified.get(key):
        return
    _check_hash(path, real)
    shapes = _read_header(path, real, st.st_size)
    if b is not None:
        _check_shapes(shapes, _expected_shapes(b.model), str(path), b.model)
    _verified[key] = True


def _backbone_of(real: Path) -> Backbone | None:
    """The backbone whose cache folder (models--timm--<repo>) holds this file, if any."""
    folders = {("models--" + b.hf_repo.replace("/", "--")): b for b in BACKBONES.values()}
    for part in real.parts:
        if part in folders:
            return folders[part]
    return None


def _check_hash(path: Path, real: Path) -> None:
    """A blob's name is its etag: the SHA-256 of its content (LFS files), or its git blob SHA-1 (small files)."""
    name = real.name.lower()
    if len(name) not in (40, 64) or any(c not in "0123456789abcdef" for c in name):
        return  # not content-addressed (a copy made where symlinks are not available): nothing to compare
    h = hashlib.sha256() if len(name) == 64 else hashlib.sha1(b"blob %d\0" % real.stat().st_size)
    with open(real, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    if h.hexdigest() != name:
        raise ModelFileError(f"{path}: content does not match its hash (a corrupt or tampered download; expected "
                             f"{name[:12]}…, got {h.hexdigest()[:12]}…)")


def _read_header(path: Path, real: Path, size: int) -> dict[str, tuple[int, ...]]:
    """The {key: shape} of a safetensors file, from its header; the header's offsets must cover the file exactly,
    so a truncated or padded file is refused without reading its tensors."""
    with open(real, "rb") as f:
        n = int.from_bytes(f.read(8).ljust(8, b"\0"), "little")
        if size < 10 or not 2 <= n <= min(_MAX_HEADER, size - 8):
            raise ModelFileError(f"{path}: not a safetensors file, or truncated ({size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw)
        entries = {k: v for k, v in header.items() if k != "__metadata__"}
        shapes, end = {}, 0
        for k, v in entries.items():
            shape, (a, z) = tuple(int(d) for d in v["shape"]), v["data_offsets"]
            count = 1
            for d in shape:
                count *= d
            if z - a != count * _SAFETENSORS_DTYPES[v["dtype"]] or a < 0:
                raise ValueError(f"tensor {k!r}: its offsets do not fit its shape")
            shapes[k], end = shape, max(end, int(z))
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ModelFileError(f"{path}: not a valid safetensors header ({first_line(e)})") from None
    if 8 + n + end != size:
        raise ModelFileError(f"{path}: truncated or corrupt: the header describes {8 + n + end} bytes, the file "
                             f"has {size}")
    return shapes


@functools.lru_cache(maxsize=16)
def _expected_shapes(model: str) -> dict[str, tuple[int, ...]]:
    """{key: shape} of the architecture's state dict with its ImageNet head, from a meta-device build (nothing
    allocated or initialised). In state-dict order: the order a foreign layout is zipped onto."""
    import torch

    from imgrec.models.timm_models import _timm
    arch = model.removeprefix("timm:")
    timm = _timm(arch)
    with torch.device("meta"):
        net = timm.create_model(arch, pretrained=False)
    return {k: tuple(v.shape) for k, v in net.state_dict().items()}


def _check_shapes(got: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], source: str,
                  model: str) -> None:
    """ModelFileError naming the first key that is not in ``model``, has another shape, or is missing
    (BatchNorm's num_batches_tracked may be missing: torch fills it in)."""
    unknown = [k for k in got if k not in expected]
    if unknown:
        raise ModelFileError(f"{source}: {len(unknown)} of its {len(got)} tensors are not part of {model}, the "
                             f"first {unknown[0]!r} (weights of another architecture or layout?)")
    for k, shape in got.items():
        if tuple(shape) != expected[k]:
            raise ModelFileError(f"{source}: {k} has shape {list(shape)}, {model} needs {list(expected[k])}")
    missing = [k for k in expected if k not in got and not k.endswith("num_batches_tracked")]
    if missing:
        raise ModelFileError(f"{source}: {len(missing)} tensor(s) of {model} missing, the first {missing[0]!r}")


# -- download ------------------------------------------------------------------------------------------------
def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}  # huggingface_hub's reading


def _offline_reason() -> str | None:
    """The environment variable that forbids downloads, if one is set."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if _truthy(os.environ.get(var)):
            return var
    if os.environ.get("IMGREC_OFFLINE"):  # any value, as timm_models reads it
        return "IMGREC_OFFLINE"
    return None


def _endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def fetch_weights(name: str, *, progress: bool = True) -> Path:
    """The verified weights of backbone ``name``: from the HF cache (or torch hub's, taken into it), else
    downloaded now through huggingface_hub
    (from ``$HF_ENDPOINT``, into the HF cache) after one line on stderr naming the size, licence and source;
    ``progress`` shows huggingface_hub's progress bar. Never downloads when ``HF_HUB_OFFLINE`` or
    ``IMGREC_OFFLINE`` is set. ModelFileError in one line on any failure; a file that fails
    :func:`verify_file` is removed from the cache, never left where :func:`cached_weights` would find it."""
    b = backbone(name)
    path = cached_weights(b.name) or (_from_torch_cache(b) if _torch_cached(b) else None)
    if path is not None:
        return path
    hint = f"on an air-gapped machine: imgrec weights add FILE --as {b.name}"
    reason = _offline_reason()
    if reason:
        raise ModelFileError(f"{b.name}: no weights on this machine and {reason} is set, so nothing is downloaded; "
                             f"{hint}")
    _discard(_snapshot_file(b))  # a broken file there: huggingface_hub would hand it back instead of downloading
    endpoint = _endpoint()
    url = f"{endpoint}/{b.hf_repo}/resolve/main/{b.filename}"
    size = _remote_size(url, endpoint, b, hint)
    print(f"downloading {b.name} weights ({(size or b.size_mb * 1e6) / 1e6:.1f} MB, {b.licence}) from "
          f"{endpoint}/{b.hf_repo}", file=sys.stderr, flush=True)
    path = _download(b, endpoint, url, progress, hint)
    try:
        verify_file(path, name=b.name)
    except ModelFileError as e:
        _discard(path)
        raise ModelFileError(f"{b.name}: the download from {url} was refused and removed: {e}") from None
    return path


def _remote_size(url: str, endpoint: str, b: Backbone, hint: str) -> int | None:
    """The file's size from one HEAD request, with no retries: without a network huggingface_hub would retry
    for most of a minute before failing."""
    from huggingface_hub import get_hf_file_metadata

    try:
        return get_hf_file_metadata(url, timeout=10, endpoint=endpoint).size
    except Exception as e:  # noqa: BLE001 - connection, HTTP and offline errors, in the library's words
        raise ModelFileError(f"{b.name}: cannot reach {url} ({first_line(e)}); offline, set HF_HUB_OFFLINE=1, "
                             f"or {hint}") from None


def _download(b: Backbone, endpoint: str, url: str, progress: bool, hint: str) -> Path:
    """hf_hub_download into the cache imgrec reads (huggingface_hub resolves its own at import)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils.tqdm import silent_tqdm

    try:
        return Path(hf_hub_download(b.hf_repo, b.filename, cache_dir=hub_cache(), endpoint=endpoint,
                                    etag_timeout=10, tqdm_class=None if progress else silent_tqdm))
    except Exception as e:  # noqa: BLE001 - truncated bodies (OSError), HTTP, connection and disk errors
        # huggingface_hub downloads into a temporary file and removes it on failure: nothing is left under a
        # final name. What it did rename into place is checked by verify_file in fetch_weights.
        raise ModelFileError(f"{b.name}: download from {url} failed ({first_line(e)}); {hint}") from None


def _discard(path: Path | None) -> None:
    """Remove a cached file: its snapshot entry and, when it lives in the cache's blobs folder, its blob."""
    if path is None:
        return
    blob = Path(os.path.realpath(path))
    repo = Path(os.path.realpath(path.parent.parent.parent))
    doomed = [path] + ([blob] if blob.parent == repo / "blobs" else [])  # never a file outside the cache
    for p in doomed:
        p.unlink(missing_ok=True)
    for key in [k for k in _verified if k[0] == str(blob)]:
        del _verified[key]


# -- adding a local file ---------------------------------------------------------------------------------------
def add_weights(file: str | Path, as_name: str) -> Path:
    """Take a local weights file (safetensors, or a weights-only .pt/.pth) into the HF cache as the weights of
    backbone ``as_name``, where :func:`cached_weights` and ``timm.create_model(model, pretrained=True)`` (also
    offline) find them. Keys in timm's names are taken as they are; a known foreign layout (lukemelas'
    EfficientNet-PyTorch) is mapped; every shape is checked. Returns the cached file."""
    from imgrec.safeio import load_weights

    b = backbone(as_name)
    path = Path(file)
    state = {k.removeprefix("module."): v for k, v in load_weights(path).items()}  # no pickle code runs
    expected = _expected_shapes(b.model)
    if not set(state) <= set(expected) and _is_lukemelas(state):
        if not b.model.startswith("timm:tf_"):
            # lukemelas' weights are TensorFlow ports, trained with TF's asymmetric "same" padding: on timm's
            # PyTorch-padded EfficientNets every shape fits and the features come out subtly wrong
            tf = ", ".join(n for n, x in BACKBONES.items() if x.model.startswith("timm:tf_"))
            raise ModelFileError(f"{path}: EfficientNet-PyTorch weights (TensorFlow ports) fit timm's tf_ "
                                 f"architectures only ({tf}), not {b.model}")
        state = _zip_lukemelas(state, expected, str(path), b.model)
    _check_shapes({k: tuple(v.shape) for k, v in state.items()}, expected, str(path), b.model)
    return _write_to_cache(state, b)


# lukemelas' EfficientNet-PyTorch: module order, which its .pth keeps and a safetensors file (sorted keys) loses
_LM_TOP = {"_conv_stem": 0, "_bn0": 1, "_blocks": 2, "_conv_head": 3, "_bn1": 4, "_fc": 5}
_LM_BLOCK = {"_expand_conv": 0, "_bn0": 1, "_depthwise_conv": 2, "_bn1": 3, "_se_reduce": 4, "_se_expand": 5,
             "_project_conv": 6, "_bn2": 7}
_PARAM = {"weight": 0, "bias": 1, "running_mean": 2, "running_var": 3, "num_batches_tracked": 4}


def _is_lukemelas(state) -> bool:
    return "_conv_stem.weight" in state and all(k.split(".")[0] in _LM_TOP for k in state)


def _lukemelas_rank(key: str) -> tuple[int, int, int, int]:
    parts = key.split(".")
    if parts[0] == "_blocks":
        return 2, int(parts[1]), _LM_BLOCK[parts[2]], _PARAM[parts[-1]]
    return _LM_TOP[parts[0]], 0, 0, _PARAM[parts[-1]]


def _zip_lukemelas(state, expected: dict[str, tuple[int, ...]], source: str, model: str) -> dict:
    """lukemelas' keys in module order zipped onto timm's (the same modules in the same order, other names),
    with the count and every shape checked: a pair that does not fit is refused, never loaded."""
    try:
        keys = sorted(state, key=_lukemelas_rank)
    except (KeyError, ValueError, IndexError):
        bad = next(k for k in state if not _ranks(k))
        raise ModelFileError(f"{source}: EfficientNet-PyTorch layout with an unknown tensor {bad!r}") from None
    has_counter = any(k.endswith("num_batches_tracked") for k in keys)
    targets = [k for k in expected if has_counter or not k.endswith("num_batches_tracked")]
    if len(keys) != len(targets):
        raise ModelFileError(f"{source}: EfficientNet-PyTorch layout with {len(keys)} tensors, {model} has "
                             f"{len(targets)} (another EfficientNet variant?)")
    out = {}
    for k, t in zip(keys, targets):
        if tuple(state[k].shape) != expected[t]:
            raise ModelFileError(f"{source}: {k} {list(state[k].shape)} does not fit {model}'s {t} "
                                 f"{list(expected[t])} (another EfficientNet variant?)")
        out[t] = state[k]
    return out


def _ranks(key: str) -> bool:
    try:
        _lukemelas_rank(key)
    except (KeyError, ValueError, IndexError):
        return False
    return True


def _write_to_cache(state, b: Backbone) -> Path:
    """Write ``state`` as the backbone's file in the HF cache layout: the blob (named by its SHA-256, written
    atomically), then the snapshot link, then refs/main, so that no step leaves a reference to a missing or
    half-written file."""
    from safetensors.torch import save

    from imgrec.safeio import atomic_write_bytes, atomic_write_text
    data = save({k: v.detach().cpu().contiguous() for k, v in state.items()}, metadata={"format": "pt"})
    digest = hashlib.sha256(data).hexdigest()
    repo = _repo_dir(b)
    blob = repo / "blobs" / digest
    if not blob.is_file() or blob.stat().st_size != len(data):
        atomic_write_bytes(blob, data)
    # A commit id of imgrec's own, derived from the content: the real Hub commit is unknown offline. Online,
    # huggingface_hub asks the Hub for main's commit and fetches its file beside this one.
    commit = hashlib.sha1(b"imgrec weights add " + digest.encode()).hexdigest()
    pointer = repo / "snapshots" / commit / b.filename
    _link(blob, pointer, data)
    atomic_write_text(repo / "refs" / "main", commit)
    verify_file(pointer, name=b.name)
    return pointer


def _link(blob: Path, pointer: Path, data: bytes) -> None:
    """pointer -> ../../blobs/<sha256>, a relative symlink as huggingface_hub makes, replaced atomically; a copy
    where the file system has no symlinks (huggingface_hub does the same)."""
    from imgrec.safeio import atomic_write_bytes
    pointer.parent.mkdir(parents=True, exist_ok=True)
    tmp = pointer.with_name(f".{pointer.name}.{os.getpid()}.link")
    try:
        tmp.unlink(missing_ok=True)
        os.symlink(os.path.relpath(blob, pointer.parent), tmp)
        os.replace(tmp, pointer)
    except OSError:
        tmp.unlink(missing_ok=True)
        atomic_write_bytes(pointer, data)

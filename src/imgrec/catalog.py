"""The model catalogue behind ``imgrec models``: every registered architecture with its parameter count.

Listing the registry needs the model modules, which need torch (over a second to import on a 2-core CPU),
and counting parameters needs the networks. So the catalogue is built once — each network on PyTorch's
``meta`` device, which allocates no memory and runs no initialisation — and cached as JSON under the user's
cache folder. The cache key covers imgrec's version, the model modules' sizes and modification times and the
torch/torchvision versions, so a changed or added model, or a new torch, rebuilds it. A cache hit imports
neither torch nor the model modules.

``timm_catalog`` does the same for ``imgrec models --timm PATTERN``: timm's architecture names, default input
sizes and pretrained tags, cached per timm version (importing timm costs seconds; matching a pattern in the
cache costs milliseconds and imports neither torch nor timm).
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
from importlib import metadata
from pathlib import Path

__all__ = ["model_catalog", "timm_catalog"]

CATALOG_VERSION = "1"
COUNT_AS = {"num_classes": 10, "in_chans": 3}  # parameters are counted for a 10-class RGB head


def _key() -> str:
    import imgrec
    h = hashlib.sha256(f"v{CATALOG_VERSION}|{imgrec.__version__}".encode())
    for dist in ("torch", "torchvision"):
        try:
            h.update(f"|{dist}={metadata.version(dist)}".encode())
        except metadata.PackageNotFoundError:
            h.update(f"|{dist}=none".encode())
    models_dir = Path(__file__).parent / "models"
    for p in sorted(models_dir.glob("*.py")):
        st = p.stat()
        h.update(f"|{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def _cache_path() -> Path:
    from imgrec.data.named import user_cache_dir
    return user_cache_dir() / f"models-{_key()}.json"


def _build() -> list[dict]:
    import torch

    from imgrec.models import create_model, list_models, model_info
    from imgrec.models.base import count_params

    rows = []
    for name in list_models():
        info = model_info(name)
        with torch.device("meta"):  # shapes only: no memory, no weight initialisation
            m = create_model(name, image_size=info.default_image_size, **COUNT_AS)
        rows.append({"name": name, "params": count_params(m), "default_image_size": info.default_image_size,
                     "family": info.family, "pretrained": info.pretrained, "description": info.description})
    return rows


def model_catalog(use_cache: bool = True) -> list[dict]:
    """``[{"name", "params", "default_image_size", "family", "pretrained", "description"}]`` sorted by name;
    ``params`` for a 10-class RGB model."""
    path = _cache_path() if use_cache else None
    rows = _read_cache(path) if path is not None else None
    if rows is None:
        rows = _build()
        if path is not None:
            _write_cache(path, rows, indent=1)
    return rows


def _read_cache(path: Path) -> list[dict] | None:
    """The rows cached in ``path``, or None when there are none (a damaged cache is a miss)."""
    if not path.is_file():
        return None
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return rows if isinstance(rows, list) and all(isinstance(r, dict) and "name" in r for r in rows) else None


def _write_cache(path: Path, rows: list[dict], indent: int) -> None:
    from imgrec.safeio import atomic_write_text
    try:
        atomic_write_text(path, json.dumps(rows, indent=indent))
    except OSError:  # a read-only home must not stop the listing
        pass


def _timm_cache_path() -> Path:
    from imgrec.data.named import user_cache_dir
    from imgrec.errors import ConfigError
    try:
        version = metadata.version("timm")
    except metadata.PackageNotFoundError:
        raise ConfigError("listing timm models needs timm, which imgrec installs: pip install timm") from None
    src = Path(__file__).parent / "models" / "timm_models.py"  # how rows are made (family, sizes)
    st = src.stat()
    h = hashlib.sha256(f"v{CATALOG_VERSION}|timm={version}|{st.st_size}:{st.st_mtime_ns}".encode())
    return user_cache_dir() / f"timm-models-{h.hexdigest()[:24]}.json"


def timm_catalog(pattern: str | None = None, use_cache: bool = True) -> list[dict]:
    """timm architectures matching ``pattern`` (``resnet1*``; without wildcards: names containing it):
    ``[{"name": "timm:<arch>", "default_image_size", "family", "pretrained": [tags]}]`` sorted by name.
    ``ConfigError`` when timm is not installed."""
    path = _timm_cache_path()
    rows = _read_cache(path) if use_cache else None
    if rows is None:
        from imgrec.models.timm_models import timm_catalog_rows
        rows = timm_catalog_rows()
        if use_cache:
            _write_cache(path, rows, indent=0)
    return _match_timm(rows, pattern)


def _match_timm(rows: list[dict], pattern: str | None) -> list[dict]:
    """Rows whose architecture matches ``pattern``: a shell pattern as timm's ``list_models`` takes
    (``resnet1*``), or, without wildcards, any name containing it; a ``timm:`` prefix is optional.
    Here, not in timm_models, so that a cache hit imports no torch."""
    if not pattern:
        return list(rows)
    pat = pattern.removeprefix("timm:").lower()
    if not any(c in pat for c in "*?["):
        pat = f"*{pat}*"
    return [r for r in rows if fnmatch.fnmatchcase(str(r["name"]).removeprefix("timm:").lower(), pat)]

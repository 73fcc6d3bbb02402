"""The model catalogue behind ``imgrec models``: every registered architecture with its parameter count.

Listing the registry needs the model modules, which need torch (over a second to import on a 2-core CPU),
and counting parameters needs the networks. So the catalogue is built once — each network on PyTorch's
``meta`` device, which allocates no memory and runs no initialisation — and cached as JSON under the user's
cache folder. The cache key covers imgrec's version, the model modules' sizes and modification times and the
torch/torchvision versions, so a changed or added model, or a new torch, rebuilds it. A cache hit imports
neither torch nor the model modules.
"""
from __future__ import annotations

import hashlib
import json
from importlib import metadata
from pathlib import Path

__all__ = ["model_catalog"]

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
    if path is not None and path.is_file():
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(rows, list) and all(isinstance(r, dict) and "name" in r for r in rows):
                return rows
        except (OSError, ValueError):
            pass  # a damaged cache is a miss
    rows = _build()
    if path is not None:
        try:
            from imgrec.safeio import atomic_write_text
            atomic_write_text(path, json.dumps(rows, indent=1))
        except OSError:  # a read-only home must not stop the listing
            pass
    return rows


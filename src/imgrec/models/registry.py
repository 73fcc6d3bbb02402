"""One registry, one factory (torchvision's ``register_model``/``get_model``; raises on duplicates).

This module imports no model module: ``imgrec/models/__init__.py`` imports them so their ``@register_model``
decorators run, and Python runs that package ``__init__`` before any of its submodules, so the registry is
full whenever it can be called. A new model: a function decorated with ``@register_model`` in a module
that ``imgrec/models/__init__.py`` imports.

Names with a prefix (``timm:resnet18``) belong to an outside model zoo: its module registers a resolver for the
prefix (``register_prefix``), which turns the rest of the name into a :class:`ModelInfo` on demand, so that the
thousand-odd timm architectures need not be listed (or timm imported) to build one of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn as nn

from imgrec.errors import ConfigError


@dataclass(frozen=True)
class ModelInfo:
    name: str
    fn: Callable[..., nn.Module]
    default_image_size: int          # pixels, square
    pretrained: str | None = None    # torchvision weights enum name usable with --pretrained, or None
    family: str = "cnn"              # "cnn" or "vit": tells explain which method fits
    description: str = ""
    cpu_bf16: bool = True            # bf16 autocast is faster than fp32 on bf16-capable CPUs (see benchmarks/throughput.py)


_REGISTRY: dict[str, ModelInfo] = {}
# prefix (before the colon) -> resolver(rest of the name) -> ModelInfo, or ConfigError for an unknown name
_PREFIXES: dict[str, Callable[[str], ModelInfo]] = {}


def register_model(name: str, *, default_image_size: int = 32, pretrained: str | None = None,
                   family: str = "cnn", description: str = "", cpu_bf16: bool = True):
    """Decorator: register ``fn(num_classes, in_chans, image_size, **kwargs) -> nn.Module`` under ``name``."""

    def wrap(fn):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        doc = (fn.__doc__ or "").strip()
        _REGISTRY[name] = ModelInfo(name, fn, default_image_size, pretrained, family,
                                    description or (doc.splitlines()[0] if doc else ""), cpu_bf16)
        return fn

    return wrap


def register_prefix(prefix: str, resolver: Callable[[str], ModelInfo]) -> None:
    """Resolve every name ``prefix:REST`` with ``resolver(REST)`` (an outside zoo such as timm)."""
    if prefix in _PREFIXES:
        raise ValueError(f"model prefix {prefix!r} is already registered")
    _PREFIXES[prefix] = resolver


def list_models() -> list[str]:
    """The registered names (prefixed names such as ``timm:...`` are resolved on demand, not listed)."""
    return sorted(_REGISTRY)


def model_info(name: str) -> ModelInfo:
    prefix, colon, rest = str(name).partition(":")
    if colon and prefix in _PREFIXES:
        return _PREFIXES[prefix](rest)
    if name not in _REGISTRY:
        zoos = "".join(f"; or {p}:NAME" for p in sorted(_PREFIXES))  # e.g. timm:NAME (imgrec models --timm)
        raise ConfigError(f"unknown model {name!r}; choose one of: {', '.join(sorted(_REGISTRY))}{zoos}")
    return _REGISTRY[name]


def create_model(name: str, num_classes: int = 10, in_chans: int = 3, image_size: int | None = None,
                 **kwargs) -> nn.Module:
    """Build a registered model for ``num_classes`` classes, ``in_chans`` (1 or 3) channels and square ``image_size``."""
    info = model_info(name)
    if in_chans not in (1, 3):
        raise ConfigError(f"in_chans must be 1 or 3, got {in_chans}")
    if num_classes < 1:
        raise ConfigError(f"num_classes must be at least 1, got {num_classes}")
    size = int(image_size or info.default_image_size)
    if not 16 <= size <= 512:
        raise ConfigError(f"image_size must be between 16 and 512, got {size}")
    return info.fn(num_classes=num_classes, in_chans=in_chans, image_size=size, **kwargs)

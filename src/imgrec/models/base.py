"""The head API every imgrec model shares, the same as timm's (``forward_features`` /
``forward_head`` / ``reset_classifier``), so that timm models plug in unchanged.

Every registered model provides:

- ``forward_features(x)``: the last spatial feature map, N x C x h x w, for CNNs (the layer
  Grad-CAM looks at), or the token sequence N x T x D for ViTs (class token first);
- ``forward_head(feats, pre_logits=False)``: logits, or the pooled N x ``num_features`` vector
  that enters the classifier when ``pre_logits`` is true;
- ``forward(x) == forward_head(forward_features(x))``;
- ``get_classifier()``: the final ``nn.Linear``; ``reset_classifier(num_classes)``: a new one;
- ``num_features``: the classifier's input width.

Softmax is never part of a model: ``CrossEntropyLoss`` applies log-softmax itself in training and
the predictor applies softmax to the logits, so models return raw logits.

:class:`ImageClassifier` implements the API once for every architecture built from parts
(``features -> pool -> neck -> dropout -> head``), so that fine-tuning, freezing, explaining and
loading weights never need a branch per model. Models that implement the API themselves (the
FastNets in ``fast.py``) work with the same callers.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

__all__ = ["ImageClassifier", "ClassTokenPool", "global_avg_pool", "flatten_pool",
           "he_init", "count_params", "first_conv_name", "classifier_name"]


class ImageClassifier(nn.Module):
    """``features -> pool -> neck -> dropout -> head``, with the shared head API.

    Args:
        features: images -> last feature map (N x C x h x w) or token sequence (N x T x D).
        pool: features -> flat N x F vector (global average pool, fixed-size pool + flatten,
            or the class token).
        num_features: width of the vector that enters ``head`` (after ``neck``).
        num_classes: classifier outputs.
        neck: layers between pooling and the classifier, e.g. the fully connected hidden layers of
            LeNet, AlexNet and VGG; ``None`` for none.
        drop_rate: dropout probability right before the classifier.
        zero_head: start the classifier at zero (the ViT convention: the untrained model predicts
            uniformly) instead of ``nn.Linear``'s default initialisation.
        source_prefixes: ``((torchvision_prefix, own_prefix), ...)``: how the keys of the
            torchvision model this one was built from map onto our keys (first match wins; keys
            that match no prefix are unchanged). Used by ``pretrained.load_pretrained``.
        adapted_parts: ``{own_key_prefix: reason}``: parts whose shape (or presence) depends on
            the image size or channels (small-image stems, ViT patch embeddings, the large MLP
            classifiers that exist only for big images). When a weights file does not fit them
            they are skipped and reported instead of failing the load.
    """

    def __init__(self, features: nn.Module, pool: nn.Module, num_features: int, num_classes: int,
                 *, neck: nn.Module | None = None, drop_rate: float = 0.0, zero_head: bool = False,
                 source_prefixes: Iterable[tuple[str, str]] = (),
                 adapted_parts: dict[str, str] | None = None):
        super().__init__()
        # Registration order matters: the head is registered last, so it is the last nn.Linear in
        # ``self.modules()``, and ``first_conv_name`` finds the stem first.
        self.features = features
        self.pool = pool
        self.neck = neck if neck is not None else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.num_features = int(num_features)
        self.zero_head = zero_head
        self.head: nn.Linear
        self.reset_classifier(num_classes)
        # Plain attributes, not state: they describe how this architecture relates to torchvision's.
        self.source_prefixes: tuple[tuple[str, str], ...] = tuple(source_prefixes)
        self.adapted_parts: dict[str, str] = dict(adapted_parts or {})

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, feats: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.neck(self.pool(feats)))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Linear:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier by a fresh one with ``num_classes`` outputs (for fine-tuning)."""
        if num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {num_classes}")
        # Build it on the device/dtype of the current head so a model already moved keeps working.
        old = getattr(self, "head", None)
        factory = {"device": old.weight.device, "dtype": old.weight.dtype} if isinstance(old, nn.Linear) else {}
        self.head = nn.Linear(self.num_features, num_classes, **factory)
        if self.zero_head:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        self.num_classes = int(num_classes)


class ClassTokenPool(nn.Module):
    """ViT pooling: the class token (first token) of an N x T x D sequence."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 0]


def global_avg_pool() -> nn.Module:
    """N x C x h x w -> N x C (works for any h, w)."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))


def flatten_pool(size: int) -> nn.Module:
    """N x C x h x w -> N x (C*size*size): adaptive average pool to ``size`` x ``size``, then flatten.

    This is what lets the classic flatten-into-fully-connected nets (LeNet, AlexNet, VGG) take any
    input size: the first fully connected layer always sees the same number of inputs.
    """
    return nn.Sequential(nn.AdaptiveAvgPool2d(size), nn.Flatten(1))


def he_init(module: nn.Module) -> nn.Module:
    """He (Kaiming) normal initialisation, fan-out, as torchvision initialises ResNet/VGG/EfficientNet
    convolutions; BatchNorm to identity. Used for the layers we build in place of torchvision's."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return module


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared tensors counted once); ``trainable_only`` counts requires_grad ones."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def first_conv_name(model: nn.Module) -> str | None:
    """Qualified name of the first ``nn.Conv2d`` (the stem that sees the input channels), or None."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return name
    return None


def classifier_name(model: nn.Module) -> str:
    """Qualified name of ``model.get_classifier()`` (``"head"`` for ImageClassifier, ``"fc"`` for FastNet)."""
    head = model.get_classifier()
    for name, m in model.named_modules():
        if m is head:
            return name
    raise ValueError(f"{type(model).__name__}.get_classifier() is not a submodule of the model")


"""torchvision architectures adapted to any image size (16-512 px) and 1 or 3 input channels.

The layers are torchvision's own (``torchvision.models.resnet18()`` ...), rearranged into
:class:`~imgrec.models.base.ImageClassifier` (features -> pool -> neck -> head) so that every model
has the same head API and torchvision's ImageNet weights map onto ours key by key
(``source_prefixes``; see ``pretrained.py``).

Small images are not upscaled to 224 px. Instead, below ``SMALL_IMAGE_SIZE`` the layers that
shrink the image 4x or more right at the input are replaced, as CIFAR versions of these networks
do, so a 28-32 px image still ends in a 2-4 px feature map instead of vanishing:

- ResNet: the 7x7 stride-2 conv + 3x3 max-pool stem becomes one 3x3 stride-1 conv (kuangliu's
  pytorch-cifar and the ResNet paper's own CIFAR nets): 32 px -> 4 x 4 final map (8x instead of 32x).
- AlexNet: the 11x11 stride-4 conv becomes a 3x3 stride-1 conv; the three 3x3/2 max-pools stay
  (28 px -> 2 x 2); the 9216-4096-4096 MLP, meant for a 6 x 6 map, becomes global average pooling
  and one linear layer.
- VGG: the trailing 2x2 max-pools are dropped until the final map is at least 4 x 4 (28 px keeps 2
  pools, 32 px 3, 64 px 4, 128+ px all 5) - no weights change, so ImageNet weights still load; below
  ``SMALL_IMAGE_SIZE`` the 25088-4096-4096 MLP becomes global average pooling + one linear layer (the
  usual CIFAR VGG head; the MLP alone would be 120 M parameters looking at a blown-up 1-4 px map).
- EfficientNet-B0: the stem conv and the first stride-2 block get stride 1 (8x instead of 32x, the
  same 4 x 4 map at 32 px as ResNet). Only strides change, so every ImageNet weight still fits.
- ViT: the patch size is computed from the image size (``vit_patch_size``) so the patch grid stays
  7-14 wide; the position embeddings are sized for that grid (interpolated when loading weights).

``adapted_parts`` on each model names the weights these adaptations make size-dependent; a weights
file that does not fit them has them skipped and reported rather than failing.
"""
from __future__ import annotations

import functools
import math
from collections import OrderedDict
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from imgrec.models.base import ClassTokenPool, ImageClassifier, flatten_pool, global_avg_pool, he_init
from imgrec.models.registry import register_model

__all__ = ["SMALL_IMAGE_SIZE", "ViTFeatures", "vit_patch_size", "vgg_pool_count", "alexnet", "vgg11", "vgg16",
           "resnet18", "resnet34", "resnet50", "efficientnet_b0", "vit_tiny", "vit_b_16"]

# Below this size the aggressive ImageNet stems are replaced by small-image ones (see module doc).
# 96 px: with torchvision's 32x reduction a 96 px image already ends in a 3 x 3 map; anything
# smaller ends in 1-2 px (or fails, for AlexNet and VGG).
SMALL_IMAGE_SIZE = 96


def _tv_models():
    """``torchvision.models``, imported when one of these architectures is built: importing torchvision
    costs seconds (measured 1.4 s beyond torch's own import on a 2-core CPU), which the models that do
    not need it (fastnet, the small CNNs), ``imgrec models`` and ``imgrec predict`` should not pay."""
    import torchvision.models
    return torchvision.models


def _is_small(image_size: int) -> bool:
    return image_size < SMALL_IMAGE_SIZE


def _new_conv(old: nn.Conv2d, in_chans: int, *, kernel_size: int | None = None, stride: int | None = None,
              padding: int | None = None) -> nn.Conv2d:
    """A freshly initialised conv like ``old`` with another input width and optionally another geometry."""
    conv = nn.Conv2d(in_chans, old.out_channels,
                     kernel_size=kernel_size if kernel_size is not None else old.kernel_size,
                     stride=stride if stride is not None else old.stride,
                     padding=padding if padding is not None else old.padding,
                     bias=old.bias is not None)
    return he_init(conv)


# ----------------------------------------------------------------------------------------------
# ResNet
def _resnet(tv_builder: Callable[..., nn.Module], num_classes: int, in_chans: int,
            image_size: int, drop_rate: float) -> ImageClassifier:
    tv = tv_builder()  # random init; ImageNet weights are loaded later by pretrained.py if asked
    if _is_small(image_size):
        tv.conv1 = _new_conv(tv.conv1, in_chans, kernel_size=3, stride=1, padding=1)
        tv.maxpool = nn.Identity()
    elif in_chans != 3:
        tv.conv1 = _new_conv(tv.conv1, in_chans)
    features = nn.Sequential(OrderedDict(
        conv1=tv.conv1, bn1=tv.bn1, relu=tv.relu, maxpool=tv.maxpool,
        layer1=tv.layer1, layer2=tv.layer2, layer3=tv.layer3, layer4=tv.layer4))
    return ImageClassifier(
        features, global_avg_pool(), tv.fc.in_features, num_classes, drop_rate=drop_rate,
        source_prefixes=(("fc.", "head."), ("", "features.")),
        adapted_parts={"features.conv1.": f"stem: 3x3 stride-1 conv below {SMALL_IMAGE_SIZE} px, "
                                          f"torchvision's 7x7 stride-2 conv from {SMALL_IMAGE_SIZE} px"})


def _register_variant(name: str, weights: str, description: str,
                      build_with: Callable[[int, int, int, float], nn.Module]) -> Callable[..., nn.Module]:
    """Register (and return) the builder ``name`` of one of a family's sizes (the ResNets, the VGGs): 224 px by
    default, torchvision's ImageNet ``weights``, built by ``build_with(num_classes, in_chans, image_size,
    drop_rate)``."""
    def build(num_classes: int = 10, in_chans: int = 3, image_size: int = 224, drop_rate: float = 0.0):
        return build_with(num_classes, in_chans, image_size, drop_rate)
    build.__name__ = build.__qualname__ = name
    return register_model(name, default_image_size=224, pretrained=weights, description=description)(build)


def _tv_resnet(name: str, num_classes: int, in_chans: int, image_size: int, drop_rate: float) -> ImageClassifier:
    return _resnet(getattr(_tv_models(), name), num_classes, in_chans, image_size, drop_rate)


_RESNET_STEM = "3x3 stride-1 stem below 96 px"
resnet18 = _register_variant("resnet18", "ResNet18_Weights.IMAGENET1K_V1", f"ResNet-18 (torchvision); {_RESNET_STEM}",
                             functools.partial(_tv_resnet, "resnet18"))
resnet34 = _register_variant("resnet34", "ResNet34_Weights.IMAGENET1K_V1", f"ResNet-34 (torchvision); {_RESNET_STEM}",
                             functools.partial(_tv_resnet, "resnet34"))
# IMAGENET1K_V2 (80.9% top-1, torchvision's improved recipe) is torchvision's DEFAULT for ResNet-50.
resnet50 = _register_variant("resnet50", "ResNet50_Weights.IMAGENET1K_V2",
                             f"ResNet-50 (torchvision, bottleneck blocks); {_RESNET_STEM}",
                             functools.partial(_tv_resnet, "resnet50"))


# ----------------------------------------------------------------------------------------------
# AlexNet and VGG: conv features, then either the ImageNet MLP (big images) or GAP + linear (small)
_MLP_REASON = f"the 4096-wide MLP classifier exists only from {SMALL_IMAGE_SIZE} px"
# torchvision's ``classifier`` Sequential: indices 0-5 are the MLP (our ``neck``), 6 the output layer.
_MLP_PREFIXES = (("classifier.6.", "head."), ("classifier.", "neck."))


def _mlp_classifier(tv: nn.Module, features: nn.Module, pool_size: int, num_classes: int,
                    image_size: int, drop_rate: float, adapted_parts: dict[str, str]) -> ImageClassifier:
    """Shared AlexNet/VGG head: torchvision's MLP from ``SMALL_IMAGE_SIZE`` px, GAP + linear below."""
    adapted_parts = {**adapted_parts, "neck.": _MLP_REASON}
    if _is_small(image_size):
        channels = [m for m in features.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
        return ImageClassifier(features, global_avg_pool(), channels, num_classes, drop_rate=drop_rate,
                               source_prefixes=_MLP_PREFIXES, adapted_parts=adapted_parts)
    neck = nn.Sequential(*list(tv.classifier.children())[:6])  # keeps indices 0..5 = torchvision's keys
    return ImageClassifier(features, flatten_pool(pool_size), tv.classifier[6].in_features, num_classes,
                           neck=neck, drop_rate=drop_rate, source_prefixes=_MLP_PREFIXES,
                           adapted_parts=adapted_parts)


@register_model("alexnet", default_image_size=224, pretrained="AlexNet_Weights.IMAGENET1K_V1",
                description="AlexNet (torchvision); 3x3 stride-1 first conv and GAP head below 96 px")
def alexnet(num_classes: int = 10, in_chans: int = 3, image_size: int = 224, drop_rate: float = 0.0):
    tv = _tv_models().alexnet()
    if _is_small(image_size):
        # 11x11 stride 4 would turn 28 px into 6 px before the first pool; 3x3 stride 1 keeps 28.
        tv.features[0] = _new_conv(tv.features[0], in_chans, kernel_size=3, stride=1, padding=1)
    elif in_chans != 3:
        tv.features[0] = _new_conv(tv.features[0], in_chans)
    return _mlp_classifier(tv, tv.features, 6, num_classes, image_size, drop_rate, adapted_parts={
        "features.0.": f"stem: 3x3 stride-1 conv below {SMALL_IMAGE_SIZE} px, 11x11 stride-4 conv from "
                       f"{SMALL_IMAGE_SIZE} px"})


def vgg_pool_count(image_size: int) -> int:
    """How many of VGG's five 2x2 max-pools to keep: as many as leave a final map of at least 4 x 4."""
    return max(0, min(5, int(math.floor(math.log2(image_size / 4)))))


def _vgg(cfg: str, num_classes: int, in_chans: int, image_size: int, drop_rate: float) -> ImageClassifier:
    # The BatchNorm variants (vgg11_bn, vgg16_bn): plain VGG trains from scratch only with careful
    # learning rates (the paper initialised VGG-16 from a trained VGG-11), while the BN versions train
    # reliably at ordinary settings and have torchvision ImageNet weights too (better top-1 as well).
    if _is_small(image_size):
        # Build only the conv layers: ``torchvision.models.vgg16_bn()`` would also allocate and
        # initialise the 120 M-parameter MLP that a small image never uses (4 s on a 2-core CPU).
        tv = None
        tvm = _tv_models()
        features = he_init(tvm.vgg.make_layers(tvm.vgg.cfgs[cfg], batch_norm=True))
    else:
        tv = {"A": _tv_models().vgg11_bn, "D": _tv_models().vgg16_bn}[cfg]()
        features = tv.features
    # Drop trailing max-pools (replace by Identity: layer indices, hence weight keys, stay torchvision's).
    pools = [i for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)]
    for i in pools[vgg_pool_count(image_size):]:
        features[i] = nn.Identity()
    if in_chans != 3:
        features[0] = _new_conv(features[0], in_chans)  # 3x3 stride 1 at every size: only channels change
    return _mlp_classifier(tv, features, 7, num_classes, image_size, drop_rate, adapted_parts={})


_VGG_SMALL = "fewer pools and GAP head for small images"
vgg11 = _register_variant("vgg11", "VGG11_BN_Weights.IMAGENET1K_V1",
                          f"VGG-11 with BatchNorm (torchvision vgg11_bn); {_VGG_SMALL}", functools.partial(_vgg, "A"))
vgg16 = _register_variant("vgg16", "VGG16_BN_Weights.IMAGENET1K_V1",
                          f"VGG-16 with BatchNorm (torchvision vgg16_bn); {_VGG_SMALL}", functools.partial(_vgg, "D"))


# ----------------------------------------------------------------------------------------------
# EfficientNet
@register_model("efficientnet_b0", default_image_size=224, pretrained="EfficientNet_B0_Weights.IMAGENET1K_V1",
                description="EfficientNet-B0 (torchvision); stride-1 stem and first stage below 96 px")
def efficientnet_b0(num_classes: int = 10, in_chans: int = 3, image_size: int = 224, drop_rate: float = 0.2):
    """EfficientNet-B0. ``drop_rate`` 0.2 before the classifier is torchvision's (and the paper's) default."""
    tv = _tv_models().efficientnet_b0()
    if in_chans != 3:
        tv.features[0][0] = _new_conv(tv.features[0][0], in_chans)
    if _is_small(image_size):
        # Strides only: the 3x3 stem and the depthwise 3x3 conv keep their shapes (and ImageNet
        # weights). features[2][0] is the first stride-2 MBConv, block[1][0] its depthwise conv;
        # its residual connection is already off (16 -> 24 channels), so only the stride changes.
        tv.features[0][0].stride = (1, 1)
        tv.features[2][0].block[1][0].stride = (1, 1)
    return ImageClassifier(tv.features, global_avg_pool(), tv.classifier[1].in_features, num_classes,
                           drop_rate=drop_rate, source_prefixes=(("classifier.1.", "head."),))


# ----------------------------------------------------------------------------------------------
# Vision Transformers
def vit_patch_size(image_size: int) -> int:
    """Patch size for ``image_size``: the largest power of two <= 16 leaving a grid at least 7 wide.

    28/32 px -> 4 (7 x 7 / 8 x 8 patches), 64 px -> 8, 112-224 px -> 16 (224 px: the standard 14 x 14).
    A grid of 7-14 patches keeps 50-197 tokens: few enough for a CPU, enough for attention to matter.
    """
    return int(min(16, max(1, 2 ** math.floor(math.log2(image_size / 7)))))


class ViTFeatures(nn.Module):
    """Patch embedding, class token and transformer encoder of a torchvision ``VisionTransformer``.

    Returns the N x (1 + grid*grid) x D token sequence after the final LayerNorm (class token
    first). We call the torchvision modules ourselves instead of ``VisionTransformer.forward`` for
    one reason: torchvision requires the image size to be a multiple of the patch size. Here an
    image that is not (e.g. 30 px with 4 px patches) is zero-padded evenly on all sides to the next
    multiple, so every size from 16 to 512 px works.

    Attributes for explainers: ``grid_size`` (patches per side) and ``num_prefix_tokens`` (1).
    """

    num_prefix_tokens = 1

    def __init__(self, vit: nn.Module, image_size: int):
        super().__init__()
        self.image_size = image_size
        self.patch_size = vit.patch_size
        self.grid_size = vit.image_size // vit.patch_size
        pad = vit.image_size - image_size          # total padding to a multiple of the patch size
        self.padding = (pad // 2, pad - pad // 2) * 2  # F.pad order: left, right, top, bottom
        self.hidden_dim = vit.hidden_dim
        self.conv_proj = vit.conv_proj
        self.class_token = vit.class_token
        self.encoder = vit.encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.shape[-1] == self.image_size and x.shape[-2] == self.image_size,
                      f"this ViT was built for {self.image_size} x {self.image_size} px input")
        if any(self.padding):
            x = F.pad(x, self.padding)
        x = self.conv_proj(x).flatten(2).transpose(1, 2)          # N x grid*grid x D
        cls = self.class_token.expand(x.shape[0], -1, -1)
        return self.encoder(torch.cat([cls, x], dim=1))           # adds position embeddings


def _vit(num_classes: int, in_chans: int, image_size: int, *, depth: int, heads: int, dim: int,
         mlp_dim: int, drop_rate: float) -> ImageClassifier:
    patch = vit_patch_size(image_size)
    grid = math.ceil(image_size / patch)
    # torchvision's VisionTransformer class, built for the padded size (a multiple of the patch).
    tv = _tv_models().VisionTransformer(image_size=grid * patch, patch_size=patch, num_layers=depth,
                                              num_heads=heads, hidden_dim=dim, mlp_dim=mlp_dim)
    if in_chans != 3:
        # torchvision hard-codes 3 input channels; same init as torchvision's patch embedding.
        tv.conv_proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)
        nn.init.trunc_normal_(tv.conv_proj.weight, std=math.sqrt(1 / (in_chans * patch * patch)))
        nn.init.zeros_(tv.conv_proj.bias)
    return ImageClassifier(
        ViTFeatures(tv, image_size), ClassTokenPool(), dim, num_classes, drop_rate=drop_rate,
        zero_head=True,  # as torchvision and timm initialise ViT heads
        source_prefixes=(("heads.head.", "head."), ("", "features.")),
        adapted_parts={
            "features.conv_proj.": "patch embedding: the patch size follows the image size (16 px patches from 112 px)",
            "features.encoder.pos_embedding": "position embedding: resized to the patch grid",
        })


@register_model("vit_tiny", default_image_size=32, family="vit",
                description="ViT-Tiny (DeiT-Ti sizes: dim 192, depth 12, 3 heads) with patch size from image size")
def vit_tiny(num_classes: int = 10, in_chans: int = 3, image_size: int = 32, drop_rate: float = 0.0):
    """ViT for small images: DeiT-Tiny's proven width/depth (5.4 M parameters at 32 px), 4 px patches at 28-32 px.

    No torchvision ImageNet weights exist at this width, so it trains from scratch.
    """
    return _vit(num_classes, in_chans, image_size, depth=12, heads=3, dim=192, mlp_dim=768, drop_rate=drop_rate)


@register_model("vit_b_16", default_image_size=224, pretrained="ViT_B_16_Weights.IMAGENET1K_V1", family="vit",
                description="ViT-B/16 (torchvision); smaller patches below 112 px")
def vit_b_16(num_classes: int = 10, in_chans: int = 3, image_size: int = 224, drop_rate: float = 0.0):
    """ViT-Base: 16 px patches from 112 px (224 px: exactly torchvision's vit_b_16), 4-8 px patches below."""
    return _vit(num_classes, in_chans, image_size, depth=12, heads=12, dim=768, mlp_dim=3072, drop_rate=drop_rate)

"""FastNet: small plain CNNs built to train to high accuracy in seconds on a CPU.

Design notes (first measured on a 2-core AMD EPYC with AVX512_BF16, torch 2.14.1; see
``benchmarks/fast_search.py`` for the script and ``benchmarks/results/fast_search.md`` for the numbers):

* **Stride-2 stem.** A 3x3 convolution at full 28x28 resolution from a 1-channel input is
  badly served by oneDNN's backward pass on CPU (~45 ms per 512 images for 1->32 channels, more
  than the whole 64->128 convolution at 14x14 costs per FLOP), while a 4x4 stride-2 stem
  (an overlapping "patchify") costs ~7 ms.  So the stem halves the resolution at once; every
  later layer then runs at 14x14 or below.
* **Downsampling: stride-2 conv (``fastnet``) or conv -> maxpool -> BN -> act (``fastnet_wide``,
  the airbench / hlb-CIFAR10 ordering, which runs BN and GELU on 4x fewer values).**  On CPU the
  max-pool variant pays 4x the conv FLOPs plus ~15% of a step for max-pool forward/backward
  (its backward zero-fills a full-resolution gradient) — yet measured whole steps at batch 512 were
  about equal (120-140 ms each: at these sizes the step is overhead-bound), and the max-pool net
  reached 92.5% validation accuracy in 4 epochs against 91.8%, so ``fastnet`` uses max-pooling too.
* **Wide, few layers.**  Small channel counts are overhead-bound on CPU; a handful of wide 3x3
  convolutions keeps most of the time in dense GEMM work, where bf16 autocast pays ~1.5x for the
  whole step (16.4 against 24.7 CPU-seconds per epoch, with channels_last).
* **Residual convs per stage** (ResNet-9 / "How to train your ResNet"): after the downsampling
  conv, ``depth - 1`` extra conv-BN-act layers whose output is added back; the last BN scale of
  each branch starts at zero so the untrained net is a shallow one.
* **Global max pool + bias-free linear, optional temperature ``logit_scale``** (airbench uses
  1/9).  At SGD lr 0.1-0.2 a scale of 1/8 trained slower (85.7% against 87.6% validation after 2
  epochs), so the default is 1.0; a small scale needs a proportionally larger lr.

Re-measured for the machine-class recipes (2-core AMD EPYC, CPU family 26 / Zen 5, AVX512_BF16, no AMX;
torch 2.14.1; benchmarks/results/fast_search.md):

* **The step is FLOP-bound now, not overhead-bound.**  At batch 512 with channels_last, fastnet's convolutions
  (forward + backward, isolated) run at 500-760 GFLOP/s in bf16 and 210-250 GFLOP/s in fp32 limited to AVX2,
  near these cores' peak; the whole step (69 ms bf16, 187 ms fp32/AVX2) is >85% convolution.  Only fewer
  multiply-adds make it faster: fastnet is ~11.8 M MACs per 28x28 image, its 32->64 conv at 14x14 (before the
  pool) is 31% of them.
* **The last stage matters most.**  Removing the 256-channel stage at 3x3 cost a point of validation accuracy
  (92.3% against 93.3%), stride-2 convs instead of pooling 0.5-1 point; halving every width
  (``fastnet_small``, 1/4 of the MACs) costs ~0.4 point at equal epochs and gives the better accuracy per
  CPU-second when the budget is a few seconds per epoch.
* **ReLU vs GELU**: the same accuracy within the seed-to-seed spread (validation 93.14% over 3 seeds against
  93.25% over 2; 6 epochs) and ~5% less CPU time per run (1-thread runs; not visible in 2-thread wall time):
  ``fastnet_relu`` and ``fastnet_small`` use ReLU.  (``fastnet`` keeps GELU so that saved model directories
  keep loading as they were trained.)

Every model implements imgrec's head API: ``forward_features`` -> N x C x h x w map,
``forward_head(feats, pre_logits=False)``, ``get_classifier``, ``reset_classifier`` and
``num_features``.

The training recipes that use these networks live in ``imgrec.engine.recipes``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from imgrec.models.registry import register_model

__all__ = ["FastNet", "fastnet", "fastnet_relu", "fastnet_small", "fastnet_wide"]


def _conv3x3(cin: int, cout: int) -> nn.Conv2d:
    # No bias: every conv is followed by BatchNorm, whose shift makes a conv bias redundant.
    return nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False)


def _bn(channels: int, momentum: float) -> nn.BatchNorm2d:
    # A larger momentum than torch's default 0.1 lets the running statistics track the fast
    # moving weights of a run that lasts only a few hundred steps.
    return nn.BatchNorm2d(channels, momentum=momentum)


_ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


def _act(name: str = "gelu") -> nn.Module:
    return _ACTIVATIONS[name]()


class ConvBeforePool(nn.Conv2d):
    """The 3x3 "same" convolution of a ``down="pool"`` layer; under bf16 autocast on a CPU, computed only where
    the 2x2 max pool after it looks, and on the smallest maps as one matrix product.

    The pool rounds down: on an odd-sized map it drops the conv output's last row (column), so the convolution
    can skip it: pad 1 on top (left) and 0 at the bottom (right) when the input's height (width) is odd, then
    convolve without padding. At 28x28 FastNet's pooled maps are 14, 7 and 3 pixels wide: the 7x7 conv skips 13
    of its 49 outputs, the 3x3 one 5 of its 9. The same function and the same weights (the state dict of an
    ``nn.Conv2d``). Measured on a 2-core Zen 5 (AVX512-BF16), batch 512, channels_last, forward + backward:
    fastnet_lean's 7x7 conv 9.9 -> 8.4 ms, its 3x3 conv 13.8 ms -> 6.6 ms as a product, the whole training step
    38 -> 30.5 ms. In fp32 neither paid (alike within noise, with AVX-512 and limited to AVX2), so fp32, GPUs and
    every export keep the plain convolution.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h_odd, w_odd = x.shape[-2] % 2, x.shape[-1] % 2
        if not ((h_odd or w_odd) and _cpu_bf16_autocast(x)):
            return super().forward(x)
        x = F.pad(x, (1, 1 - w_odd, 1, 1 - h_odd))
        if x.shape[-2] <= 4 and x.shape[-1] <= 4 and self.bias is None and self.groups == 1 \
                and self.stride == (1, 1) and self.dilation == (1, 1):  # the product form's only case
            return _conv3x3_gemm(x, self.weight)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def _cpu_bf16_autocast(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and \
        torch.get_autocast_dtype("cpu") == torch.bfloat16


def _conv3x3_gemm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """An unpadded 3x3 convolution (no bias) of a map of at most 4x4, as one matrix product of its 3x3 windows,
    in bf16. Written by hand because oneDNN's convolution serves this shape badly in bf16 (numbers above)."""
    n, c, h, w = x.shape
    oh, ow = h - 2, w - 2
    x = x.to(torch.bfloat16).permute(0, 2, 3, 1)  # N H W C (a view when the map is channels_last)
    cols = _Windows3x3.apply(x)  # N oh ow (kh kw C)
    kernel = weight.to(torch.bfloat16).permute(0, 2, 3, 1).reshape(weight.shape[0], 9 * c)  # O x (kh kw C)
    out = cols.reshape(n * oh * ow, 9 * c) @ kernel.t()
    return out.view(n, oh, ow, weight.shape[0]).permute(0, 3, 1, 2)  # explicit: an empty batch has no -1


class _Windows3x3(torch.autograd.Function):
    """The 3x3 windows of an N H W C map side by side on the last axis (N oh ow 9C). Its backward adds the nine
    slices of the gradient into one zeroed map; autograd's own backward of the nine slicings and the
    concatenation zero-filled and summed nine full-size maps (and as many half-size ones), ~1.5 ms of a 37 ms
    bf16 training step of fastnet_lean on 2 Zen 5 cores."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        oh, ow = x.shape[1] - 2, x.shape[2] - 2
        ctx.in_shape = x.shape
        return torch.cat([x[:, i:i + oh, j:j + ow, :] for i in range(3) for j in range(3)], dim=3)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        n, h, w, c = ctx.in_shape
        oh, ow = h - 2, w - 2
        out = grad.new_zeros(n, h, w, c)
        parts = grad.view(n, oh, ow, 9, c)
        for k in reversed(range(9)):  # autograd's order: the same bf16 sums to the last bit
            i, j = divmod(k, 3)
            out[:, i:i + oh, j:j + ow, :] += parts[:, :, :, k, :]
        return out


class ConvBNAct(nn.Sequential):
    """3x3 conv, optional downsampling by 2, BatchNorm, activation.

    ``down="pool"``: conv at full resolution then 2x2 max pool (airbench; pool before BN/act so
    they touch 4x fewer values).  ``down="stride"``: stride-2 conv, 4x fewer conv FLOPs and no
    max-pool backward (which costs ~10% of a step on CPU, mostly zero-filling its gradient).
    """

    def __init__(self, cin: int, cout: int, down: str | None, bn_momentum: float, act: str = "gelu"):
        stride = 2 if down == "stride" else 1
        conv = ConvBeforePool if down == "pool" else nn.Conv2d
        layers: list[nn.Module] = [conv(cin, cout, 3, stride=stride, padding=1, bias=False)]
        if down == "pool":
            layers.append(nn.MaxPool2d(2))
        layers += [_bn(cout, bn_momentum), _act(act)]
        super().__init__(*layers)


class Stage(nn.Module):
    """One resolution stage: a pooling conv that changes width, then ``depth - 1`` residual convs."""

    def __init__(self, cin: int, cout: int, depth: int, down: str | None, bn_momentum: float, act: str = "gelu"):
        super().__init__()
        self.down = ConvBNAct(cin, cout, down=down, bn_momentum=bn_momentum, act=act)
        self.res = nn.Sequential(*[ConvBNAct(cout, cout, down=None, bn_momentum=bn_momentum, act=act)
                                   for _ in range(depth - 1)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        if len(self.res):
            x = x + self.res(x)
        return x


class FastNet(nn.Module):
    """Stem, a few wide pooled stages, global max pool, linear classifier scaled by ``logit_scale``.

    Args:
        num_classes: output classes.
        in_chans: input channels (1 or 3).
        stem_width: channels of the stem convolution.
        stem_stride: 2 for a 4x4 stride-2 stem (cheap on CPU), 1 for a 3x3 full-resolution stem.
        widths: channels of each stage; every stage max-pools by 2.
        depths: convs per stage (1 = only the pooling conv; 2 adds one residual conv, ...).
        logit_scale: temperature multiplying the logits (airbench uses 1/9).
        bn_momentum: BatchNorm running-statistics momentum (torch convention).
        down: how each stage halves the resolution: "pool" (conv + 2x2 max pool), "stride" (stride-2
            conv), or None (keeps it); one value for every stage or a sequence with one per stage.
        act: "gelu" or "relu" (ReLU's backward is cheaper: it is memory-bound work on the CPU).
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, stem_width: int = 32,
                 stem_stride: int = 2, widths: Sequence[int] = (64, 128, 256),
                 depths: Sequence[int] = (1, 1, 1), logit_scale: float = 0.125,
                 bn_momentum: float = 0.2, down: str | Sequence[str | None] = "pool", act: str = "gelu"):
        super().__init__()
        if len(widths) != len(depths):
            raise ValueError("widths and depths must have the same length")
        if stem_stride == 2:
            # 4x4 kernel, stride 2, padding 1: overlapping patches, 28x28 -> 14x14.
            stem_conv = nn.Conv2d(in_chans, stem_width, kernel_size=4, stride=2, padding=1, bias=False)
        elif stem_stride == 1:
            stem_conv = _conv3x3(in_chans, stem_width)
        else:
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
        if act not in _ACTIVATIONS:
            raise ValueError(f"act must be one of {', '.join(_ACTIVATIONS)}, got {act!r}")
        self.stem = nn.Sequential(stem_conv, _bn(stem_width, bn_momentum), _act(act))
        downs = [down] * len(widths) if isinstance(down, str) or down is None else list(down)
        if len(downs) != len(widths):
            raise ValueError("down must be one string or one entry per stage")
        for d in downs:
            if d not in ("pool", "stride", None):
                raise ValueError(f"down must be 'pool', 'stride' or None, got {d!r}")
        stages, cin = [], stem_width
        for width, depth, d in zip(widths, depths, downs):
            stages.append(Stage(cin, width, depth, down=d, bn_momentum=bn_momentum, act=act))
            cin = width
        self.stages = nn.Sequential(*stages)
        self.num_features = cin
        self.logit_scale = logit_scale
        # Global max pool: works for any input size 16..512 and, on small grey images, keeps the
        # strongest local evidence (airbench uses max pooling here too).
        self.global_pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(cin, num_classes, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Residual branches start as (near) identity: zero the last BN scale of each branch
        # ("How to train your ResNet"/Goyal et al.), so the untrained net is a shallow one.
        for stage in self.stages:
            if len(stage.res):
                nn.init.zeros_(stage.res[-1][1].weight)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward_head(self, feats: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if feats.shape[-2] == 1 and feats.shape[-1] == 1 and not (torch.jit.is_tracing() or
                                                                 torch.onnx.is_in_onnx_export()):
            # The global max pool of a 1x1 map (FastNet's at 28 px) is the map itself: on a CPU,
            # AdaptiveMaxPool2d's channels_last path spends ~0.9 ms of a 40 ms training step on it (batch 512,
            # 2 Zen 5 cores). Exports keep the pool, so that their graphs do not depend on the input size.
            pooled = feats.flatten(1)
        else:
            pooled = self.global_pool(feats).flatten(1)
        if pre_logits:
            return pooled
        return self.fc(pooled) * self.logit_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Linear:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.fc = nn.Linear(self.num_features, num_classes, bias=False)


# The registered variants share FastNet; only sizes (and fastnet_relu's activation) differ.
FASTNET_CFG = dict(stem_width=32, stem_stride=2, widths=(64, 128, 256), depths=(2, 1, 1),
                   down="pool", logit_scale=1.0)
# Half of fastnet's widths (~1/4 of its MACs): the better trade-off when the budget is a few CPU-seconds
# per epoch (more epochs of a narrower net beat fewer epochs of a wider one; benchmarks/fast_search.py).
FASTNET_SMALL_CFG = dict(stem_width=16, stem_stride=2, widths=(32, 64, 128), depths=(2, 1, 1),
                         down="pool", logit_scale=1.0, act="relu")
# fastnet's late stages with fastnet_small's early ones (~half of fastnet's MACs: the early, high-resolution layers
# cost the most per channel): with Muon, 5 epochs of it matched 4 of fastnet_relu on validation (93.15% both, 3
# seeds) for 26% fewer CPU-seconds (benchmarks/results/fast_search.md)
FASTNET_LEAN_CFG = dict(stem_width=16, stem_stride=2, widths=(32, 128, 256), depths=(2, 1, 1),
                        down="pool", logit_scale=1.0, act="relu")
FASTNET_WIDE_CFG = dict(stem_width=64, stem_stride=2, widths=(128, 256, 512), depths=(2, 2, 2),
                        down="pool", logit_scale=1.0)


@register_model("fastnet", default_image_size=28,
                description="Small CNN (stride-2 stem, max-pooled stages, ~12 M MACs at 28x28) for fast CPU training")
def fastnet(num_classes: int = 10, in_chans: int = 1, image_size: int = 28, **kw) -> nn.Module:
    # image_size is accepted for the registry's signature; global pooling makes the net size-agnostic.
    return FastNet(num_classes=num_classes, in_chans=in_chans, **{**FASTNET_CFG, **kw})


@register_model("fastnet_relu", default_image_size=28,
                description="fastnet with ReLU instead of GELU (same accuracy, cheaper backward)")
def fastnet_relu(num_classes: int = 10, in_chans: int = 1, image_size: int = 28, **kw) -> nn.Module:
    return FastNet(num_classes=num_classes, in_chans=in_chans, **{**FASTNET_CFG, "act": "relu", **kw})


@register_model("fastnet_small", default_image_size=28,
                description="fastnet at half the widths, ReLU (~3 M MACs at 28x28): CPUs without bf16 units")
def fastnet_small(num_classes: int = 10, in_chans: int = 1, image_size: int = 28, **kw) -> nn.Module:
    return FastNet(num_classes=num_classes, in_chans=in_chans, **{**FASTNET_SMALL_CFG, **kw})


@register_model("fastnet_lean", default_image_size=28,
                description="fastnet with narrow early stages, ReLU (~6 M MACs at 28x28): the bf16 CPU recipe")
def fastnet_lean(num_classes: int = 10, in_chans: int = 1, image_size: int = 28, **kw) -> nn.Module:
    return FastNet(num_classes=num_classes, in_chans=in_chans, **{**FASTNET_LEAN_CFG, **kw})


@register_model("fastnet_wide", default_image_size=28,
                description="Wider/deeper FastNet (max-pool stages, residual convs) for higher accuracy")
def fastnet_wide(num_classes: int = 10, in_chans: int = 1, image_size: int = 28, **kw) -> nn.Module:
    return FastNet(num_classes=num_classes, in_chans=in_chans, **{**FASTNET_WIDE_CFG, **kw})

"""Named training recipes for ``imgrec train --recipe NAME``: plain config, the same keys as ``RunConfig``.

A recipe is a flat mapping of settings (``name`` is the architecture, the rest are ``TrainConfig``
keys) applied above the dataclass defaults and below a ``--config`` file and the command line.
lr is the peak learning rate of the "onecycle" schedule (linear warm-up over ``warmup`` of all steps,
then linear decay); ``tta_flip`` averages the logits of the image and its mirror image. Every choice
below was made on the 5,000-image validation split carved from the 60k Fashion-MNIST training set
(split_seed 0); the test split was not used.

Measured on a 2-core Zen 4 (benchmarks/results/time_to_accuracy.md), fastnet, batch 512, SGD lr 0.4,
seed 0, validation accuracy with TTA:
  stride-2 stages, no crop, 4 epochs        91.8%
  max-pool stages, no crop, 4 epochs        92.5%   (~13 s per epoch)
  max-pool stages, no crop, 6 epochs        93.3%
Random crops cost accuracy in runs this short (+1.7 points without them at 4 epochs) and pay off only
in long runs; flips help at every length, and flip-TTA adds 0.2-0.4 points.
"""
from __future__ import annotations

from imgrec.errors import ConfigError

DEFAULT_RECIPE = "fast"

RECIPES: dict[str, dict] = {
    "fast": dict(
        name="fastnet", epochs=6, batch_size=512,
        optimizer="sgd", lr=0.4, momentum=0.9, weight_decay=5e-4,
        scheduler="onecycle", warmup=0.2, label_smoothing=0.1,
        crop_padding=0, flip=True, ema=None, tta_flip=True,
        # "auto": bf16 autocast where the CPU has bf16 instructions (1.5x here), fp32 elsewhere
        amp="auto", channels_last=True,
        # torch.compile: ~35 s of compiling measured before (perf-notes) > the whole run's budget.
        compile=False,
    ),
    "accurate": dict(
        name="fastnet", epochs=16, batch_size=512,
        optimizer="sgd", lr=0.4, momentum=0.9, weight_decay=5e-4,
        scheduler="onecycle", warmup=0.2, label_smoothing=0.1,
        crop_padding=2, flip=True, ema=None, tta_flip=True,
        amp="auto", channels_last=True, compile=False,
    ),
    # not validated yet: a wider network for long runs
    "best": dict(
        name="fastnet_wide", epochs=40, batch_size=256,
        optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4,
        scheduler="onecycle", warmup=0.15, label_smoothing=0.1,
        crop_padding=2, flip=True, ema=None, tta_flip=True,
        amp="auto", channels_last=True, compile=False,
    ),
}


def get_recipe(name: str) -> dict:
    """The settings of recipe ``name`` (a copy); a ConfigError listing the choices for an unknown name."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; choose one of: {', '.join(RECIPES)}")
    return dict(RECIPES[name])


def choose_recipe(device_type: str, cpu_has_bf16: bool, cores: int) -> tuple[str, str]:
    """The default recipe for this machine, and a one-line reason (printed by ``imgrec train``, kept in
    model.json). ``device_type``: "cpu", "cuda" or "mps"; ``cpu_has_bf16``: AMX or AVX512-BF16 present."""
    if device_type != "cpu":
        return DEFAULT_RECIPE, f"a {device_type} device"
    if cpu_has_bf16:
        return DEFAULT_RECIPE, f"{cores}-core CPU with bf16 instructions (bf16 autocast)"
    return DEFAULT_RECIPE, f"{cores}-core CPU without bf16 instructions (fp32)"

"""Named training recipes for ``imgrec train --recipe NAME``: plain config, the same keys as ``RunConfig``.

A recipe is a flat mapping of settings (``name`` is the architecture, the rest are ``TrainConfig``
keys) applied above the dataclass defaults and below a ``--config`` file and the command line.
lr is the peak learning rate of the "onecycle" schedule (linear warm-up over ``warmup`` of all steps,
then linear decay); ``tta_flip`` averages the logits of the image and its mirror image.

The default recipe depends on the machine (``choose_recipe``): one per machine class, each also a name a
user can pick by hand anywhere, so a run can be reproduced on another machine:

* ``fast-bf16``: CPUs with bf16 units (AVX512-BF16 or AMX).
* ``fast-fp32``: CPUs without them (AVX2/FMA only: most laptops, AMD Zen 3 and older); no autocast.
* ``fast-gpu``: a CUDA GPU.
* ``fast`` is another name for ``fast-bf16`` (the recipe ``fast`` meant before machine classes existed);
  ``accurate`` and ``best`` are the slower, more accurate recipes.

Every choice was made on the 5,000-image validation split carved from the 60k Fashion-MNIST training set
(split_seed 0); the test split was looked at only to confirm the chosen recipes. The search, its numbers
and the machine they were measured on are in ``benchmarks/fast_search.py`` and
``benchmarks/results/fast_search.md``.
"""
from __future__ import annotations

from imgrec.errors import ConfigError

DEFAULT_RECIPE = "fast"

# Shared by the fast family: SGD (Nesterov) with a linear one-cycle schedule, label smoothing, flips only
# (random crops cost accuracy in runs this short), flip-TTA, channels_last; no torch.compile (it compiles
# for longer than these runs train).
_FAST_COMMON = dict(
    batch_size=512, optimizer="sgd", lr=0.4, momentum=0.9, weight_decay=5e-4,
    scheduler="onecycle", warmup=0.2, label_smoothing=0.1,
    crop_padding=0, flip=True, ema=None, tta_flip=True, channels_last=True, compile=False,
    # validate only the last 2 epochs: in every measured run of these short one-cycle schedules the last epoch
    # was the best, and skipping the early validation passes saves 2-4 s of a run (benchmarks/fast_search.py)
    val_last=2,
)

RECIPES: dict[str, dict] = {
    # CPUs with bf16 units: fastnet with ReLU (as accurate as GELU within seed noise, ~5% less CPU time) in
    # bf16 autocast, 6 epochs: the cheapest measured recipe at >= 93.1% validation (mean of 3 seeds). Its
    # convolutions already run at 600-750 GFLOP/s on 2 cores, so only fewer multiply-adds make it faster, and
    # every cheaper variant measured lost 0.3-1 point.
    "fast-bf16": dict(name="fastnet_relu", epochs=6, amp="auto", **_FAST_COMMON),
    # CPUs without bf16 units: fp32 convolutions run ~2.5-3x slower than bf16 ones, and fastnet's 6 epochs
    # would take ~2x the 60 s budget of 2 such cores; fastnet_small (1/4 of the MACs, ReLU) for 9 epochs fits
    # it (~5.3 s per epoch with 2 cores limited to AVX2), at ~0.3-0.4 point below fastnet's accuracy.
    "fast-fp32": dict(name="fastnet_small", epochs=9, amp="none", **_FAST_COMMON),
    # CUDA GPUs: unmeasured in this form (no GPU was available when it was written). The step of so small a
    # net is launch-bound on a GPU, so the bf16 CPU recipe's settings are kept (6 epochs of fastnet trained in
    # 4.0-4.4 s on an H200 and reached 92.9-93.2% test, perf-notes); bf16 autocast via amp="auto".
    "fast-gpu": dict(name="fastnet", epochs=6, amp="auto", **_FAST_COMMON),
    "accurate": dict(
        name="fastnet", epochs=16, batch_size=512,
        optimizer="sgd", lr=0.4, momentum=0.9, weight_decay=5e-4,
        scheduler="onecycle", warmup=0.2, label_smoothing=0.1,
        crop_padding=2, flip=True, ema=None, tta_flip=True,
        amp="auto", channels_last=True, compile=False,
    ),
    # a wider network for long runs: 94.54% test on an H200 in 101 s (perf-notes)
    "best": dict(
        name="fastnet_wide", epochs=40, batch_size=256,
        optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4,
        scheduler="onecycle", warmup=0.15, label_smoothing=0.1,
        crop_padding=2, flip=True, ema=None, tta_flip=True,
        amp="auto", channels_last=True, compile=False,
    ),
}

# Other names for recipes (kept so that older commands and configs keep working).
ALIASES: dict[str, str] = {"fast": "fast-bf16"}


def recipe_names() -> list[str]:
    """Every name ``get_recipe`` accepts: the recipes, then the aliases."""
    return [*RECIPES, *ALIASES]


def get_recipe(name: str) -> dict:
    """The settings of recipe ``name`` (a copy); a ConfigError listing the choices for an unknown name."""
    key = ALIASES.get(name, name)
    if key not in RECIPES:
        raise ConfigError(f"unknown recipe {name!r}; choose one of: {', '.join(recipe_names())}")
    return dict(RECIPES[key])


def choose_recipe(device_type: str, cpu_has_bf16: bool, cores: int) -> tuple[str, str]:
    """The default recipe for a machine, and a one-line reason a user can read.

    ``device_type`` is the torch device type training will use ("cpu", "cuda", "mps"), ``cpu_has_bf16``
    whether the CPU has bf16 units (AVX512-BF16 or AMX; ``imgrec.device.cpu_has_fast_bf16``), ``cores`` the
    cores this process may use.
    """
    cores = max(1, int(cores or 1))
    if device_type == "cuda":
        return "fast-gpu", "a CUDA GPU: fastnet in bf16 autocast (GPU recipe, not yet measured in this form)"
    if device_type == "mps":
        # no measurement on Apple GPUs; the GPU recipe is the closest (fp16 autocast there)
        return "fast-gpu", "an Apple GPU (MPS): the GPU recipe (not measured on MPS)"
    if cpu_has_bf16:
        return "fast-bf16", (f"CPU with bf16 units (AVX512-BF16/AMX), {cores} core{'s' * (cores > 1)}: "
                             f"fastnet_relu, 6 epochs, bf16 autocast")
    return "fast-fp32", (f"CPU without bf16 units, {cores} core{'s' * (cores > 1)}: fastnet_small in fp32 "
                         f"(bf16 would be emulated, slower than fp32)")

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

import math

from imgrec.errors import ConfigError

DEFAULT_RECIPE = "fast"

# Shared by the fast family: SGD (Nesterov; the CPU recipes put Muon on the filters) with a linear one-cycle
# schedule, label smoothing, flips only (random crops cost accuracy in runs this short), flip-TTA, channels_last; no torch.compile (it compiles
# for longer than these runs train).
_FAST_COMMON = dict(
    batch_size=512, optimizer="sgd", lr=0.4, momentum=0.9, weight_decay=5e-4,
    scheduler="onecycle", warmup=0.2, label_smoothing=0.1,
    crop_padding=0, flip=True, ema=None, tta_flip=True, channels_last=True, compile=False,
    # validate only the last 2 epochs: in every measured run of these short one-cycle schedules the last epoch
    # was the best, and skipping the early validation passes saves 2-4 s of a run (benchmarks/fast_search.py)
    val_last=2,
)

# The CPU recipes: Muon, validation in the last epoch only (the best one in every Muon run measured), and
# alternating flips (each image mirrored every other epoch): measured on both CPU recipes, same cost.
_CPU_MUON = {**_FAST_COMMON, "optimizer": "muon", "val_last": 1, "flip_order": "alternate"}

RECIPES: dict[str, dict] = {
    # CPUs with bf16 units: fastnet_lean (fastnet's late stages, fastnet_small's early ones, ReLU) in bf16
    # autocast. Muon on the convolution filters (SGD for the rest) reached in 4 epochs of fastnet_relu the
    # validation accuracy SGD reached in 6 (93.15% against 93.14%, mean of 3 seeds) for ~6% more work per step
    # (the Newton-Schulz iterations, in bf16): ~30% less training. Muon's filter step 0.1 and 0.15 were alike
    # (93.15%, 93.13%), 0.2-0.3 worse on seed 0. 5 epochs of fastnet_lean then matched the 4 of fastnet_relu
    # (93.15%, 3 seeds) for 26% fewer CPU-seconds. The convolutions already run at 600-750 GFLOP/s on 2 cores,
    # so only fewer multiply-adds × epochs make it faster.
    # Alternating flips (each image mirrored every other epoch) then gave 93.15% against 93.00% for random ones
    # (12 seeds, paired +0.155, standard error 0.08) at the same cost.
    "fast-bf16": dict(name="fastnet_lean", epochs=5, amp="auto", **_CPU_MUON, muon_lr=0.1),
    # CPUs without bf16 units: fp32 convolutions run ~2.5-3x slower than bf16 ones, so fastnet_small (1/4 of
    # fastnet's MACs, ReLU); with Muon (filter step 0.15) 8 epochs reached 93.11% validation (2 seeds) where SGD
    # reached 92.71% in 9 (3 seeds), measured with 2 cores limited to AVX2 (an emulation). Alternating flips:
    # 93.17% against 93.10% (4 seeds); 7 epochs with them 93.03%, so 8 stay.
    "fast-fp32": dict(name="fastnet_small", epochs=8, amp="none", **_CPU_MUON, muon_lr=0.15),
    # CUDA GPUs: unmeasured in this form (no GPU was available when it was written). The step of so small a
    # net is launch-bound on a GPU, so the earlier SGD settings of the CPU recipes are kept (6 epochs of fastnet trained in
    # 4.0-4.4 s on an H200 and reached 92.9-93.2% test, measured in an earlier session); bf16 autocast via amp="auto".
    "fast-gpu": dict(name="fastnet", epochs=6, amp="auto", **_FAST_COMMON),
    "accurate": dict(
        name="fastnet", epochs=16, batch_size=512,
        optimizer="sgd", lr=0.4, momentum=0.9, weight_decay=5e-4,
        scheduler="onecycle", warmup=0.2, label_smoothing=0.1,
        crop_padding=2, flip=True, ema=None, tta_flip=True,
        amp="auto", channels_last=True, compile=False,
    ),
    # a wider network for long runs: 94.54% test on an H200 in 101 s (measured in an earlier session)
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
                             f"fastnet_lean in bf16 autocast")
    return "fast-fp32", (f"CPU without bf16 units, {cores} core{'s' * (cores > 1)}: fastnet_small in fp32 "
                         f"(bf16 would be emulated, slower than fp32)")


# --- the recipe chosen from the data -------------------------------------------------------------------------
# The recipes above were measured on Fashion-MNIST: 55,000 training images of 28 px, where batch 512 makes 107
# optimizer steps an epoch. A folder of a few hundred photos gets one step an epoch from them and trains to
# chance. ``adapt_to_data`` keeps the machine's architecture and precision and re-derives, from the training set's
# size and image sizes, what depends on them: the batch (so an epoch has tens of steps), the learning rate
# (scaled with the batch), the schedule's length (enough optimizer steps, bounded in compute), validation every
# epoch (a short run cannot afford to pick its epoch blind), crop augmentation, and the image size.

LARGE_DATA = 20_000          # training images from which the machine's recipe applies as it is (at ≤ 32 px)
SEEN_TARGET = 30_000         # images a small-data run sees in all (e.g. 1,000 images × 30 epochs)
MIN_EPOCHS, MAX_EPOCHS = 10, 40
MIN_STEPS, MAX_TINY_EPOCHS = 240, 100  # optimizer steps every small-data run gets, up to this many epochs
# compute bound of a small-data run, in 28×28-pixel image passes: about the fast recipe's own cost (6-9 epochs of
# 55,000 images), so no default run costs much more than the Fashion-MNIST one on the same machine
COST_BOUND = 400_000 * 28 * 28
# small data on a CPU: fastnet_small (a quarter of fastnet's multiply-adds) matched fastnet_relu's validation
# accuracy on the measured suite of small folders in 40-45% of its time (benchmarks/results/defaults.md)
SMALL_DATA_MODELS = {"fastnet_lean": "fastnet_small", "fastnet_relu": "fastnet_small"}
SMALL_LR_PER_32 = 0.05       # SGD peak lr at batch 32; scaled linearly with the batch, capped at the recipe's
MIN_BATCH, SMALL_MAX_BATCH = 16, 128


def _pow2_floor(x: float) -> int:
    return 1 << max(0, int(math.floor(math.log2(max(1.0, x)))))


def adapt_to_data(probe, current: dict, explicit: set[str]) -> tuple[dict, str]:
    """Settings to change for the data described by ``probe`` (``imgrec.data.probe.DataProbe``), and the reason
    in words. ``current``: the resolved flat settings (name, batch_size, lr, optimizer, epochs, image_size, ...);
    ``explicit``: the keys the user set (command line or config file), never changed here."""
    if probe is None:
        return {}, ""
    n, desc = int(probe.n_train), probe.describe()
    if n >= LARGE_DATA and probe.max_side <= 32:
        return {}, f"{desc}: the recipe as measured on data of this kind"
    changes: dict = {}

    def put(key, value):
        if key not in explicit and current.get(key) != value:
            changes[key] = value

    notes: list[str] = []
    backbone = _transfer_backbone(probe, explicit, notes)
    if backbone is not None:
        return _transfer_changes(probe, backbone, put, changes, explicit)
    size = _data_image_size(probe, current, explicit, put)
    batch = _data_batch(n, current, explicit)
    put("batch_size", batch)
    _data_model_and_lr(n, batch, current, explicit, changes, put)
    # the loader keeps a short last batch unless an epoch has at least 4 full ones (imgrec.engine.train)
    steps_per_epoch = n // int(batch) if n >= 4 * int(batch) else math.ceil(n / int(batch))
    epochs = _data_epochs(n, size, steps_per_epoch, current, explicit)
    put("epochs", epochs)
    if n < LARGE_DATA:
        put("val_last", 0)
        put("crop_padding", None)  # size // 14 px: the augmentation small data needs most
        put("flip_order", "random")  # what the small-data settings were measured with (benchmarks/defaults.py)
    parts = [f"{changes['name']} (small data)"] if "name" in changes else []
    parts += [f"batch {batch} ({steps_per_epoch} steps an epoch)", f"{epochs} epochs ({steps_per_epoch * epochs:,} "
              f"steps)", f"lr {changes.get('lr', current.get('lr'))}", f"{size} px"]
    if n < LARGE_DATA:
        parts.append("validating every epoch")
    return changes, f"{desc}: " + ", ".join(parts + notes)


# --- transfer: photos start from a pretrained backbone -----------------------------------------------------------
# Colour images start from ImageNet weights when a backbone's weights are on this machine (or can be downloaded):
# a linear probe on the frozen backbone's features (imgrec.engine.transfer), measured on the photo folders of
# benchmarks/transfer.py against training from scratch, fine-tuning and fastai's fine_tune
# (benchmarks/results/transfer.md). Grey images and large collections of small images keep the from-scratch
# recipes, which were measured better there (Fashion-MNIST, the grey folders of benchmarks/defaults.py).
# px: a forward pass at 224 px costs 3-8x one at 128 px, and the backbone's own 224 px did not pay on the photo suite
# (benchmarks/results/transfer.md): with the default's probe, +1.8 and +2.7 points on the 100- and 150-image folders,
# -4.5 on the 432-image one (one run each, 80-180 test images)
TRANSFER_SIZE = 128
TRANSFER_MIN_SIDE = 24       # median side below which images are too small to be photos worth transferring to


def _transfer_backbone(probe, explicit: set[str], notes: list[str]):
    """(Backbone, weights path, where they came from) for colour photos, or None (then the reason is noted)."""
    if explicit & {"name", "pretrained", "weights", "probe"} or probe.channels != 3 or probe.kind == "tensor":
        return None
    if probe.median_side < TRANSFER_MIN_SIDE or (probe.n_train >= LARGE_DATA and probe.max_side <= 32):
        return None
    from imgrec.errors import ModelFileError
    from imgrec.models.weights import BACKBONES, available_backbones, fetch_weights
    first = next(iter(BACKBONES.values()))
    try:
        found = available_backbones()
        if found:
            return found[0][0], found[0][1], "found in the Hugging Face cache"
        return first, fetch_weights(first.name), "downloaded"
    except (ModelFileError, ConfigError, ImportError) as e:  # offline, a failed download, timm missing
        notes.append(f"trained from scratch: no pretrained backbone on this machine ({e}); `imgrec weights` "
                     f"says how to add one")
        return None


def _transfer_changes(probe, chosen, put, changes: dict, explicit: set[str]) -> tuple[dict, str]:
    """The settings of a linear probe on ``chosen`` = (backbone, weights path, origin), and the reason."""
    bb, path, origin = chosen
    put("name", bb.model)
    put("weights", str(path))
    put("probe", True)
    put("epochs", 0)  # the probe is the whole training: fine-tuning costs 10-20x for less on new photos
    put("image_size", TRANSFER_SIZE)
    put("tta_flip", True)
    put("amp", "auto")
    per_class = probe.n_train / max(1, probe.num_classes)
    size = f"{changes['image_size']} px" if "image_size" in changes else "the size given"
    few = (f"; {per_class:.0f} images per class: few enough that the probe is all they can teach"
           if per_class < 25 else "")
    reason = (f"{probe.describe()}: transfer from ImageNet {bb.name} (weights {origin}: {path}; licence "
              f"{bb.licence}), a linear probe on its frozen features at {size}{few}")
    return changes, reason


def _data_image_size(probe, current: dict, explicit: set[str], put) -> int:
    """The training image size: the user's, a pack's or tensor's own, else 32 px for small images, 64 above."""
    if "image_size" in explicit or probe.kind in ("pack", "tensor"):
        size = current.get("image_size") or probe.median_side  # a pack or a tensor holds its images at one size
    else:
        size = 32 if probe.median_side <= 40 else 64
        put("image_size", size)
    return int(size or 32)


def _data_batch(n: int, current: dict, explicit: set[str]) -> int:
    if "batch_size" in explicit:
        return current["batch_size"]
    base_batch = int(current.get("batch_size") or 512)
    if n < LARGE_DATA:
        base_batch = min(base_batch, SMALL_MAX_BATCH)  # tens of steps an epoch even at the compute bound
    return max(MIN_BATCH, min(base_batch, _pow2_floor(n / 25)))


def _data_model_and_lr(n: int, batch: int, current: dict, explicit: set[str], changes: dict, put) -> None:
    """The architecture, optimizer and learning rate for data trained from scratch: the machine's network (its
    small-data variant) with SGD's learning rate scaled to the batch."""
    if n < LARGE_DATA and "name" not in explicit and current.get("name") in SMALL_DATA_MODELS:
        put("name", SMALL_DATA_MODELS[current["name"]])
    if n < LARGE_DATA and current.get("optimizer") == "muon":
        # the small-data settings (batch, lr per batch, epochs) were measured with SGD (benchmarks/defaults.py)
        put("optimizer", "sgd")
    if "lr" not in explicit and (changes.get("optimizer") or current.get("optimizer")) == "sgd":
        put("lr", round(min(float(current.get("lr") or 0.4), SMALL_LR_PER_32 * batch / 32), 6))


def _data_epochs(n: int, size: int, steps_per_epoch: int, current: dict, explicit: set[str]) -> int:
    """Epochs: enough images seen and optimizer steps for small data, bounded in compute (COST_BOUND)."""
    if "epochs" in explicit:
        return int(current["epochs"])
    if n >= LARGE_DATA:
        return int(current.get("epochs") or 10)
    epochs = min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(SEEN_TARGET / n)))
    # the tiniest folders: a batch cannot shrink below MIN_BATCH (BatchNorm statistics), so more epochs
    epochs = max(epochs, min(MAX_TINY_EPOCHS, math.ceil(MIN_STEPS / steps_per_epoch)))
    return max(4, min(epochs, COST_BOUND // max(1, n * size * size)))

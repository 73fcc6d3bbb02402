"""timm's architectures as imgrec models: ``--model timm:NAME`` (timm is installed with imgrec).

Any name timm knows works, with a pretrained tag or without (``timm:resnet18``, ``timm:resnet18.tv_in1k``,
``timm:vit_tiny_patch16_224``). The registry hands every ``timm:`` name to :func:`timm_model_info`
(``register_prefix``), so timm is imported only when such a model is used, and the rest of imgrec runs without it.

timm models already have imgrec's head API (imgrec took it from timm; see models/base.py): ``forward_features``,
``forward_head(x, pre_logits)``, ``get_classifier``, ``reset_classifier`` and ``num_features``.

How the arguments map:

- ``num_classes``, ``in_chans`` go to ``timm.create_model`` as they are; extra ``model.kwargs`` pass through
  when they are plain architecture arguments (:data:`TIMM_ARCH_KWARGS`: ``drop_rate``, ``depth``,
  ``embed_dim`` ..., numbers, strings, booleans or short lists of them). Anything else is refused in one line
  naming the key, before timm sees it: ``model.kwargs`` comes from files people hand each other (``model.json``,
  a ``--config`` file, a resumed ``config.yaml``), and timm's own keywords reach far beyond the architecture —
  ``checkpoint_path`` makes it load a file right after building (with ``torch.load(weights_only=False)``
  before timm 1.0.26), ``pretrained_cfg``/``pretrained_cfg_overlay`` name files and URLs to fetch.
- ``image_size`` goes to the models that are built for one input size (timm's ``fixed_input_size``: ViTs,
  Swin, ...) as ``img_size``. When the default patch would leave a grid under ``MIN_GRID`` patches per side
  (16 px patches on 28 px Fashion-MNIST: 1 x 1), ``patch_size`` shrinks as for imgrec's own ViTs
  (``zoo.vit_patch_size``: 4 px at 28-32 px). CNNs take any size and are built as timm builds them (their
  ImageNet stems reduce 28 px to a 1 x 1 map: they run, but ``--image-size 64`` or more suits them better).
- Weights: ``--pretrained`` loads timm's own (its hub download) and ``--weights FILE`` a timm state dict
  (offline, that is the way to start from a local copy of timm's weights). Both go through timm's loader on a twin of the model,
  built for the source's classifier, so timm's own conversions apply (position-embedding and patch-embedding
  resampling, input-channel adaptation); then ``pretrained.transfer_state_dict`` copies it over and reports,
  as for built-in models (the classifier re-initialised for the new classes when its shape differs).
  A ``--weights`` file is read by ``safeio.load_weights`` first: safetensors or weights-only pickles, no code.
"""
from __future__ import annotations

import difflib
import functools
import os
from typing import Any

import torch
import torch.nn as nn

from imgrec.errors import ConfigError, ModelFileError
from imgrec.models.registry import ModelInfo, register_prefix

__all__ = ["TIMM_PREFIX", "INSTALL_HINT", "MIN_GRID", "TIMM_ARCH_KWARGS", "check_timm_kwargs", "timm_model_info",
           "create_timm_model", "timm_source_state", "timm_catalog_rows"]

TIMM_PREFIX = "timm"
INSTALL_HINT = "pip install timm"
MIN_GRID = 7  # patches per side below which a ViT gets smaller patches (zoo.vit_patch_size keeps 7-14)

# The keyword arguments of timm's builders that only shape the architecture (sizes, depths, dropout rates,
# pooling, token options). An allow-list, not a deny-list: timm.create_model forwards unknown keywords to the
# model's builder and also reads checkpoint_path, pretrained_cfg, pretrained_cfg_overlay, cache_dir … which
# load files or fetch URLs; a new timm release may add more of those, never to this list.
TIMM_ARCH_KWARGS = frozenset({
    "num_classes", "in_chans", "img_size", "patch_size", "embed_dim", "depth", "depths", "dims", "num_heads",
    "mlp_ratio", "window_size", "drop_rate", "drop_path_rate", "drop_block_rate", "proj_drop_rate",
    "attn_drop_rate", "pos_drop_rate", "patch_drop_rate", "global_pool", "qkv_bias", "qk_norm", "class_token",
    "no_embed_class", "reg_tokens", "pre_norm", "fc_norm", "dynamic_img_size", "dynamic_img_pad",
    "init_values", "output_stride", "channel_multiplier", "depth_multiplier", "head_hidden_size",
})
_MAX_LIST = 16  # a list argument (depths, dims, img_size as (h, w)) is a handful of numbers


def _plain_value(v: Any) -> bool:
    scalar = (str, int, float, bool, type(None))
    if isinstance(v, scalar):
        return not isinstance(v, str) or len(v) <= 64
    return isinstance(v, (list, tuple)) and len(v) <= _MAX_LIST and all(
        isinstance(x, (int, float, bool)) for x in v)


def check_timm_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """ConfigError naming the first keyword of ``model.kwargs`` that is not a plain architecture argument of
    :data:`TIMM_ARCH_KWARGS` (or whose value is not a number, short string, boolean or short list)."""
    for key, value in kwargs.items():
        if key not in TIMM_ARCH_KWARGS:
            raise ConfigError(f"model.kwargs of timm:{name}: {key!r} is not an architecture argument imgrec passes "
                              f"to timm (arguments that load files, fetch URLs or replace timm's settings are "
                              f"refused; allowed: drop_rate, drop_path_rate, img_size, patch_size, embed_dim, depth, "
                              f"num_heads, mlp_ratio, global_pool … {len(TIMM_ARCH_KWARGS)} in all)")
        if not _plain_value(value):
            raise ConfigError(f"model.kwargs of timm:{name}: {key!r} must be a number, a short string, a boolean "
                              f"or a short list of numbers, got {type(value).__name__}")


# timm modules whose forward_features returns a token sequence N x T x D (ViT-like): imgrec's "vit" family,
# trained without channels_last (it only slows attention down). Every other timm model returns a spatial
# N x C x h x w map and counts as a CNN (Grad-CAM works on it).
TOKEN_MODULES = ("vision_transformer", "vision_transformer_hybrid", "vision_transformer_relpos", "deit", "eva",
                 "beit", "cait", "xcit", "tnt", "convit", "crossvit", "volo", "mlp_mixer", "naflexvit")


def _timm(name: str = ""):
    """The timm package, or the one line that says how to install it."""
    try:
        import timm
        import timm.models
    except ImportError as e:
        what = f"model 'timm:{name}'" if name else "listing timm models"
        raise ConfigError(f"{what} needs timm, which imgrec installs: {INSTALL_HINT} ({e})") from None
    return timm


@functools.lru_cache(maxsize=256)
def timm_model_info(name: str) -> ModelInfo:
    """The :class:`ModelInfo` of ``timm:<name>``; ``ConfigError`` naming close matches for an unknown name."""
    if not name:
        raise ConfigError("'timm:' needs an architecture name, e.g. timm:resnet18 (list them: imgrec models --timm)")
    timm = _timm(name)
    from timm.models import get_pretrained_cfg, is_model_in_modules, split_model_name_tag

    arch, tag = split_model_name_tag(name)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.75)
        hint = f"; did you mean {', '.join('timm:' + c for c in close)}?" if close else ""
        raise ConfigError(f"unknown timm model {name!r}{hint} (list them: imgrec models --timm 'PATTERN*')")
    try:
        cfg = get_pretrained_cfg(name)  # a tag (resnet18.tv_in1k) selects those weights
    except RuntimeError:
        tags = [t.split(".", 1)[1] for t in timm.list_models(arch, pretrained=True)]
        raise ConfigError(f"timm model {arch!r} has no pretrained tag {tag!r}; its tags: "
                          f"{', '.join(tags) or 'none'}") from None
    size = 224
    if cfg is not None and cfg.input_size:
        size = min(512, max(16, int(cfg.input_size[-1])))  # imgrec's size range (registry.create_model)
    has_weights = cfg is not None and bool(cfg.url or cfg.hf_hub_id or cfg.file)
    pretrained = None
    if has_weights:
        pretrained = f"{arch}.{cfg.tag}" if cfg.tag else arch
    family = "vit" if is_model_in_modules(arch, TOKEN_MODULES) else "cnn"
    return ModelInfo(name=f"{TIMM_PREFIX}:{name}", fn=functools.partial(create_timm_model, name),
                     default_image_size=size, pretrained=pretrained, family=family,
                     description=f"timm {arch}" + (f" (weights {pretrained})" if pretrained else ""))


def _build_kwargs(timm, name: str, num_classes: int, in_chans: int, image_size: int,
                  kwargs: dict[str, Any]) -> dict[str, Any]:
    """timm's keyword arguments for this image size: ``img_size`` (and a smaller ``patch_size``) for models
    built for one input size; the caller's own kwargs win."""
    from timm.models import get_pretrained_cfg

    kw = dict(kwargs)
    cfg = get_pretrained_cfg(name)
    if cfg is None or not cfg.fixed_input_size or "img_size" in kw:
        return kw
    kw["img_size"] = image_size
    if "patch_size" in kw:
        return kw
    # The default patch size, from a shape-only build (the meta device allocates and initialises nothing).
    try:
        with torch.device("meta"):
            probe = timm.create_model(name, num_classes=num_classes, in_chans=in_chans, **kw)
    except TypeError:  # a fixed-size model that takes no img_size: build it as timm does
        kw.pop("img_size")
        return kw
    except Exception:  # noqa: BLE001 - a model that cannot be built on meta: keep its patches, timm decides
        return kw
    patch = getattr(getattr(probe, "patch_embed", None), "patch_size", None)
    if isinstance(patch, (tuple, list)):
        patch = patch[0]
    if isinstance(patch, int) and image_size // patch < MIN_GRID:
        from imgrec.models.zoo import vit_patch_size
        kw["patch_size"] = min(patch, vit_patch_size(image_size))
    return kw


def create_timm_model(name: str, num_classes: int = 10, in_chans: int = 3, image_size: int = 224,
                      **kwargs) -> nn.Module:
    """``timm.create_model(name, ...)`` with random weights for ``image_size`` px (see the module doc)."""
    check_timm_kwargs(name, kwargs)  # before timm is imported or called: nothing of a refused file is read
    timm = _timm(name)
    kw = _build_kwargs(timm, name, num_classes, in_chans, image_size, kwargs)
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kw)
    except (TypeError, ValueError, AssertionError, RuntimeError, KeyError) as e:  # bad kwargs or geometry
        raise ConfigError(f"timm cannot build {name!r} for {image_size} px, {in_chans} channel(s): "
                          f"{_one_line(e)}") from None
    # How it was built, so that a twin can be built to load weights into (timm_source_state). A plain
    # attribute: not part of the state dict, and model.json keeps the recipe (name + image size + kwargs).
    model.imgrec_timm = {"name": name, "num_classes": num_classes, "in_chans": in_chans, "kwargs": kw}
    return model


def timm_source_state(model: nn.Module, *, pretrained: bool = False, weights_file=None
                      ) -> tuple[dict[str, torch.Tensor], str]:
    """(state dict in ``model``'s key names and shapes but the source's classifier, source name) for timm's
    pretrained weights (``pretrained=True``) or a timm state dict file (``weights_file``).

    timm loads them into a twin of ``model`` built for the source's number of classes, so its own
    conversions run (the architecture's checkpoint filter: position and patch embeddings resampled to this
    size; the first convolution adapted to ``in_chans``) and a file of another architecture fails there.
    """
    args = getattr(model, "imgrec_timm", None)
    if args is None:
        raise ConfigError(f"{type(model).__name__} was not built by create_model('timm:...')")
    name = args["name"]
    timm = _timm(name)
    kw = dict(args["kwargs"])
    check_timm_kwargs(name, kw)  # what create_timm_model accepted (a hand-set attribute would be checked here)
    overlay: dict[str, Any] = {}  # imgrec's own: a --weights file's state dict, never one from model.kwargs
    cfg = model.pretrained_cfg
    if weights_file is not None:
        from imgrec.safeio import load_weights
        state = load_weights(weights_file)  # safetensors or a weights-only pickle: nothing in it runs
        # "module." from DistributedDataParallel (timm's own clean_state_dict strips it too)
        state = {k.removeprefix("module."): v for k, v in state.items()}
        classes = _classifier_rows(state, cfg.get("classifier"))
        stem = cfg.get("first_conv")
        stem_w = state.get(f"{stem}.weight") if isinstance(stem, str) else None
        in_size = tuple(cfg.get("input_size") or (3, 224, 224))
        if stem_w is not None and stem_w.ndim == 4 and stem_w.shape[1] in (1, 3):
            in_size = (int(stem_w.shape[1]), *in_size[1:])  # the channels the file was trained on
        overlay.update(state_dict=state, num_classes=classes, input_size=in_size)
        source = str(weights_file)
    elif pretrained:
        info = timm_model_info(name)
        if info.pretrained is None:
            with_weights = ", ".join(timm.list_models(name.split(".")[0] + "*", pretrained=True)[:5])
            raise ConfigError(f"timm model {name!r} has no pretrained weights"
                              + (f" (tagged ones: {with_weights})" if with_weights else "")
                              + "; or load a local file with --weights FILE")
        classes = int(cfg.get("num_classes") or 0)
        source = info.pretrained
        offline_hint = "; offline, pass --weights FILE (a timm state dict: .safetensors or weights-only .pth)"
        if os.environ.get("IMGREC_OFFLINE"):
            # huggingface_hub retries for most of a minute before giving up without a network
            raise ModelFileError(f"{source}: IMGREC_OFFLINE is set, so timm's weights are not downloaded"
                                 f"{offline_hint}")
    else:
        raise ConfigError("timm_source_state needs pretrained=True or a weights file")
    try:
        twin = timm.create_model(name, pretrained=True, num_classes=classes, in_chans=args["in_chans"],
                                 pretrained_cfg_overlay=overlay, **kw)
    except Exception as e:  # noqa: BLE001 - download, file and shape errors, in timm's or torch's words
        if weights_file is not None:
            raise ModelFileError(f"{source}: does not fit timm:{name}; is it a state dict for this architecture? "
                                 f"({_one_line(e)})") from None
        raise ModelFileError(f"{source}: timm's pretrained weights could not be loaded ({_one_line(e)})"
                             f"{offline_hint}") from None
    return twin.state_dict(), source


def _classifier_rows(state: dict[str, torch.Tensor], classifier) -> int:
    """The number of classes of a state dict's classifier (0: the file has none, e.g. saved headless)."""
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    for n in names:
        w = state.get(f"{n}.weight")
        if w is not None and w.ndim >= 1:
            return int(w.shape[0])
    return 0


def _one_line(e: BaseException) -> str:
    """An exception as one short line (torch's load_state_dict errors span many tab-indented lines)."""
    text = " ".join(part.strip() for part in str(e).splitlines() if part.strip()) or type(e).__name__
    return text[:300] + (" ..." if len(text) > 300 else "")


# -- listing -----------------------------------------------------------------------------------------
def timm_catalog_rows() -> list[dict]:
    """Every timm architecture: ``[{"name": "timm:<arch>", "default_image_size", "family", "pretrained":
    [tags]}]`` sorted by name (the cached catalogue behind ``imgrec models --timm``)."""
    timm = _timm()
    from timm.models import get_pretrained_cfg, is_model_in_modules

    tags: dict[str, list[str]] = {}
    for full in timm.list_models(pretrained=True):
        arch, _, tag = full.partition(".")
        tags.setdefault(arch, []).append(tag)
    rows = []
    for arch in timm.list_models():
        cfg = get_pretrained_cfg(arch)
        size = int(cfg.input_size[-1]) if cfg is not None and cfg.input_size else 224
        arch_tags = sorted(tags.get(arch, []))
        if cfg is not None and cfg.tag in arch_tags:  # the default first: what --pretrained loads
            arch_tags.insert(0, arch_tags.pop(arch_tags.index(cfg.tag)))
        rows.append({"name": f"{TIMM_PREFIX}:{arch}", "default_image_size": size,
                     "family": "vit" if is_model_in_modules(arch, TOKEN_MODULES) else "cnn",
                     "pretrained": arch_tags})
    return rows


register_prefix(TIMM_PREFIX, timm_model_info)

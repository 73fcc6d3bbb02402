"""Transfer learning: load ImageNet (or any local) weights into a registered model, and freeze it.

``load_pretrained`` takes torchvision's ImageNet weights (``pretrained=True``) or a local state dict
(``weights_file``: safetensors, or a ``.pt``/``.pth`` read with ``torch.load(weights_only=True)``,
with torchvision's key names or ours) and copies every tensor that fits. The rules:

- the classifier is loaded only when its shape matches; otherwise it keeps its fresh
  initialisation for the new classes (the usual fine-tuning case);
- a first convolution with another number of input channels is adapted: RGB kernels summed for
  1 channel (a grey image x through the summed kernel gives what the RGB kernel gives for
  (x, x, x)), a 1-channel kernel repeated and divided by 3 for RGB;
- ViT position embeddings are interpolated (bicubic) to this model's patch grid;
- weights of parts that depend on the image size (``model.adapted_parts``: small-image stems, ViT
  patch embeddings, the ImageNet MLP classifiers) are skipped and reported when they do not fit;
- anything else missing, unexpected or of another shape raises ``ModelFileError`` naming it: it
  means the file belongs to another architecture, and a half-loaded backbone would train silently
  worse (``strict_backbone=False`` skips and reports those too).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from imgrec.errors import ConfigError, ModelFileError, first_line
from imgrec.models.base import classifier_name, count_params, first_conv_name
from imgrec.models.registry import list_models, model_info
from imgrec.safeio import load_weights

__all__ = ["TransferReport", "load_pretrained", "transfer_state_dict", "freeze_backbone"]


@dataclass
class TransferReport:
    """What ``load_pretrained`` did. Keys are this model's state-dict keys (or the file's, for keys
    the model does not have)."""

    source: str                                              # weights enum name or file path
    loaded: list[str] = field(default_factory=list)          # keys copied from the source
    skipped: dict[str, str] = field(default_factory=dict)    # key -> why it was not loaded
    adapted: dict[str, str] = field(default_factory=dict)    # key -> how its tensor was changed to fit

    @property
    def loaded_count(self) -> int:
        return len(self.loaded)

    def summary(self) -> str:
        """One line for logs, e.g. ``loaded 120 tensors from X (2 adapted); skipped 3: head.weight, ...``,
        and ``; classifier re-initialised for the new classes`` when the head was not loaded."""
        line = f"loaded {self.loaded_count} tensors from {self.source}"
        if self.adapted:
            line += f" ({len(self.adapted)} adapted)"
        if self.skipped:
            names = list(self.skipped)
            line += f"; skipped {len(names)}: " + ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
        if any(why.startswith("classifier") for why in self.skipped.values()):
            line += "; classifier re-initialised for the new classes"
        return line

    def __str__(self) -> str:  # ``imgrec train`` prints the report: the one line, not every key
        return self.summary()


def load_pretrained(model: nn.Module, model_name: str, *, pretrained: bool = False,
                    weights_file: str | os.PathLike | None = None, strict_backbone: bool = True) -> TransferReport:
    """Load torchvision's ImageNet weights (``pretrained=True``) or ``weights_file`` into ``model``.

    Args:
        model: a model from ``create_model(model_name, ...)``; changed in place.
        model_name: its registry name (selects torchvision's weights for ``pretrained=True``).
        pretrained: download (or take from torch's hub cache) torchvision's ImageNet weights.
        weights_file: a local state dict instead: safetensors, or a plain ``.pt``/``.pth`` state dict.
        strict_backbone: raise on tensors that do not fit outside the size-dependent parts; when
            false, skip and report them.

    Returns:
        a :class:`TransferReport`. Raises ``ModelFileError`` for unreadable, unsafe or
        non-matching weights (and when the download fails), ``ConfigError`` for bad arguments.
    """
    if pretrained and weights_file is not None:
        raise ConfigError("give either pretrained=True or a weights file, not both")
    if getattr(model, "imgrec_timm", None) is not None and (pretrained or weights_file is not None):
        # timm models: timm's own download and conversions (see timm_models.py), then the same transfer
        from imgrec.models.timm_models import timm_source_state
        state, source = timm_source_state(model, pretrained=pretrained, weights_file=weights_file)
        return transfer_state_dict(model, state, source=source, model_name=model_name,
                                   strict_backbone=strict_backbone)
    if pretrained:
        weights_name = model_info(model_name).pretrained
        if weights_name is None:
            with_weights = [n for n in list_models() if model_info(n).pretrained]
            raise ConfigError(f"model {model_name!r} has no pretrained ImageNet weights; models with "
                              f"them: {', '.join(with_weights)} (or load a local file with --weights FILE)")
        state, source = download_state_dict(weights_name), weights_name
    elif weights_file is not None:
        state, source = load_weights(weights_file), str(weights_file)
    else:
        raise ConfigError("load_pretrained needs pretrained=True or a weights file")
    return transfer_state_dict(model, state, source=source, model_name=model_name, strict_backbone=strict_backbone)


def download_state_dict(weights_name: str) -> dict[str, torch.Tensor]:
    """torchvision's state dict for e.g. ``"ResNet18_Weights.IMAGENET1K_V1"``: downloaded once, then
    read from torch's hub cache (``$TORCH_HOME/hub/checkpoints``), hash-checked, never unpickling code."""
    import torchvision

    weights = torchvision.models.get_weight(weights_name)
    try:
        return weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except OSError as e:  # URLError, socket and SSL errors are all OSErrors
        reason = getattr(e, "reason", None) or e.strerror or e
        raise ModelFileError(f"{weights_name}: the ImageNet weights could not be downloaded ({reason}); "
                             f"to load a local copy instead, pass --weights FILE (.pth or .safetensors)") from None
    except Exception as e:  # noqa: BLE001 - a corrupt cache or a failed hash check, in torch's words
        raise ModelFileError(f"{weights_name}: the downloaded weights could not be read ({first_line(e)}); "
                             f"delete the cached file under {torch.hub.get_dir()}/checkpoints and retry, "
                             f"or pass --weights FILE") from None


def transfer_state_dict(model: nn.Module, state: dict[str, torch.Tensor], *, source: str,
                        model_name: str | None = None, strict_backbone: bool = True) -> TransferReport:
    """Copy the tensors of ``state`` that fit into ``model`` by the rules in the module docstring."""
    own = model.state_dict()
    state = _to_own_keys(model, state, own)
    stem = (first_conv_name(model) or "<none>") + ".weight"
    report = TransferReport(source)
    misfits = _Misfits(report, classifier_name(model) + ".", getattr(model, "adapted_parts", {}))
    new_state = dict(own)
    for key, target in own.items():
        if key not in state:
            misfits.note(key, "missing from the weights",
                         classifier="classifier: not in the weights, initialised for the new classes",
                         part=lambda why: f"not in the weights ({why})")
            continue
        value = _adapted(key, state[key], target, stem, report)
        if value.shape != target.shape:
            shapes = f"{tuple(state[key].shape)} in the weights vs {tuple(target.shape)} here"
            report.adapted.pop(key, None)
            misfits.note(key, shapes, classifier=f"classifier {shapes}: replaced for the new classes",
                         part=lambda why: f"{shapes}: {why}")
            continue
        new_state[key] = value.to(dtype=target.dtype)
        report.loaded.append(key)
    for key in state:
        if key not in own:
            misfits.note(key, "not in this model", part=lambda why: f"not in this model ({why})")
    misfits.settle(source, model_name or type(model).__name__, strict_backbone)
    model.load_state_dict(new_state, strict=True)
    return report


class _Misfits:
    """The keys of a transfer that do not fit: skipped with a reason where that is expected (the classifier,
    replaced for the new classes; a part the model adapted, ``adapted_parts``), else problems."""

    def __init__(self, report: TransferReport, head: str, parts: dict[str, str]):
        self.report, self.head, self.parts = report, head, parts
        self.problems: dict[str, str] = {}  # key -> what is wrong with it

    def note(self, key: str, problem: str, *, classifier: str | None = None, part: Callable[[str], str]) -> None:
        """``classifier``: the reason when the key is the classifier's (None: that is no excuse here);
        ``part``: the reason, from the part's own, when it is an adapted part's."""
        why = next((why for prefix, why in self.parts.items() if key.startswith(prefix)), None)
        if classifier is not None and key.startswith(self.head):
            self.report.skipped[key] = classifier
        elif why is not None:
            self.report.skipped[key] = part(why)
        else:
            self.problems[key] = problem

    def settle(self, source: str, label: str, strict_backbone: bool) -> None:
        """ModelFileError when nothing fits, or when anything outside the classifier does not and
        ``strict_backbone``; otherwise the problems become skipped keys."""
        problems = self.problems
        if not self.report.loaded:
            example = next(iter(problems.items()), ("", "the weights are empty"))
            raise ModelFileError(f"{source}: no weights fit {label} (e.g. {' '.join(example).strip()}); "
                                 f"is it a state dict for this architecture?")
        if problems:
            if strict_backbone:
                shown = "; ".join(f"{k}: {v}" for k, v in list(problems.items())[:3])
                if len(problems) > 3:
                    shown += f"; and {len(problems) - 3} more"
                raise ModelFileError(f"{source}: weights do not fit {label}: {shown}")
            for key, what in problems.items():
                self.report.skipped[key] = f"{what} (skipped: strict_backbone=False)"


def _adapted(key: str, value: torch.Tensor, target: torch.Tensor, stem: str, report: TransferReport) -> torch.Tensor:
    """``value`` made to fit ``target`` where a rule allows (the stem's input channels, a ViT's position
    embedding grid), noted in ``report.adapted``; otherwise as it was."""
    if key == stem and value.ndim == 4 and value.shape[1] != target.shape[1]:
        before = value.shape[1]
        value = _adapt_input_channels(value, target.shape[1])
        if value.shape[1] == target.shape[1]:
            report.adapted[key] = f"input channels {before} -> {target.shape[1]}"
    if key.endswith("pos_embedding") and value.shape != target.shape:
        resized = _resize_pos_embedding(value, target.shape)
        if resized is not None:
            report.adapted[key] = f"position embedding grid {_grid(value)} -> {_grid(target)}"
            value = resized
    return value


def freeze_backbone(model: nn.Module) -> int:
    """Make only the classifier trainable (linear probing / the first phase of fine-tuning).

    Only ``requires_grad`` changes: BatchNorm layers still update their running statistics when the
    model is in ``train()`` mode, which adapts the normalisation to the new data (e.g. grey digits
    instead of ImageNet photos) at no cost. A caller that wants the features fully fixed puts the
    BatchNorm layers in ``eval()`` after each ``model.train()``. Returns the trainable parameter count.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.get_classifier().parameters():
        p.requires_grad_(True)
    return count_params(model, trainable_only=True)


# ----------------------------------------------------------------------------------------------
def _to_own_keys(model: nn.Module, state: dict[str, torch.Tensor], own: dict) -> dict[str, torch.Tensor]:
    """Rename torchvision keys to ours when that matches more of the model than the names as given.

    A file saved from our own model already has our names; one saved from a torchvision model (or
    downloaded) has torchvision's. Counting which naming matches more keys tells them apart.
    """
    prefixes = getattr(model, "source_prefixes", ())
    if not prefixes:
        return state
    renamed = {_rename(k, prefixes): v for k, v in state.items()}
    if sum(k in own for k in renamed) > sum(k in own for k in state):
        return renamed
    return state


def _rename(key: str, prefixes) -> str:
    for theirs, ours in prefixes:
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return key


def _adapt_input_channels(weight: torch.Tensor, in_chans: int) -> torch.Tensor:
    """RGB kernels -> 1 channel by summing; 1 channel -> RGB by repeating / 3 (timm's adapt_input_conv)."""
    have = weight.shape[1]
    if have == 3 and in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    if have == 1 and in_chans == 3:
        return weight.repeat(1, 3, 1, 1) / 3
    return weight


def _grid(pos: torch.Tensor) -> str:
    side = math.isqrt(pos.shape[1] - 1)
    return f"{side}x{side}"


def _resize_pos_embedding(pos: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
    """1 x (1 + g*g) x D -> 1 x (1 + G*G) x D: the class token's embedding kept, the grid bicubic-resized."""
    if pos.ndim != 3 or len(shape) != 3 or pos.shape[0] != 1 or pos.shape[2] != shape[2]:
        return None
    old, new = math.isqrt(pos.shape[1] - 1), math.isqrt(shape[1] - 1)
    if old * old != pos.shape[1] - 1 or new * new != shape[1] - 1:
        return None
    cls, grid = pos[:, :1], pos[:, 1:]
    grid = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, -1).to(pos.dtype)
    return torch.cat([cls, grid], dim=1)
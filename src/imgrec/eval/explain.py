"""Why did the model say that? Grad-CAM heat maps, and the first layers of the network made visible.

``explain(clf, image)`` returns plain numpy arrays (no plotting here), so the CLI can draw them with
matplotlib (:func:`imgrec.eval.plots.explain_figure`) and a web page can draw the heat map itself.

Grad-CAM (Selvaraju et al. 2017): weight each channel of the last spatial feature map by the mean
gradient of the target class's logit with respect to it, sum, keep the positive part, upsample to the
input size, scale from its minimum to its maximum. For CNNs that map is ``forward_features(x)`` (the head API every imgrec model shares), so no
per-architecture layer names are needed; where that map is smaller than 3×3, or shows no positive evidence,
the deepest wider map of the forward pass that does is used instead. A ViT's ``forward_features`` returns tokens after the final
LayerNorm, and its head reads only the class token, so the gradient reaching the patch tokens there is
exactly zero; we take the patch tokens where the last encoder block reads them instead (the output of its
first LayerNorm, the layer pytorch-grad-cam recommends for ViTs) and fold them back into the patch grid.
For ViTs we also return attention rollout (Abnar & Zuidema 2020): what the class token attends to,
through all layers, which needs no gradient and no target.

The "steps" show what the textbook says a CNN does: a window of input pixels as numbers, the first
convolution's filters, its feature maps, the same maps after the activation and after pooling, and the
classic vertical-edge filter applied to the same image beside the learned filter that behaves most
like it.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from imgrec.errors import ConfigError
from imgrec.safeio import plain

__all__ = ["explain", "resolve_target", "resolve_label", "training_view", "to_json", "grad_cam", "attention_rollout", "heat_mass", "VERTICAL_EDGE"]

# The classic hand-made filter: bright on the left, dark on the right gives a positive response.
VERTICAL_EDGE = np.array([[1, 0, -1], [1, 0, -1], [1, 0, -1]], dtype=np.float32)

# Modules that count as "the activation" and "the pooling" after the first convolution.
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish, nn.ELU, nn.Tanh)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d)
PATCH = 8  # side of the window of input pixels shown as numbers
MIN_CAM_SIDE = 3  # a Grad-CAM map narrower than this says little about where


def resolve_target(classes: list[str], target: str | int | None) -> int | None:
    """A class index from a label (exact, then case-insensitive) or an index; ConfigError otherwise."""
    if target is None:
        return None
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        idx = int(target)
    elif str(target) in classes:
        return classes.index(str(target))
    else:
        lowered = [c.lower() for c in classes]
        t = str(target).strip()
        if t.lower() in lowered:
            return lowered.index(t.lower())
        if not t.lstrip("-").isdigit():
            shown = ", ".join(classes[:20]) + (" …" if len(classes) > 20 else "")
            raise ConfigError(f"unknown target class {target!r}; choose one of: {shown}")
        idx = int(t)
    if not 0 <= idx < len(classes):
        raise ConfigError(f"target class index {idx} is outside 0..{len(classes) - 1}")
    return idx


# -- Grad-CAM --------------------------------------------------------------------------------------
def _vit_parts(model: nn.Module) -> tuple[nn.Module, nn.Module, str]:
    """(the module with the ViT's patch geometry, the last encoder block, its qualified name)."""
    geometry = next((m for m in model.modules() if hasattr(m, "grid_size") and hasattr(m, "num_prefix_tokens")), None)
    # torchvision's EncoderBlock: ln_1 -> self_attention -> ... (duck-typed so any such block works)
    blocks = [(n, m) for n, m in model.named_modules() if hasattr(m, "ln_1") and hasattr(m, "self_attention")]
    if geometry is None or not blocks:
        raise ConfigError(f"{type(model).__name__}: a ViT needs grid_size/num_prefix_tokens and encoder blocks "
                          "for Grad-CAM")
    name, block = blocks[-1]
    return geometry, block, f"{name}.ln_1" if name else "ln_1"


def _cnn_candidates(model: nn.Module, x: torch.Tensor) -> tuple[list[tuple[torch.Tensor, str]], torch.Tensor]:
    """(maps that Grad-CAM may explain, best first, with their names; logits) for a CNN.

    First ``forward_features(x)`` (the last spatial map), when it is at least ``MIN_CAM_SIDE`` cells wide.
    Some small-image networks pool that map down to 1×1 or 2×2 (FastNet at 28 px ends at 1×1, AlexNet at
    2×2), where Grad-CAM can only say "the whole image"; then, and as fallbacks when a map holds no positive
    evidence for the class, every other map at least ``MIN_CAM_SIDE`` wide that the forward pass went
    through, deepest first (a block's output comes after its layers', so a residual stage's sum comes
    before the branch inside it).
    """
    seen: dict[int, tuple[str, torch.Tensor]] = {}  # in the order the maps were last produced

    def record(name: str):
        def hook(module, inputs, output):
            if isinstance(output, torch.Tensor) and output.dim() == 4 and output.requires_grad \
                    and min(output.shape[-2:]) >= MIN_CAM_SIDE:
                # an in-place activation or a block returning its last layer's tensor hands back the same
                # tensor: it is named after the last module that produced it
                seen.pop(id(output), None)
                seen[id(output)] = (name, output)
        return hook

    handles = [m.register_forward_hook(record(n)) for n, m in model.named_modules() if n]
    try:
        feats = model.forward_features(x)
    finally:
        for h in handles:
            h.remove()
    logits = model.forward_head(feats)
    small = min(feats.shape[-2:]) < MIN_CAM_SIDE
    why = f"forward_features is only {feats.shape[-2]}×{feats.shape[-1]}" if small else \
        "no positive evidence in forward_features"
    out = [] if small else [(feats, "forward_features")]
    out += [(t, f"{name} ({why})") for name, t in reversed(list(seen.values())) if t is not feats]
    return out, logits


def _cam(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Grad-CAM of one map: channels (C×h×w) weighted by their mean gradient, summed, positive part."""
    weights = g.mean(dim=(1, 2))
    return torch.relu((weights[:, None, None] * a).sum(0))


def grad_cam(model: nn.Module, x: torch.Tensor, target: int | None, family: str = "cnn"
             ) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Grad-CAM for one normalised image ``x`` (1×C×H×W).

    Returns (heat map H×W in 0..1 at the input size, the logits of this un-augmented forward pass, the
    layer's name). ``target`` None means the arg-max class of that pass. Gradients are taken with
    ``torch.autograd.grad`` on the activations only, so no ``.grad`` is left on the model's parameters
    (the model may be serving other requests). A CNN's map comes from the first of its candidate layers
    (:func:`_cnn_candidates`) that shows positive evidence somewhere more than elsewhere; when none does the
    map is all zero.
    """
    h, w = x.shape[-2:]
    x = x.detach().clone().requires_grad_(True)  # a graph exists even if every parameter is frozen
    geometry = None
    with torch.enable_grad():
        if family == "vit":
            geometry, block, layer = _vit_parts(model)
            store: dict[str, torch.Tensor] = {}
            handle = block.ln_1.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
            try:
                logits = model(x)
            finally:
                handle.remove()
            candidates = [(store["a"], layer)]
        else:
            candidates, logits = _cnn_candidates(model, x)
        t = int(logits[0].argmax()) if target is None else int(target)
        grads = torch.autograd.grad(logits[0, t], [a for a, _ in candidates], allow_unused=True) \
            if candidates else []
    cam, layer = None, candidates[0][1] if candidates else "none"
    for (acts, name), grad in zip(candidates, grads):
        if grad is None:  # a map the target's logit does not depend on
            continue
        a, g = acts.detach()[0].float(), grad[0].float()
        if geometry is not None:
            # tokens T×D → drop the class token(s) → D×grid×grid, like a CNN feature map
            n, grid = int(geometry.num_prefix_tokens), int(geometry.grid_size)
            a = a[n:].T.reshape(-1, grid, grid)
            g = g[n:].T.reshape(-1, grid, grid)
        c = _cam(a, g)
        if cam is None or float(c.max()) > float(c.min()):
            cam, layer = c, name
            if float(c.max()) > float(c.min()):
                break
    if cam is None:
        cam = torch.zeros(h, w)
    cam = _to_input_size(cam, h, w, geometry)
    # Scaled from its minimum to its maximum, as the Grad-CAM authors' code does: the map says where
    # relative to the rest of this image. Without subtracting the minimum a ViT's map is a near-constant
    # 0.9-1.0 (every token shares a component after LayerNorm) that shows nothing.
    lo, hi = float(cam.min()), float(cam.max())
    cam = (cam - lo) / (hi - lo) if hi > lo else torch.zeros_like(cam)
    return cam, logits.detach()[0].float(), layer


def _to_input_size(cam: torch.Tensor, h: int, w: int, vit_geometry: Any = None) -> torch.Tensor:
    """Bilinear upsampling of a feature-grid map to the input size.

    A ViT's grid covers the input zero-padded to a multiple of the patch size, so it is upsampled to the
    padded size and the padding cut off again.
    """
    pad = (0, 0, 0, 0)
    if vit_geometry is not None and hasattr(vit_geometry, "padding"):
        pad = tuple(int(p) for p in vit_geometry.padding)  # left, right, top, bottom
    size = (h + pad[2] + pad[3], w + pad[0] + pad[1])
    up = F.interpolate(cam[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    return up[pad[2]:pad[2] + h, pad[0]:pad[0] + w].clamp_min(0)


def attention_rollout(model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """ViT attention rollout: the class token's attention to each patch through all layers (grid×grid).

    torchvision's encoder blocks call their attention with ``need_weights=False``; a forward pre-hook
    flips that to True for this one pass so the weights come back, without copying the block's code.
    """
    geometry = next((m for m in model.modules() if hasattr(m, "grid_size") and hasattr(m, "num_prefix_tokens")), None)
    attns = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    if geometry is None or not attns:
        return None
    weights: list[torch.Tensor] = []

    def pre(module, args, kwargs):
        return args, {**kwargs, "need_weights": True, "average_attn_weights": True}

    def post(module, args, kwargs, output):
        weights.append(output[1].detach()[0].float())  # T×T, averaged over heads

    handles = [h for m in attns for h in (m.register_forward_pre_hook(pre, with_kwargs=True),
                                          m.register_forward_hook(post, with_kwargs=True))]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    if not weights:
        return None
    t = weights[0].shape[0]
    rollout = torch.eye(t)
    for wgt in weights:
        # the residual connection: half the signal skips attention (Abnar & Zuidema's 0.5 I + 0.5 A)
        a = 0.5 * wgt + 0.5 * torch.eye(t)
        rollout = (a / a.sum(-1, keepdim=True)) @ rollout
    n, grid = int(geometry.num_prefix_tokens), int(geometry.grid_size)
    return rollout[0, n:].reshape(grid, grid)


# -- the first layers, step by step ---------------------------------------------------------------
class _FirstLayers:
    """Forward hooks that record the first convolution's output, then the first activation and the first
    pooling applied to it, in execution order; recording stops at the next convolution or when the
    tensors stop being image-shaped (a ViT's tokens). Outputs are cloned because in-place ReLUs would
    otherwise overwrite the recorded convolution output."""

    def __init__(self, model: nn.Module):
        self.first_conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
        self.records: dict[str, tuple[str, nn.Module, torch.Tensor]] = {}  # step -> (name, module, output)
        self.done = self.first_conv is None
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in model.named_modules()
                        if not list(m.children())]

    def _hook(self, name: str):
        def hook(module, inputs, output):
            if self.done or not isinstance(output, torch.Tensor):
                return
            if "conv" not in self.records:
                if module is self.first_conv:
                    self.records["conv"] = (name, module, output.detach().float().clone()[0])
                return
            if output.dim() != 4 or isinstance(module, nn.Conv2d):
                self.done = True
            elif isinstance(module, _ACTIVATIONS) and "activation" not in self.records:
                self.records["activation"] = (name, module, output.detach().float().clone()[0])
            elif isinstance(module, _POOLS):
                self.records["pool"] = (name, module, output.detach().float().clone()[0])
                self.done = True
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _busiest_window(gray: np.ndarray, k: int) -> tuple[int, int]:
    """Top-left corner of the k×k window with the largest pixel variance: on a dark-background image the
    literal corner is all zeros, and a window across an edge shows what an edge filter responds to."""
    h, w = gray.shape
    k = min(k, h, w)
    g = torch.from_numpy(gray.astype(np.float64))[None, None]
    mean = F.avg_pool2d(g, k, stride=1)
    var = F.avg_pool2d(g * g, k, stride=1) - mean * mean
    r, c = divmod(int(var[0, 0].argmax()), var.shape[-1])
    return r, c


def _recorded_or(recorder: _FirstLayers, step: str, out: dict, illustrate: Callable[[], torch.Tensor],
                 what: str) -> torch.Tensor:
    """The network's own output of ``step`` ("activation", "pool") when it recorded one, else ``illustrate()``
    (``what``, for illustration only); ``out`` gets its ``<step>_layer`` (None when illustrated) and
    ``<step>_note``."""
    if step in recorder.records:
        out[f"{step}_layer"], module, value = recorder.records[step]
        out[f"{step}_note"] = f"{type(module).__name__} ({out[f'{step}_layer']})"
        return value
    out[f"{step}_layer"] = None
    out[f"{step}_note"] = f"{what}, for illustration only"
    return illustrate()


def _steps(recorder: _FirstLayers, image: np.ndarray) -> dict:
    """The arrays for the step-by-step view, from one recorded forward pass over ``image`` (H×W×C uint8)."""
    out: dict[str, Any] = {}
    gray = image.astype(np.float32).mean(axis=2) / 255.0
    r, c = _busiest_window(gray, PATCH)
    out["patch"] = image[r:r + PATCH, c:c + PATCH, :].transpose(2, 0, 1).copy()  # C×k×k uint8
    out["patch_origin"] = (r, c)
    conv = recorder.first_conv
    if conv is None or "conv" not in recorder.records:
        return out
    out["filters"] = conv.weight.detach().float().cpu().numpy()   # O×C×kh×kw
    out["conv_layer"], _, conv_map = recorder.records["conv"]
    out["conv"] = conv_map.cpu().numpy()
    # The network's own activation and pooling when they follow the first convolution; otherwise ReLU and
    # 2×2 max pooling applied for illustration only (a ViT's patch embedding has neither; ResNet's small-image
    # stem has no pooling), and the note says so.
    act = _recorded_or(recorder, "activation", out, lambda: torch.relu(conv_map), "ReLU")
    pooled = _recorded_or(recorder, "pool", out,
                          lambda: F.max_pool2d(act[None], 2)[0] if min(act.shape[-2:]) >= 2 else act,
                          "2×2 max pooling")
    out["activation"], out["pool"] = act.cpu().numpy(), pooled.cpu().numpy()
    # The classic edge filter on the same image (grey, 0..1). The border is padded by repeating the edge
    # pixels, not with zeros: zeros would make a bright image's outline the strongest "edge" in the map.
    padded = F.pad(torch.from_numpy(gray)[None, None], (1, 1, 1, 1), mode="replicate")
    edge = F.conv2d(padded, torch.from_numpy(VERTICAL_EDGE)[None, None])[0, 0]
    out["edge_filter"], out["edge_map"] = VERTICAL_EDGE.copy(), edge.numpy()
    # ...beside the learned filter whose feature map looks most like it (correlation of the maps at the
    # input size, so filters of any size and stride compare), sign included: a learned filter may be the
    # mirror image (right-minus-left) of the classic one.
    maps = F.interpolate(conv_map[None].cpu(), size=edge.shape, mode="bilinear", align_corners=False)[0]
    m = maps.flatten(1)
    m = m - m.mean(1, keepdim=True)
    e = edge.flatten() - edge.mean()
    corr = (m @ e) / (m.norm(dim=1) * e.norm()).clamp_min(1e-12)
    best = int(corr.abs().argmax())
    out["edge_like_channel"], out["edge_like_correlation"] = best, float(corr[best])
    return out


# -- training on this one image ---------------------------------------------------------------------
TOP_CONTRIBUTIONS = 8  # features shown per class in the "features × weights = logits" step
DEFAULT_LR = 0.01      # the learning rate of the illustrative SGD step


def resolve_label(classes: list[str], label: str | int | None, image: Any = None) -> tuple[int | None, str]:
    """(the true class index, where it came from): ``label`` when given (a label or an index, as
    :func:`resolve_target`), else the image's folder name when it names a class (the ImageFolder layout,
    exact then case-insensitive), else (None, "none")."""
    if label is not None:
        try:
            return resolve_target(classes, label), "given"
        except ConfigError as e:
            raise ConfigError(str(e).replace("target class", "label")) from None
    if isinstance(image, (str, os.PathLike)):
        folder = Path(image).parent.name
        lowered = [c.lower() for c in classes]
        if folder in classes:
            return classes.index(folder), "folder"
        if folder and folder.lower() in lowered:
            return lowered.index(folder.lower()), "folder"
    return None, "none"


def _classifier_step(model: nn.Module, x: torch.Tensor, top: int) -> dict[str, Any]:
    """The last fully connected layer as arithmetic: the features entering it (``forward_head(...,
    pre_logits=True)``, after any hidden fully connected layers), its weights and bias, the logits they
    give, and each class's largest products weight × feature."""
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x), pre_logits=True)[0].float().flatten()
        fc = model.get_classifier()
        w, b = fc.weight.detach().float(), fc.bias.detach().float() if fc.bias is not None else None
        bias = b if b is not None else torch.zeros(w.shape[0])
        logits = w @ feats + bias
        products = w * feats[None]                      # K×D: logit_k = Σ_d products[k, d] + bias[k]
    contributions = []
    for k in range(w.shape[0]):
        order = products[k].abs().argsort(descending=True, stable=True)[:top]
        shown = float(products[k, order].sum())
        contributions.append({
            "features": [int(i) for i in order], "values": feats[order].tolist(),
            "weights": w[k, order].tolist(), "products": products[k, order].tolist(),
            "rest": float(logits[k] - bias[k]) - shown, "bias": float(bias[k])})
    return {"features": feats.numpy(), "num_features": int(feats.numel()), "logits": logits.numpy(),
            "bias": bias.numpy(), "contributions": contributions}


def _weight_layers(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The weight matrices and filter banks (parameters of two or more dimensions), in definition order:
    what "a layer" means in a gradient plot. Biases and normalisation scales are left out."""
    return [(n[:-len(".weight")] if n.endswith(".weight") else n, p) for n, p in model.named_parameters()
            if p.dim() >= 2]


def _backward_and_step(model: nn.Module, x: torch.Tensor, label: int, lr: float) -> dict[str, Any]:
    """One backward pass and one SGD step on ``label``'s CrossEntropyLoss, on a deep copy of ``model``.

    The copy stays in eval mode (BatchNorm's running statistics, no dropout), so the loss before and after
    the step is the same function of the weights and the step's effect is the gradient's alone; one image is
    a batch of one, whose own BatchNorm statistics would be meaningless. Plain SGD, w ← w − lr·∂loss/∂w:
    momentum has no effect on a first step.
    """
    import copy

    twin = copy.deepcopy(model).eval()
    for p in twin.parameters():
        p.grad = None
    xg = x.detach().clone().requires_grad_(True)
    y = torch.tensor([label])
    with torch.enable_grad():
        logits = twin(xg).float()
        loss = F.cross_entropy(logits, y)
        loss.backward()
    layers = [{"name": n, "shape": list(p.shape), "grad_norm": float(p.grad.norm()),
               "weight_norm": float(p.detach().norm())} for n, p in _weight_layers(twin) if p.grad is not None]
    frozen = sum(1 for _, p in _weight_layers(twin) if p.grad is None)
    saliency = xg.grad[0].abs().amax(dim=0).float()
    hi = float(saliency.max())
    grad_sq = sum(float((p.grad.float() ** 2).sum()) for p in twin.parameters() if p.grad is not None)
    with torch.no_grad():
        for p in twin.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-lr)
        after = twin(x).float()
    p_before, p_after = torch.softmax(logits.detach()[0], 0), torch.softmax(after[0], 0)
    return {
        "layers": layers, "frozen_layers": frozen,
        "saliency": (saliency / hi if hi > 0 else saliency).cpu().numpy().astype(np.float32),
        "saliency_max": hi,
        "step": {"optimizer": "SGD", "lr": float(lr), "grad_norm": math.sqrt(grad_sq),
                 "loss_before": float(loss.detach()), "loss_after": float(F.cross_entropy(after, y)),
                 "predicted_change": -lr * grad_sq,   # first order: Δloss ≈ −lr·‖g‖²
                 "probability_before": float(p_before[label]), "probability_after": float(p_after[label]),
                 "probabilities_after": p_after.cpu().numpy()},
    }


def _run_training_settings(meta: Any) -> dict[str, Any]:
    train = (getattr(meta, "config", None) or {}).get("train") or {}
    return {k: train.get(k) for k in ("label_smoothing", "optimizer", "lr", "batch_size", "epochs")}


def training_view(clf, x: torch.Tensor, label: int, lr: float = DEFAULT_LR,
                  top: int = TOP_CONTRIBUTIONS) -> dict[str, Any]:
    """What training does with one normalised image ``x`` (1×C×H×W) whose true class is ``label``.

    Returns ``classifier`` (features × weights + bias = logits, top contributions per class), ``probabilities``
    (softmax of those logits, T = 1: what the loss sees), ``loss`` (CrossEntropyLoss = −log p[label]),
    ``smoothed_loss`` (with the run's label smoothing, what training minimised), ``layers`` (gradient norm per
    weight layer, first to last), ``saliency`` (|∂loss/∂pixel|, H×W, 0..1) and ``step`` (one SGD step on a
    copy: loss and the label's probability before and after). ``clf.model`` is not changed.
    """
    model = clf.model
    out = _classifier_step(model, x, top)
    logits = torch.from_numpy(out["logits"])
    probs = torch.softmax(logits.double(), 0)
    settings = _run_training_settings(clf.meta)
    eps = float(settings.get("label_smoothing") or 0.0)
    y = torch.tensor([label])
    back = _backward_and_step(model, x, label, lr)
    return {
        "label_index": int(label), "label": clf.classes[label],
        "classifier": out, "probabilities": probs.float().numpy(),
        "loss": float(-torch.log(probs[label])),
        "smoothed_loss": float(F.cross_entropy(logits.double()[None], y, label_smoothing=eps)),
        "label_smoothing": eps, "run": settings,
        **back,
    }


# -- the public function ---------------------------------------------------------------------------
def explain(clf, image, target: str | int | None = None, steps: bool = True, label: str | int | None = None,
            lr: float = DEFAULT_LR) -> dict[str, Any]:
    """Explain one prediction of a :class:`~imgrec.infer.predictor.Classifier`.

    Args:
        clf: the loaded classifier. image: anything ``clf.load_image`` takes (path, bytes, PIL image, uint8
            array or tensor).
        target: class label or index to explain; default the predicted class.
        steps: also return the first-layer arrays (filters, feature maps, edge filter) and ``training``
            (:func:`training_view`: logits from features × weights, the loss, a backward pass and one SGD
            step on a copy of the model).
        label: the image's true class for the loss (label or index); default its folder name when that
            names a class, else the predicted class (``training["label_source"]`` says which).
        lr: the learning rate of the illustrative SGD step.

    Returns a dict: ``image`` H×W×C uint8 (at the model's input size), ``heatmap`` H×W float32 in 0..1,
    ``method``, ``layer``, ``classes``, ``probabilities`` (K, the same numbers ``predict`` gives, test-time
    flip included), ``predicted``/``predicted_index``/``predicted_probability``, ``target``/``target_index``/
    ``target_probability``; for ViTs ``attention`` (H×W in 0..1, attention rollout); with ``steps`` a
    ``steps`` dict: ``patch`` (C×8×8 uint8, the busiest window of the input) and ``patch_origin`` (row, col);
    ``filters`` (the first convolution's weights, O×C×kh×kw); ``conv``, ``activation``, ``pool`` (O×h×w
    feature maps after that convolution, the activation and the pooling that follow it, with ``*_layer``
    names and ``*_note`` texts; ReLU / 2×2 max pooling for illustration where the network has none there);
    ``edge_filter`` (3×3) and ``edge_map`` (H×W, the filter over the grey input); ``edge_like_channel`` and
    ``edge_like_correlation`` (the learned filter whose map is most like the edge map).
    """
    target_idx = resolve_target(clf.classes, target)
    label_idx, label_source = resolve_label(clf.classes, label, image) if steps else (None, "none")
    x_uint8 = clf.load_image(image)                       # C×H×W uint8 through the safe decoder
    probs = clf.probabilities(x_uint8[None])[0].float()
    pred = int(probs.argmax())
    tgt = pred if target_idx is None else target_idx
    family = _family(clf.name)
    model = clf.model
    # fp32, contiguous: Grad-CAM wants exact gradients, not autocast's bf16 ones
    x = clf.normalize(x_uint8[None]).float().contiguous()
    recorder = _FirstLayers(model) if steps else None
    try:
        heat, _, layer = grad_cam(model, x, tgt, family)
    finally:
        if recorder is not None:
            recorder.remove()
    img = x_uint8.permute(1, 2, 0).cpu().numpy()
    out: dict[str, Any] = {
        "image": img, "heatmap": heat.cpu().numpy().astype(np.float32), "method": "grad-cam", "layer": layer,
        "family": family, "classes": list(clf.classes),
        "probabilities": probs.cpu().numpy(),
        "predicted": clf.classes[pred], "predicted_index": pred, "predicted_probability": float(probs[pred]),
        "target": clf.classes[tgt], "target_index": tgt, "target_probability": float(probs[tgt]),
    }
    if family == "vit":
        _add_attention(out, model, x, img)
    if recorder is not None:  # the pipeline, training included
        out["steps"] = _steps(recorder, img)
        out["training"] = training_view(clf, x, pred if label_idx is None else label_idx, lr)
        out["training"]["label_source"] = "predicted" if label_idx is None else label_source
    return out


def _family(name: str) -> str:
    from imgrec.models import model_info
    try:
        return model_info(name).family
    except ConfigError:
        return "cnn"


def _add_attention(out: dict[str, Any], model, x: torch.Tensor, img: np.ndarray) -> None:
    """A ViT's attention rollout at the input's size, scaled min to max like the Grad-CAM map beside it."""
    roll = attention_rollout(model, x)
    if roll is not None:
        geometry, _, _ = _vit_parts(model)
        roll = _to_input_size(roll.cpu(), img.shape[0], img.shape[1], geometry)
        lo, hi = roll.min(), roll.max()
        out["attention"] = ((roll - lo) / (hi - lo).clamp_min(1e-12)).numpy().astype(np.float32)


def to_json(result: dict[str, Any]) -> Any:
    """``explain``'s result with numpy arrays as nested lists, for ``json.dump`` (notebooks, other tools)."""
    return plain(result)


def heat_mass(heatmap: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """Fraction of a heat map's total mass inside ``box`` = (top, left, height, width); 0 for an empty map."""
    t, l, h, w = box
    total = float(heatmap.sum())
    return float(heatmap[t:t + h, l:l + w].sum()) / total if total > 0 else 0.0



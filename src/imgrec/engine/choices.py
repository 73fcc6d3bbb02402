"""What is chosen on the validation split after training, each stored in ``model.json`` with the next save:
the logit adjustment τ, the temperature T, the "unknown" score and its threshold (with the bank of training
features), a multi-label model's thresholds. The test split is never used to choose any of them."""
from __future__ import annotations

from pathlib import Path

import torch

from imgrec.data.dataset import DataBundle
from imgrec.data.imbalance import TAU_GRID, logit_adjust_entry
from imgrec.modeldir import ModelMeta

__all__ = ["choose_logit_adjust", "choose_temperature", "choose_unknown", "choose_val_thresholds",
           "validation_pass"]


def validation_pass(out: Path, bundle: DataBundle, device: torch.device, amp: str) -> tuple | None:
    """(the Classifier, its ``logits_and_features`` of the validation images for the "unknown" score's layers):
    one forward pass that :func:`choose_temperature` and :func:`choose_unknown` both read (~0.3 s of a 25 s
    default run saved). None for a model without the ``forward_features``/``forward_head`` API."""
    from imgrec.infer.predictor import Classifier
    from imgrec.infer.unknown import unknown_layers
    clf = Classifier.load(out, device=str(device), amp=amp)
    if not (hasattr(clf.model, "forward_features") and hasattr(clf.model, "forward_head")):
        return None
    return clf, clf.logits_and_features(bundle.val.images, 512, unknown_layers(clf, bundle.train.images))


def choose_temperature(out: Path, bundle: DataBundle, meta: ModelMeta, device: torch.device, amp: str,
                       shared: tuple | None = None) -> float:
    """Temperature scaling: the T minimising the validation NLL of ``softmax(logits / T)`` under the prior on
    log T of imgrec.eval.calibration (it matters on a small folder's few dozen images only), for the best weights
    as the model directory predicts them (the same forward pass, flip-TTA and logit adjustment included);
    stored in ``meta.inference["temperature"]`` (written with the next save). The test split is never used to
    fit it. ``shared``: a :func:`validation_pass`, whose logits are used. Returns T."""
    from imgrec.eval.calibration import temperature_entry
    from imgrec.eval.evaluate import EVAL_BATCH_SIZE
    from imgrec.infer.predictor import Classifier
    if shared is not None:
        logits = shared[1][0]
    else:
        clf = Classifier.load(out, device=str(device), amp=amp)
        logits = clf.logits(bundle.val.images, EVAL_BATCH_SIZE)  # raw: Classifier.logits never divides by T
    meta.inference["temperature"] = temperature_entry(logits, bundle.val.labels, "val")
    return float(meta.inference["temperature"]["T"])


MIN_UNKNOWN_VAL = 20  # validation images below which no "unknown" threshold is chosen: its quantile would be noise


def choose_unknown(out: Path, bundle: DataBundle, meta: ModelMeta, device: torch.device, amp: str,
                   accept_rate: float, shared: tuple | None = None) -> float | None:
    """The "unknown" answer: the out-of-distribution score's statistics fitted on the training images (written
    to the model directory), its threshold chosen on the validation split to answer ``accept_rate`` of it;
    stored in ``meta.inference["unknown"]`` (written with the next save), and the bank of training features
    for the nearest-training-images lookup (``meta.inference["neighbours"]``). Returns the threshold, or None
    for a model without the ``forward_features``/``forward_head`` API the features come from (a plain
    ``nn.Module`` registered by hand): it always names one of its classes. ``shared``: a
    :func:`validation_pass` made before the temperature was chosen (which ``meta`` holds now)."""
    from imgrec.infer.predictor import Classifier
    from imgrec.infer.unknown import fit_unknown
    if shared is not None:
        clf, val = shared
        clf.temperature = meta.temperature  # chosen after that pass; the scores read through it
    else:
        clf, val = Classifier.load(out, device=str(device), amp=amp), None
    if not (hasattr(clf.model, "forward_features") and hasattr(clf.model, "forward_head")):
        return None
    neighbours: dict = {}  # the nearest-training-images bank, from the same forward pass
    meta.inference["unknown"] = fit_unknown(clf, out, bundle.train.images, bundle.train.labels, bundle.val.images,
                                            accept_rate=accept_rate, neighbours=neighbours, val=val)
    meta.inference["neighbours"] = neighbours
    return float(meta.inference["unknown"]["threshold"])


def choose_val_thresholds(out: Path, bundle: DataBundle, meta: ModelMeta, device: torch.device, amp: str) -> dict:
    """Multi-label: per-label decision thresholds maximising each label's F1 on the validation split, with
    the best weights as the model directory predicts (same forward pass), stored in ``meta.thresholds``
    (written with the next save). The test split is never used to choose them. Returns validation metrics
    at those thresholds."""
    from imgrec.eval.evaluate import EVAL_BATCH_SIZE
    from imgrec.eval.multilabel import choose_thresholds, summarize_multilabel
    from imgrec.infer.predictor import Classifier
    clf = Classifier.load(out, device=str(device), amp=amp)
    logits = clf.logits(bundle.val.images, EVAL_BATCH_SIZE)
    meta.thresholds = choose_thresholds(torch.sigmoid(logits), bundle.val.labels)
    res = summarize_multilabel(logits, bundle.val.labels, list(bundle.classes), meta.thresholds)
    return {f"val_{k}": res[k] for k in ("map_macro", "map_micro", "f1_macro", "exact_match", "hamming_loss")}


def choose_logit_adjust(out: Path, bundle: DataBundle, meta: ModelMeta, device: torch.device, amp: str) -> float:
    """``--logit-adjust auto``: the τ of TAU_GRID with the best balanced accuracy on the validation split, for
    the best weights as the model directory predicts them; stored in ``meta.inference`` (written with the next
    save). The test split is never used to choose it. Returns τ."""
    from imgrec.eval.evaluate import EVAL_BATCH_SIZE
    from imgrec.eval.metrics import best_logit_adjustment
    from imgrec.infer.predictor import Classifier
    clf = Classifier.load(out, device=str(device), amp=amp)
    clf.logit_bias = None  # the raw logits, whatever model.json holds now
    logits = clf.logits(bundle.val.images, EVAL_BATCH_SIZE)
    entry = logit_adjust_entry(bundle.counts["train"], 1.0)["logit_adjust"]
    tau, score = best_logit_adjustment(logits, bundle.val.labels, entry["prior"], TAU_GRID)
    if tau:
        meta.inference["logit_adjust"] = {**entry, "tau": tau, "chosen": f"validation balanced accuracy {score:.4f}"}
    return tau

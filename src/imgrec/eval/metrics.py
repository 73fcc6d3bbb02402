"""Classification metrics as pure tensor functions (checked against scikit-learn in the tests)."""
from __future__ import annotations

import torch


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """K×K counts; row = true class, column = predicted class."""
    idx = target.long() * num_classes + pred.long()
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def topk_accuracy(logits: torch.Tensor, target: torch.Tensor, k: int) -> float:
    """Fraction of samples whose true class is among the ``k`` highest logits (k is capped at K)."""
    k = min(k, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    return (top == target[:, None]).any(dim=1).float().mean().item()


def per_class_prf(cm: torch.Tensor) -> dict[str, list[float]]:
    """Per-class precision, recall, F1 and support from a confusion matrix (0 where undefined, as sklearn)."""
    cm = cm.double()
    return prf_from_counts(cm.diag(), cm.sum(0), cm.sum(1))


def prf_from_counts(tp: torch.Tensor, pred_n: torch.Tensor, true_n: torch.Tensor) -> dict[str, list[float]]:
    """Precision, recall, F1 and support per class from its true positives, predicted and true counts (float64
    tensors; 0 where undefined, as sklearn)."""
    precision = torch.where(pred_n > 0, tp / pred_n.clamp_min(1), torch.zeros_like(tp))
    recall = torch.where(true_n > 0, tp / true_n.clamp_min(1), torch.zeros_like(tp))
    denom = precision + recall
    f1 = torch.where(denom > 0, 2 * precision * recall / denom.clamp_min(1e-12), torch.zeros_like(tp))
    return {"precision": precision.tolist(), "recall": recall.tolist(), "f1": f1.tolist(),
            "support": true_n.long().tolist()}


def balanced_accuracy(cm: torch.Tensor) -> float:
    """Mean per-class recall over the classes present in the labels (scikit-learn's balanced_accuracy_score):
    the accuracy a balanced test set would show, so a rare class counts as much as a common one."""
    cm = cm.double()
    true_n = cm.sum(1)
    present = true_n > 0
    if not present.any():
        return float("nan")
    return (cm.diag()[present] / true_n[present]).mean().item()


def best_logit_adjustment(logits: torch.Tensor, target: torch.Tensor, prior, taus) -> tuple[float, float]:
    """(τ, balanced accuracy): the τ of ``taus`` whose post-hoc logit adjustment ``logits - τ·log(prior)``
    (Menon et al. 2021) has the highest balanced accuracy on (``logits``, ``target``); ties go to the smaller τ
    (the smaller change to the model's own predictions)."""
    log_prior = torch.log(torch.as_tensor(prior, dtype=torch.float64))
    k = logits.shape[1]
    best = (float("-inf"), 0.0)
    for tau in sorted(taus):
        pred = (logits.double() - tau * log_prior).argmax(1)
        score = balanced_accuracy(confusion_matrix(pred, target, k))
        if score > best[0] + 1e-12:
            best = (score, float(tau))
    return best[1], best[0]


def expected_calibration_error(probs: torch.Tensor, target: torch.Tensor, n_bins: int = 15) -> dict:
    """ECE with equal-width confidence bins (Guo et al. 2017); also returns the per-bin table for a diagram."""
    conf, pred = probs.max(dim=1)
    correct = (pred == target).double()
    conf = conf.double()
    edges = torch.linspace(0, 1, n_bins + 1, dtype=torch.float64)
    # bin i holds confidences in (edges[i], edges[i+1]]; a confidence of exactly 0 goes to bin 0
    b = torch.clamp(torch.bucketize(conf, edges, right=False) - 1, 0, n_bins - 1)
    n = len(conf)
    count = torch.bincount(b, minlength=n_bins).double()
    sum_conf = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, b, conf)
    sum_acc = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, b, correct)
    safe = count.clamp_min(1)
    ece = (torch.abs(sum_acc - sum_conf).sum() / max(n, 1)).item()
    return {"ece": ece, "bins": {"lower": edges[:-1].tolist(), "upper": edges[1:].tolist(), "count": count.long().tolist(),
                                 "confidence": (sum_conf / safe).tolist(), "accuracy": (sum_acc / safe).tolist()}}


def has_topk(top_k: int, num_classes: int) -> bool:
    """Whether top-k accuracy means anything: k below the number of classes (and above 1, which is top-1)."""
    return 1 < int(top_k) < int(num_classes)


def summarize(logits: torch.Tensor, target: torch.Tensor, classes: list[str], top_k: int = 5) -> dict:
    """Everything ``imgrec eval`` reports: top-1/top-k accuracy, per-class P/R/F1/support, confusion matrix.
    ``top{k}`` is None where k is not below the number of classes (see :func:`has_topk`)."""
    k = len(classes)
    logits = logits.float()
    pred = logits.argmax(1)
    cm = confusion_matrix(pred, target, k)
    prf = per_class_prf(cm)
    n = int(target.numel())
    # top-1 from the same argmax as the confusion matrix, so the two agree even when scores tie (bf16)
    top1 = float(cm.diag().sum()) / max(n, 1)
    # with k ≥ the number of classes every label is "in the top k": 1.0 says nothing, so it is null
    topk = {} if int(top_k) == 1 else {f"top{top_k}": topk_accuracy(logits, target, top_k) if has_topk(top_k, k)
                                       else None}
    return {
        "n": n,
        "top1": top1,
        **topk,
        "loss": torch.nn.functional.cross_entropy(logits, target).item() if n else float("nan"),
        "macro_f1": float(sum(prf["f1"]) / k),
        "balanced_acc": balanced_accuracy(cm),
        "classes": list(classes),
        "per_class": [{"class": c, "precision": prf["precision"][i], "recall": prf["recall"][i], "f1": prf["f1"][i],
                       "support": prf["support"][i]} for i, c in enumerate(classes)],
        "confusion_matrix": cm.tolist(),
    }


# what a text table or a page shows of many classes (2,000 classes printed 22 MB); --json keeps every class
PER_CLASS_SHOWN = 20       # the worst and the best this many, by F1
MATRIX_MAX_CLASSES = 30    # a confusion matrix is printed as numbers up to this many classes


def worst_and_best(per_class: list[dict], n: int = PER_CLASS_SHOWN, key: str = "f1") -> tuple[list[dict], int]:
    """The per-class rows to show and how many are left out: all of them, in order, up to ``2 n`` classes;
    otherwise the ``n`` worst by ``key`` (worst first) and then the ``n`` best (best last), ties by position."""
    if len(per_class) <= 2 * n:
        return list(per_class), 0
    order = sorted(range(len(per_class)), key=lambda i: (per_class[i][key], i))
    return [per_class[i] for i in order[:n] + order[-n:]], len(per_class) - 2 * n


def more_classes_line(hidden: int) -> str:
    return f"… {hidden:,} more classes (all in --json)"

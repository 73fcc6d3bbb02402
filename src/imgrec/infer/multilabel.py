"""Multi-label outputs, shared by every backend (no PyTorch: the ONNX Runtime path uses it too).

A multi-label model answers every label whose probability (its own sigmoid) reaches that label's threshold,
highest score first — possibly none. Thresholds come from ``model.json`` (chosen on the validation split by
``imgrec train``) and can be overridden at prediction time: one number for every label (``0.3``), or
``label=number`` for some (``dog=0.3``), the others keeping theirs.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np

from imgrec.errors import ConfigError

__all__ = ["DEFAULT_THRESHOLD", "parse_thresholds", "select_labels", "top_k_error"]

DEFAULT_THRESHOLD = 0.5


def select_labels(probs: Any, classes: list[str], thresholds: list[float] | None) -> list[list[dict]]:
    """``[{"label", "score"}]`` per row: every label with probability ≥ its threshold, highest first."""
    probs = np.asarray(probs, dtype=np.float32)
    thr = np.asarray(thresholds if thresholds is not None else [DEFAULT_THRESHOLD] * len(classes), np.float32)
    out = []
    for row in probs:
        hits = np.flatnonzero(row >= thr)
        hits = hits[np.argsort(-row[hits], kind="stable")]
        out.append([{"label": classes[j], "score": float(row[j])} for j in hits])
    return out


def _check(value: float, where: str) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ConfigError(f"{where}: a threshold must be a number from 0 to 1, got {value!r}")
    return float(value)


def parse_thresholds(spec: Any, classes: list[str], current: list[float] | None) -> list[float]:
    """New thresholds from ``spec``: a number (every label), a ``{label: number}`` mapping, or strings
    ``"0.3"`` / ``"dog=0.3"`` (as ``--threshold`` gives them, one or several). ConfigError (one line)
    for a number outside 0..1, an unknown label, or anything else."""
    thr = list(current) if current is not None else [DEFAULT_THRESHOLD] * len(classes)
    if spec is None:
        return thr
    items: Iterable = spec.items() if isinstance(spec, dict) else (spec if isinstance(spec, (list, tuple)) else [spec])
    index = {c: i for i, c in enumerate(classes)}
    for item in items:
        if isinstance(item, tuple):
            label, value = item
        elif isinstance(item, str) and "=" in item:
            label, _, value = item.rpartition("=")
        else:
            label, value = None, item
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise ConfigError(f"threshold {item!r}: expected a number from 0 to 1 or label=number") from None
        if label is None:
            thr = [_check(value, "threshold")] * len(classes)
            continue
        label = str(label).strip()
        if label not in index:
            raise ConfigError(f"threshold {item!r}: {label!r} is not one of the model's labels "
                              f"({', '.join(classes[:10])}{' …' if len(classes) > 10 else ''})")
        thr[index[label]] = _check(value, f"threshold for {label!r}")
    return thr


def top_k_error(where: str = "--top-k") -> ConfigError:
    """The one line for asking a multi-label model for top-k: it has no ranking cut, it has thresholds."""
    return ConfigError(f"{where} does not apply to a multi-label model: it returns every label whose score "
                       f"reaches that label's threshold (change them with --threshold)")

"""Metrics against independent computations (scikit-learn and a hand count)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from imgrec.eval.metrics import confusion_matrix, expected_calibration_error, per_class_prf, summarize, topk_accuracy


@pytest.fixture
def preds():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(500, 6, generator=g)
    target = torch.randint(0, 6, (500,), generator=g)
    logits[torch.arange(250), target[:250]] += 2.0  # make it better than chance
    logits[:, 5] -= 10  # class 5 is never predicted: precision is undefined → 0, as sklearn
    return logits, target


def test_confusion_matrix_and_prf_match_sklearn(preds):
    logits, target = preds
    pred = logits.argmax(1)
    cm = confusion_matrix(pred, target, 6)
    np.testing.assert_array_equal(cm.numpy(), skm.confusion_matrix(target, pred, labels=range(6)))
    prf = per_class_prf(cm)
    p, r, f, s = skm.precision_recall_fscore_support(target, pred, labels=range(6), zero_division=0)
    np.testing.assert_allclose(prf["precision"], p)
    np.testing.assert_allclose(prf["recall"], r)
    np.testing.assert_allclose(prf["f1"], f)
    assert prf["support"] == s.tolist()


def test_topk_matches_sklearn(preds):
    logits, target = preds
    for k in (1, 2, 5):
        assert topk_accuracy(logits, target, k) == pytest.approx(
            skm.top_k_accuracy_score(target, logits.numpy(), k=k, labels=range(6)))


def test_summary_hand_count():
    logits = torch.tensor([[3.0, 1, 0], [0, 2, 1], [0, 3, 1], [1, 0, 2]])
    target = torch.tensor([0, 1, 2, 2])
    s = summarize(logits, target, ["a", "b", "c"], top_k=2)
    assert s["top1"] == 0.75 and s["top2"] == 1.0 and s["n"] == 4
    assert s["confusion_matrix"] == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    b = s["per_class"][1]
    assert b["precision"] == 0.5 and b["recall"] == 1.0 and b["support"] == 1


def test_ece_matches_independent_loop(preds):
    logits, target = preds
    probs = torch.softmax(logits, 1)
    got = expected_calibration_error(probs, target, n_bins=10)
    conf, pred = probs.max(1)
    conf, correct = conf.numpy().astype(np.float64), (pred == target).numpy()
    ece = 0.0
    for lo in np.arange(10) / 10:
        m = (conf > lo) & (conf <= lo + 0.1) if lo > 0 else (conf <= 0.1)
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    assert got["ece"] == pytest.approx(ece, abs=1e-9)
    assert sum(got["bins"]["count"]) == 500

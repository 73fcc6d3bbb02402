"""Grad-CAM is never empty on a registered CNN: where ``forward_features`` is pooled below 3×3 (FastNet at
28 px ends at 1×1) or shows no positive evidence for the class, the deepest wider map is explained instead.
Walks the registry, so a new model is covered without anyone remembering. Untrained networks are enough
to tell an empty map from one with a where."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from imgrec.eval.explain import explain
from imgrec.infer.predictor import Classifier
from imgrec.models import create_model, list_models, model_info
from imgrec.modeldir import ModelMeta

CNNS = [n for n in list_models() if model_info(n).family == "cnn"]
CASES = [(name, chans, size) for name in CNNS for chans, size in ((1, 28), (3, 32))]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


def _classifier(name: str, chans: int, size: int) -> Classifier:
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, in_chans=chans, image_size=size)
    nn.init.normal_(model.get_classifier().weight, std=0.05)  # a head that is not all zero
    meta = ModelMeta(model={"name": name}, classes=list("abcde"), image_size=size, channels=chans,
                     mean=[0.5] * chans, std=[0.25] * chans)
    return Classifier(model, meta, device="cpu", amp="none")


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-c{c[1]}-{c[2]}px")
def test_heat_map_is_never_empty(case):
    name, chans, size = case
    clf = _classifier(name, chans, size)
    image = np.random.RandomState(1).randint(0, 256, (size, size, chans), dtype=np.uint8)
    for target in (None, 0, 3):  # the predicted class and two others
        r = explain(clf, image, target=target, steps=False)
        heat = r["heatmap"]
        assert heat.shape == (size, size)
        assert heat.max() == pytest.approx(1.0) and heat.min() < 0.999, (target, r["layer"])
        assert heat.std() > 0.01, (target, r["layer"])


def test_fastnet_at_28px_explains_a_map_of_at_least_3x3():
    """FastNet pools its last map to 1×1 at 28 px: the explained layer is the deepest one still 3×3 or wider."""
    clf = _classifier("fastnet", 1, 28)
    sides: dict[str, int] = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: sides.__setitem__(n, min(o.shape[-2:])))
             for n, m in clf.model.named_modules() if n]
    x = torch.zeros(1, 1, 28, 28)
    with torch.no_grad():
        clf.model.forward_features(x)
    for h in hooks:
        h.remove()
    image = np.random.RandomState(2).randint(0, 256, (28, 28, 1), dtype=np.uint8)
    r = explain(clf, image, steps=False)
    layer = r["layer"].split(" ")[0]
    assert "forward_features is only 1×1" in r["layer"]
    assert sides[layer] >= 3
    assert r["heatmap"].std() > 0.01

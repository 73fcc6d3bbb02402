"""The source registry: one entry makes a new kind of data readable by training's loader, `data check`
(and so the audit) and `data pack`; a spec no source claims gets one error everywhere."""
from __future__ import annotations

import numpy as np
import pytest

from imgrec.data import sources
from imgrec.errors import DatasetError


def _toy_listing(spec, *, data_dir=None, splits=sources.SPLITS, task=None, classes=None):
    rng = np.random.default_rng(0)
    parts = {}
    for s, n in (("train", 120), ("test", 40)):
        labels = np.arange(n) % 2
        images = rng.integers(0, 60, (n, 16, 16), dtype=np.uint8)
        images[labels == 1, 4:12, 4:12] = 230  # class 1: a bright square
        parts[s] = {"images": images, "labels": labels.astype(np.int64)}
    return sources.Listing("toy", "toy", ["dark", "square"], parts, flip=True)


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setattr(sources, "_SOURCES", list(sources._SOURCES))
    sources.register_source(sources.Source("toy", lambda spec: spec.startswith("toy:"), _toy_listing))
    return "toy:anything"


def test_one_entry_serves_load_data_check_and_pack(toy, tmp_path):
    from imgrec.data.datacheck import catalog
    from imgrec.data.dataset import load_data
    from imgrec.data.pack import _plan
    b = load_data(toy, val_split=20, progress=False)
    assert b.classes == ["dark", "square"] and (len(b.train), len(b.val), len(b.test)) == (100, 20, 40)
    cat = catalog(toy)
    assert cat.classes == ["dark", "square"] and len(cat.labels) == 160
    plan = _plan(toy, None, None, 20, 0, None)
    assert {s: len(p["labels"]) for s, p in plan["splits"].items()} == {"train": 100, "val": 20, "test": 40}


def test_registering_a_name_twice_is_refused(toy):
    with pytest.raises(ValueError, match="registered already"):
        sources.register_source(sources.Source("toy", lambda spec: False, _toy_listing))
    assert [s.name for s in sources.sources()][:3] == ["named", "csv", "folder"]


def test_a_spec_nobody_claims_is_one_error(tmp_path):
    with pytest.raises(DatasetError, match="no such dataset, folder or CSV file"):
        sources.list_source(str(tmp_path / "missing"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="a dataset is a folder, a .csv list"):
        sources.list_source(str(tmp_path / "notes.txt"))

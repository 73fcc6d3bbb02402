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


# -- the recipe asks the source (issue 36) ------------------------------------------------------------------
def test_a_registered_source_gets_a_data_aware_recipe(toy):
    """A source added with register_source is probed through its listing (here 120 in-memory 16×16 grey training
    images): the recipe is chosen for 108 training images, not the large-data batch of 512."""
    from imgrec.data.probe import probe_source
    from imgrec.engine.train import resolve_config
    probe = probe_source(toy)
    assert (probe.kind, probe.n_train, probe.num_classes, probe.counts) == ("toy", 108, 2, [60, 60])
    assert (probe.channels, probe.min_side, probe.max_side, probe.has_val) == (1, 16, 16, False)
    cfg = resolve_config(None, None, {"data": toy})
    assert cfg.data_recipe["probe"]["n_train"] == 108 and "108 training images" in cfg.data_recipe["reason"]
    assert cfg.train.batch_size <= 64 and cfg.train.val_last == 0


def _photo_listing(root):
    def listing(spec, *, data_dir=None, splits=sources.SPLITS, task=None, classes=None):
        paths = sorted(root.glob("*.png"))
        return sources.Listing("cams", "camera", ["day", "night"],
                               {"train": {"paths": paths, "labels": [i % 2 for i in range(len(paths))]}})
    return listing


def test_a_file_source_is_described_from_its_files_headers(monkeypatch, tmp_path):
    """A registered source of files: the colour and sizes come from the files' headers, as for a folder."""
    from PIL import Image

    from imgrec.data.probe import probe_source
    for i in range(10):
        Image.fromarray(np.zeros((32 + 8 * i, 48, 3), np.uint8)).save(tmp_path / f"{i}.png")
    monkeypatch.setattr(sources, "_SOURCES", list(sources._SOURCES))
    sources.register_source(sources.Source("cams", lambda s: s.startswith("cams:"), _photo_listing(tmp_path)))
    probe = probe_source("cams:x", val_split=0.2)
    assert (probe.kind, probe.n_train, probe.counts, probe.channels) == ("camera", 8, [5, 5], 3)
    assert (probe.min_side, probe.max_side, probe.sampled) == (32, 48, 10)


def test_a_source_that_describes_itself_is_asked(monkeypatch):
    """A source's own describe() is what the recipe sees (the named datasets' facts come the same way)."""
    from imgrec.data.probe import DataProbe, probe_source
    asked = []

    def describe(spec, *, data_dir=None, val_split=None, sample=256):
        asked.append((spec, data_dir, val_split))
        return DataProbe("remote", 400, 4, [100] * 4, 3, 200, 300, 400)

    def listing(*a, **k):
        raise AssertionError("the listing is not needed to describe it")

    monkeypatch.setattr(sources, "_SOURCES", list(sources._SOURCES))
    sources.register_source(sources.Source("remote", lambda s: s.startswith("remote:"), listing, describe))
    assert probe_source("remote:x", val_split=0.25, data_dir="/d").n_train == 400
    assert asked == [("remote:x", "/d", 0.25)]
    named = probe_source("fashion-mnist")
    assert (named.kind, named.n_train, named.channels, named.median_side) == ("named", 55000, 1, 28)

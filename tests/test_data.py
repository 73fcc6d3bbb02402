"""Every data source (IDX, named datasets, image folders, CSV lists), the splits, and the batch loader."""
from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from conftest import write_image_folder
from imgrec.data import named
from imgrec.data.idx import read_idx, read_idx_pair
from imgrec.data.dataset import ImageData, load_data, split_off
from imgrec.data.memory import BatchLoader
from imgrec.errors import ConfigError, DatasetError


def write_idx(path, arr: np.ndarray, gz=False):
    code = {np.uint8: 0x08}[arr.dtype.type]
    data = bytes([0, 0, code, arr.ndim]) + b"".join(struct.pack(">I", s) for s in arr.shape) + arr.tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


def fake_mnist(folder, n_train=120, n_test=40, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        y = (np.arange(n) % 10).astype(np.uint8)
        sfx = ".gz" if gz else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{sfx}", x, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{sfx}", y, gz)
    return folder


# -- IDX --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [False, True])
def test_idx_roundtrip(tmp_path, gz):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a", arr, gz)
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), arr)


def test_idx_wrong_magic(tmp_path):
    (tmp_path / "a").write_bytes(b"\x12\x34\x08\x01" + b"\x00" * 8)
    with pytest.raises(DatasetError, match="wrong magic"):
        read_idx(tmp_path / "a")


def test_idx_wrong_length(tmp_path):
    arr = np.zeros((5, 28, 28), np.uint8)
    write_idx(tmp_path / "a", arr)
    data = (tmp_path / "a").read_bytes()
    (tmp_path / "a").write_bytes(data[:-10])
    with pytest.raises(DatasetError, match="length mismatch"):
        read_idx(tmp_path / "a")


def test_idx_images_labels_count_mismatch(tmp_path):
    write_idx(tmp_path / "x", np.zeros((5, 28, 28), np.uint8))
    write_idx(tmp_path / "y", np.zeros((4,), np.uint8))
    with pytest.raises(DatasetError, match="4 labels for 5 images"):
        read_idx_pair(tmp_path / "x", tmp_path / "y")


# -- named datasets -------------------------------------------------------------------------------
def test_fashion_mnist_real(fmnist_arrays):
    b = load_data("fashion-mnist")
    assert b.classes[0] == "T-shirt/top" and b.classes[9] == "Ankle boot" and len(b.classes) == 10
    assert len(b.train) == 55000 and len(b.val) == 5000 and len(b.test) == 10000
    assert b.train.images.shape[1:] == (1, 28, 28) and b.train.images.dtype == torch.uint8
    # the validation split is stratified: 500 of each class
    assert b.counts["val"] == [500] * 10
    # mean/std are computed on the training split only, and match a direct computation
    x = b.train.images.double() / 255
    assert abs(b.mean[0] - x.mean().item()) < 1e-6 and abs(b.std[0] - x.std().item()) < 1e-4
    assert b.flip is True


def test_named_dataset_from_data_dir_raw_and_gz(tmp_path):
    for gz in (True, False):
        d = fake_mnist(tmp_path / f"m{gz}", gz=gz)
        b = load_data("mnist", data_dir=str(d), val_split=20)
        assert b.classes == [str(i) for i in range(10)]
        assert len(b.train) == 100 and len(b.val) == 20 and len(b.test) == 40
        assert b.flip is False  # digits are not mirrored


def test_named_dataset_resized_and_rgb(tmp_path):
    d = fake_mnist(tmp_path / "m")
    b = load_data("mnist", data_dir=str(d), image_size=32, channels=3, val_split=20)
    assert b.train.images.shape[1:] == (3, 32, 32)
    assert torch.equal(b.train.images[:, 0], b.train.images[:, 2])


def test_missing_dataset_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGREC_OFFLINE", "1")
    with pytest.raises(DatasetError, match="not found.*download"):
        load_data("mnist", data_dir=str(tmp_path))


def test_unknown_dataset_path():
    with pytest.raises(DatasetError, match="no such dataset"):
        load_data("/nonexistent/folder")


def test_val_split_larger_than_data(tmp_path):
    d = fake_mnist(tmp_path / "m")
    with pytest.raises(DatasetError, match="not smaller"):
        load_data("mnist", data_dir=str(d), val_split=500)


def test_split_is_disjoint_and_reproducible():
    data = ImageData(torch.zeros(100, 1, 4, 4, dtype=torch.uint8), torch.arange(100) % 4)
    data.images[:, 0, 0, 0] = torch.arange(100, dtype=torch.uint8)
    tr, va = split_off(data, 0.2, seed=3)
    tr2, va2 = split_off(data, 0.2, seed=3)
    a, b = set(tr.images[:, 0, 0, 0].tolist()), set(va.images[:, 0, 0, 0].tolist())
    assert not a & b and len(a | b) == 100 and len(b) == 20
    assert torch.equal(va.images, va2.images)
    assert torch.bincount(va.labels).tolist() == [5, 5, 5, 5]


# -- image folders and CSV ---------------------------------------------------------------------------
CLASSES3 = ["T-shirt", "Trouser", "Bag"]


def small_folder(tmp_path, fmnist_arrays, per_class=20):
    x, y, _, _ = fmnist_arrays
    sel = np.isin(y, [0, 1, 8])
    yy = np.select([y == 0, y == 1, y == 8], [0, 1, 2], -1)
    return write_image_folder(tmp_path / "folder", x[sel], yy[sel], CLASSES3, per_class)


def test_image_folder(tmp_path, fmnist_arrays):
    root = small_folder(tmp_path, fmnist_arrays)
    b = load_data(str(root), image_size=28, val_split=0.25)
    assert b.classes == sorted(CLASSES3)
    assert len(b.train) + len(b.val) == 60 and len(b.val) == 15
    assert b.channels == 1 and b.train.images.shape[1:] == (1, 28, 28)
    # PNG images decode to exactly the original pixels
    png = [i for i, p in enumerate(b.train.paths) if p.endswith(".png")][0]
    from PIL import Image
    orig = np.asarray(Image.open(b.train.paths[png]))
    np.testing.assert_array_equal(b.train.images[png, 0].numpy(), orig)
    # the label is the folder name
    assert b.classes[int(b.train.labels[png])] == b.train.paths[png].split("/")[-2]


def test_image_folder_split_folders(tmp_path, fmnist_arrays):
    x, y, xt, yt = fmnist_arrays
    root = tmp_path / "ds"
    write_image_folder(root / "train", x, y, ["a", "b"], 12)
    write_image_folder(root / "val", x, y, ["a", "b"], 4, offset=12)
    write_image_folder(root / "test", xt, yt, ["a", "b"], 5)
    b = load_data(str(root), image_size=20, channels=3)
    assert (len(b.train), len(b.val), len(b.test)) == (24, 8, 10)
    assert b.train.images.shape[1:] == (3, 20, 20)


def test_folder_without_class_subfolders(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"x")
    with pytest.raises(DatasetError, match="no class subfolders"):
        load_data(str(tmp_path / "flat"))


def test_empty_class_folder(tmp_path, fmnist_arrays):
    root = small_folder(tmp_path, fmnist_arrays, per_class=4)
    (root / "Empty").mkdir()
    with pytest.raises(DatasetError, match="Empty: empty class folder"):
        load_data(str(root))


def test_corrupt_image_fail_and_skip(tmp_path, fmnist_arrays):
    root = small_folder(tmp_path, fmnist_arrays, per_class=10)
    (root / "Bag" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    (root / "Bag" / "text.jpg").write_text("not an image")
    with pytest.raises(DatasetError, match="2 unreadable image.*broken.png"):
        load_data(str(root), image_size=28, val_split=0.2)
    b = load_data(str(root), image_size=28, val_split=0.2, on_bad_image="skip")
    assert len(b.train) + len(b.val) == 30


def test_csv_list(tmp_path, fmnist_arrays):
    root = small_folder(tmp_path, fmnist_arrays, per_class=6)
    files = sorted(root.rglob("*.png")) + sorted(root.rglob("*.jpg"))
    lines = ["path,label,split"] + [f"{f.relative_to(tmp_path)},{f.parent.name},{'test' if i % 6 == 0 else 'train'}"
                                    for i, f in enumerate(files)]
    (tmp_path / "list.csv").write_text("\n".join(lines) + "\n")
    b = load_data(str(tmp_path / "list.csv"), image_size=28, val_split=0.2)
    assert b.classes == sorted(CLASSES3)
    assert len(b.test) == 3 and len(b.train) + len(b.val) == 15


@pytest.mark.parametrize("row,match", [
    ("only_a_path.png", "row 2: expected 'path,label'"),
    ("missing.png,Bag", "row 2: file not found"),
])
def test_csv_bad_rows(tmp_path, row, match):
    (tmp_path / "l.csv").write_text(f"path,label\n{row}\n")
    with pytest.raises(DatasetError, match=match):
        load_data(str(tmp_path / "l.csv"))


def test_csv_label_not_in_class_list(tmp_path, fmnist_arrays):
    root = small_folder(tmp_path, fmnist_arrays, per_class=2)
    f = sorted(root.rglob("*.png"))[0]
    (tmp_path / "l.csv").write_text(f"{f},Bag\n{f},Shoe\n")
    with pytest.raises(DatasetError, match="row 2: label 'Shoe' is not in the class list"):
        load_data(str(tmp_path / "l.csv"), classes=["Bag", "T-shirt"])


def test_decoded_folder_is_cached(tmp_path, fmnist_arrays, monkeypatch):
    import imgrec.data.batchdecode as files
    root = small_folder(tmp_path, fmnist_arrays, per_class=5)
    a = load_data(str(root), image_size=28, val_split=3)
    monkeypatch.setattr(files, "_decode_all", lambda *a, **k: pytest.fail("decoded again despite the cache"))
    b = load_data(str(root), image_size=28, val_split=3)
    assert torch.equal(a.train.images, b.train.images)


# -- batch loader ---------------------------------------------------------------------------------------
def _data(n=64, c=1, s=8):
    g = torch.Generator().manual_seed(0)
    return ImageData(torch.randint(0, 256, (n, c, s, s), dtype=torch.uint8, generator=g), torch.arange(n) % 3)


def test_loader_normalises_without_augmentation():
    d = _data()
    ld = BatchLoader(d, 16, [0.5], [0.25])
    xs = torch.cat([x for x, _ in ld])
    expect = (d.images.float() / 255 - 0.5) / 0.25
    torch.testing.assert_close(xs, expect)
    assert len(ld) == 4


def test_loader_crop_and_flip_are_real_crops_and_flips():
    d = _data()
    ld = BatchLoader(d, 64, [0.0], [1.0 / 255], crop_padding=2, flip=True, shuffle=False, seed=1)
    x, _ = next(iter(ld))
    padded = torch.nn.functional.pad(d.images.float(), (2, 2, 2, 2))
    flips = 0
    for i in range(64):
        windows = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        plain = any(torch.equal(x[i], w) for w in windows)
        flipped = any(torch.equal(x[i], w.flip(2)) for w in windows)
        assert plain or flipped, f"image {i} is not a crop of its padded original"
        flips += flipped and not plain
    assert 10 < flips < 54  # about half are mirrored


def test_loader_is_reproducible_and_resumable():
    d = _data()
    ld = BatchLoader(d, 10, [0.0], [1.0], shuffle=True, crop_padding=1, flip=True, seed=5)
    ld.set_epoch(2)
    full = list(ld)
    tail = list(ld.iterate(start_step=3))
    assert len(tail) == len(full) - 3
    for (a, ya), (b, yb) in zip(full[3:], tail):
        assert torch.equal(a, b) and torch.equal(ya, yb)
    ld.set_epoch(3)
    assert not torch.equal(list(ld)[0][0], full[0][0])


def test_alternating_flips_show_every_image_both_ways_every_two_epochs():
    """flip_order "alternate": an image mirrored in one epoch is not in the next, whatever the shuffle; about half
    are mirrored in each epoch; several processes and a resumed epoch get the same flips."""
    g = torch.Generator().manual_seed(1)
    n = 90
    d = ImageData(torch.randint(0, 256, (n, 1, 6, 6), dtype=torch.uint8, generator=g), torch.arange(n))

    def mirrored(ld, epoch, start_step=0):
        ld.set_epoch(epoch)
        out = {}
        for x, y in ld.iterate(start_step=start_step):
            for xi, yi in zip(x, y.tolist()):
                img = d.images[yi].float()
                assert torch.equal(xi, img) or torch.equal(xi, img.flip(2))
                out[yi] = not torch.equal(xi, img)
        return out

    ld = BatchLoader(d, 20, [0.0], [1.0 / 255], shuffle=True, flip=True, seed=4, flip_order="alternate")
    e0, e1, e2 = (mirrored(ld, e) for e in range(3))
    assert sorted(e0) == sorted(e1) == list(range(n))
    assert all(e0[i] != e1[i] for i in range(n)) and e0 == e2
    assert 25 < sum(e0.values()) < 65
    tail = mirrored(ld, 1, start_step=2)  # a resumed epoch: the same flips
    assert tail and all(tail[i] == e1[i] for i in tail)
    shards = [BatchLoader(d, 20, [0.0], [1.0 / 255], shuffle=True, flip=True, seed=4, flip_order="alternate",
                          rank=r, world_size=2) for r in range(2)]
    assert {**mirrored(shards[0], 1), **mirrored(shards[1], 1)} == e1
    # random flips: independent coins, so some image keeps its side from one epoch to the next
    rnd = BatchLoader(d, 20, [0.0], [1.0 / 255], shuffle=True, flip=True, seed=4)
    r0, r1 = mirrored(rnd, 0), mirrored(rnd, 1)
    assert any(r0[i] == r1[i] for i in range(n))
    with pytest.raises(ConfigError, match="flip_order"):
        BatchLoader(d, 20, [0.0], [1.0], flip=True, flip_order="sometimes")

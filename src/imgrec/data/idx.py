"""IDX files (the MNIST family's format): ``.gz`` or raw, validated before use."""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from imgrec.errors import DatasetError

# dtype code in the third magic byte → numpy dtype (big-endian as the format says)
_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file into a numpy array, checking the magic number and the payload length."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DatasetError(f"{path}: cannot read IDX file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _DTYPES:
        raise DatasetError(f"{path}: not an IDX file (wrong magic number {raw[:4].hex() or 'empty'})")
    ndim = raw[3]
    if ndim < 1 or ndim > 4 or len(raw) < 4 + 4 * ndim:
        raise DatasetError(f"{path}: bad IDX header ({ndim} dimensions)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_DTYPES[raw[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    payload = memoryview(raw)[4 + 4 * ndim:]
    if len(payload) != expected:
        raise DatasetError(f"{path}: IDX length mismatch: header says {shape} ({expected} bytes), "
                           f"file has {len(payload)} bytes")
    return np.frombuffer(payload, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="), copy=True)


def read_idx_pair(images_path: str | os.PathLike, labels_path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Images N×H×W uint8 and labels N int64, checked against each other."""
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetError(f"{images_path}: expected N×H×W uint8 images, got shape {images.shape} {images.dtype}")
    if labels.ndim != 1:
        raise DatasetError(f"{labels_path}: expected a 1-D label array, got shape {labels.shape}")
    if len(labels) != len(images):
        raise DatasetError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path}")
    return images, labels.astype(np.int64)

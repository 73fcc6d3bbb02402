"""How far an input lies from the training data: one short note per way it differs much, shown next to the
answer by ``imgrec predict``, the server's JSON and the web page.

A model squashes every input to its own square size and channels, so a 640×427 colour photo given to a
model trained on 28×28 grey images is answered like any other image, with no sign that it was shrunk 15×,
squashed from 3:2 to 1:1 and turned grey. :func:`input_notes` compares the image as it arrived (its size
and pixel mode, read from the file header: :func:`image_info`) with what the model directory records of the
training images (``data.image_sizes``: the range of their shorter sides and aspect ratios, and whether any
was colour); where a model lacks those, with its input size and channels only.

Nothing here imports PyTorch (the ONNX Runtime backend uses it too).
"""
from __future__ import annotations

import io
import os
from typing import Any

__all__ = ["ASPECT_FACTOR", "SIDE_FACTOR", "image_info", "input_notes"]

SIDE_FACTOR = 3.0     # a shorter side this many times above the training range (or below it) is noted
ASPECT_FACTOR = 1.4   # an aspect ratio this far outside the training range (1.5 = 3:2 for square data)
# Pillow modes that decode to one grey channel (as the decoder and the data probe treat them)
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
HEADER_BYTES = 64 << 10  # the size and mode of every allowed format, EXIF blocks included


def image_info(src: Any) -> tuple[int, int, str] | None:
    """``(width, height, Pillow mode)`` of an image file or its bytes, from its header only (no pixels are
    decoded; only the formats the safe decoder allows are opened). None when the header cannot be read:
    decoding the image then says what is wrong with it."""
    from PIL import Image

    from imgrec.data.decode import sniff_format
    try:
        if isinstance(src, (bytes, bytearray, memoryview)):
            head = bytes(src[:HEADER_BYTES])
        elif isinstance(src, (str, os.PathLike)):
            with open(src, "rb") as f:
                head = f.read(HEADER_BYTES)
        else:
            return None
        fmt = sniff_format(head)
        if fmt is None:
            return None
        with Image.open(io.BytesIO(head), formats=[fmt]) as im:
            w, h, mode = int(im.width), int(im.height), str(im.mode)
            if fmt in ("JPEG", "WEBP", "PNG"):
                try:
                    if im.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF rotation by 90°: the decoder turns it
                        w, h = h, w
                except Exception:  # noqa: BLE001 - a broken EXIF block: the header size stands
                    pass
            return w, h, mode
    except Exception:  # noqa: BLE001 - unreadable or odd headers give no note, decoding reports them
        return None


def _sizes(meta: Any) -> dict | None:
    data = getattr(meta, "data", None) or {}
    s = data.get("image_sizes") if isinstance(data, dict) else None
    if not isinstance(s, dict):
        return None
    try:
        return {"min_side": float(s["min_side"]), "max_side": float(s["max_side"]),
                "aspect_min": float(s.get("aspect_min") or 1.0), "aspect_max": float(s.get("aspect_max") or 1.0),
                "channels_seen": int(s.get("channels_seen") or getattr(meta, "channels", 3))}
    except (KeyError, TypeError, ValueError):
        return None


def input_notes(meta: Any, size: tuple[int, int] | None, mode: str | None) -> list[str]:
    """Short notes on how an input of ``size`` = (width, height) and Pillow ``mode`` (as it arrived, before
    resizing) differs much from the training images of the model ``meta`` (a ``ModelMeta`` or an exported
    file's metadata); empty when it is like them or when nothing is known about it.

    Noted: colour into a model trained on grey images (and grey into one trained only on colour), a shorter
    side ``SIDE_FACTOR`` times above or below the training images' range, an aspect ratio (width / height)
    ``ASPECT_FACTOR`` times outside theirs. Without ``data.image_sizes`` in the metadata the training images
    are taken to be the model's input size (square) and of its channels, and aspect ratios are not judged."""
    notes: list[str] = []
    chans = int(getattr(meta, "channels", 3))
    side = int(getattr(meta, "image_size", 0) or 0)
    stats = _sizes(meta)
    seen = stats["channels_seen"] if stats else chans
    if mode is not None:
        grey = mode in _GREY_MODES
        if not grey and chans == 1 and seen == 1:
            notes.append("colour image into a model trained on grey images (seen in grey)")
        elif grey and chans == 3 and seen == 3:
            notes.append("grey image into a model trained on colour images")
    if size is None or min(size) < 1:
        return notes
    w, h = int(size[0]), int(size[1])
    short = min(w, h)
    if stats:
        lo, hi = stats["min_side"], stats["max_side"]
        ref = f"the training images ({lo:.0f} px)" if lo == hi else f"the training images ({lo:.0f}–{hi:.0f} px)"
    else:
        lo = hi = float(side)
        ref = f"the model's input ({side} px)"
    resized = f"resized to {side}×{side}" if side else "resized"
    # sides compare shorter side with shorter side, as the training images' range is measured
    if hi > 0 and short > SIDE_FACTOR * hi:
        notes.append(f"{w}×{h}: {short / hi:.0f}× larger than {ref}, {resized}")
    elif lo > 0 and short * SIDE_FACTOR < lo:
        notes.append(f"{w}×{h}: {lo / short:.0f}× smaller than {ref}, {resized}")
    if stats:
        aspect, amin, amax = w / h, stats["aspect_min"], stats["aspect_max"]
        if aspect > amax * ASPECT_FACTOR or aspect * ASPECT_FACTOR < amin:
            rng = f"{amin:.2f}" if abs(amax - amin) < 0.005 else f"{amin:.2f}–{amax:.2f}"
            notes.append(f"aspect ratio {aspect:.2f} far from the training images' {rng}, squashed to a square")
    return notes

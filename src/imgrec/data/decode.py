"""The one safe image decoder: every path of imgrec (training data, predict, serving, reports) turns
bytes into pixels here, and only here.

The input is untrusted. The order of the steps is the point of this module:

1. read at most ``max_bytes`` (a path must be a regular file: a directory, FIFO or device is never read);
2. sniff the real format from the magic bytes and refuse anything outside :data:`ALLOWED_FORMATS`,
   whatever the file name says;
3. walk the container structure without decoding (``_check_structure``): bound the block count where
   Pillow's pure-Python parsers would otherwise spend seconds on a crafted file, count animation frames,
   and read canvas sizes that Pillow would allocate while *opening* (WebP, GIF);
4. ``Image.open`` with only the sniffed format's plugin (so EPS never reaches Ghostscript), with Pillow's
   decompression-bomb warning turned into an error, then check the header size against ``max_pixels``
   ourselves, before any pixel buffer exists, and the frame count and progressive-JPEG scan count;
5. decode the first frame (``load()``, which is where truncation shows), apply the EXIF orientation,
   convert any pixel mode to 8-bit L/RGB (alpha composited onto ``background``), resize.

Anything unusable raises :class:`~imgrec.errors.ImageDecodeError`, and only that; wrong argument types
or values (a programming error, not bad input) raise ``TypeError`` / ``ValueError``.
"""

from __future__ import annotations

import io
import os
import re
import stat
import struct
import threading
import warnings
from typing import TYPE_CHECKING, BinaryIO, Union

import numpy as np
from PIL import Image, ImageFile

from imgrec.errors import ImageDecodeError

if TYPE_CHECKING:  # torch is imported lazily: the decoder (and its fuzz target) should not pay for it
    import torch

__all__ = [
    "ALLOWED_FORMATS",
    "IMAGE_EXTENSIONS",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_BYTES",
    "MAX_FRAMES",
    "sniff_format",
    "decode_image",
    "image_header",
    "ImageTooLargeError",
    "load_image_tensor",
]

ALLOWED_FORMATS: frozenset[str] = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF"})
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"})
DEFAULT_MAX_PIXELS = 40_000_000  # per frame, checked from the header before pixels are allocated
DEFAULT_MAX_BYTES = 50 * 1024 * 1024
MAX_FRAMES = 1000  # frames counted/bounded for animations; only the first frame is decoded

ImageSource = Union[str, "os.PathLike[str]", bytes, bytearray, memoryview, BinaryIO]

# Pillow's parsers for PNG chunks, JPEG markers and GIF blocks are pure Python: a 50 MB file made of
# empty chunks keeps Image.open busy for 10-25 s (measured with Pillow 13). Real files have tens to a
# few thousand blocks (libpng writes 8 KiB IDATs: 6400 for 50 MB), so refuse files with more.
_MAX_BLOCKS = 100_000
# Counting GIF frames walks every data sub-block after the first frame. Normal encoders use 255-byte
# sub-blocks (200k for 50 MB); 4M steps of the loop below cost about 0.3 s.
_MAX_GIF_SUB_BLOCKS = 4_000_000
# Each progressive JPEG scan touches every block of the image even when its data is a few bytes: a
# 172 KB file repeating one 31-byte scan 990 times takes libjpeg 62 s for 16 Mpx (about 2.4 ns per
# pixel per scan). Real progressive JPEGs have about 10 scans (libjpeg's default script; mozjpeg's
# optimised ones stay near 20), so bound scans × pixels (about 2.5 s at the limit) and the scan count.
_MAX_JPEG_SCAN_PIXELS = 1_000_000_000
_MAX_JPEG_SCANS = 1000
# Pillow decodes RLE-compressed BMPs in Python (~0.3 us per run: 8 s for 50 MB of 1-pixel runs).
_MAX_BMP_RLE_BYTES = 8 * 1024 * 1024

# What Pillow raises on malformed data. Pillow's plugins do not confine themselves to OSError, so the
# decoding steps catch these; our own steps between them stay outside the try blocks.
_PIL_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes UnidentifiedImageError and "image file is truncated"
    SyntaxError,  # Pillow's "not a PNG/JPEG file" from a plugin's _open
    ValueError,
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    OverflowError,
    MemoryError,
    Image.DecompressionBombError,
    Image.DecompressionBombWarning,
)

# warnings.catch_warnings swaps process-global state and is not thread-safe (Python < 3.14); two
# overlapping decodes could restore each other's filters. The lock keeps our own uses from interleaving
# and is held only while Image.open parses the header. Our explicit max_pixels check is the primary guard
# and needs no global state.
_WARNINGS_LOCK = threading.Lock()

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_BMP_DIB_HEADER_SIZES = frozenset({12, 40, 52, 56, 64, 108, 124})  # the ones Pillow's BMP plugin reads

# Formats we recognise only to name them in the refusal (prefix, name); checked after the allowlist.
_OTHER_SIGNATURES: tuple[tuple[bytes, str], ...] = (
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"II+\x00", "TIFF"),  # BigTIFF
    (b"MM\x00+", "TIFF"),
    (b"%!PS", "EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),  # DOS EPS binary header
    (b"%PDF-", "PDF"),
    (b"8BPS", "PSD"),
    (b"SIMPLE  =", "FITS"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x02\x00", "CUR"),
    (b"icns", "ICNS"),
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG2000"),
    (b"\xff\x4f\xff\x51", "JPEG2000"),
    (b"qoif", "QOI"),
    (b"DDS ", "DDS"),
    (b"\x01\xda", "SGI"),
    (b"/* XPM */", "XPM"),
    (b"\x76\x2f\x31\x01", "OpenEXR"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
)
_FTYP_BRANDS = {b"avif": "AVIF", b"avis": "AVIF", b"heic": "HEIF", b"heix": "HEIF", b"mif1": "HEIF", b"msf1": "HEIF"}
_NETPBM = re.compile(rb"P[1-7]\s")

# EXIF orientation → the transpose that displays the image upright (the table ImageOps.exif_transpose uses).
_EXIF_ORIENTATION_TAG = 0x0112
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# Modes whose natural output is one channel when channels=None.
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"})


# ---------------------------------------------------------------------------------------------------
# Public API


def sniff_format(data: bytes | bytearray | memoryview) -> str | None:
    """Return the allowlisted format named by ``data``'s magic bytes ("JPEG", "PNG", ...), else None."""
    head = bytes(data[:32])
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(_PNG_MAGIC):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    # "BM" alone is too weak (text can start with it): also require a DIB header size Pillow knows.
    if head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_DIB_HEADER_SIZES:
        return "BMP"
    return None


def decode_image(
    src: ImageSource,
    *,
    channels: int | None = 3,
    size: int | tuple[int, int] | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    background: tuple[int, int, int] = (255, 255, 255),
    source: str | None = None,
) -> np.ndarray:
    """Decode the first frame of an image into a uint8 array of shape H×W×C.

    Args:
        src: a path (str / PathLike), the file's bytes (bytes, bytearray, memoryview), or a binary file
            object (read from its current position).
        channels: 1 (luminance 'L'), 3 (RGB), or None to keep 1 for grayscale sources and 3 otherwise.
        size: None keeps the size; an int gives size×size; a tuple is (height, width). The image is
            squashed to it (no crop) with antialiased bilinear resampling.
        max_pixels: refuse images whose width×height exceeds this, judged from the header.
        max_bytes: refuse inputs longer than this.
        background: RGB colour that transparent pixels are composited onto.
        source: name used in error messages (defaults to the path or the file object's name).

    Raises:
        ImageDecodeError: the input is not a usable image; ``.reason`` says why, ``.source`` names it.
    """
    out_channels = _check_channels(channels)
    out_size = _check_size(size, max_pixels)
    background = _check_background(background)
    data, source, fmt, image = _read_and_open(src, max_bytes, max_pixels, source)
    with image as opened:
        _check_pixels(opened.size, max_pixels, source)
        _check_frame_count(opened, fmt, source)
        if fmt == "JPEG":
            _check_jpeg_scans(opened, data, source)
        if out_size is not None:
            _draft(opened, out_size)
        _load(opened, fmt, source)
        try:
            return _to_array(opened, out_channels, out_size, background)
        except _PIL_ERRORS as e:
            raise ImageDecodeError(f"cannot convert {fmt} image ({_describe(e)})", source) from e


class ImageTooLargeError(ImageDecodeError):
    """An image refused for its size alone (pixels, side or aspect ratio, read from the header): a usable
    image, too big for this caller's limits. The server answers it with 413/422 rather than 415. ``kind``:
    "pixels", "side" or "aspect"."""

    def __init__(self, reason: str, source: str | None = None, kind: str = "pixels"):
        super().__init__(reason, source)
        self.kind = kind


def image_header(
    src: ImageSource,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int | None = None,
    max_aspect: float | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    source: str | None = None,
) -> tuple[str, int, int]:
    """``(format, width, height)`` from the header alone, after the same checks as :func:`decode_image` up to
    and including ``Image.open`` (no pixel buffer exists yet), so a caller can refuse by size before paying
    for a decode: :class:`ImageTooLargeError` past ``max_pixels``, a side over ``max_side`` or a longer/shorter
    side ratio over ``max_aspect`` (a 1×39,999,999 PNG is 78 KB and seconds of decoding), ImageDecodeError for
    anything that is not a usable image."""
    _, source, fmt, image = _read_and_open(src, max_bytes, max_pixels, source)
    with image as opened:
        width, height = opened.size
    _check_pixels((width, height), max_pixels, source)
    if max_side is not None and max(width, height) > max_side:
        raise ImageTooLargeError(f"image side too long ({width}x{height}, limit {max_side} pixels per side)", source,
                                 "side")
    if max_aspect is not None and max(width, height) > max_aspect * max(1, min(width, height)):
        raise ImageTooLargeError(f"extreme aspect ratio ({width}x{height}, limit {max_aspect:g}:1)", source,
                                 "aspect")
    return fmt, int(width), int(height)


def load_image_tensor(
    src: ImageSource, *, channels: int | None = 3, size: int | tuple[int, int] | None = None, **kw
) -> "torch.Tensor":
    """Decode like :func:`decode_image` (same keyword arguments) into a contiguous uint8 C×H×W tensor."""
    import torch  # lazily: see TYPE_CHECKING above

    array = decode_image(src, channels=channels, size=size, **kw)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------------------------------------------
# Arguments


def _check_channels(channels: int | None) -> int | None:
    if channels is None or (type(channels) is int and channels in (1, 3)):
        return channels
    raise ValueError(f"channels must be 1, 3 or None, not {channels!r}")


def _check_size(size: int | tuple[int, int] | None, max_pixels: int) -> tuple[int, int] | None:
    """Return (height, width) or None."""
    if size is None:
        return None
    if isinstance(size, int) and not isinstance(size, bool):
        size = (size, size)
    if (
        not isinstance(size, (tuple, list))
        or len(size) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in size)
    ):
        raise ValueError(f"size must be a positive int or a (height, width) pair, not {size!r}")
    if size[0] * size[1] > max_pixels:
        raise ValueError(f"size {size[0]}x{size[1]} exceeds max_pixels={max_pixels}")
    return int(size[0]), int(size[1])


def _check_background(background: tuple[int, int, int]) -> tuple[int, int, int]:
    try:
        r, g, b = background
    except (TypeError, ValueError):
        raise ValueError(f"background must be an (r, g, b) tuple, not {background!r}") from None
    if not all(isinstance(v, int) and 0 <= v <= 255 for v in (r, g, b)):
        raise ValueError(f"background values must be ints in 0..255, not {background!r}")
    return r, g, b


# ---------------------------------------------------------------------------------------------------
# Reading: bounded, and only from regular files


def _read_source(src: ImageSource, max_bytes: int, source: str | None) -> tuple[bytes, str | None]:
    if isinstance(src, (bytes, bytearray, memoryview)):
        view = memoryview(src)
        if view.nbytes > max_bytes:
            raise ImageDecodeError(_too_large(view.nbytes, max_bytes), source)
        return (src if isinstance(src, bytes) else view.tobytes()), source
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        source = source or os.fsdecode(path)
        return _read_path(path, max_bytes, source), source
    if hasattr(src, "read"):
        name = getattr(src, "name", None)
        source = source or (name if isinstance(name, str) else None)
        return _read_limited(src, max_bytes, source), source
    raise TypeError(f"cannot decode an image from {type(src).__name__}; pass a path, bytes or a binary file")


def _read_path(path: str | bytes, max_bytes: int, source: str) -> bytes:
    # O_NONBLOCK: opening a FIFO named x.jpg must not wait for a writer; fstat below then refuses it.
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        reason = "broken symbolic link" if os.path.islink(path) else "file not found"
        raise ImageDecodeError(reason, source) from None
    except IsADirectoryError:
        raise ImageDecodeError("is a directory", source) from None
    except PermissionError:
        raise ImageDecodeError("permission denied", source) from None
    except OSError as e:
        raise ImageDecodeError(f"cannot open file ({e.strerror or e})", source) from None
    except ValueError:  # e.g. an embedded NUL byte
        raise ImageDecodeError("invalid path", source) from None
    try:
        st = os.fstat(fd)  # of what was opened: no window for the path to be swapped after a check
        if stat.S_ISDIR(st.st_mode):
            raise ImageDecodeError("is a directory", source)
        if not stat.S_ISREG(st.st_mode):
            raise ImageDecodeError("not a regular file", source)
        if st.st_size > max_bytes:  # refuse before reading a byte
            raise ImageDecodeError(_too_large(st.st_size, max_bytes), source)
        with open(fd, "rb", closefd=False) as f:
            return _read_limited(f, max_bytes, source)
    finally:
        os.close(fd)


def _read_limited(f: BinaryIO, max_bytes: int, source: str | None) -> bytes:
    """Read to EOF, but never more than max_bytes + 1 bytes (one more tells "too large" from "exactly")."""
    chunks: list[bytes] = []
    total = 0
    while total <= max_bytes:
        try:
            chunk = f.read(min(max_bytes + 1 - total, 1 << 20))
        except OSError as e:
            raise ImageDecodeError(f"cannot read file ({e.strerror or e})", source) from None
        if chunk is None:  # a non-blocking raw stream with nothing ready
            raise ImageDecodeError("cannot read file (no data available)", source)
        if not isinstance(chunk, (bytes, bytearray)):
            raise TypeError("the file object must be opened in binary mode")
        if not chunk:
            break
        chunks.append(bytes(chunk))
        total += len(chunk)
    if total > max_bytes:
        raise ImageDecodeError(_too_large(None, max_bytes), source)
    return b"".join(chunks)


def _too_large(nbytes: int | None, max_bytes: int) -> str:
    if nbytes is None:  # a stream: we stopped reading one byte past the limit
        return f"file too large (more than the limit of {max_bytes} bytes)"
    return f"file too large ({nbytes} bytes, limit {max_bytes})"


# ---------------------------------------------------------------------------------------------------
# Format and structure, before Pillow sees the bytes


def _sniff_or_refuse(data: bytes, source: str | None) -> str:
    if not data:
        raise ImageDecodeError("empty file", source)
    fmt = sniff_format(data)
    if fmt is not None:
        return fmt
    other = _name_other_format(data)
    if other is not None:
        raise ImageDecodeError(f"unsupported format {other}", source)
    raise ImageDecodeError("not an image (unrecognised format)", source)


def _name_other_format(data: bytes) -> str | None:
    head = data[:32]
    for prefix, name in _OTHER_SIGNATURES:
        if head.startswith(prefix):
            return name
    if head[4:8] == b"ftyp":
        return _FTYP_BRANDS.get(head[8:12])
    if _NETPBM.match(head):
        return "PPM"
    return None


def _check_structure(data: bytes, fmt: str, max_pixels: int, source: str | None) -> None:
    """Walk the container (no decoding) to refuse what would make Image.open itself slow or hungry."""
    if fmt == "PNG":
        _scan_png(data, source)
    elif fmt == "JPEG":
        _scan_jpeg(data, source)
    elif fmt == "GIF":
        canvas, too_many_frames = _scan_gif(data, source)
        _check_pixels(canvas, max_pixels, source)  # Pillow fills the first frame's extent while opening
        if too_many_frames:
            raise ImageDecodeError(f"too many frames (more than {MAX_FRAMES})", source)
    elif fmt == "WEBP":
        canvas = _webp_canvas_size(data)
        if canvas is not None:  # libwebp allocates the canvas when Pillow opens the file
            _check_pixels(canvas, max_pixels, source)
    elif fmt == "BMP":
        _scan_bmp(data, source)


def _scan_png(data: bytes, source: str | None) -> None:
    pos, n, count = 8, len(data), 0
    while pos + 8 <= n:
        length, ctype = struct.unpack_from(">I4s", data, pos)
        count += 1
        if count > _MAX_BLOCKS:
            raise ImageDecodeError(f"corrupt PNG (more than {_MAX_BLOCKS} chunks)", source)
        if ctype == b"IEND":
            return
        pos += 12 + length


def _scan_jpeg(data: bytes, source: str | None) -> None:
    # Count what Pillow's JpegImagePlugin._open loops over before the first scan: one iteration per
    # marker, and one per junk byte between markers.
    pos, n, steps = 2, len(data), 0
    while pos + 1 < n:
        if data[pos] != 0xFF:
            following = data.find(b"\xff", pos)
            steps += (n if following < 0 else following) - pos
            pos = n if following < 0 else following
        else:
            marker = data[pos + 1]
            steps += 1
            if marker == 0xDA:  # start of scan: libjpeg (C) takes over from here
                return
            if marker == 0xFF:  # fill byte: the second 0xFF starts the marker
                pos += 1
            elif marker in (0x00, 0x01) or 0xD0 <= marker <= 0xD9:  # no length field (SOI, EOI, RSTn, ...)
                pos += 2
            elif pos + 4 <= n:
                pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
            else:
                return
        if steps > _MAX_BLOCKS:
            raise ImageDecodeError(f"corrupt JPEG (more than {_MAX_BLOCKS} markers or junk bytes)", source)


def _scan_gif(data: bytes, source: str | None) -> tuple[tuple[int, int], bool]:
    """Return the canvas size Pillow will give the first frame, and whether there are > MAX_FRAMES frames.

    Walks the blocks without decompressing anything. Up to the first image it mirrors Pillow's
    GifImagePlugin (which skips unknown bytes one at a time) because Image.open walks that part too.
    """
    n = len(data)
    if n < 13:
        return (0, 0), False  # Pillow reports the truncated header
    width, height = struct.unpack_from("<HH", data, 6)
    flags = data[10]
    pos = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    frames = 0
    steps = 0  # blocks, data sub-blocks and skipped bytes visited
    while pos < n:
        block = data[pos]
        if block == 0x2C:  # image descriptor: position, size, flags, local palette, LZW code size
            if pos + 10 > n:
                break
            x, y, w, h = struct.unpack_from("<HHHH", data, pos + 1)
            local = data[pos + 9]
            if frames == 0:
                width, height = max(width, x + w), max(height, y + h)
            frames += 1
            if frames > MAX_FRAMES:
                break
            if frames == 1 and data.count(b",", pos + 1) < MAX_FRAMES:
                break  # fewer ',' bytes left than frames allowed: no need to walk the rest
            pos += 10 + (3 << ((local & 7) + 1) if local & 0x80 else 0) + 1
        elif block == 0x21:  # extension: introducer and label, then data sub-blocks
            pos += 2
        elif block == 0x3B:  # trailer
            break
        elif frames == 0:  # Pillow skips stray bytes before the first image
            pos += 1
            steps += 1
            if steps > _MAX_BLOCKS:
                raise ImageDecodeError(f"corrupt GIF (more than {_MAX_BLOCKS} blocks before the first image)", source)
            continue
        else:  # stray bytes after the first image: we never decode past it, so stop counting here
            break
        limit = _MAX_BLOCKS if frames == 0 else _MAX_GIF_SUB_BLOCKS
        while pos < n:  # data sub-blocks: a length byte, then that many bytes; a zero length ends them
            length = data[pos]
            pos += length + 1
            steps += 1
            if length == 0:
                break
            if steps > limit:
                where = "before the first image" if frames == 0 else "in the file"
                raise ImageDecodeError(f"corrupt GIF (more than {limit} data blocks {where})", source)
    return (width, height), frames > MAX_FRAMES


def _webp_canvas_size(data: bytes) -> tuple[int, int] | None:
    """The canvas size from a WebP's first chunk header, or None where it cannot be read."""
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _scan_bmp(data: bytes, source: str | None) -> None:
    if len(data) >= 34 and int.from_bytes(data[14:18], "little") >= 40:
        compression = int.from_bytes(data[30:34], "little")
        if compression in (1, 2) and len(data) > _MAX_BMP_RLE_BYTES:  # BI_RLE8, BI_RLE4
            raise ImageDecodeError(
                f"RLE-compressed BMP larger than {_MAX_BMP_RLE_BYTES} bytes is not supported", source
            )


def _check_pixels(size: tuple[int, int], max_pixels: int, source: str | None) -> None:
    width, height = size
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"image too large ({width}x{height} = {width * height} pixels, limit {max_pixels})", source
        )


# ---------------------------------------------------------------------------------------------------
# Pillow: open the header, decode the first frame


def _read_and_open(src: ImageSource, max_bytes: int, max_pixels: int,
                   source: str | None) -> tuple[bytes, str | None, str, ImageFile.ImageFile]:
    """The checks up to and including ``Image.open`` (no pixel buffer yet), shared by decode_image and
    image_header: read ``src``, sniff its format, check its structure, open it. Returns ``(data, source name,
    format, opened image)``."""
    data, source = _read_source(src, max_bytes, source)
    fmt = _sniff_or_refuse(data, source)
    _check_structure(data, fmt, max_pixels, source)
    return data, source, fmt, _open(data, fmt, source)


def _open(data: bytes, fmt: str, source: str | None) -> ImageFile.ImageFile:
    """Image.open with only the sniffed format's plugin and the bomb warning as an error."""
    try:
        with _WARNINGS_LOCK, warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; make it refuse instead.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=[fmt])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageDecodeError(f"image too large (decompression bomb: {e})", source) from e
    except Image.UnidentifiedImageError:
        raise ImageDecodeError(f"corrupt {fmt} file (cannot read its header)", source) from None
    except _PIL_ERRORS as e:
        raise ImageDecodeError(f"corrupt {fmt} file ({_describe(e)})", source) from e
    # A JPEG with a multi-picture index opens as MPO (a JPEG subclass); anything else would be a bug.
    if im.format != fmt and not (fmt == "JPEG" and im.format == "MPO"):
        im.close()
        raise ImageDecodeError(f"unsupported format {im.format}", source)
    return im


def _check_jpeg_scans(im: Image.Image, data: bytes, source: str | None) -> None:
    """Refuse progressive JPEGs whose scan count makes decoding cost far more than the pixels suggest."""
    # An upper bound on the scans: entropy-coded data never holds FF DA (0xFF is stuffed as FF 00), but
    # a thumbnail or other APP payload may; that only matters near the limits.
    scans = data.count(b"\xff\xda")
    width, height = im.size
    if scans > _MAX_JPEG_SCANS or (scans > 1 and scans * width * height > _MAX_JPEG_SCAN_PIXELS):
        raise ImageDecodeError(f"corrupt JPEG (too many scans: {scans} for {width}x{height} pixels)", source)


def _check_frame_count(im: Image.Image, fmt: str, source: str | None) -> None:
    # GIF was counted by _scan_gif: GifImageFile.n_frames would walk (and partly decode) every frame.
    # PNG (APNG acTL), WebP (demuxer) and MPO (index) report a count without decoding.
    if fmt == "GIF":
        return
    frames = getattr(im, "n_frames", 1)
    if not isinstance(frames, int) or frames > MAX_FRAMES:
        raise ImageDecodeError(f"too many frames ({frames}, limit {MAX_FRAMES})", source)


def _draft(im: ImageFile.ImageFile, out_size: tuple[int, int]) -> None:
    """Let libjpeg decode a large JPEG at 1/2, 1/4 or 1/8 scale when we are going to shrink it anyway.

    The draft keeps at least twice the target in both directions (Pillow's thumbnail() does the same);
    the square target covers both orientations since EXIF rotation is applied after decoding.
    """
    if im.format in ("JPEG", "MPO"):
        side = 2 * max(out_size)
        try:
            im.draft(None, (side, side))
        except _PIL_ERRORS:
            pass  # an optimisation only: decode at full size


def _load(im: ImageFile.ImageFile, fmt: str, source: str | None) -> None:
    # Image.open reads only the header; truncation and corrupt data show here. LOAD_TRUNCATED_IMAGES
    # is Pillow's process-wide switch: we rely on its default (False) and never change it.
    try:
        im.load()
    except _PIL_ERRORS as e:
        raise ImageDecodeError(f"truncated or corrupt {fmt} image ({_describe(e)})", source) from e


def _describe(e: BaseException) -> str:
    text = str(e).split("\n", 1)[0].strip()
    return text[:200] if text else type(e).__name__


# ---------------------------------------------------------------------------------------------------
# Pixels: orientation, bit depth, alpha, channels


def _to_array(
    im: Image.Image, channels: int | None, size: tuple[int, int] | None, background: tuple[int, int, int]
) -> np.ndarray:
    """Loaded image → H×W×C uint8: orientation, 8 bits, alpha onto background, channels, size."""
    im = _apply_exif_orientation(im)
    gray_source = im.mode in _GRAY_MODES
    if channels is None:
        channels = 1 if gray_source else 3
    im = _composite(_to_8bit(im), background, gray=channels == 1)
    target_mode = "L" if channels == 1 else "RGB"
    if im.mode != target_mode:
        im = im.convert(target_mode)  # RGB → L is ITU-R 601-2 luma; L → RGB replicates
    if size is not None and im.size != (size[1], size[0]):
        # reducing_gap=3 first shrinks by an integer factor with a box filter, then resamples by at
        # least 3×: as good as a full antialiased resize (Pillow's docs) and much faster.
        im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR, reducing_gap=3.0)
    array = np.array(im, dtype=np.uint8)
    return array.reshape(array.shape[0], array.shape[1], -1)


def _apply_exif_orientation(im: Image.Image) -> Image.Image:
    """Transpose by the EXIF orientation; a broken EXIF block means no orientation, not a broken image.

    ImageOps.exif_transpose does the same transpose but then rewrites the EXIF block, which fails on
    exactly the broken EXIF we want to tolerate; we need only the pixels.
    """
    try:
        orientation = im.getexif().get(_EXIF_ORIENTATION_TAG)
    except Exception:  # noqa: BLE001 - any failure to parse metadata is "no usable orientation"
        return im
    method = _ORIENTATION_TRANSPOSE.get(orientation) if type(orientation) is int else None
    return im.transpose(method) if method is not None else im


def _to_8bit(im: Image.Image) -> Image.Image:
    """Convert any Pillow mode to one of L, LA, RGB, RGBA, keeping transparency as alpha."""
    mode = im.mode
    transparency = im.info.get("transparency")
    if mode in ("L", "RGB"):
        # a colour-key transparency (PNG tRNS) becomes an alpha channel
        return im.convert(mode[0] + "A" if mode == "L" else "RGBA") if transparency is not None else im
    if mode in ("LA", "RGBA"):
        return im
    if mode == "1":
        return im.convert("L")
    if mode in ("P", "PA"):
        # has_transparency_data: a transparency index or table in info, or an RGBA palette
        return im.convert("RGBA" if mode == "PA" or im.has_transparency_data else "RGB")
    if mode == "I" or mode.startswith("I;16"):
        return _sixteen_bit_to_8bit(im, transparency)
    if mode == "F":
        return _float_to_8bit(im)
    if mode == "La":  # premultiplied: Pillow cannot convert it, so unpremultiply here
        la = np.asarray(im).astype(np.uint32)
        alpha = la[..., 1]
        gray = np.where(alpha > 0, np.minimum(la[..., 0] * 255 // np.maximum(alpha, 1), 255), 0)
        return Image.fromarray(np.stack([gray, alpha], axis=-1).astype(np.uint8), "LA")
    if mode == "RGBa":
        return im.convert("RGBA")
    return im.convert("RGB")  # CMYK (Adobe inversion already undone by the JPEG plugin), YCbCr, LAB, HSV, RGBX


def _sixteen_bit_to_8bit(im: Image.Image, transparency: object) -> Image.Image:
    # 16-bit PNG grayscale opens as I;16 (or I in older Pillow) with values 0..65535. Pillow's
    # convert("L") clips them at 255, turning almost every pixel white; keep the high byte instead
    # (what Pillow itself does for 16-bit RGB PNGs).
    values = np.asarray(im)
    gray = (np.clip(values, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)
    if type(transparency) is int:
        alpha = np.where(values == transparency, 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([gray, alpha], axis=-1), "LA")
    return Image.fromarray(gray, "L")


def _float_to_8bit(im: Image.Image) -> Image.Image:
    # No allowlisted format produces 'F'; values in [0, 1] are taken as a unit range, others as 0..255.
    values = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    if values.size and values.min() >= 0.0 and values.max() <= 1.0:
        values = values * 255.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L")


def _composite(im: Image.Image, background: tuple[int, int, int], gray: bool) -> Image.Image:
    """Blend LA/RGBA onto the background (dropping alpha would show whatever colour hides under it).

    LA becomes L over the background's luminance when ``gray``; everything else becomes RGB.
    """
    if im.mode not in ("LA", "RGBA"):
        return im
    alpha = im.getchannel("A")
    if im.mode == "LA" and gray:
        base = Image.new("L", im.size, Image.new("RGB", (1, 1), background).convert("L").getpixel((0, 0)))
        base.paste(im.getchannel("L"), mask=alpha)
    else:
        base = Image.new("RGB", im.size, background)
        base.paste(im.convert("RGB"), mask=alpha)
    return base

"""Write valid and broken image files for tests: import these from any test that needs images on disk.

Every writer takes the file path to create (its extension is not consulted: the format is the function's)
and returns it as a Path. Contents are deterministic. Sizes are given as ``width, height`` like Pillow's.
The bombs and hand-built files are assembled from bytes, never from full-size pixel buffers.
"""

from __future__ import annotations

import io
import os
import random
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = [
    "pattern", "write_image", "write_png", "write_jpeg", "write_webp", "write_bmp", "write_gif",
    "write_png16", "write_rle8_bmp", "rle8_bmp_bytes", "write_cmyk_jpeg", "write_exif_image", "write_broken_exif_jpeg",
    "write_animated_gif", "write_animated_webp", "write_apng", "write_mpo", "write_many_frames_gif", "write_apng_declaring",
    "truncated_jpeg", "truncated_png", "truncate", "png_bomb", "gif_bomb", "bmp_bomb", "jpeg_bomb", "webp_bomb",
    "write_tiff", "write_eps", "write_pdf", "write_psd", "write_fits", "write_ico", "write_other_format",
    "png_with_appended_zip", "png_with_appended_html", "zero_byte", "random_bytes", "text_file",
    "png_chunk", "png_bytes", "write_seed_corpus", "OTHER_FORMATS",
]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _out(path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _write(path, data: bytes) -> Path:
    path = _out(path)
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------------------------------
# Valid images


def pattern(mode: str = "RGB", width: int = 16, height: int = 12) -> Image.Image:
    """A deterministic image in ``mode``: gradients along x and y, so flips and rotations show."""
    x = np.linspace(0, 255, width, dtype=np.float64)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float64)[:, None].repeat(width, 1)
    gray = ((x + y) / 2).astype(np.uint8)
    rgb = np.stack([x, y, np.full_like(x, 96)], axis=-1).astype(np.uint8)
    if mode == "L":
        return Image.fromarray(gray)
    if mode == "1":
        return Image.fromarray(gray).point(lambda v: 255 if v >= 128 else 0).convert("1")
    if mode == "LA":
        return Image.merge("LA", [Image.fromarray(gray), Image.fromarray(x.astype(np.uint8))])
    if mode == "RGB":
        return Image.fromarray(rgb)
    if mode == "RGBA":
        return Image.fromarray(np.dstack([rgb, x.astype(np.uint8)]))
    if mode == "P":
        return Image.fromarray(rgb).quantize(16)
    if mode == "CMYK":
        return Image.fromarray(rgb).convert("CMYK")
    if mode == "I;16":
        return Image.fromarray((gray.astype(np.uint16) * 257))
    raise ValueError(f"no pattern for mode {mode}")


def write_image(path, fmt: str, mode: str = "RGB", width: int = 16, height: int = 12, image=None, **save) -> Path:
    """Save ``image`` (default: :func:`pattern`) as ``fmt`` ("PNG", "JPEG", "WEBP", "BMP", "GIF", ...)."""
    path = _out(path)
    image = image if image is not None else pattern(mode, width, height)
    image.save(path, fmt, **save)
    return path


def write_png(path, mode: str = "RGB", width: int = 16, height: int = 12, image=None, **save) -> Path:
    return write_image(path, "PNG", mode, width, height, image, **save)


def write_jpeg(path, mode: str = "RGB", width: int = 16, height: int = 12, image=None, quality: int = 95,
               **save) -> Path:
    return write_image(path, "JPEG", mode, width, height, image, quality=quality, **save)


def write_webp(path, mode: str = "RGB", width: int = 16, height: int = 12, image=None, lossless: bool = True,
               **save) -> Path:
    return write_image(path, "WEBP", mode, width, height, image, lossless=lossless, **save)


def write_bmp(path, mode: str = "RGB", width: int = 16, height: int = 12, image=None, **save) -> Path:
    return write_image(path, "BMP", mode, width, height, image, **save)


def write_gif(path, mode: str = "P", width: int = 16, height: int = 12, image=None, **save) -> Path:
    return write_image(path, "GIF", mode, width, height, image, **save)


def write_rle8_bmp(path, indices: np.ndarray, palette: list[tuple[int, int, int]]) -> Path:
    """An RLE8-compressed palette BMP (Pillow reads these but does not write them) of ``indices`` (2-D uint8)."""
    indices = np.asarray(indices, dtype=np.uint8)
    height, width = indices.shape
    codes = bytearray()
    for row in indices[::-1]:  # BMP rows go bottom-up
        x = 0
        while x < width:
            run = 1
            while x + run < width and run < 255 and row[x + run] == row[x]:
                run += 1
            codes += bytes((run, row[x]))
            x += run
        codes += b"\x00\x00"  # end of line
    codes += b"\x00\x01"  # end of bitmap
    return _write(path, rle8_bmp_bytes(bytes(codes), width, height, palette))


def rle8_bmp_bytes(codes: bytes, width: int, height: int, palette: list[tuple[int, int, int]]) -> bytes:
    """An RLE8 BMP file around already encoded ``codes`` (pairs of count, index; 0 0 ends a line)."""
    table = b"".join(bytes((b, g, r, 0)) for r, g, b in palette).ljust(1024, b"\x00")
    offset = 14 + 40 + len(table)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(codes), 2835, 2835, 256, 0)
    header = b"BM" + struct.pack("<IHHI", offset + len(codes), 0, 0, offset)
    return header + info + table + codes


def write_png16(path, values: np.ndarray, transparency: int | None = None) -> Path:
    """A 16-bit grayscale PNG (Pillow mode I;16) holding exactly ``values`` (2-D uint16)."""
    image = Image.fromarray(np.asarray(values, dtype=np.uint16))
    save = {} if transparency is None else {"transparency": transparency}
    return write_image(path, "PNG", image=image, **save)


def write_cmyk_jpeg(path, colors: list[tuple[int, int, int, int]], block: int = 16) -> Path:
    """A CMYK JPEG (Adobe-inverted, as Photoshop writes them) with one ``block``-pixel square per colour."""
    image = Image.new("CMYK", (block * len(colors), block))
    for i, color in enumerate(colors):
        image.paste(color, (i * block, 0, (i + 1) * block, block))
    return write_image(path, "JPEG", image=image, quality=95)


def write_exif_image(path, fmt: str = "JPEG", orientation: int = 6, image=None) -> Path:
    """An image with an EXIF orientation tag (JPEG APP1, PNG eXIf or WebP EXIF chunk)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    image = image if image is not None else halves((255, 0, 0), (0, 0, 255), 20, 10)
    save = {"quality": 95} if fmt == "JPEG" else {"lossless": True} if fmt == "WEBP" else {}
    return write_image(path, fmt, image=image, exif=exif.tobytes(), **save)


def halves(left: tuple[int, int, int], right: tuple[int, int, int], width: int, height: int) -> Image.Image:
    """An RGB image whose left half is ``left`` and right half ``right``."""
    image = Image.new("RGB", (width, height), left)
    image.paste(right, (width // 2, 0, width, height))
    return image


def write_broken_exif_jpeg(path, kind: str = "garbage", image=None) -> Path:
    """A JPEG whose EXIF block is broken: "garbage" (not TIFF), "loop" (IFD pointing to itself),
    "bad_offset" (IFD beyond the block), "text_orientation" (orientation stored as ASCII), "orientation_99"."""
    image = image if image is not None else halves((255, 0, 0), (0, 0, 255), 20, 10)
    if kind == "garbage":
        exif = b"Exif\x00\x00" + bytes(range(7, 60))
    elif kind == "loop":  # IFD0 with one entry and a next-IFD offset pointing back at itself
        exif = b"Exif\x00\x00II*\x00\x08\x00\x00\x00" + struct.pack("<HHHII", 1, 0x0112, 3, 1, 6) + struct.pack("<I", 8)
    elif kind == "bad_offset":
        exif = b"Exif\x00\x00II*\x00" + struct.pack("<I", 0x7FFFFFF0)
    elif kind == "text_orientation":  # orientation as an ASCII string of 4 bytes: "6\0\0\0"
        entry = struct.pack("<HHHI4s", 1, 0x0112, 2, 4, b"6\x00\x00\x00")
        exif = b"Exif\x00\x00II*\x00\x08\x00\x00\x00" + entry + bytes(4)
    elif kind == "orientation_99":
        exif = b"Exif\x00\x00II*\x00\x08\x00\x00\x00" + struct.pack("<HHHII", 1, 0x0112, 3, 1, 99) + bytes(4)
    else:
        raise ValueError(kind)
    return write_image(path, "JPEG", image=image, quality=95, exif=exif)


def write_animated_gif(path, colors=((255, 0, 0), (0, 255, 0), (0, 0, 255)), width: int = 8, height: int = 8) -> Path:
    """An animated GIF with one solid frame per colour."""
    frames = [Image.new("RGB", (width, height), c) for c in colors]
    return write_image(path, "GIF", image=frames[0], save_all=True, append_images=frames[1:], duration=50, loop=0)


def write_animated_webp(path, colors=((255, 0, 0), (0, 255, 0), (0, 0, 255)), width: int = 8, height: int = 8) -> Path:
    """An animated WebP with one solid frame per colour."""
    frames = [Image.new("RGB", (width, height), c) for c in colors]
    return write_image(path, "WEBP", image=frames[0], save_all=True, append_images=frames[1:], duration=50,
                       lossless=True)


def write_apng(path, colors=((255, 0, 0), (0, 255, 0)), width: int = 8, height: int = 8) -> Path:
    """An animated PNG with one solid frame per colour."""
    frames = [Image.new("RGB", (width, height), c) for c in colors]
    return write_image(path, "PNG", image=frames[0], save_all=True, append_images=frames[1:], duration=50)


def write_mpo(path, colors=((255, 0, 0), (0, 255, 0)), width: int = 8, height: int = 8) -> Path:
    """A multi-picture JPEG (MPO, as stereo cameras write them) with one solid picture per colour."""
    frames = [Image.new("RGB", (width, height), c) for c in colors]
    return write_image(path, "MPO", image=frames[0], save_all=True, append_images=frames[1:])


# The smallest GIF frame: 1×1 pixel, palette index 0, LZW minimum code size 2 (clear, 0, end).
_GIF_TINY_FRAME = b"\x2c" + struct.pack("<HHHH", 0, 0, 1, 1) + b"\x00" + b"\x02\x02\x44\x01\x00"


def write_many_frames_gif(path, frames: int) -> Path:
    """A 1×1 GIF with ``frames`` frames, 11 bytes each (1001 frames: 11 KB)."""
    header = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\xff\x00\x00\x00\x00\xff"
    return _write(path, header + _GIF_TINY_FRAME * frames + b"\x3b")


def png_chunk(ctype: bytes, data: bytes) -> bytes:
    """One PNG chunk with its CRC."""
    return struct.pack(">I", len(data)) + ctype + data + struct.pack(">I", zlib.crc32(ctype + data) & 0xFFFFFFFF)


def png_bytes(width: int, height: int, idat: bytes, color_type: int = 0, bit_depth: int = 8,
              chunks_before: bytes = b"") -> bytes:
    """A PNG file from an already compressed IDAT stream."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return PNG_MAGIC + png_chunk(b"IHDR", ihdr) + chunks_before + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def write_apng_declaring(path, frames: int) -> Path:
    """A one-frame 4×4 APNG whose acTL chunk declares ``frames`` frames."""
    idat = zlib.compress(b"".join(b"\x00" + bytes([200] * 4) for _ in range(4)))
    actl = png_chunk(b"acTL", struct.pack(">II", frames, 0))
    fctl = png_chunk(b"fcTL", struct.pack(">IIIIIHHBB", 0, 4, 4, 0, 0, 1, 10, 0, 0))
    return _write(path, png_bytes(4, 4, idat, chunks_before=actl + fctl))


# ---------------------------------------------------------------------------------------------------
# Broken images


def truncate(path, fraction: float = 0.5) -> Path:
    """Cut an existing file to ``fraction`` of its length, in place."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * fraction))])
    return path


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    # noise does not compress, so the cut lands in the middle of the pixel data
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def truncated_jpeg(path, fraction: float = 0.6) -> Path:
    """A JPEG cut in its entropy-coded data: Image.open succeeds, decoding fails."""
    return truncate(write_image(path, "JPEG", image=_noise(64, 64), quality=90), fraction)


def truncated_png(path, fraction: float = 0.6) -> Path:
    """A PNG cut inside its IDAT chunk: Image.open succeeds, decoding fails."""
    return truncate(write_image(path, "PNG", image=_noise(64, 64)), fraction)


def _zlib_zeros(nbytes: int) -> bytes:
    """A zlib stream that inflates to ``nbytes`` zero bytes, built in O(1) memory per MiB of output.

    A full flush makes each compressed MiB of zeros a self-contained, byte-aligned deflate block, so
    the same block can be repeated; the Adler-32 of n zero bytes is ((n mod 65521) << 16) | 1.
    """
    mib = 1 << 20
    blocks, rest = divmod(nbytes, mib)
    raw = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = raw.compress(bytes(mib)) + raw.flush(zlib.Z_FULL_FLUSH)
    tail = zlib.compressobj(9, zlib.DEFLATED, -15)
    last = tail.compress(bytes(rest)) + tail.flush(zlib.Z_FULL_FLUSH) if rest else b""
    final_empty_block = b"\x03\x00"  # BFINAL=1, fixed Huffman, end-of-block
    adler = ((nbytes % 65521) << 16) | 1
    return b"\x78\xda" + block * blocks + last + final_empty_block + struct.pack(">I", adler)


def png_bomb(path, width: int = 20000, height: int = 20000, mode: str = "L") -> Path:
    """A complete, valid, all-black PNG (mode "L" or "RGB") of width×height: 20000×20000 L is 390 KB on
    disk and 400 MB of pixels."""
    channels = {"L": 1, "RGB": 3}[mode]
    idat = _zlib_zeros(height * (1 + width * channels))  # each row: filter byte 0 and zero samples
    return _write(path, png_bytes(width, height, idat, color_type={1: 0, 3: 2}[channels]))


def gif_bomb(path, width: int = 8000, height: int = 8000, via_frame_extent: bool = False) -> Path:
    """A GIF whose canvas is width×height but which holds one 1×1 frame. With ``via_frame_extent`` the
    logical screen is 1×1 and the frame is placed at (width-1, height-1), which grows Pillow's canvas."""
    screen = (1, 1) if via_frame_extent else (width, height)
    x, y = (width - 1, height - 1) if via_frame_extent else (0, 0)
    frame = b"\x2c" + struct.pack("<HHHH", x, y, 1, 1) + b"\x00\x02\x02\x44\x01\x00"
    header = b"GIF89a" + struct.pack("<HHBBB", *screen, 0x80, 0, 0) + b"\xff\x00\x00\x00\x00\xff"
    return _write(path, header + frame + b"\x3b")


def bmp_bomb(path, width: int = 8000, height: int = 8000) -> Path:
    """A 24-bit BMP header declaring width×height, followed by one row of pixels only."""
    row = bytes((width * 3 + 3) // 4 * 4)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    header = b"BM" + struct.pack("<IHHI", 14 + len(info) + len(row), 0, 0, 14 + len(info))
    return _write(path, header + info + row)


def jpeg_bomb(path, width: int = 8000, height: int = 8000) -> Path:
    """An 8×8 JPEG whose SOF header is patched to declare width×height."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return _write(path, bytes(data))


def webp_bomb(path, width: int = 8000, height: int = 8000) -> Path:
    """An animated 8×8 WebP whose VP8X header declares a width×height canvas (libwebp allocates it)."""
    buf = io.BytesIO()
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    frames[0].save(buf, "WEBP", save_all=True, append_images=frames[1:], lossless=True)
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"VP8X"
    data[24:27] = (width - 1).to_bytes(3, "little")
    data[27:30] = (height - 1).to_bytes(3, "little")
    return _write(path, bytes(data))


# Formats outside the allowlist, as real files where Pillow can write them.
OTHER_FORMATS = ("TIFF", "EPS", "PDF", "PSD", "FITS", "ICO", "PPM", "JPEG2000", "QOI", "AVIF", "SGI", "DDS")


def write_tiff(path) -> Path:
    return write_image(path, "TIFF")


def write_eps(path) -> Path:
    """A real EPS file (Pillow writes PostScript; reading it back would run Ghostscript)."""
    return write_image(path, "EPS")


def write_pdf(path) -> Path:
    return write_image(path, "PDF")


def write_ico(path) -> Path:
    return write_image(path, "ICO")


def write_psd(path) -> Path:
    """A minimal 1×1 RGB Photoshop file (Pillow cannot write PSD)."""
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, 1, 1, 8, 3)
    return _write(path, header + struct.pack(">I", 0) * 3 + struct.pack(">H", 0) + bytes(3))


def write_fits(path) -> Path:
    """A minimal 2×2 8-bit FITS file."""
    cards = ["SIMPLE  =                    T", "BITPIX  =                    8", "NAXIS   =                    2",
             "NAXIS1  =                    2", "NAXIS2  =                    2", "END"]
    header = "".join(c.ljust(80) for c in cards).ljust(2880).encode("ascii")
    return _write(path, header + bytes(4).ljust(2880, b"\x00"))


def write_other_format(path, name: str) -> Path:
    """Write one of :data:`OTHER_FORMATS`."""
    special = {"EPS": write_eps, "PDF": write_pdf, "PSD": write_psd, "FITS": write_fits, "ICO": write_ico}
    if name in special:
        return special[name](path)
    return write_image(path, name)


def png_with_appended_zip(path, mode: str = "RGB") -> Path:
    """A valid PNG followed by a ZIP archive (a polyglot: the pixels still decode)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("payload.txt", "not for serving back")
    png = write_png(path, mode).read_bytes()
    return _write(path, png + buf.getvalue())


def png_with_appended_html(path, mode: str = "RGB") -> Path:
    """A valid PNG followed by an HTML document with a script."""
    png = write_png(path, mode).read_bytes()
    return _write(path, png + b"<html><body><script>alert(1)</script></body></html>\n")


def zero_byte(path) -> Path:
    return _write(path, b"")


def random_bytes(path, n: int = 4096, seed: int = 0) -> Path:
    return _write(path, random.Random(seed).randbytes(n))


def text_file(path, text: str = "this is not an image\n" * 20) -> Path:
    return _write(path, text.encode())


# ---------------------------------------------------------------------------------------------------
# Fuzzing seeds


def write_seed_corpus(directory) -> list[Path]:
    """Small valid and broken images of every allowlisted format and mode, for a fuzzer's corpus."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    out: list[Path] = []
    for fmt, ext, modes in [
        ("PNG", "png", ["1", "L", "LA", "P", "RGB", "RGBA", "I;16"]),
        ("JPEG", "jpg", ["L", "RGB", "CMYK"]),
        ("WEBP", "webp", ["RGB", "RGBA"]),
        ("BMP", "bmp", ["1", "L", "P", "RGB"]),
        ("GIF", "gif", ["L", "P"]),
    ]:
        for mode in modes:
            out.append(write_image(d / f"{fmt.lower()}_{mode.replace(';', '')}.{ext}", fmt, mode, 8, 6))
    out.append(write_image(d / "webp_lossy.webp", "WEBP", "RGB", 8, 6, lossless=False))
    out.append(write_image(d / "jpeg_progressive.jpg", "JPEG", "RGB", 16, 16, progressive=True))
    out.append(write_image(d / "png_interlaced.png", "PNG", "RGB", 8, 6, interlace=1))
    rle_palette = [(i * 20, 255 - i * 20, 7) for i in range(10)]
    out.append(write_rle8_bmp(d / "bmp_rle8.bmp", np.arange(48).reshape(6, 8) // 5, rle_palette))
    out.append(write_image(d / "png_trns.png", "PNG", "P", 8, 6, transparency=0))
    out.append(write_exif_image(d / "exif6.jpg", "JPEG", 6, image=halves((255, 0, 0), (0, 0, 255), 8, 4)))
    out.append(write_exif_image(d / "exif3.png", "PNG", 3, image=halves((255, 0, 0), (0, 0, 255), 8, 4)))
    out.append(write_broken_exif_jpeg(d / "exif_loop.jpg", "loop", image=halves((255, 0, 0), (0, 0, 255), 8, 4)))
    out.append(write_animated_gif(d / "anim.gif", width=4, height=4))
    out.append(write_animated_webp(d / "anim.webp", width=4, height=4))
    out.append(write_apng(d / "anim.png", width=4, height=4))
    out.append(write_mpo(d / "multi.jpg", width=4, height=4))
    out.append(write_apng_declaring(d / "apng_5000.png", 5000))
    out.append(write_many_frames_gif(d / "frames_20.gif", 20))
    out.append(truncated_jpeg(d / "truncated.jpg"))
    out.append(truncated_png(d / "truncated.png"))
    out.append(png_bomb(d / "bomb.png", 3000, 3000))  # small: the fuzzer's max input length follows the seeds
    out.append(gif_bomb(d / "bomb.gif", via_frame_extent=True))
    out.append(bmp_bomb(d / "bomb.bmp", 9000, 9000))
    out.append(jpeg_bomb(d / "bomb.jpg"))
    out.append(webp_bomb(d / "bomb.webp"))
    out.append(write_cmyk_jpeg(d / "cmyk.jpg", [(255, 0, 0, 0), (0, 0, 0, 255)], block=8))
    out.append(png_with_appended_html(d / "polyglot.png"))
    out.append(write_tiff(d / "tiff.png"))
    out.append(write_psd(d / "psd.jpg"))
    out.append(random_bytes(d / "random.bin", 256))
    return out


if __name__ == "__main__":  # write the corpus somewhere to look at it: python tests/imagefactory.py DIR
    import sys

    target = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.getcwd(), "imgrec-seed-corpus")
    for p in write_seed_corpus(target):
        print(p, p.stat().st_size)

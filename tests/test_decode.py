"""The safe image decoder (imgrec.data.decode) against real files: valid, broken and hostile.

Each kind of image the decoder must refuse or repair (wrong format, bomb, truncated, EXIF, CMYK, 16-bit,
palette, alpha) has a test here; the images come from tests/imagefactory.py.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import subprocess
import sys
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import EpsImagePlugin, Image, ImageFile

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/ is not a package: import the factory beside us
import imagefactory as factory  # noqa: E402

from imgrec.data import decode  # noqa: E402
from imgrec.data.decode import (  # noqa: E402
    ALLOWED_FORMATS,
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    MAX_FRAMES,
    decode_image,
    load_image_tensor,
    sniff_format,
)
from imgrec.errors import ImageDecodeError  # noqa: E402

TESTS = Path(__file__).resolve().parent
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)
VALID_WRITERS = {
    "PNG": factory.write_png,
    "JPEG": factory.write_jpeg,
    "WEBP": factory.write_webp,
    "BMP": factory.write_bmp,
    "GIF": factory.write_gif,
}


def refused(src, **kw) -> ImageDecodeError:
    """Decode ``src`` expecting a refusal; return the error."""
    with pytest.raises(ImageDecodeError) as info:
        decode_image(src, **kw)
    return info.value


def close(a, b, tol: int) -> bool:
    return bool(np.all(np.abs(np.asarray(a, dtype=np.int32) - np.asarray(b, dtype=np.int32)) <= tol))


# ---------------------------------------------------------------------------------------------------
# API shape


def test_constants_match_the_documented_api():
    assert ALLOWED_FORMATS == {"JPEG", "PNG", "WEBP", "BMP", "GIF"}
    assert IMAGE_EXTENSIONS == {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}
    assert all(e == e.lower() for e in IMAGE_EXTENSIONS)
    assert DEFAULT_MAX_PIXELS == 40_000_000 and decode.DEFAULT_MAX_BYTES == 50 * 1024 * 1024 and MAX_FRAMES == 1000


@pytest.mark.parametrize("fmt", sorted(VALID_WRITERS))
def test_every_allowed_format_decodes_to_its_pixels(tmp_path, fmt):
    image = factory.pattern("RGB", 16, 12)
    path = VALID_WRITERS[fmt](tmp_path / f"x.{fmt.lower()}", image=image)
    out = decode_image(path)
    assert out.dtype == np.uint8 and out.shape == (12, 16, 3)
    assert out.flags.c_contiguous and out.flags.writeable
    # JPEG is lossy and GIF is quantised to a palette; the others are exact
    tol = {"JPEG": 12, "GIF": 24}.get(fmt, 0)
    assert close(out, np.asarray(image), tol)
    assert sniff_format(path.read_bytes()) == fmt


def test_bytes_bytearray_memoryview_and_file_objects_are_accepted(tmp_path):
    path = factory.write_png(tmp_path / "x.png")
    data = path.read_bytes()
    expected = decode_image(path)
    assert np.array_equal(decode_image(data), expected)
    assert np.array_equal(decode_image(bytearray(data)), expected)
    assert np.array_equal(decode_image(memoryview(data)), expected)
    assert np.array_equal(decode_image(io.BytesIO(data)), expected)
    with open(path, "rb") as f:
        assert np.array_equal(decode_image(f), expected)
    assert np.array_equal(decode_image(str(path)), expected)


def test_load_image_tensor_is_contiguous_uint8_chw(tmp_path):
    path = factory.write_png(tmp_path / "x.png", width=16, height=12)
    t = load_image_tensor(path, size=(8, 10))
    assert isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.is_contiguous()
    assert tuple(t.shape) == (3, 8, 10)
    assert torch.equal(t, torch.from_numpy(decode_image(path, size=(8, 10))).permute(2, 0, 1))
    assert tuple(load_image_tensor(path, channels=1).shape) == (1, 12, 16)


def test_bad_arguments_are_programming_errors_not_decode_errors(tmp_path):
    path = factory.write_png(tmp_path / "x.png")
    for kw in ({"channels": 2}, {"channels": 4}, {"size": 0}, {"size": (3,)}, {"size": (2, -1)}, {"size": True},
               {"background": (1, 2)}, {"background": (0, 0, 300)}, {"size": (100_000, 100_000)}):
        with pytest.raises(ValueError) as info:
            decode_image(path, **kw)
        assert not isinstance(info.value, ImageDecodeError), kw
    with pytest.raises(TypeError):
        decode_image(12345)
    with pytest.raises(TypeError):
        decode_image(io.StringIO("text"))


# ---------------------------------------------------------------------------------------------------
# Not images, other formats, and the file system


def test_sniff_format_uses_magic_bytes_only(tmp_path):
    assert sniff_format(b"") is None
    assert sniff_format(b"BMW is not a bitmap, nor is this text") is None
    assert sniff_format(b"RIFF\x00\x00\x00\x00WAVEfmt ") is None
    for name in factory.OTHER_FORMATS:
        path = factory.write_other_format(tmp_path / f"x.{name}", name)
        assert sniff_format(path.read_bytes()) is None, name


@pytest.mark.parametrize(
    "make, reason",
    [
        (factory.zero_byte, "empty file"),
        (factory.text_file, "not an image (unrecognised format)"),
        (factory.random_bytes, "not an image (unrecognised format)"),
        (lambda p: factory._write(p, b"<html><body>hello</body></html>"), "not an image (unrecognised format)"),
        (lambda p: factory._write(p, b"\xff\xd8"), "not an image (unrecognised format)"),  # JPEG magic cut short
    ],
    ids=["zero-byte", "text", "random", "html", "two-bytes"],
)
def test_not_an_image_gives_a_clear_reason_naming_the_file(tmp_path, make, reason):
    path = make(tmp_path / "photo.jpg")
    err = refused(path)
    assert err.reason == reason
    assert err.source == str(path) and str(path) in str(err)


@pytest.mark.parametrize("name", factory.OTHER_FORMATS)
def test_formats_outside_the_allowlist_are_refused_whatever_the_extension(tmp_path, name):
    path = factory.write_other_format(tmp_path / "disguised.png", name)
    if name != "PDF":  # a real file of that format: Pillow (which only writes PDF) would open it
        with Image.open(path) as im:
            assert im.format is not None
    err = refused(path)
    expected = {"JPEG2000": "JPEG2000", "AVIF": "AVIF"}.get(name, name)
    assert err.reason == f"unsupported format {expected}"


def test_eps_never_reaches_ghostscript_or_the_eps_plugin(tmp_path, monkeypatch):
    calls = []

    def forbidden(*args, **kwargs):
        calls.append(args)
        raise AssertionError("EPS plugin reached")  # not a Pillow error type: it would escape decode_image

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", forbidden)
    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", forbidden)
    for name in ("x.eps", "x.png", "x.jpg"):
        err = refused(factory.write_eps(tmp_path / name))
        assert err.reason == "unsupported format EPS"
    # the PostScript text behind a DOS EPS binary header too
    data = factory.write_eps(tmp_path / "y.eps").read_bytes()
    assert refused(b"\xc5\xd0\xd3\xc6" + bytes(26) + data).reason == "unsupported format EPS"
    assert calls == []


def test_a_png_named_jpg_decodes_by_its_real_format(tmp_path):
    path = factory.write_png(tmp_path / "really_a_png.jpg", image=Image.new("RGB", (5, 4), (1, 2, 3)))
    assert np.all(decode_image(path) == (1, 2, 3))


def test_directory_named_like_an_image(tmp_path):
    d = tmp_path / "x.jpg"
    d.mkdir()
    err = refused(d)
    assert err.reason == "is a directory" and err.source == str(d)


def test_broken_symlink(tmp_path):
    link = tmp_path / "gone.png"
    link.symlink_to(tmp_path / "does-not-exist.png")
    err = refused(link)
    assert err.reason == "broken symbolic link" and str(link) in str(err)


def test_nonexistent_path(tmp_path):
    path = tmp_path / "nope.png"
    err = refused(path)
    assert err.reason == "file not found" and err.source == str(path)


def test_working_symlink_is_followed(tmp_path):
    target = factory.write_png(tmp_path / "real.png", image=Image.new("RGB", (3, 3), RED))
    link = tmp_path / "link.png"
    link.symlink_to(target)
    assert np.all(decode_image(link) == RED)


def test_fifo_named_like_an_image_is_refused_without_blocking(tmp_path, monkeypatch):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    flags = []
    real_open = os.open
    monkeypatch.setattr(decode.os, "open", lambda p, f, *a: flags.append(f) or real_open(p, f, *a))
    monkeypatch.setattr(decode, "_read_limited", lambda *a: pytest.fail("read"))
    err = refused(fifo)  # a plain open() would wait for a writer forever
    assert err.reason == "not a regular file"
    # why it cannot block: opened non-blocking, and refused from fstat before a byte is read
    assert flags and all(f & os.O_NONBLOCK for f in flags)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads chmod-000 files; test_permission_error_simulated covers it")
def test_unreadable_file(tmp_path):
    path = factory.write_png(tmp_path / "locked.png")
    path.chmod(0)
    try:
        err = refused(path)
    finally:
        path.chmod(0o644)
    assert err.reason == "permission denied" and err.source == str(path)


def test_permission_error_simulated(tmp_path, monkeypatch):
    # Runs as root too: make the open itself fail the way an unreadable file does.
    path = factory.write_png(tmp_path / "locked.png")
    real_open = os.open

    def deny(p, *args, **kwargs):
        if os.fspath(p) == str(path):
            raise PermissionError(13, "Permission denied", str(p))
        return real_open(p, *args, **kwargs)

    monkeypatch.setattr(os, "open", deny)
    err = refused(path)
    assert err.reason == "permission denied" and err.source == str(path)


def test_source_argument_names_bytes_and_overrides_the_path(tmp_path):
    assert refused(b"", source="upload.png").source == "upload.png"
    assert str(refused(b"", source="upload.png")) == "upload.png: empty file"
    assert refused(factory.zero_byte(tmp_path / "a.png"), source="shown.png").source == "shown.png"
    with open(factory.zero_byte(tmp_path / "b.png"), "rb") as f:
        assert refused(f).source == f.name


# ---------------------------------------------------------------------------------------------------
# Size limits: bytes and pixels


def test_input_over_max_bytes_is_refused(tmp_path):
    path = factory.write_png(tmp_path / "x.png")
    n = path.stat().st_size
    assert decode_image(path, max_bytes=n).shape == (12, 16, 3)  # exactly at the limit is fine
    for src in (path, path.read_bytes(), io.BytesIO(path.read_bytes())):
        err = refused(src, max_bytes=n - 1)
        assert err.reason.startswith("file too large")


def test_huge_sparse_file_is_refused_from_its_size_without_reading(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    with open(path, "wb") as f:
        f.write(factory.write_png(tmp_path / "x.png").read_bytes())
        f.truncate(100 * 1024**3)  # 100 GiB, sparse
    monkeypatch.setattr(decode, "_read_limited", lambda *a: pytest.fail("read"))  # refused from its size alone
    assert refused(path).reason == f"file too large ({100 * 1024**3} bytes, limit {decode.DEFAULT_MAX_BYTES})"


def test_endless_stream_is_read_only_up_to_the_limit():
    class Endless(io.RawIOBase):
        consumed = 0

        def readable(self):
            return True

        def readinto(self, b):
            b[:] = b"\xff" * len(b)
            self.consumed += len(b)
            return len(b)

    stream = Endless()
    assert refused(stream, max_bytes=1000).reason.startswith("file too large")
    assert stream.consumed == 1001


def test_max_pixels_boundary(tmp_path):
    path = factory.write_png(tmp_path / "x.png", width=10, height=10)
    assert decode_image(path, max_pixels=100).shape == (10, 10, 3)
    err = refused(path, max_pixels=99)
    assert err.reason == "image too large (10x10 = 100 pixels, limit 99)"


@pytest.fixture
def allocations(monkeypatch):
    """Record the size of every pixel buffer Pillow allocates (Image.core.new / fill)."""
    sizes = []
    for name in ("new", "fill"):
        real = getattr(Image.core, name)

        def spy(mode, size, *args, _real=real):
            sizes.append(size[0] * size[1])
            return _real(mode, size, *args)

        monkeypatch.setattr(Image.core, name, spy)
    return sizes


@pytest.mark.parametrize(
    "make",
    [
        lambda p: factory.png_bomb(p, 8000, 8000),
        lambda p: factory.png_bomb(p, 20000, 20000, "RGB"),
        lambda p: factory.gif_bomb(p),
        lambda p: factory.gif_bomb(p, via_frame_extent=True),
        lambda p: factory.bmp_bomb(p),
        lambda p: factory.jpeg_bomb(p),
        lambda p: factory.webp_bomb(p),
    ],
    ids=["png-64M", "png-400M", "gif-screen", "gif-frame-extent", "bmp", "jpeg", "webp-canvas"],
)
def test_decompression_bombs_are_refused_before_pixels_are_allocated(tmp_path, make, allocations):
    path = make(tmp_path / "bomb")
    assert path.stat().st_size < 1_200_000  # small files (the 400 Mpx RGB PNG is complete: 1.2 MB)...
    err = refused(path)  # ...declaring 64 or 400 megapixels
    assert err.reason.startswith("image too large")
    assert all(n <= DEFAULT_MAX_PIXELS for n in allocations), allocations


def test_our_pixel_limit_holds_when_pillows_is_switched_off(tmp_path, monkeypatch, allocations):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # what some scripts do to "fix" bomb errors
    bombs = (factory.png_bomb(tmp_path / "b.png", 20000, 20000), factory.webp_bomb(tmp_path / "b.webp", 16000, 16000))
    for path in bombs:
        assert refused(path).reason.startswith("image too large (")
    assert all(n <= DEFAULT_MAX_PIXELS for n in allocations), allocations


def test_png_bomb_is_a_real_image_that_would_decode(tmp_path):
    # The bombs above are refused by the header alone; make sure they are not refused for being broken.
    path = factory.png_bomb(tmp_path / "b.png", 2000, 1500, "RGB")
    out = decode_image(path, max_pixels=2000 * 1500)
    assert out.shape == (1500, 2000, 3) and not out.any()


_RSS_CHILD = r"""
import json, resource, sys
from imgrec.data.decode import decode_image
from imgrec.errors import ImageDecodeError
results = {}
for path in sys.argv[1:]:
    data = open(path, "rb").read()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        decode_image(data)
        outcome = "decoded"
    except ImageDecodeError as e:
        outcome = e.reason
    results[path] = {"outcome": outcome,
                     "rss_growth_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}
print(json.dumps(results))
"""


def test_bomb_refusal_keeps_process_memory_flat(tmp_path):
    # Peak RSS of a fresh process (it counts C allocations too, which the spy above cannot see for
    # libwebp). 9000×9000 RGB is 81 Mpx: under Pillow's own warning threshold (89 Mpx), so only our
    # check stands between it and 324 MB of pixels.
    bombs = [factory.png_bomb(tmp_path / "b.png", 9000, 9000, "RGB"),
             factory.webp_bomb(tmp_path / "b.webp", 9000, 9000)]
    run = subprocess.run([sys.executable, "-c", _RSS_CHILD, *map(str, bombs)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    for path in bombs:
        r = results[str(path)]
        assert r["outcome"].startswith("image too large"), r
        assert r["rss_growth_mb"] < 40, r


def test_pillow_bomb_warning_becomes_an_error_without_leaking_warnings(tmp_path):
    # 10000×10000 lies between Pillow's MAX_IMAGE_PIXELS and twice that, where Pillow only warns.
    # A caller's generous max_pixels does not switch off Pillow's process-wide limit.
    assert Image.MAX_IMAGE_PIXELS < 10000 * 10000 < 2 * Image.MAX_IMAGE_PIXELS
    path = factory.png_bomb(tmp_path / "b.png", 10000, 10000)
    filters_before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        err = refused(path, max_pixels=10**9)
    assert "decompression bomb" in err.reason
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    assert warnings.filters == filters_before


def test_concurrent_decodes_leave_warning_filters_as_they_were(tmp_path):
    bomb = factory.png_bomb(tmp_path / "b.png", 10000, 10000).read_bytes()
    good = factory.write_png(tmp_path / "g.png", image=Image.new("RGB", (4, 4), RED)).read_bytes()
    filters_before = list(warnings.filters)
    failures = []

    def work():
        for _ in range(20):
            try:
                decode_image(bomb, max_pixels=10**9)
                failures.append("bomb decoded")
            except ImageDecodeError:
                pass
            if not np.all(decode_image(good) == RED):
                failures.append("wrong pixels")

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert warnings.filters == filters_before


# ---------------------------------------------------------------------------------------------------
# Truncated and corrupt data


@pytest.mark.parametrize("make, fmt", [(factory.truncated_jpeg, "JPEG"), (factory.truncated_png, "PNG")])
def test_truncated_image_is_found_at_decode_time(tmp_path, make, fmt):
    path = make(tmp_path / "cut")
    with Image.open(path) as im:  # the header is intact: opening alone does not notice
        assert im.format == fmt
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    err = refused(path)
    assert err.reason.startswith(f"truncated or corrupt {fmt} image")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


@pytest.mark.parametrize("fmt", sorted(VALID_WRITERS))
@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.97])
def test_any_truncation_of_any_format_is_refused(tmp_path, fmt, fraction):
    noise = factory._noise(48, 32)
    image = noise.quantize(256) if fmt == "GIF" else noise
    path = factory.truncate(VALID_WRITERS[fmt](tmp_path / "x", image=image), fraction)
    refused(path)


def test_no_imgrec_code_changes_load_truncated_images():
    # LOAD_TRUNCATED_IMAGES is process-wide: one assignment anywhere in imgrec (at import time or in a
    # function) would blind this decoder to truncated files everywhere, so look for one in the source.
    import imgrec

    assignment = re.compile(r"LOAD_TRUNCATED_IMAGES\s*=(?!=)|setattr\([^)]*LOAD_TRUNCATED_IMAGES")
    offenders = [str(path) for root in imgrec.__path__ for path in Path(root).rglob("*.py")
                 if assignment.search(path.read_text(encoding="utf-8", errors="replace"))]
    assert offenders == []
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# ---------------------------------------------------------------------------------------------------
# Container structures that make Pillow's Python parsers slow


def _png_with_chunks(count: int) -> bytes:
    """A 1×2 grayscale PNG with ``count`` empty ancillary chunks before its pixels."""
    idat = zlib.compress(b"\x00\x07" * 2)
    return factory.png_bytes(1, 2, idat, chunks_before=factory.png_chunk(b"abCd", b"") * count)


@pytest.fixture()
def pillow_never_opens(monkeypatch):
    """The budget of the structure checks: refused before Pillow's (slow, Python) parser sees a byte."""
    monkeypatch.setattr(decode.Image, "open", lambda *a, **k: pytest.fail("Pillow opened it"))


def test_png_with_too_many_chunks_is_refused_fast():
    assert decode_image(_png_with_chunks(1000), channels=1).shape == (2, 1, 1)


def test_png_with_too_many_chunks_is_refused_before_pillow_reads_it(pillow_never_opens):
    assert refused(_png_with_chunks(200_000)).reason.startswith("corrupt PNG (more than")


def test_jpeg_with_too_many_markers_is_refused_fast(tmp_path, monkeypatch):
    data = factory.write_jpeg(tmp_path / "x.jpg", image=Image.new("RGB", (8, 8), RED)).read_bytes()
    assert data[2:4] == b"\xff\xe0"
    app0_end = 4 + int.from_bytes(data[4:6], "big")
    head, tail = data[:app0_end], data[app0_end:]
    assert close(decode_image(head + b"\xff\xe5\x00\x02" * 1000 + tail), RED, 3)
    assert close(decode_image(head + b"\x00" * 1000 + tail), RED, 3)  # Pillow skips junk between markers
    monkeypatch.setattr(decode.Image, "open", lambda *a, **k: pytest.fail("Pillow opened it"))  # the budget
    for filler in (b"\xff\xe5\x00\x02" * 200_000, b"\x00" * 800_000):  # empty APP5 segments; junk bytes
        assert refused(head + filler + tail).reason.startswith("corrupt JPEG (more than")


def _with_repeated_last_scan(data: bytes, times: int) -> bytes:
    """A progressive JPEG with its last scan (SOS segment and entropy-coded data) repeated ``times`` more."""
    last_scan = data[data.rindex(b"\xff\xda") : -2]
    return data[:-2] + last_scan * times + data[-2:]


def test_jpeg_with_too_many_progressive_scans_is_refused(tmp_path, monkeypatch):
    small = factory.write_jpeg(tmp_path / "p.jpg", width=64, height=64, progressive=True).read_bytes()
    assert decode_image(_with_repeated_last_scan(small, 20)).shape == (64, 64, 3)
    assert refused(_with_repeated_last_scan(small, 1000)).reason.startswith("corrupt JPEG (too many scans: 10")
    # Each scan costs a pass over every block: 2000×2000 with 300 scans would take libjpeg ~3 s.
    image = Image.new("RGB", (2000, 2000), (120, 30, 200))
    large = factory.write_jpeg(tmp_path / "l.jpg", image=image, progressive=True).read_bytes()
    assert close(decode_image(large, size=8), (120, 30, 200), 4)
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda *a, **k: pytest.fail("decoded"))  # from the header
    assert refused(_with_repeated_last_scan(large, 300)).reason.startswith("corrupt JPEG (too many scans: 3")


def test_gif_with_too_many_blocks_before_the_first_image_is_refused_fast(tmp_path, monkeypatch):
    data = factory.write_many_frames_gif(tmp_path / "g.gif", 1).read_bytes()
    header_end = data.index(b"\x2c")
    comment = b"\x21\xfe" + b"\x01c" * 200_000 + b"\x00"  # a comment in 200k one-byte sub-blocks
    with monkeypatch.context() as m:  # refused by the scan, before Pillow's parser walks the blocks
        m.setattr(decode.Image, "open", lambda *a, **k: pytest.fail("Pillow opened it"))
        assert refused(data[:header_end] + comment + data[header_end:]).reason.startswith("corrupt GIF (more than")
    assert decode_image(data[:header_end] + b"\x21\xfe\x05hello\x00" + data[header_end:]).shape == (1, 1, 3)


def test_large_rle_bmp_is_refused(tmp_path, monkeypatch):
    palette = [(200, 0, 0), (0, 0, 200), (7, 8, 9)]
    indices = np.array([[0, 0, 0, 1], [2, 1, 1, 1]], dtype=np.uint8)
    small = factory.write_rle8_bmp(tmp_path / "rle.bmp", indices, palette)
    assert decode_image(small).tolist() == [[list(palette[i]) for i in row] for row in indices]
    # 2100×2100 of one-pixel runs: 8.8 MB of codes, each one a Python loop iteration in Pillow
    codes = (b"\x01\x00\x01\x01" * 1050 + b"\x00\x00") * 2100 + b"\x00\x01"
    big = factory.rle8_bmp_bytes(codes, 2100, 2100, palette)
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda *a, **k: pytest.fail("decoded"))  # never run-length decoded
    assert refused(big).reason.startswith("RLE-compressed BMP larger than")


# ---------------------------------------------------------------------------------------------------
# Pixel modes, colour and alpha


def test_cmyk_jpeg_converts_to_the_right_rgb(tmp_path):
    colors = {  # CMYK → expected RGB
        (255, 0, 0, 0): (0, 255, 255),  # cyan
        (0, 255, 0, 0): (255, 0, 255),  # magenta
        (0, 0, 255, 0): (255, 255, 0),  # yellow
        (0, 255, 255, 0): (255, 0, 0),  # red
        (0, 0, 0, 255): (0, 0, 0),  # black
        (0, 0, 0, 0): (255, 255, 255),  # white
    }
    path = factory.write_cmyk_jpeg(tmp_path / "cmyk.jpg", list(colors))
    with Image.open(path) as im:
        assert im.mode == "CMYK"
    out = decode_image(path)
    for i, rgb in enumerate(colors.values()):
        assert close(out[8, i * 16 + 8], rgb, 6), (i, out[8, i * 16 + 8], rgb)


def test_16bit_grayscale_png_is_scaled_not_saturated(tmp_path):
    values = np.array([[0, 255, 256, 4096, 32768, 0x8080, 65280, 65535]], dtype=np.uint16)
    path = factory.write_png16(tmp_path / "g16.png", values)
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    out = decode_image(path, channels=None)
    assert out.shape == (1, 8, 1)
    assert out[0, :, 0].tolist() == [0, 0, 1, 16, 128, 128, 255, 255]
    assert decode_image(path, channels=3)[0, 4].tolist() == [128, 128, 128]


def test_16bit_grayscale_png_with_transparency_is_composited(tmp_path):
    values = np.array([[0, 65535, 12345]], dtype=np.uint16)
    path = factory.write_png16(tmp_path / "g16t.png", values, transparency=12345)
    out = decode_image(path, channels=3, background=(10, 20, 30))
    assert out[0].tolist() == [[0, 0, 0], [255, 255, 255], [10, 20, 30]]


def test_rgba_is_composited_onto_the_background(tmp_path):
    pixels = np.array([[[255, 0, 0, 255], [255, 0, 0, 128], [0, 255, 0, 0]]], dtype=np.uint8)
    for fmt, writer in (("PNG", factory.write_png), ("WEBP", factory.write_webp)):
        path = writer(tmp_path / f"rgba.{fmt}", image=Image.fromarray(pixels))
        out = decode_image(path, background=(0, 0, 255))
        # opaque red stays; half-transparent red over blue is purple; the hidden green is not shown
        assert close(out[0], [[255, 0, 0], [128, 0, 127], [0, 0, 255]], 1), (fmt, out[0])
        assert close(decode_image(path)[0, 2], WHITE, 0)  # default background is white


def test_la_is_composited_onto_the_background_luminance_or_colour(tmp_path):
    image = Image.merge("LA", [Image.new("L", (2, 1), 200), Image.frombytes("L", (2, 1), b"\xff\x00")])
    path = factory.write_png(tmp_path / "la.png", image=image)
    bg = (255, 0, 0)  # luminance 76
    assert decode_image(path, channels=None, background=bg)[0, :, 0].tolist() == [200, 76]
    assert decode_image(path, channels=3, background=bg)[0].tolist() == [[200, 200, 200], [255, 0, 0]]


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency_is_composited(tmp_path, fmt):
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)  # index 0 red, 1 green
    image.putpixel((1, 0), 1)
    path = VALID_WRITERS[fmt](tmp_path / "p", image=image, transparency=0)
    out = decode_image(path, background=(10, 20, 30))
    assert out[0].tolist() == [[10, 20, 30], [0, 255, 0]]  # the transparent red pixel shows the background


def test_png_colour_key_transparency_is_composited(tmp_path):
    image = Image.new("RGB", (2, 1), (1, 2, 3))
    image.putpixel((1, 0), (200, 100, 50))
    path = factory.write_png(tmp_path / "trns.png", image=image, transparency=(1, 2, 3))
    assert decode_image(path, background=(9, 9, 9))[0].tolist() == [[9, 9, 9], [200, 100, 50]]


def test_palette_without_transparency_becomes_rgb(tmp_path):
    image = Image.new("P", (2, 1))
    image.putpalette([12, 34, 56, 200, 100, 0] + [0] * 762)
    image.putpixel((1, 0), 1)
    out = decode_image(factory.write_png(tmp_path / "p.png", image=image), channels=None)
    assert out.shape == (1, 2, 3) and out[0].tolist() == [[12, 34, 56], [200, 100, 0]]


def test_bilevel_image_becomes_grayscale(tmp_path):
    image = Image.frombytes("1", (8, 1), b"\xa5")  # 1010 0101
    for writer in (factory.write_png, factory.write_bmp):
        out = decode_image(writer(tmp_path / "bw", image=image), channels=None)
        assert out.shape == (1, 8, 1) and out[0, :, 0].tolist() == [255, 0, 255, 0, 0, 255, 0, 255]


def test_rgb_to_one_channel_uses_luminance(tmp_path):
    image = Image.new("RGB", (3, 1))
    for x, c in enumerate((RED, GREEN, BLUE)):
        image.putpixel((x, 0), c)
    out = decode_image(factory.write_png(tmp_path / "rgb.png", image=image), channels=1)
    assert out.shape == (1, 3, 1)
    assert close(out[0, :, 0], [76, 150, 29], 1)  # ITU-R 601-2: 0.299 R + 0.587 G + 0.114 B


def test_grayscale_to_three_channels_is_replicated(tmp_path):
    path = factory.write_png(tmp_path / "l.png", "L")
    gray = decode_image(path, channels=None)
    rgb = decode_image(path, channels=3)
    assert gray.shape[2] == 1 and rgb.shape[2] == 3
    assert np.array_equal(rgb, np.repeat(gray, 3, axis=2))
    assert np.array_equal(gray[:, :, 0], np.asarray(factory.pattern("L")))


@pytest.mark.parametrize(
    "fmt, mode, expected",
    [("PNG", "L", 1), ("PNG", "LA", 1), ("PNG", "1", 1), ("PNG", "I;16", 1), ("JPEG", "L", 1), ("GIF", "L", 3),
     ("PNG", "RGB", 3), ("PNG", "RGBA", 3), ("PNG", "P", 3), ("JPEG", "CMYK", 3), ("WEBP", "RGB", 3)],
)
def test_channels_none_keeps_grayscale_sources_single_channel(tmp_path, fmt, mode, expected):
    # (Pillow saves an 'L' image as a palette GIF, which is a colour source)
    path = factory.write_image(tmp_path / "x", fmt, mode)
    assert decode_image(path, channels=None).shape[2] == expected


@pytest.mark.parametrize(
    "image, expected",
    [
        (Image.new("YCbCr", (1, 1), (76, 85, 255)), (254, 0, 0)),
        (Image.new("LAB", (1, 1), (255, 128, 128)), (255, 255, 255)),
        (Image.new("HSV", (1, 1), (0, 255, 255)), (255, 0, 0)),
        (Image.new("RGBX", (1, 1), (1, 2, 3, 0)), (1, 2, 3)),
        (Image.new("CMYK", (1, 1), (0, 255, 255, 0)), (255, 0, 0)),
        (Image.new("I", (1, 1), 32768), (128, 128, 128)),
        (Image.new("F", (1, 1), 0.5), (128, 128, 128)),
        (Image.new("F", (1, 1), 200.0), (200, 200, 200)),
    ],
    ids=["YCbCr", "LAB", "HSV", "RGBX", "CMYK", "I", "F-unit", "F-byte"],
)
def test_modes_no_allowlisted_file_produces_still_convert(image, expected):
    # No JPEG/PNG/WebP/BMP/GIF opens in these modes, so they are tested on the conversion step directly.
    out = decode._to_8bit(image).convert("RGB")
    assert close(out.getpixel((0, 0)), expected, 1), out.getpixel((0, 0))


def test_premultiplied_modes_are_unpremultiplied():
    la = decode._to_8bit(Image.new("La", (1, 1), (50, 128)))
    assert la.mode == "LA" and close(la.getpixel((0, 0)), (99, 128), 1)
    rgba = decode._to_8bit(Image.new("RGBa", (1, 1), (50, 0, 0, 128)))
    assert rgba.mode == "RGBA" and close(rgba.getpixel((0, 0)), (99, 0, 0, 128), 1)


# ---------------------------------------------------------------------------------------------------
# EXIF orientation


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_orientation_is_applied_before_resizing(tmp_path, fmt):
    # Stored: 20 wide × 10 high, left red, right blue. Orientation 6 = rotate 90° clockwise to display.
    path = factory.write_exif_image(tmp_path / "rot", fmt, 6)
    out = decode_image(path)
    assert out.shape == (20, 10, 3)
    assert close(out[2, 5], RED, 10) and close(out[17, 5], BLUE, 10)
    small = decode_image(path, size=(8, 4))  # (height, width) of the upright image
    assert small.shape == (8, 4, 3) and close(small[0, 2], RED, 20) and close(small[7, 2], BLUE, 20)


@pytest.mark.parametrize("orientation, top_left, shape", [(1, RED, (10, 20)), (2, BLUE, (10, 20)), (3, BLUE, (10, 20)),
                                                           (8, BLUE, (20, 10))])
def test_other_exif_orientations(tmp_path, orientation, top_left, shape):
    out = decode_image(factory.write_exif_image(tmp_path / "o.jpg", "JPEG", orientation))
    assert out.shape[:2] == shape and close(out[1, 1], top_left, 10)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize("kind", ["garbage", "bad_offset", "text_orientation", "orientation_99"])
def test_broken_exif_is_ignored_not_fatal(tmp_path, kind):
    out = decode_image(factory.write_broken_exif_jpeg(tmp_path / "e.jpg", kind))
    assert out.shape == (10, 20, 3)  # not rotated
    assert close(out[5, 2], RED, 10) and close(out[5, 17], BLUE, 10)


def test_exif_ifd_loop_terminates(tmp_path, monkeypatch):
    from PIL import TiffImagePlugin
    loads, load = [], TiffImagePlugin.ImageFileDirectory_v2.load
    monkeypatch.setattr(TiffImagePlugin.ImageFileDirectory_v2, "load",
                        lambda self, *a, **k: loads.append(1) or load(self, *a, **k))
    out = decode_image(factory.write_broken_exif_jpeg(tmp_path / "loop.jpg", "loop"))
    assert 1 <= len(loads) <= 4  # the budget: the looping IFD chain is not followed round (one load today)
    assert out.shape == (20, 10, 3)  # its orientation entry (6) is still read


# ---------------------------------------------------------------------------------------------------
# Animation


@pytest.mark.parametrize("writer", [factory.write_animated_gif, factory.write_animated_webp, factory.write_apng,
                                    factory.write_mpo], ids=["gif", "webp", "apng", "mpo"])
def test_animation_decodes_its_first_frame(tmp_path, writer):
    path = writer(tmp_path / "anim")
    with Image.open(path) as im:
        assert im.n_frames >= 2
    assert close(decode_image(path), RED, 2)


def test_gif_frame_count_is_bounded(tmp_path, monkeypatch):
    ok = factory.write_many_frames_gif(tmp_path / "1000.gif", MAX_FRAMES)
    assert decode_image(ok).shape == (1, 1, 3)
    assert refused(factory.write_many_frames_gif(tmp_path / "1001.gif", MAX_FRAMES + 1)).reason == (
        f"too many frames (more than {MAX_FRAMES})"
    )
    # frames are never decoded or counted by Pillow: n_frames would walk every one of them
    monkeypatch.setattr(Image.Image, "seek", lambda *a: pytest.fail("seek called"))
    assert refused(factory.write_many_frames_gif(tmp_path / "many.gif", 300_000)).reason.startswith("too many frames")


def test_webp_frame_count_is_bounded(tmp_path):
    colors = [(i % 256, 0, 0) for i in range(MAX_FRAMES + 1)]
    err = refused(factory.write_animated_webp(tmp_path / "many.webp", colors, width=1, height=1))
    assert err.reason == f"too many frames ({MAX_FRAMES + 1}, limit {MAX_FRAMES})"


def test_apng_declaring_absurd_frame_count_is_refused(tmp_path):
    assert close(decode_image(factory.write_apng_declaring(tmp_path / "ok.png", 3)), (200, 200, 200), 0)
    err = refused(factory.write_apng_declaring(tmp_path / "bad.png", 5000))
    assert err.reason == f"too many frames (5000, limit {MAX_FRAMES})"


# ---------------------------------------------------------------------------------------------------
# Resizing


@pytest.mark.parametrize("size", [28, 224, (28, 28), (224, 224)])
def test_one_pixel_image_resizes(tmp_path, size):
    path = factory.write_png(tmp_path / "1x1.png", image=Image.new("RGB", (1, 1), (10, 200, 30)))
    out = decode_image(path, size=size)
    side = size if isinstance(size, int) else size[0]
    assert out.shape == (side, side, 3) and np.all(out == (10, 200, 30))


@pytest.mark.parametrize("side", [28, 224])
def test_very_wide_image_resizes(tmp_path, side):
    ramp = np.linspace(0, 255, 4000).round().astype(np.uint8)
    image = Image.fromarray(np.stack([np.tile(ramp, (3, 1))] * 3, axis=-1))  # 4000 wide × 3 high
    out = decode_image(factory.write_png(tmp_path / "wide.png", image=image), size=side)
    assert out.shape == (side, side, 3)
    assert (out == out[:1]).all()  # every output row the same
    row = out[0, :, 0].astype(int)
    assert np.all(np.diff(row) >= 0) and row[0] < 10 and row[-1] > 245  # the ramp survives, in order


def test_size_tuple_is_height_width_and_squashes(tmp_path):
    path = factory.write_png(tmp_path / "h.png", image=factory.halves(RED, BLUE, 20, 10))
    out = decode_image(path, size=(5, 40))
    assert out.shape == (5, 40, 3)
    assert np.all(out[:, :18] == RED) and np.all(out[:, 22:] == BLUE)


def test_downscaling_is_antialiased(tmp_path):
    checker = (np.indices((256, 256)).sum(axis=0) % 2 * 255).astype(np.uint8)
    out = decode_image(factory.write_png(tmp_path / "c.png", image=Image.fromarray(checker)), channels=1, size=32)
    assert out.shape == (32, 32, 1) and close(out, 127, 3)  # a point sampler would give 0s and 255s


def test_large_jpeg_shrinks_like_a_full_decode(tmp_path):
    # Large JPEGs are decoded at reduced scale by libjpeg when a size is asked for: same picture.
    image = Image.new("RGB", (1600, 1200), RED)
    image.paste(BLUE, (800, 0, 1600, 600))
    image.paste(GREEN, (0, 600, 800, 1200))
    path = factory.write_jpeg(tmp_path / "big.jpg", image=image)
    fast = decode_image(path, size=(30, 40))
    full = np.asarray(Image.fromarray(decode_image(path)).resize((40, 30), Image.Resampling.BILINEAR))
    assert fast.shape == (30, 40, 3) and close(fast, full, 8)
    assert close(fast[5, 5], RED, 8) and close(fast[5, 35], BLUE, 8) and close(fast[25, 5], GREEN, 8)
    assert close(fast[25, 35], RED, 8)


# ---------------------------------------------------------------------------------------------------
# Polyglots


@pytest.mark.parametrize("make", [factory.png_with_appended_zip, factory.png_with_appended_html], ids=["zip", "html"])
def test_png_with_appended_data_decodes_to_its_pixels(tmp_path, make):
    path = make(tmp_path / "poly.png")
    assert close(decode_image(path), np.asarray(factory.pattern("RGB")), 0)


# ---------------------------------------------------------------------------------------------------
# Fuzzing


@pytest.mark.filterwarnings("ignore")  # Pillow warns about odd metadata in most mutants
def test_corrupted_seeds_raise_only_decode_errors(tmp_path):
    """A deterministic mutation pass over the fuzzing seeds (runs even without atheris): each seed with
    bytes overwritten, inserted or cut either decodes or raises ImageDecodeError, nothing else."""
    rng = np.random.default_rng(1234)
    outcomes = {"decoded": 0, "refused": 0}
    for seed in factory.write_seed_corpus(tmp_path / "seeds"):
        data = seed.read_bytes()
        for _ in range(30):
            mutated = bytearray(data)
            for _ in range(int(rng.integers(1, 6))):
                pos = int(rng.integers(0, len(mutated)))
                op = int(rng.integers(0, 3))
                if op == 0:
                    mutated[pos] = int(rng.integers(0, 256))
                elif op == 1:
                    mutated[pos:pos] = bytes(rng.integers(0, 256, int(rng.integers(1, 9)), dtype=np.uint8))
                else:
                    del mutated[pos : pos + int(rng.integers(1, 9))]
            try:
                out = decode_image(bytes(mutated), size=32, channels=None, max_pixels=1 << 22)
                assert out.dtype == np.uint8 and out.shape[:2] == (32, 32) and out.shape[2] in (1, 3)
                outcomes["decoded"] += 1
            except ImageDecodeError:
                outcomes["refused"] += 1
    assert outcomes["decoded"] > 50 and outcomes["refused"] > 50, outcomes


def test_fuzz_target_short_run(tmp_path):
    """A bounded run of tests/fuzz_decode.py (atheris), seeded with the factory's images; the long run
    is ``python tests/fuzz_decode.py -atheris_runs=N CORPUS_DIR``. Only ImageDecodeError may escape."""
    pytest.importorskip("atheris")
    corpus = tmp_path / "corpus"
    seeds = factory.write_seed_corpus(corpus)
    assert len(seeds) > 30
    cmd = [sys.executable, str(TESTS / "fuzz_decode.py"), "-atheris_runs=2000", "-max_total_time=8",
           "-timeout=20", "-rss_limit_mb=3072", f"-artifact_prefix={tmp_path}/", str(corpus)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    crashes = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(("crash-", "timeout-", "oom-")))
    assert run.returncode == 0 and not crashes, f"{crashes}\n{(run.stdout + run.stderr)[-4000:]}"
    assert "Done" in run.stderr or "DONE" in run.stderr, run.stderr[-2000:]

"""Fuzz target for imgrec's image decoder (atheris, i.e. libFuzzer for Python).

Long run (the documented command; an empty corpus folder is first filled with tests/imagefactory.py's
valid and broken images, and libFuzzer adds what it finds there):

    .venv/bin/python tests/fuzz_decode.py -atheris_runs=2000000 -timeout=20 fuzz-corpus/

Any exception other than ImageDecodeError is a finding: libFuzzer prints the traceback and saves the
input as crash-<sha1> (a slow input as timeout-<sha1>). Reproduce one with
``python tests/fuzz_decode.py crash-<sha1>``. tests/test_decode.py runs a short bounded version.
"""

from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import atheris

HERE = Path(__file__).resolve().parent
if importlib.util.find_spec("imgrec") is None:  # running from a checkout that is not pip-installed
    sys.path.insert(0, str(HERE.parent / "src"))

# Coverage feedback from the decoder and from Pillow's pure-Python plugins (its C codecs are not
# instrumented); numpy and torch are left alone. Image.open imports its format plugins lazily, so
# import them all here, inside the instrumenting block.
with atheris.instrument_imports(include=["imgrec.data.decode", "PIL"]):
    from PIL import Image

    Image.init()
    from imgrec.data.decode import decode_image

from imgrec.errors import ImageDecodeError

# A lower pixel limit than the default keeps each execution fast; the checks are the same code.
MAX_PIXELS = 1 << 20


def TestOneInput(data: bytes) -> None:  # noqa: N802 - the name atheris expects
    channels = (3, 1, None)[len(data) % 3]  # vary the output path without spending input bytes on it
    try:
        decode_image(data, channels=channels, size=32, max_pixels=MAX_PIXELS)
    except ImageDecodeError:
        pass


def _seed_empty_corpora(argv: list[str]) -> None:
    """Fill each empty corpus folder named on the command line with the factory's seed images."""
    sys.path.insert(0, str(HERE))
    import imagefactory

    for arg in argv[1:]:
        path = Path(arg)
        if not arg.startswith("-") and path.is_dir() and not any(path.iterdir()):
            imagefactory.write_seed_corpus(path)


def main() -> None:
    # Mutated inputs make Pillow warn about odd metadata on most executions; only exceptions matter here.
    warnings.simplefilter("ignore")
    _seed_empty_corpora(sys.argv)
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

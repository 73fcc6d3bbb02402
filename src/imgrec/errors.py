"""The error types imgrec raises for bad input. The CLI prints them as one line; HTTP turns them into 4xx.

``first_line`` quotes a library's exception inside one of them."""


class ImgrecError(Exception):
    """Base class: a problem with the user's input, files or settings (not a bug in imgrec)."""


class ImageDecodeError(ImgrecError, ValueError):
    """The bytes are not a usable image. ``reason`` says why; ``source`` names the file when known."""

    def __init__(self, reason: str, source: str | None = None):
        self.reason = reason
        self.source = source
        super().__init__(f"{source}: {reason}" if source else reason)


class DatasetError(ImgrecError):
    """A dataset cannot be found or read (missing files, bad IDX header, bad CSV row, empty class folder)."""


class ModelFileError(ImgrecError):
    """A model directory, weights file or checkpoint is missing, corrupt, unsafe or does not match."""


class ConfigError(ImgrecError):
    """An option or configuration value is invalid."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, at most ``limit`` characters (its type's name if it has none):
    what an ``ImgrecError`` quotes of a library's error, so that the CLI's one error line stays one line."""
    lines = str(e).strip().splitlines()
    return lines[0][:limit] if lines else type(e).__name__


def require_modules(modules, what: str, extra: str) -> None:
    """ConfigError naming the first of ``modules`` that is not installed: ``what`` needs it, and the optional
    extra ``extra`` of imgrec brings it (a one-line error instead of an ImportError's traceback)."""
    for module in modules:
        try:
            __import__(module)
        except ModuleNotFoundError:
            raise ConfigError(f"{what} needs {module}: pip install 'imgrec[{extra}]'") from None

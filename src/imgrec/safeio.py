"""Safe, crash-proof file I/O for weights, checkpoints and metadata.

Two rules of imgrec's file handling live here so that every writer and reader follows them:
- nothing is unpickled: tensors go through safetensors, or ``torch.load(weights_only=True)`` for
  foreign ``.pt``/``.pth`` files, which refuses pickles that carry code;
- nothing half-written ever replaces a good file: write to a temporary file in the same folder,
  fsync it, then ``os.replace`` it over the target (and fsync the folder so the rename survives a crash).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from imgrec.errors import ConfigError, ImgrecError, ModelFileError, first_line

if TYPE_CHECKING:  # torch is imported where it is used: atomic writes alone must not pay for it
    import torch


# ----------------------------------------------------------------------------------------------
# atomic writes
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the same folder as ``path``; on success fsync and rename it into place. The
    file keeps the permission bits of the one it replaces (a 600 model.json stays 600 through
    ``imgrec calibrate``); a new file gets the usual ones (0666 less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:  # no file there yet (or none we may look at)
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        _fault_point(path)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, mode)  # after the writing (mkstemp makes 0600 files): a read-only mode is kept too
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_fault_counts: dict[str, int] = {}


def _fault_point(path: Path) -> None:
    """Fault injection for the crash tests: ``IMGREC_FAULT_KILL_SAVE=<file name>:<n>`` makes the process
    SIGKILL itself on the n-th write of that file, after the temporary file is written and before the
    rename — the worst moment for a crash. Unset (always, outside tests) this does nothing."""
    spec = os.environ.get("IMGREC_FAULT_KILL_SAVE")
    if not spec:
        return
    name, _, n = spec.rpartition(":")
    if path.name != name:
        return
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if _fault_counts[name] == int(n):
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    import torch
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"cannot write {type(o).__name__} as JSON")


def plain(x: Any) -> Any:
    """``x`` in JSON's types: dicts with str keys, lists for lists and tuples, numpy arrays as nested lists and
    numpy numbers as Python's; anything else as it is (what ``json.dump`` and a pickle-free checkpoint take)."""
    import numpy as np
    if isinstance(x, dict):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return x


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_writable(folder: str | os.PathLike, need_bytes: int = 0) -> None:
    """Fail early (before training) when ``folder`` cannot be created or written, or the disk is full."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".imgrec-write-test-"):
            pass
    except OSError as e:
        raise ModelFileError(f"{folder}: output folder is not writable ({e.strerror or e})") from None
    if need_bytes:
        st = os.statvfs(folder)
        free = st.f_bavail * st.f_frsize
        if free < need_bytes:
            raise ModelFileError(f"{folder}: not enough free disk space ({free >> 20} MiB free, "
                                 f"about {need_bytes >> 20} MiB needed)")


# ----------------------------------------------------------------------------------------------
# bounded reading of the text files imgrec is handed (JSON, YAML, CSV): a size limit, a nesting limit and
# one ImgrecError line for anything wrong, never a RecursionError, a MemoryError or a silent exit
MAX_TEXT_BYTES = 256 << 20  # a CSV list of a few million images; the size a reader takes unless it says less
MAX_JSON_BYTES = 64 << 20   # model.json (2,000 classes with their per-class metrics take under 1 MB)
MAX_NESTING = 64            # JSON/YAML levels: imgrec's own files use fewer than 10
_JSON_STRINGS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_JSON_BRACKETS = re.compile(r"[\[\]{}]")


def read_text_file(path: str | os.PathLike, head: str = "cannot read the file", *, limit: int = MAX_TEXT_BYTES,
                   error: type[ImgrecError] = ConfigError) -> str:
    """The text of ``path``: UTF-8 with a byte-order mark dropped (Excel writes one), at most ``limit``
    bytes. ``error("<path>: <head> (<why>)")``, one line, when it cannot be read, is larger or is not UTF-8."""
    try:
        with open(path, "rb") as f:
            raw = f.read(limit + 1)
    except OSError as e:
        raise error(f"{path}: {head} ({e.strerror or type(e).__name__})") from None
    if len(raw) > limit:
        raise error(f"{path}: {head} (larger than {_mib(limit)})")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise error(f"{path}: {head} (not UTF-8 text: byte {e.start})") from None


def _mib(n: int) -> str:
    return f"{n >> 20} MB" if n >= 1 << 20 else f"{n} bytes"


def json_nesting(text: str, stop_above: int = MAX_NESTING) -> int:
    """How deeply the arrays and objects of a JSON text nest (strings skipped); counting stops once it
    passes ``stop_above``. Linear in the text, no recursion: json.loads itself recurses once per level."""
    depth = deepest = 0
    for m in _JSON_BRACKETS.finditer(_JSON_STRINGS.sub('""', text)):
        if m.group() in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > stop_above:
                    break
        else:
            depth -= 1
    return deepest


def loads_json(text: str, where: str, head: str = "cannot read JSON", *, max_nesting: int = MAX_NESTING,
               error: type[ImgrecError] = ConfigError) -> Any:
    """``json.loads`` with the nesting bounded: ``error("<where>: <head> (<why>)")`` for a text that is not
    JSON or nests more than ``max_nesting`` levels."""
    if json_nesting(text, max_nesting) > max_nesting:
        raise error(f"{where}: {head} (nested more than {max_nesting} levels deep)")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError; an integer of more than 4,300 digits
        raise error(f"{where}: {head} (not valid JSON: {first_line(e, 200)})") from None


def read_json_file(path: str | os.PathLike, head: str = "cannot read JSON", *, limit: int = MAX_JSON_BYTES,
                   max_nesting: int = MAX_NESTING, error: type[ImgrecError] = ConfigError) -> Any:
    """A JSON file read by :func:`read_text_file` and :func:`loads_json`."""
    return loads_json(read_text_file(path, head, limit=limit, error=error), str(path), head,
                      max_nesting=max_nesting, error=error)


def read_csv_rows(path: str | os.PathLike, head: str = "cannot read CSV", *, limit: int = MAX_TEXT_BYTES,
                  error: type[ImgrecError] = ConfigError) -> list[list[str]]:
    """The rows of a CSV file (UTF-8, a byte-order mark dropped, at most ``limit`` bytes): the one CSV reader
    of the files imgrec is handed (image lists, class weights)."""
    import csv
    text = read_text_file(path, head, limit=limit, error=error)
    try:
        return list(csv.reader(text.splitlines()))
    except csv.Error as e:  # a field over csv.field_size_limit (128 KB), a NUL byte
        raise error(f"{path}: {head} ({first_line(e, 200)})") from None


def load_yaml_text(text: str, where: str, head: str = "cannot read YAML", *, max_nesting: int = MAX_NESTING,
                   error: type[ImgrecError] = ConfigError) -> Any:
    """Plain YAML without aliases, nested at most ``max_nesting`` levels; ``error("<where>: <head> (<why>)")``
    for anything else."""
    import yaml
    try:
        return yaml.load(text, Loader=_no_alias_loader(max_nesting))  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        raise error(f"{where}: {head} ({' '.join(str(e).split())[:200]})") from None
    except RecursionError:
        raise error(f"{where}: {head} (nested too deeply)") from None


@functools.cache
def _no_alias_loader(max_nesting: int) -> type:
    """PyYAML's safe loader without aliases (``*name``) and with nesting bounded. safe_load keeps an alias as
    a shared reference, which costs nothing until something walks the tree (``dataclasses.asdict``, a YAML
    dump): nine levels of ``[*a, *a, …]`` in a few hundred bytes become billions of nodes. imgrec's files
    never need them."""
    import yaml

    class NoAliasLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                event = self.peek_event()
                raise yaml.YAMLError(f"aliases (*{event.anchor}) are not allowed{event.start_mark}")
            self._depth = getattr(self, "_depth", 0) + 1
            try:
                if self._depth > max_nesting:
                    raise yaml.YAMLError(f"nested more than {max_nesting} levels deep")
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1
    return NoAliasLoader


# ----------------------------------------------------------------------------------------------
# CSV files people open in a spreadsheet
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def printable(text: str) -> str:
    """``text`` as UTF-8 can hold it: a file name's bytes that are not UTF-8 (which Python keeps as lone
    surrogates) written as ``\\xNN`` escapes instead of failing the whole output with UnicodeEncodeError."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        try:
            return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:  # a surrogate that is not an escaped byte
            return text.encode("utf-8", "backslashreplace").decode("utf-8")


def csv_cell(value: Any) -> Any:
    """A cell for a CSV file: text that a spreadsheet would run as a formula (starting with = + - @, a tab or
    a carriage return, and not a plain number) gets a leading ``'`` (OWASP's advice); non-UTF-8 bytes are
    escaped (:func:`printable`). Numbers are left as they are."""
    if not isinstance(value, str):
        return value
    value = printable(value)
    if value.startswith(_FORMULA_START):
        try:
            float(value)
        except ValueError:
            return "'" + value
    return value


def csv_text(rows: Any) -> str:
    """Rows (lists of cells) as CSV text, every cell through :func:`csv_cell`: what imgrec's CSV outputs write."""
    import csv
    import io
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    for row in rows:
        w.writerow([csv_cell(c) for c in row])
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# weights
def save_weights(path: str | os.PathLike, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write a flat state dict as safetensors, atomically. Shared/aliased tensors are cloned."""
    from safetensors.torch import save_file

    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=metadata)


def load_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict without running any code: safetensors, or torch.load(weights_only=True).

    A pickle that carries code is refused by ``weights_only=True`` before its payload can run.
    """
    import torch
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: weights file not found")
    with open(path, "rb") as f:
        head = f.read(16)
    if len(head) == 0:
        raise ModelFileError(f"{path}: weights file is empty")
    if _looks_like_safetensors(path, head):
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise ModelFileError(f"{path}: corrupt or truncated safetensors file ({first_line(e)})") from None
    try:
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: noise for the user
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError ... for bad files
        msg = first_line(e)
        import pickle
        if isinstance(e, pickle.UnpicklingError) or "Weights only load failed" in str(e) or "weights_only" in msg:
            raise ModelFileError(f"{path}: refused: the file is a pickle that is not plain weights "
                                 f"(it may carry code); only safetensors or plain state dicts are loaded") from None
        raise ModelFileError(f"{path}: not a readable weights file ({msg})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelFileError(f"{path}: does not hold a state dict of tensors")
    return obj


def _looks_like_safetensors(path: Path, head: bytes) -> bool:
    # safetensors starts with an 8-byte little-endian header length followed by '{'.
    if path.suffix == ".safetensors":
        return True
    return len(head) > 8 and head[8:9] == b"{"


def load_state_dict_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names the mismatch instead of a page of text."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"{len(shapes)} shape mismatch(es), e.g. {shapes[0]}")
        if missing:
            parts.append(f"{len(missing)} missing key(s), e.g. {missing[0]}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s), e.g. {unexpected[0]}")
        raise ModelFileError(f"{source}: weights do not match the model ({'; '.join(parts)})")
    model.load_state_dict(state, strict=True)


# ----------------------------------------------------------------------------------------------
# nested training state (optimizer, scheduler, RNG...) in one safetensors file, no pickle
def save_tree(path: str | os.PathLike, tree: Any) -> None:
    """Save nested dicts/lists/tuples of tensors, numbers, strings, bools and None as safetensors.

    Tensors are stored as tensors; the structure around them travels as JSON in the file's metadata.
    This replaces ``torch.save`` for checkpoints so that resuming never unpickles anything.
    """
    import torch
    tensors: dict[str, torch.Tensor] = {}

    def enc(x):
        if isinstance(x, torch.Tensor):
            key = f"t{len(tensors)}"
            tensors[key] = x.detach().to("cpu").contiguous().clone()
            return {"__tensor__": key}
        if isinstance(x, dict):
            if all(isinstance(k, str) for k in x):
                return {"__dict__": {k: enc(v) for k, v in x.items()}}
            return {"__kvdict__": [[enc(k), enc(v)] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v) for v in x]}
        if isinstance(x, list):
            return [enc(v) for v in x]
        if isinstance(x, (bool, int, float, str)) or x is None:
            return x
        if hasattr(x, "tolist") and hasattr(x, "dtype"):  # numpy arrays and scalars
            return {"__tensor__": enc(torch.as_tensor(x))["__tensor__"], "__numpy__": True}
        raise TypeError(f"cannot store {type(x).__name__} in a checkpoint")

    structure = json.dumps(enc(tree))
    from safetensors.torch import save_file
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"imgrec_tree": structure})


def load_tree(path: str | os.PathLike) -> Any:
    """Inverse of :func:`save_tree`."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: checkpoint not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelFileError(f"{path}: corrupt or truncated checkpoint ({first_line(e)})") from None
    if "imgrec_tree" not in meta:
        raise ModelFileError(f"{path}: not an imgrec checkpoint")

    def dec(x):
        if isinstance(x, list):
            return [dec(v) for v in x]
        if isinstance(x, dict):
            if "__tensor__" in x:
                t = tensors[x["__tensor__"]]
                return t.numpy() if x.get("__numpy__") else t
            if "__dict__" in x:
                return {k: dec(v) for k, v in x["__dict__"].items()}
            if "__kvdict__" in x:
                return {_hashable(dec(k)): dec(v) for k, v in x["__kvdict__"]}
            if "__tuple__" in x:
                return tuple(dec(v) for v in x["__tuple__"])
        return x

    try:
        return dec(json.loads(meta["imgrec_tree"]))
    except (KeyError, ValueError) as e:
        raise ModelFileError(f"{path}: corrupt checkpoint structure ({first_line(e)})") from None


def _hashable(x):
    return tuple(x) if isinstance(x, list) else x


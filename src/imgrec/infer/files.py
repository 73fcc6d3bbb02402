"""Prediction over image files, shared by every backend: expanding folders, ``FilePredictions``, and the
decode pipeline that keeps the model busy.

Nothing here imports PyTorch: the ONNX Runtime backend (imgrec.infer.ort) uses it too.

Why a pipeline: decoding a JPEG and resizing it costs about as much CPU as a small network's forward pass
for that image, and the old loop did the two one after the other. Pillow releases the GIL while it decodes
and resamples, so a thread pool decodes the next batches while the model (which also releases the GIL in
its kernels) runs the current one. Results keep the order of the input files, a bounded window of files
is in flight (memory stays flat for any folder size), and ``on_bad_image="fail"`` still names the first
unreadable file in input order.
"""
from __future__ import annotations

import collections
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from imgrec.errors import ConfigError, ImageDecodeError

__all__ = ["FilePredictions", "ON_BAD_IMAGE", "check_file_options", "decoded_batches",
           "default_decode_threads", "expand_inputs"]

ON_BAD_IMAGE = ("fail", "skip")


@dataclass
class FilePredictions:
    """What ``predict_files`` returns: one ``{"file", "predictions"}`` per readable file, and the
    ``(file, reason)`` of each file skipped with ``on_bad_image="skip"``."""
    results: list[dict] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def expand_inputs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, folders expanded recursively to their image files (sorted)."""
    from imgrec.data.folder import scan_images
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            out += scan_images(p)
        else:
            out.append(p)
    return out


def check_file_options(paths, top_k: int, batch_size: int, on_bad_image: str) -> list[Path]:
    """Validate ``predict_files``' arguments and expand its inputs; ConfigError for anything wrong."""
    if top_k < 1:
        raise ConfigError("top_k must be at least 1")
    if batch_size < 1:
        raise ConfigError("batch_size must be at least 1")
    if on_bad_image not in ON_BAD_IMAGE:
        raise ConfigError(f"on_bad_image must be one of {', '.join(ON_BAD_IMAGE)}")
    paths = [str(p) for p in paths]
    files = expand_inputs(paths)
    if not files:
        raise ConfigError(f"no images found in {', '.join(paths)} (looked for .jpg .jpeg .png .webp .bmp .gif)")
    return files


def default_decode_threads() -> int:
    """One decoding thread per usable core (at least 2, so one decodes while another waits on the disk)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(2, min(cores, 16))


def decoded_batches(files: list[Path], decode: Callable[[Path], Any], batch_size: int, on_bad_image: str,
                    out: FilePredictions, warn: bool = True,
                    threads: int | None = None) -> Iterator[tuple[list[Path], list[Any]]]:
    """Yield ``(files, decoded images)`` batches of up to ``batch_size``, in input order.

    ``decode(path)`` runs in ``threads`` worker threads (None: :func:`default_decode_threads`; 0: inline,
    one file after the other, as before the pipeline existed), at most two batches ahead of the consumer.
    An ImageDecodeError is raised naming the file (``on_bad_image="fail"``) or recorded in ``out.skipped``.
    """
    threads = default_decode_threads() if threads is None else int(threads)
    if threads < 0:
        raise ConfigError("decode threads must be 0 (inline) or more")

    def handle_bad(f: Path, e: ImageDecodeError) -> None:
        if on_bad_image == "fail":
            raise ImageDecodeError(e.reason, str(f)) from None
        out.skipped.append((str(f), e.reason))
        if warn:
            print(f"imgrec: warning: skipped {f}: {e.reason}", file=sys.stderr)

    batch_files: list[Path] = []
    batch: list[Any] = []
    if threads == 0:
        for f in files:
            try:
                batch.append(decode(f))
                batch_files.append(f)
            except ImageDecodeError as e:
                handle_bad(f, e)
            if len(batch) == batch_size:
                yield batch_files, batch
                batch_files, batch = [], []
        if batch:
            yield batch_files, batch
        return

    window = 2 * batch_size + threads  # files in flight: the batch being filled, the next one, one per thread
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="imgrec-decode")
    pending: collections.deque[tuple[Path, Future]] = collections.deque()
    todo = iter(files)
    try:
        def fill() -> None:
            while len(pending) < window:
                f = next(todo, None)
                if f is None:
                    return
                pending.append((f, pool.submit(decode, f)))

        fill()
        while pending:
            f, fut = pending.popleft()
            try:
                image = fut.result()
            except ImageDecodeError as e:
                handle_bad(f, e)
            else:
                batch.append(image)
                batch_files.append(f)
            fill()
            if len(batch) == batch_size:
                yield batch_files, batch
                batch_files, batch = [], []
        if batch:
            yield batch_files, batch
    finally:
        # an error or an early stop: drop what has not started; running decodes finish (they are bounded)
        pool.shutdown(wait=True, cancel_futures=True)

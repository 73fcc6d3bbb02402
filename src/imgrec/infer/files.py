"""Prediction over image files, shared by every backend: expanding folders, ``FilePredictions``, and the
decode pipeline that keeps the model busy.

Nothing here imports PyTorch: the ONNX Runtime backend (imgrec.infer.ort) uses it too.

Why a pipeline: decoding a JPEG and resizing it costs about as much CPU as a small network's forward pass
for that image, and the old loop did the two one after the other. Pillow releases the GIL while it decodes
and resamples, so a thread pool decodes the next batches while the model (which also releases the GIL in
its kernels) runs the current one. Results keep the order of the input files, a bounded window of files
is in flight (memory stays flat for any folder size), and ``on_bad_image="fail"`` still names the first
unreadable file in input order.

Why streams (:func:`run_batches`): on a CPU the model's own threads (PyTorch's OpenMP pool, ONNX Runtime's
intra-op pool) meet at a barrier after every operator, and a decoding thread, or another process, that takes
one of their cores makes the others spin until it comes back. On 2 cores shared with other jobs (load 10),
fastnet at 28 px ran at 80 images/s with 2 PyTorch threads and at 620 with 1. So on a CPU whole batches run
side by side instead, each on the thread that called it (``cpu_streams``: one stream per core, up to 4, with
the remaining cores as intra-op threads of each): no barrier waits for a descheduled thread, and every core
does useful work. Measured before/after in benchmarks/results/predict_throughput.md.

Why smaller passes on a CPU (:func:`cpu_pass_size`): a forward pass over 64 images at 224 px allocates
activations of hundreds of MB; above glibc's mmap threshold each is mapped and zeroed afresh by the kernel on
every pass. resnet18 at 224 px cost 22 ms of CPU per image in batches of 64 (7 ms of it in the kernel) and
18.7 ms in batches of 8, while a batch of 1 (24 ms) is too small: about 8 images of 224 × 224 per pass.
"""
from __future__ import annotations

import collections
import contextlib
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from imgrec.errors import ConfigError, ImageDecodeError

__all__ = ["FilePredictions", "ON_BAD_IMAGE", "add_results", "check_file_options", "cpu_pass_size", "cpu_streams",
           "decode_with_notes", "decoded_batches", "default_decode_threads", "expand_inputs", "run_batches",
           "usable_cores"]

ON_BAD_IMAGE = ("fail", "skip")
MAX_STREAMS = 4  # batches in flight at once on a CPU: more cores go to each batch's intra-op threads
PIXELS_PER_PASS = 8 * 224 * 224  # images × height × width per forward pass on a CPU (8 at 224 px, 512 at 28 px)


@dataclass
class FilePredictions:
    """What ``predict_files`` returns: one ``{"file", "predictions", "input_notes"}`` per readable file (notes:
    how the image differs much from the training data, imgrec.infer.inputs), the
    ``(file, reason)`` of each file skipped with ``on_bad_image="skip"``, and every file looked at
    (``files``, in input order). :meth:`entries` merges the two into one list in input order."""
    results: list[dict] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)

    def entries(self) -> list[dict]:
        """Every file in input order: its result, or ``{"file", "error", "predictions": [], ...}`` for a file that
        could not be read, so a skipped file still has its line in a table, JSON or CSV."""
        out: list[dict] = []
        i = j = 0
        for f in self.files:  # results and skipped are both in input order: merge them
            if i < len(self.results) and self.results[i]["file"] == f:
                out.append(self.results[i])
                i += 1
            elif j < len(self.skipped) and self.skipped[j][0] == f:
                out.append({"file": f, "error": self.skipped[j][1], "predictions": [], "input_notes": []})
                j += 1
        # anything not matched (files never set: a caller that filled results itself) keeps its place at the end
        out += self.results[i:] + [{"file": f, "error": r, "predictions": [], "input_notes": []}
                                   for f, r in self.skipped[j:]]
        return out


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


def decode_with_notes(decode: Callable[[Path], Any], meta: Any) -> Callable[[Path], tuple[Any, list[str]]]:
    """``decode`` that also returns the file's :func:`imgrec.infer.inputs.input_notes` (from its header,
    read after the decode succeeded), for :func:`add_results`."""
    from imgrec.infer.inputs import image_info, input_notes

    def run(f: Path) -> tuple[Any, list[str]]:
        image = decode(f)
        info = image_info(f)
        return image, (input_notes(meta, info[:2], info[2]) if info else [])
    return run


def add_results(out: FilePredictions, files: list[Path], preds: list, notes: list[list[str]],
                flags: list[dict] | None = None) -> None:
    """Append one ``{"file", "predictions", "input_notes"}`` per predicted file, with ``"unknown"`` and
    ``"ood_score"`` when the model answers "unknown" (``flags``, from ``BasePredictor.mark_unknown``)."""
    flags = flags or [{} for _ in files]
    out.results += [{"file": str(f), "predictions": p, "input_notes": n, **u}
                    for f, p, n, u in zip(files, preds, notes, flags)]


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask); imgrec.device has the same without PyTorch."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def default_decode_threads() -> int:
    """One decoding thread per usable core (at least 2, so one decodes while another waits on the disk)."""
    return max(2, min(usable_cores(), 16))


def cpu_pass_size(image_size: int, batch_size: int) -> int:
    """Images per forward pass on a CPU: ``batch_size``, or fewer for large images (``PIXELS_PER_PASS``)."""
    return max(1, min(int(batch_size), PIXELS_PER_PASS // max(1, int(image_size) ** 2)))


def cpu_streams(threads: int) -> tuple[int, int]:
    """``(streams, threads per stream)`` for a CPU budget of ``threads`` (the model's intra-op thread count):
    one batch at a time per core up to :data:`MAX_STREAMS`, the rest of the budget as each one's threads."""
    threads = max(1, int(threads))
    streams = min(threads, MAX_STREAMS)
    return streams, max(1, threads // streams)


def run_batches(batches: Iterable[tuple[list[Path], Any]], run: Callable[[Any], Any],
                streams: int = 1) -> Iterator[tuple[list[Path], Any]]:
    """Yield ``(files, run(images))`` for each ``(files, images)`` batch, in order, with up to ``streams``
    calls of ``run`` at once in worker threads (1: in this thread, one after the other).

    ``batches`` is advanced only in this thread (a decode error surfaces here, in input order); an error in
    ``run`` is raised when its batch's turn comes, and the batches still running are waited for.
    """
    if streams <= 1:
        for files, images in batches:
            yield files, run(images)
        return
    pool = ThreadPoolExecutor(max_workers=streams, thread_name_prefix="imgrec-model")
    running: collections.deque[tuple[list[Path], Future]] = collections.deque()
    try:
        for files, images in batches:
            running.append((files, pool.submit(run, images)))
            if len(running) >= streams:  # every stream busy: hand back the oldest before taking another batch
                done_files, fut = running.popleft()
                yield done_files, fut.result()
        while running:
            done_files, fut = running.popleft()
            yield done_files, fut.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def decoded_batches(files: list[Path], decode: Callable[[Path], Any], batch_size: int, on_bad_image: str,
                    out: FilePredictions, warn: bool = True, threads: int | None = None,
                    ahead: int = 2) -> Iterator[tuple[list[Path], list[Any]]]:
    """Yield ``(files, decoded images)`` batches of up to ``batch_size``, in input order.

    ``decode(path)`` runs in ``threads`` worker threads (None: :func:`default_decode_threads`; 0: inline,
    one file after the other, as before the pipeline existed), at most ``ahead`` batches ahead of the consumer
    (the model's streams + 1 keeps every stream fed). An ImageDecodeError is raised naming the file
    (``on_bad_image="fail"``) or recorded in ``out.skipped``.
    """
    threads = default_decode_threads() if threads is None else int(threads)
    if threads < 0:
        raise ConfigError("decode threads must be 0 (inline) or more")
    out.files = [str(f) for f in files]
    batch_files: list[Path] = []
    batch: list[Any] = []
    # files in flight: the batch being filled, the batches ahead, one per thread
    window = max(2, ahead) * batch_size + threads
    with contextlib.closing(_decode_in_order(files, decode, threads, window)) as decoded:
        for f, image in decoded:
            if isinstance(image, ImageDecodeError):
                if on_bad_image == "fail":
                    raise ImageDecodeError(image.reason, str(f)) from None
                out.skipped.append((str(f), image.reason))
                if warn:
                    print(f"imgrec: warning: skipped {f}: {image.reason}", file=sys.stderr)
                continue
            batch.append(image)
            batch_files.append(f)
            if len(batch) == batch_size:
                yield batch_files, batch
                batch_files, batch = [], []
    if batch:
        yield batch_files, batch


def _decode_in_order(files: list[Path], decode: Callable[[Path], Any], threads: int,
                     window: int) -> Iterator[tuple[Path, Any]]:
    """``(file, image or its ImageDecodeError)`` in input order; with threads, at most ``window`` files are
    decoded or waiting at once. Closing the generator (an error or an early stop downstream) drops what has
    not started; running decodes finish (they are bounded)."""
    if threads == 0:  # inline, one file after the other
        for f in files:
            try:
                yield f, decode(f)
            except ImageDecodeError as e:
                yield f, e
        return
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="imgrec-decode")
    pending: collections.deque[tuple[Path, Future]] = collections.deque()
    todo = iter(files)

    def fill() -> None:
        while len(pending) < window:
            f = next(todo, None)
            if f is None:
                return
            pending.append((f, pool.submit(decode, f)))
    try:
        fill()
        while pending:
            f, fut = pending.popleft()
            try:
                image = fut.result()
            except ImageDecodeError as e:
                image = e
            fill()
            yield f, image
    finally:
        pool.shutdown(wait=True, cancel_futures=True)

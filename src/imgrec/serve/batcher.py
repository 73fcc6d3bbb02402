"""Dynamic batching: concurrent requests share one forward pass.

A forward pass over 32 small images costs little more than over one (on this project's 2-core CPU,
simple_cnn takes about 6 ms for 1 image and 24 ms for 32), so a server that runs one pass per request
spends most of its time on per-call overhead exactly when it is busiest. The batcher gathers waiting
requests for at most ``max_wait_s`` or until ``max_batch`` images, runs one pass, and hands each
request its rows, so throughput grows with load instead of collapsing.

Design:

* One worker thread owns the model. PyTorch and ONNX Runtime release the GIL inside their kernels, so
  the event loop keeps accepting and decoding requests while a batch runs, and there is never more than
  one forward pass competing for the cores.
* Batches are torch tensors (PyTorch backend) or numpy arrays (ONNX Runtime backend), joined with the
  library they came from: this module imports torch only when it is handed torch tensors, so a server
  on ONNX Runtime never loads PyTorch.
* The wait is counted from when the *oldest* waiting request arrived, not from when the worker became
  free: after a slow batch everything already queued goes out at once, with no extra delay.
* Waiting only pays when someone else may join. The HTTP layer ``announce``s each request when it is
  admitted (before its upload is read and decoded); when no announced request is still on its way,
  the worker runs the batch at once, so a lone request never waits ``max_wait_s`` for company.
* The queue is bounded in images. ``submit`` raises :class:`QueueFull` at once rather than letting
  latency grow without limit; the HTTP layer turns that into 503 with ``Retry-After``. A request with a
  deadline is also refused when the passes already queued ahead of it would, at the recent pace, not
  finish in time: better a quick 503 than accepting work that ends in a timeout.
* A request that gives up (timeout, client gone) cancels its future; the worker skips cancelled
  requests that have not started, and a pass that is already running finishes and is thrown away,
  so a slow pass never kills the worker.
"""
from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["Batcher", "QueueFull", "BatcherStopped"]


class QueueFull(Exception):
    """The batcher already holds as many waiting images as it may."""


class BatcherStopped(Exception):
    """The batcher is not running (not started yet, shutting down, or its worker died)."""


@dataclass
class _Item:
    images: Any  # N×C×H×W uint8: a torch tensor or a numpy array
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float = field(default_factory=time.monotonic)
    features: bool = False  # the request wants the pass's features too: forward(x, features=True)

    @property
    def n(self) -> int:
        return int(self.images.shape[0])


def _concat(batches: list) -> Any:
    """Join N×C×H×W batches along N with their own library (numpy for ONNX Runtime, else torch)."""
    if len(batches) == 1:
        return batches[0]
    if isinstance(batches[0], np.ndarray):
        return np.concatenate(batches)
    import torch  # already imported by whoever made these tensors
    return torch.cat(batches)


def _resolve(fut: asyncio.Future, result=None, error: BaseException | None = None) -> None:
    """Runs on the event loop (via call_soon_threadsafe): a future may have been cancelled meanwhile."""
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


def _post(item: _Item, result=None, error: BaseException | None = None) -> None:
    """Hand a result to the item's event loop from the worker thread (asyncio futures are not thread-safe)."""
    try:
        item.loop.call_soon_threadsafe(_resolve, item.future, result, error)
    except RuntimeError:  # that event loop is closed (the server shut down): nobody is waiting
        pass


class Batcher:
    """Gather concurrent ``submit`` calls into batches for one worker thread.

    Args:
        forward: N×C×H×W uint8 (torch tensor or numpy array, as enqueued) → N results (sliced by rows);
            called only from the worker thread, as ``forward(x, features=True)`` when a request in the batch
            was enqueued with ``features=True``.
        max_batch: the most images in one pass (1 turns batching off: one request per pass).
            A single request with more images is run alone, in chunks of ``max_batch`` inside ``forward``.
        max_wait_s: how long the oldest waiting request may wait for others to join its batch.
        max_queue: the most images waiting for the worker; more makes ``submit`` raise QueueFull.
    """

    def __init__(self, forward: Callable[[Any], Sequence], max_batch: int = 32,
                 max_wait_s: float = 0.005, max_queue: int = 128):
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0:
            raise ValueError("max_batch and max_queue must be at least 1 and max_wait_s at least 0")
        self.forward = forward
        self.max_batch = int(max_batch)
        self.max_wait_s = float(max_wait_s)
        self.max_queue = int(max_queue)
        self._queue: collections.deque[_Item] = collections.deque()
        self._queued_images = 0
        self._announced = 0  # requests admitted upstream that have not enqueued (or withdrawn) yet
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        # statistics for benchmarks and tests (written by the worker thread only)
        self.batches_run = 0
        self.images_run = 0
        self.pass_seconds: float | None = None  # moving average of one forward pass (after warm-up passes)
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=1000)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the batcher was already started")
        self._thread = threading.Thread(target=self._run, name="imgrec-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking work, fail whatever still waits, and wait for a running pass to end."""
        with self._cond:
            self._stopping = True
            left = list(self._queue)
            self._queue.clear()
            self._queued_images = 0
            self._cond.notify_all()
        for item in left:
            _post(item, error=BatcherStopped("the server is shutting down"))
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    # -- requests --------------------------------------------------------------------------------
    def announce(self) -> None:
        """A request will ``enqueue(..., announced=True)`` or ``withdraw()`` soon: worth waiting for."""
        with self._cond:
            self._announced += 1

    def withdraw(self) -> None:
        """An announced request will not come after all (bad upload, client gone)."""
        with self._cond:
            self._announced -= 1
            self._cond.notify()

    def expected_wait(self, n: int) -> float | None:
        """Seconds until ``n`` more images would be answered, at the recent pace (None before any pass)."""
        if self.pass_seconds is None:
            return None
        passes_ahead = -(-(self._queued_images + n) // self.max_batch)  # ceil
        return (1 + passes_ahead) * self.pass_seconds  # + 1: the pass that may be running now

    def enqueue(self, images: torch.Tensor | np.ndarray, announced: bool = False,
                within: float | None = None, features: bool = False) -> asyncio.Future:
        """Queue an N×C×H×W uint8 batch; the returned future (of this event loop) gets its N rows of output.

        Call on the event loop's thread. Raises QueueFull at once when the queue is full, or when
        ``within`` seconds are not expected to be enough, and BatcherStopped when not running.
        Cancelling the future (``asyncio.wait_for`` timing out) withdraws the request. ``features``: the
        pass that runs it is asked for its features too (see ``forward``); the others are not.
        """
        loop = asyncio.get_running_loop()
        item = _Item(images, loop.create_future(), loop, features=features)
        with self._cond:
            if announced:
                self._announced -= 1
            if not self.alive:
                self._cond.notify()
                raise BatcherStopped("the model worker is not running")
            if self._queued_images + item.n > self.max_queue and self._queue:
                # an oversize request is still accepted into an empty queue, or it could never run
                self._cond.notify()
                raise QueueFull(f"{self._queued_images} images already waiting (limit {self.max_queue})")
            expected = self.expected_wait(item.n) if within is not None and self._queue else None
            if expected is not None and expected > within:
                self._cond.notify()
                raise QueueFull(f"the {self._queued_images} images waiting need about {expected:.1f} s")
            self._queue.append(item)
            self._queued_images += item.n
            self._cond.notify()
        return item.future

    async def submit(self, images: torch.Tensor | np.ndarray):
        """``enqueue`` and wait for the output."""
        return await self.enqueue(images)

    # -- worker ----------------------------------------------------------------------------------
    def _take_batch(self) -> list[_Item] | None:
        """Block until a batch is due; None when stopping. Called with nothing locked."""
        with self._cond:
            while not self._queue:
                if self._stopping:
                    return None
                self._cond.wait()
            batch = [self._queue.popleft()]
            n = batch[0].n
            deadline = batch[0].enqueued + self.max_wait_s
            while n < self.max_batch and not self._stopping:
                if self._queue:
                    if n + self._queue[0].n > self.max_batch:
                        break  # it goes first in the next batch: FIFO, no starvation of big requests
                    item = self._queue.popleft()
                    batch.append(item)
                    n += item.n
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._announced <= 0:
                    break  # waited long enough, or nobody else is on the way
                self._cond.wait(remaining)
            self._queued_images -= n
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            # requests that timed out or disconnected while waiting cost nothing
            live = [it for it in batch if not it.future.cancelled()]
            if not live:
                continue
            try:
                x = _concat([it.images for it in live])
                started = time.monotonic()
                out = self.forward(x, features=True) if any(it.features for it in live) else self.forward(x)
                took = time.monotonic() - started
                self.pass_seconds = took if self.pass_seconds is None else 0.8 * self.pass_seconds + 0.2 * took
            except Exception as e:  # noqa: BLE001 - reported to every waiting request; the worker lives on
                for it in live:
                    _post(it, error=e)
                continue
            self.batches_run += 1
            self.images_run += int(x.shape[0])
            self.batch_sizes.append(int(x.shape[0]))
            start = 0
            for it in live:
                _post(it, out[start:start + it.n])
                start += it.n

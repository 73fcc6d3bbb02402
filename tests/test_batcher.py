"""The dynamic batcher alone, without HTTP: routing, limits, cancellation, errors, shutdown."""
from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from imgrec.serve.batcher import Batcher, BatcherStopped, QueueFull


def test_batcher_unit():
    """The batcher alone: routing, limits, cancellation, errors, shutdown."""
    release = threading.Event()
    entered = threading.Event()  # a forward pass has started (and waits for `release`)
    seen: list[int] = []

    def forward(x):
        entered.set()
        assert release.wait(120), "the test never released the pass"
        seen.append(int(x.shape[0]))
        if (x == 255).any():
            raise RuntimeError("boom")
        return x.float().flatten(1).mean(1, keepdim=True)  # each row's own value

    async def held():
        """Until the worker is inside a forward pass, held at `release` (an event, not a guessed delay)."""
        assert await asyncio.to_thread(entered.wait, 120), "no forward pass started"
        entered.clear()

    async def main():
        b = Batcher(forward, max_batch=4, max_wait_s=0.05, max_queue=6)
        b.start()
        one = lambda v, n=1: torch.full((n, 1, 2, 2), v, dtype=torch.uint8)  # noqa: E731
        first = asyncio.ensure_future(b.submit(one(1)))
        await held()
        waiting = [asyncio.ensure_future(b.submit(one(v))) for v in (2, 3, 4)]
        big = asyncio.ensure_future(b.submit(one(5, 3)))  # 3 + 3 = 6 images queued: full
        await asyncio.sleep(0)  # let the four submit() calls run up to their enqueue
        with pytest.raises(QueueFull):
            b.enqueue(one(6))
        release.set()
        assert (await first).item() == 1
        for v, fut in zip((2, 3, 4), waiting):
            assert (await fut).item() == v
        assert (await big).flatten().tolist() == [5, 5, 5]
        assert seen[0] == 1 and seen[1] == 3 and seen[2] == 3  # [2,3,4] fit a batch of 4; [5,5,5] did not join
        # a cancelled request is skipped; an exception reaches its requests and the worker lives on
        release.clear()
        entered.clear()
        blocker = asyncio.ensure_future(b.submit(one(8)))
        await held()
        dropped = b.enqueue(one(9))
        dropped.cancel()
        failing = asyncio.ensure_future(b.submit(one(255)))
        await asyncio.sleep(0)
        release.set()
        assert (await blocker).item() == 8
        with pytest.raises(RuntimeError, match="boom"):
            await failing
        assert seen[-1] == 1  # the cancelled request was left out of the batch
        # a request that the queue ahead of it would make miss its deadline is refused up front
        release.clear()
        entered.clear()
        blocker = asyncio.ensure_future(b.submit(one(20)))
        await held()
        b.pass_seconds = 1.0
        queued = b.enqueue(one(21), within=5.0)  # 1 running + 1 queued pass: about 2 s, fine
        with pytest.raises(QueueFull, match="need about"):
            b.enqueue(one(22), within=1.5)
        release.set()
        assert (await blocker).item() == 20 and (await queued).item() == 21
        assert (await b.submit(one(10))).item() == 10
        assert b.alive
        # stop: queued requests fail with BatcherStopped, new ones are refused
        release.clear()
        entered.clear()
        busy = asyncio.ensure_future(b.submit(one(11)))
        await held()
        queued = asyncio.ensure_future(b.submit(one(12)))
        await asyncio.sleep(0)
        stopper = asyncio.get_running_loop().run_in_executor(None, b.stop)
        while b.alive:  # until stop() has begun (it then waits for the held pass)
            await asyncio.sleep(0.005)
        release.set()
        await stopper
        with pytest.raises(BatcherStopped):
            await queued
        await busy
        with pytest.raises(BatcherStopped):
            b.enqueue(one(13))

    asyncio.run(main())

"""MicroBatcher on its own: coalescing, limits, draining, failures."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from fedfuse.serving.batcher import BatcherClosed, MicroBatcher


class SlowDouble:
    """2x, row by row, taking 20 ms per call; records the rows of every call."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.calls.append(len(x))
        time.sleep(0.02)
        return 2 * x


def run(coro):
    return asyncio.run(coro)


@pytest.mark.parametrize("max_wait", [0.0, 0.005])
def test_concurrent_requests_share_calls_and_get_their_own_rows(max_wait):
    fn = SlowDouble()

    async def main():
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(fn, max_batch_size=64, max_wait=max_wait, executor=pool)
            batcher.start()
            inputs = [np.full((1 + i % 3, 2), i, dtype=np.float32) for i in range(40)]
            outputs = await asyncio.gather(*(batcher.submit(x) for x in inputs))
            await batcher.stop()
        return inputs, outputs

    inputs, outputs = run(main())
    for x, y in zip(inputs, outputs):
        np.testing.assert_array_equal(y, 2 * x)
    assert sum(fn.calls) == sum(len(x) for x in inputs)
    assert len(fn.calls) < 10  # 40 requests, coalesced into a few passes


def test_batches_respect_the_row_limit():
    fn = SlowDouble()

    async def main():
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(fn, max_batch_size=8, max_wait=0.0, executor=pool)
            batcher.start()
            await asyncio.gather(*(batcher.submit(np.ones((3, 1))) for _ in range(20)),
                                 batcher.submit(np.ones((12, 1))))
            await batcher.stop()

    run(main())
    assert 12 in fn.calls  # one request over the limit still runs, alone
    assert all(rows <= 8 for rows in fn.calls if rows != 12)
    assert sum(fn.calls) == 72


def test_stop_finishes_queued_requests_then_refuses_new_ones():
    fn = SlowDouble()

    async def main():
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(fn, max_batch_size=2, max_wait=0.0, executor=pool)
            batcher.start()
            pending = [asyncio.ensure_future(batcher.submit(np.full((1, 1), i)))
                       for i in range(6)]
            await asyncio.sleep(0)
            await batcher.stop()
            assert all(p.done() for p in pending)
            with pytest.raises(BatcherClosed):
                await batcher.submit(np.ones((1, 1)))
            return [float(p.result()[0, 0]) for p in pending]

    assert run(main()) == [0.0, 2.0, 4.0, 6.0, 8.0, 10.0]


def test_a_failing_model_fails_every_request_of_its_batch_only():
    calls = []

    def flaky(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        time.sleep(0.01)
        if len(calls) == 2:
            raise RuntimeError("model exploded")
        return x

    async def main():
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(flaky, max_batch_size=100, max_wait=0.0, executor=pool)
            batcher.start()
            first = asyncio.ensure_future(batcher.submit(np.ones((1, 1))))
            await asyncio.sleep(0.002)  # the first pass is running: these queue behind it
            second = await asyncio.gather(*(batcher.submit(np.ones((1, 1))) for _ in range(3)),
                                          return_exceptions=True)
            third = await batcher.submit(np.ones((1, 1)))
            await batcher.stop()
            return await first, second, third

    first, second, third = run(main())
    assert first.shape == (1, 1) and third.shape == (1, 1)
    assert [str(e) for e in second] == ["model exploded"] * 3
    assert calls == [1, 3, 1]

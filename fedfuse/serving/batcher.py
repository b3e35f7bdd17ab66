"""Dynamic micro-batching: concurrent requests share one forward pass.

Requests wait in a queue. A single worker task takes the first waiting request, then every
request already queued behind it, up to ``max_batch_size`` rows, optionally waiting up to
``max_wait`` seconds for more; it concatenates their rows, runs the model once in a worker
thread (so the event loop keeps accepting requests meanwhile), and splits the output back
row by row. While one batch is in the model the next one forms, so under load the batch
size grows with the arrival rate without any fixed delay at low load.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import numpy as np

BatchObserver = Callable[[int, int], None]
"""Called after each forward pass with (requests, rows) in it."""


@dataclass
class _Pending:
    x: np.ndarray
    future: asyncio.Future[np.ndarray] = field(repr=False)


class _Stop:
    """Queue marker: the worker ends when it reaches it."""


_STOP = _Stop()


class BatcherClosed(RuntimeError):
    """The batcher was stopped; the request was not run."""


class BatcherFull(RuntimeError):
    """``max_queue`` requests are already waiting; the request was not queued."""


class MicroBatcher:
    """Coalesce ``submit(x)`` calls into calls of ``fn`` on their concatenated rows.

    ``fn`` maps an (n, ...) array to an (n, K) array, row by row; it runs on ``executor``.
    At most ``max_queue`` requests wait at once (0: no bound); one more is refused with
    :class:`BatcherFull`, so a flood costs callers a fast refusal, not the server its memory.
    """

    def __init__(self, fn: Callable[[np.ndarray], np.ndarray], *, max_batch_size: int,
                 max_wait: float, executor: Executor,
                 observe: BatchObserver | None = None, max_queue: int = 0) -> None:
        self._fn = fn
        self._max_rows = max_batch_size
        self._max_wait = max_wait
        self._executor = executor
        self._observe = observe
        self._queue: asyncio.Queue[_Pending | _Stop] = asyncio.Queue()
        self._max_queue = max_queue
        self._worker: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._run())

    async def submit(self, x: np.ndarray) -> np.ndarray:
        """The rows of ``fn(x)``, computed in a batch with whatever else is waiting."""
        if self._closing or self._worker is None:
            raise BatcherClosed("this model version is being unloaded")
        if self._max_queue and self._queue.qsize() >= self._max_queue:
            raise BatcherFull(f"{self._max_queue} requests are already waiting")
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Pending(x, future))
        return await future

    async def stop(self) -> None:
        """Refuse new requests, finish every queued one, then end the worker."""
        self._closing = True
        if self._worker is not None:
            self._queue.put_nowait(_STOP)
            await self._worker
            self._worker = None

    async def _run(self) -> None:
        carry: _Pending | _Stop | None = None
        while True:
            first = carry if carry is not None else await self._queue.get()
            carry = None
            if isinstance(first, _Stop):  # FIFO: everything queued before it is done
                return
            batch, rows = [first], len(first.x)
            deadline = time.monotonic() + self._max_wait
            while rows < self._max_rows:
                item = await self._next(deadline)
                if item is None:
                    break
                if isinstance(item, _Stop) or rows + len(item.x) > self._max_rows:
                    carry = item  # ends this batch; handled next
                    break
                batch.append(item)
                rows += len(item.x)
            await self._forward(batch, rows)

    async def _next(self, deadline: float) -> _Pending | _Stop | None:
        """The next queued item, waiting until ``deadline`` at most; None if there is none."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            try:
                return self._queue.get_nowait()
            except asyncio.QueueEmpty:
                return None
        try:
            return await asyncio.wait_for(self._queue.get(), remaining)
        except TimeoutError:
            return None

    async def _forward(self, batch: list[_Pending], rows: int) -> None:
        x = batch[0].x if len(batch) == 1 else np.concatenate([p.x for p in batch])
        try:
            out = await asyncio.get_running_loop().run_in_executor(self._executor, self._fn, x)
        except Exception as exc:  # the model failed: every waiting request learns why
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        if self._observe is not None:
            self._observe(len(batch), rows)
        start = 0
        for p in batch:
            if not p.future.done():  # the caller may have gone away
                p.future.set_result(out[start:start + len(p.x)])
            start += len(p.x)

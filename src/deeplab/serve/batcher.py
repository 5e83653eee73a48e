"""Dynamic batching: requests that arrive within a few milliseconds of each other run as one batch.

One worker task owns the model: it takes the oldest waiting request, waits up to `wait_s` for more requests of the
same key (the network input size, or a key of their own for requests that cannot share a batch) while others are on
their way (`arriving`: received, still being read or decoded; with none, it does not wait at all), runs up to
`max_batch` of them in one call on a single worker thread, and hands each request its own result. The event loop
never runs the model, so health checks and the metrics answer while it computes. The queue is bounded: past
`max_queue` waiting requests `submit` raises `QueueFull` at once (the service answers 503 with Retry-After), it
never blocks. A batch that raises is run again one request at a time, so a bad request fails alone.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


class QueueFull(RuntimeError):
    """The batcher already holds `max_queue` waiting requests."""


@dataclass
class _Waiting:
    key: Hashable
    item: Any
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)


class Batcher:
    """Runs `run_batch(items) -> results` (one result per item, in order) on batches of submitted items.

    `max_batch` items at most per call; a batch waits at most `wait_s` after its first item arrived for others of
    its key, and only while `arriving()` says more requests are on their way; at most `max_queue` items wait (not
    counting the batch being run). `on_batch(size, seconds)` is called after each batch (metrics)."""

    def __init__(self, run_batch: Callable[[Sequence[Any]], Sequence[Any]], *, max_batch: int = 8,
                 wait_s: float = 0.005, max_queue: int = 64,
                 on_batch: Callable[[int, float], None] | None = None,
                 arriving: Callable[[], int] | None = None) -> None:
        if max_batch < 1 or max_queue < 1 or wait_s < 0:
            raise ValueError(f"max_batch and max_queue must be positive and wait_s >= 0, got {max_batch}, "
                             f"{max_queue}, {wait_s}")
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.arriving = arriving or (lambda: 1)  # unknown: assume company may come
        self.waiting: deque[_Waiting] = deque()
        self.running = 0  # items in the batch being run
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._pool: ThreadPoolExecutor | None = None

    @property
    def depth(self) -> int:
        """Requests waiting for the model (not counting the batch it runs)."""
        return len(self.waiting)

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deeplab-model")
        self._task = asyncio.create_task(self._work(), name="deeplab-batcher")

    async def stop(self) -> None:
        """Finish every waiting request, then stop the worker."""
        while self.waiting or self.running:
            await asyncio.sleep(0.01)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    async def submit(self, item: Any, *, key: Hashable) -> Any:
        """The result of `item`, run in a batch with others of the same `key`; raises what its run raised, or
        QueueFull at once when `max_queue` requests already wait."""
        if self._task is None or self._task.done():
            raise RuntimeError("the batcher is not running; call start() first")
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests already wait for the model (--max-queue {self.max_queue})")
        waiting = _Waiting(key=key, item=item, future=asyncio.get_running_loop().create_future())
        self.waiting.append(waiting)
        self._wake.set()
        return await waiting.future

    async def run_now(self, items: list[Any]) -> list[Any]:
        """`run_batch(items)` on the model thread at once, outside the queue (the service's warm-up); raises what it
        raised."""
        if self._pool is None:
            raise RuntimeError("the batcher is not running; call start() first")
        return list(await asyncio.get_running_loop().run_in_executor(self._pool, self.run_batch, items))

    def _take(self) -> list[_Waiting]:
        """Up to max_batch waiting items of the oldest item's key, oldest first; the others keep their places."""
        key = self.waiting[0].key
        batch, keep = [], deque()
        while self.waiting:
            w = self.waiting.popleft()
            (batch if w.key == key and len(batch) < self.max_batch else keep).append(w)
        self.waiting = keep
        return batch

    def _same_key(self) -> int:
        key = self.waiting[0].key
        return sum(1 for w in self.waiting if w.key == key)

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self.waiting:
                self._wake.clear()
                await self._wake.wait()
                continue
            deadline = self.waiting[0].arrived + self.wait_s
            while (self._same_key() < self.max_batch and self.arriving() > 0
                   and (left := deadline - time.perf_counter()) > 0):
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), timeout=left)
                except asyncio.TimeoutError:
                    break
            batch = [w for w in self._take() if not w.future.done()]  # a client that went away: skip its request
            if not batch:
                continue
            self.running = len(batch)
            started = time.perf_counter()
            try:
                results = await loop.run_in_executor(self._pool, _run_isolated, self.run_batch,
                                                     [w.item for w in batch])
            finally:
                self.running = 0
            if self.on_batch is not None:
                self.on_batch(len(batch), time.perf_counter() - started)
            for w, (ok, value) in zip(batch, results):
                if w.future.done():
                    continue
                if ok:
                    w.future.set_result(value)
                else:
                    w.future.set_exception(value)


def _run_isolated(run_batch: Callable[[Sequence[Any]], Sequence[Any]], items: list[Any]) -> list[tuple[bool, Any]]:
    """(ok, result or exception) per item: the batch in one call, and when it raises, each item alone, so one bad
    request fails by itself and the others still get their results."""
    try:
        results = list(run_batch(items))
        if len(results) != len(items):
            raise RuntimeError(f"run_batch returned {len(results)} results for {len(items)} items")
        return [(True, r) for r in results]
    except Exception as e:  # noqa: BLE001 - retried one by one below; the single run's own error is what is kept
        if len(items) == 1:
            return [(False, e)]
    out = []
    for item in items:
        try:
            out.append((True, run_batch([item])[0]))
        except Exception as e:  # noqa: BLE001 - handed to that request's future
            out.append((False, e))
    return out

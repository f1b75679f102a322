"""An async batcher: requests arriving within a few milliseconds of each other go to the backend
as one `Backend.generate` call, so concurrent clients share a batch instead of queueing.

On a backend that batches continuously (vLLM), each collected batch is handed over at once, so
requests keep joining the engine's running batch; on one that does not (transformers), one batch
runs at a time and new requests collect for the next one. A request that the backend rejects (its
mode or adapter was removed while it waited) fails alone: the rest of its batch is retried without it.
"""
from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from spd_engine.backend import Backend, Completion, GenerationRequest

log = logging.getLogger("spd.batcher")


@dataclass
class _Item:
    request: GenerationRequest
    future: asyncio.Future


class Batcher:
    def __init__(self, backend: Backend, max_batch: int = 64, window_ms: float = 5.0):
        self.backend, self.max_batch, self.window = backend, max_batch, window_ms / 1000
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task | None = None
        self._running: set[asyncio.Task] = set()
        # generate() blocks its thread until the batch is done: enough threads for every batch in flight
        self._pool = ThreadPoolExecutor(max_workers=max_batch if backend.batches_continuously else 1,
                                        thread_name_prefix="spd-batch")

    @property
    def depth(self) -> int:
        return self._queue.qsize() if self._queue else 0

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        for task in [self._task, *self._running]:
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        self._pool.shutdown(wait=False, cancel_futures=True)

    async def submit(self, requests: list[GenerationRequest]) -> list[Completion]:
        loop = asyncio.get_running_loop()
        items = [_Item(r, loop.create_future()) for r in requests]
        for it in items:
            self._queue.put_nowait(it)
        return list(await asyncio.gather(*(it.future for it in items)))

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            deadline = asyncio.get_running_loop().time() + self.window
            while len(batch) < self.max_batch:
                timeout = deadline - asyncio.get_running_loop().time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self._queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            batch = [it for it in batch if not it.future.cancelled()]
            if not batch:
                continue
            if self.backend.batches_continuously:
                task = asyncio.create_task(self._execute(batch))
                self._running.add(task)
                task.add_done_callback(self._running.discard)
            else:
                await self._execute(batch)

    def _stale(self, r: GenerationRequest) -> Exception | None:
        caps, adapters = set(self.backend.capabilities()), set(self.backend.adapters())
        missing = [n for n in r.capability if n not in caps]
        if missing:
            return KeyError(f"unknown capability {', '.join(map(repr, missing))}; loaded: {', '.join(sorted(caps)) or '(none)'}")
        if r.adapter is not None and r.adapter not in adapters:
            return KeyError(f"unknown adapter {r.adapter!r}; loaded: {', '.join(sorted(adapters)) or '(none)'}")
        return None

    async def _execute(self, batch: list[_Item]) -> None:
        live = []
        for it in batch:
            err = self._stale(it.request)
            if err is None:
                live.append(it)
            elif not it.future.done():
                it.future.set_exception(err)
        batch = live
        if not batch:
            return
        try:
            out = await asyncio.get_running_loop().run_in_executor(
                self._pool, self.backend.generate, [it.request for it in batch])
        except Exception as e:  # noqa: BLE001 - isolate the failing request(s)
            if len(batch) == 1:
                if not batch[0].future.done():
                    batch[0].future.set_exception(e)
                return
            log.info("batch of %d failed (%s); retrying its requests one by one", len(batch), e)
            for it in batch:
                await self._execute([it])
            return
        for it, c in zip(batch, out):
            if not it.future.done():
                it.future.set_result(c)

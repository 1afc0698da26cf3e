"""What SenseVoice, Speaker and VADHost share: device choice, one model thread, and the batcher
of the model replicas (live-tunable through `user_config`)."""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from speech_serve.replicas.metrics import BatchMetrics
from speech_serve.settings import BatchSettings

logger = logging.getLogger("ray.serve")

FINAL, INTERIM = 0, 1  # priorities: lower runs first
KINDS = {FINAL: "final", INTERIM: "interim"}


def pick_device() -> str:
    """CUDA when Ray gave this replica a GPU (it hides the others), else CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class ModelThread:
    """One thread for a replica's model calls: funasr's generate() is not thread-safe, and the
    replica's event loop must stay free to take requests while a model runs."""

    def __init__(self, name: str):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def run_blocking(self, fn: Callable, *args: Any) -> Any:
        """From outside the event loop's coroutines (a replica's reconfigure): wait for the thread."""
        return self._pool.submit(fn, *args).result()


class Batcher:
    """Queued requests in, batches through one model thread, each caller's result out.

    The next batch is formed only when the model is free, from everything queued meanwhile (up
    to `max_batch_size`): under load batches grow by themselves. Serve's `@serve.batch` (2.60)
    does not do this: it takes a batch off its queue *before* waiting for the running one, so
    every request that arrives during a batch became a batch of its own (measured: 59 of 64
    batches held one request while utterances queued for seconds). From idle, the first request
    waits up to `batch_wait_timeout_s` for company.

    - Finals before interims: an interim (a re-decode of an unfinished utterance) runs only when
      no final is queued, and never in a final's batch.
    - A request whose caller has gone (the Ingress cancelled it: its client left) is dropped
      when the batch is formed, not computed.
    - One bad request fails alone: a batch that raises is re-run one request at a time.
    """

    def __init__(self, name: str, run_batch: Callable[[list], list], settings: BatchSettings | None = None):
        self.settings = settings or BatchSettings()
        self._run_batch = run_batch
        self._thread = ModelThread(name)
        self._metrics = BatchMetrics(name)
        self._queues: dict[int, deque[tuple[Any, asyncio.Future]]] = {FINAL: deque(), INTERIM: deque()}
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.dropped = 0  # requests whose callers left before their batch

    async def submit(self, request: Any, priority: int = FINAL) -> Any:
        if self._task is None:  # on the replica's event loop, which exists only once requests come
            self._wake = asyncio.Event()
            self._task = asyncio.create_task(self._loop())
        future = asyncio.get_running_loop().create_future()
        self._queues[priority].append((request, future))
        self._wake.set()
        return await future  # cancelled with the request: the batch former skips it

    def queued(self) -> int:
        return sum(1 for q in self._queues.values() for _, future in q if not future.done())

    def run_now(self, fn: Callable, *args: Any) -> Any:
        """Run something else on the model thread, after the batch running now; blocks the caller."""
        return self._thread.run_blocking(fn, *args)

    async def run_later(self, fn: Callable, *args: Any) -> Any:
        """The same, awaited."""
        return await self._thread.run(fn, *args)

    def _take(self) -> tuple[int, list[tuple[Any, asyncio.Future]]]:
        for priority, queue in self._queues.items():
            batch = []
            while queue and len(batch) < self.settings.max_batch_size:
                request, future = queue.popleft()
                if future.done():  # cancelled: its caller has gone
                    self.dropped += 1
                    continue
                batch.append((request, future))
            if batch:
                return priority, batch
        return FINAL, []

    async def _loop(self) -> None:
        idle = True  # the model had nothing to do when the next request came
        while True:
            if not self.queued():
                idle = True
                self._wake.clear()
                await self._wake.wait()
            if idle and self.settings.batch_wait_timeout_s > 0 and self.queued() < self.settings.max_batch_size:
                await asyncio.sleep(self.settings.batch_wait_timeout_s)  # from idle: let a batch form
            idle = False
            priority, batch = self._take()
            if batch:
                self._metrics.batch(len(batch), KINDS[priority])
                await self._run(batch)

    async def _run(self, batch: list[tuple[Any, asyncio.Future]]) -> None:
        try:
            results = await self._thread.run(self._run_batch, [request for request, _ in batch])
        except Exception as exc:
            if len(batch) > 1:  # find the bad one: the others still get their results
                logger.warning("a batch of %d failed (%s); running its requests one by one", len(batch), exc)
                for item in batch:
                    await self._run([item])
                return
            results = None
            _, future = batch[0]
            if not future.done():
                future.set_exception(exc)
        if results is not None:
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)


class BatchedModelHost:
    """Base for the model deployments: requests through a `Batcher`, and `user_config`
    ({max_batch_size, batch_wait_timeout_s}) applied to it live."""

    def __init__(self, run_batch: Callable[[list], list]) -> None:
        self.batch_settings = BatchSettings()
        self._batcher = Batcher(type(self).__name__, run_batch, self.batch_settings)

    def reconfigure(self, user_config: dict) -> None:
        self.batch_settings = BatchSettings(**(user_config or {}))
        self._batcher.settings = self.batch_settings

    def queued(self) -> int:
        """Requests waiting for a batch (0 when idle; tests check that departed clients leave none)."""
        return self._batcher.queued()

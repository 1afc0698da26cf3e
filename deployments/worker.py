"""What SenseVoice and Speaker share: device choice, one model thread, live batch tuning."""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import Callable
from typing import Any

from deployments.metrics import BatchMetrics
from serve_app.settings import BatchSettings

FINAL, INTERIM = 0, 1  # priorities: lower runs first


def pick_device() -> str:
    """CUDA when Ray gave this replica a GPU (it hides the others), else CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class PriorityWorker:
    """One thread that runs model calls, the most urgent queued call first.

    One thread because funasr's generate() is not thread-safe; priorities so that interim
    (re-decode) work waits behind every queued final result. A call already running is not
    interrupted: an interim delays a final by at most one interim batch.
    """

    def __init__(self, name: str):
        self._jobs: queue.PriorityQueue = queue.PriorityQueue()
        self._order = itertools.count()  # FIFO within a priority
        threading.Thread(target=self._loop, name=name, daemon=True).start()

    def _loop(self) -> None:
        while True:
            _, _, fn, args, loop, future = self._jobs.get()
            if future.cancelled():
                continue
            try:
                result = fn(*args)
            except BaseException as exc:  # handed to the awaiting coroutine
                loop.call_soon_threadsafe(_set_exception, future, exc)
            else:
                loop.call_soon_threadsafe(_set_result, future, result)

    def submit(self, priority: int, fn: Callable, *args: Any) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._jobs.put((priority, next(self._order), fn, args, loop, future))
        return future


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class BatchedModelHost:
    """Base for model deployments: model calls on one prioritised thread off the event loop,
    and `user_config` ({max_batch_size, batch_wait_timeout_s}) applied to the batched methods."""

    batched_methods: tuple[str, ...]  # names of the @serve.batch methods

    def __init__(self) -> None:
        self._worker = PriorityWorker(type(self).__name__)
        self._batches = BatchMetrics(type(self).__name__)

    async def _run(self, fn, requests: list, priority: int = FINAL):
        self._batches.batch(len(requests), "final" if priority == FINAL else "interim")
        return await self._worker.submit(priority, fn, requests)

    def reconfigure(self, user_config: dict) -> None:
        batch = BatchSettings(**(user_config or {}))
        for name in self.batched_methods:
            method = getattr(self, name)
            method.set_max_batch_size(batch.max_batch_size)
            method.set_batch_wait_timeout_s(batch.batch_wait_timeout_s)
        self.batch_settings = batch

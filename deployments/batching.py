"""What SenseVoice and Speaker share: device choice, one inference thread, live batch tuning."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from serve_app.settings import BatchSettings


def pick_device() -> str:
    """CUDA when Ray gave this replica a GPU (it hides the others), else CPU."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


class BatchedModelHost:
    """Base for model deployments: runs blocking model calls on one thread off the event loop,
    and applies `user_config` ({max_batch_size, batch_wait_timeout_s}) to the batched method."""

    batched_method: str  # name of the @serve.batch method

    def __init__(self) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def reconfigure(self, user_config: dict) -> None:
        batch = BatchSettings(**(user_config or {}))
        method = getattr(self, self.batched_method)
        method.set_max_batch_size(batch.max_batch_size)
        method.set_batch_wait_timeout_s(batch.batch_wait_timeout_s)
        self.batch_settings = batch

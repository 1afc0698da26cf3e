"""Speaker: batched 192-d speaker embeddings of whole utterances."""

from __future__ import annotations

import logging
import time

import numpy as np
from ray import serve

from deployments.batching import BatchedModelHost, pick_device
from serve_app.audio import to_float32
from serve_app.messages import SpeakerEmbedding
from serve_app.models import ModelSource, load_automodel
from serve_app.settings import BatchSettings, SpeakerSettings

logger = logging.getLogger("ray.serve")
_DEFAULT_BATCH = BatchSettings()


def tile_to(pcm: np.ndarray, n: int) -> np.ndarray:
    """Repeat a clip up to n samples.

    funasr pads a batch with zero features, and the speaker models' statistics pooling
    then averages the padding in, which changes the embedding. A clip tiled with itself
    has the same frame statistics, so batched and single embeddings agree.
    """
    if len(pcm) >= n:
        return pcm
    return np.resize(pcm, n)


class SpeakerCore:
    def __init__(self, source: ModelSource, settings: SpeakerSettings, device: str = "cpu"):
        self.settings = settings
        self.device = device
        self.model = load_automodel(source, device=device, threads=settings.threads)

    def embed_batch(self, clips: list[np.ndarray]) -> list[SpeakerEmbedding]:
        started = time.perf_counter()
        longest = max(len(c) for c in clips)
        inputs = [to_float32(tile_to(c, longest)) for c in clips]
        out = self.model.generate(input=inputs, batch_size=len(inputs))
        vectors = np.concatenate([o["spk_embedding"].detach().cpu().float().numpy() for o in out], axis=0)
        model_ms = (time.perf_counter() - started) * 1000
        return [SpeakerEmbedding(v.astype(np.float32), model_ms, len(clips)) for v in vectors]


@serve.deployment
class Speaker(BatchedModelHost):
    batched_methods = ("embed",)

    def __init__(self, source: ModelSource, settings: SpeakerSettings):
        super().__init__()
        self._core = SpeakerCore(source, settings, device=pick_device())
        logger.info("Speaker on %s from %s", self._core.device, source.describe())

    @serve.batch(max_batch_size=_DEFAULT_BATCH.max_batch_size, batch_wait_timeout_s=_DEFAULT_BATCH.batch_wait_timeout_s)
    async def embed(self, clips: list[np.ndarray]) -> list[SpeakerEmbedding]:
        return await self._run(self._core.embed_batch, clips)

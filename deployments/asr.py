"""SenseVoice: batched transcription of whole utterances from all sessions."""

from __future__ import annotations

import logging
import time
from collections import defaultdict

from ray import serve

from deployments.batching import INTERIM, BatchedModelHost, pick_device
from serve_app.audio import to_float32
from serve_app.messages import AsrRequest, Transcript
from serve_app.models import ModelSource, load_automodel
from serve_app.settings import AsrSettings, BatchSettings
from serve_app.transcript import parse_sensevoice

logger = logging.getLogger("ray.serve")
_DEFAULT_BATCH = BatchSettings()


class AsrCore:
    def __init__(self, source: ModelSource, settings: AsrSettings, device: str = "cpu"):
        self.settings = settings
        self.device = device
        # funasr's fbank frontend dithers by default: random noise that can change the words
        self.model = load_automodel(
            source, device=device, threads=settings.threads, frontend_conf={"dither": settings.dither}
        )

    def transcribe_batch(self, requests: list[AsrRequest]) -> list[Transcript]:
        """One generate() per (language, itn) group; results in request order."""
        results: list[Transcript | None] = [None] * len(requests)
        groups: dict[tuple[str, bool], list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[(req.language, req.use_itn)].append(i)
        for (language, use_itn), idx in groups.items():
            started = time.perf_counter()
            out = self.model.generate(
                input=[to_float32(requests[i].pcm) for i in idx], batch_size=len(idx),
                language=language, use_itn=use_itn,
            )  # fmt: skip
            model_ms = (time.perf_counter() - started) * 1000
            for i, item in zip(idx, out, strict=True):
                text, lang, emotion, event = parse_sensevoice(item["text"])
                results[i] = Transcript(text, lang, emotion, event, item["text"], model_ms, len(idx))
        return results  # type: ignore[return-value]


# Same as config/serve.yaml. max_ongoing_requests: utterances queue here to be batched. health_check_period_s: a
# dead replica is noticed (and replaced) within 2 s instead of Serve's 10; its callers wait for the replacement.
@serve.deployment(max_ongoing_requests=64, health_check_period_s=2)
class SenseVoice(BatchedModelHost):
    batched_methods = ("transcribe", "transcribe_interim")

    def __init__(self, source: ModelSource, settings: AsrSettings):
        super().__init__()
        self._core = AsrCore(source, settings, device=pick_device())
        logger.info("SenseVoice on %s from %s", self._core.device, source.describe())

    @serve.batch(max_batch_size=_DEFAULT_BATCH.max_batch_size, batch_wait_timeout_s=_DEFAULT_BATCH.batch_wait_timeout_s)
    async def transcribe(self, requests: list[AsrRequest]) -> list[Transcript]:
        return await self._run(self._core.transcribe_batch, requests)

    @serve.batch(max_batch_size=_DEFAULT_BATCH.max_batch_size, batch_wait_timeout_s=_DEFAULT_BATCH.batch_wait_timeout_s)
    async def transcribe_interim(self, requests: list[AsrRequest]) -> list[Transcript]:
        """Growing segments for interim text: queued behind every final batch."""
        return await self._run(self._core.transcribe_batch, requests, priority=INTERIM)

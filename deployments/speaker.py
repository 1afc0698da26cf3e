"""Speaker: batched speaker embeddings of whole utterances, and who-spoke matching against the
enrolled voiceprints of the session's group, in the same replica (no extra service hop)."""

from __future__ import annotations

import logging
import time

import numpy as np
from ray import serve

from deployments.batching import BatchedModelHost, pick_device
from serve_app.audio import to_float32
from serve_app.messages import SpeakerEmbedding, SpeakerRequest
from serve_app.models import ModelSource, load_automodel
from serve_app.settings import BatchSettings, SpeakerSettings, VoiceprintSettings
from serve_app.voiceprints import Identifier, open_store

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
    """Embeddings from a FunASR speaker model (ERes2NetV2, CAM++) or resemblyzer's GE2E."""

    def __init__(self, source: ModelSource, settings: SpeakerSettings, device: str = "cpu"):
        self.settings = settings
        self.device = device
        if source.backend == "ge2e":
            from resemblyzer import VoiceEncoder

            self.model_name = "ge2e"
            self._ge2e = VoiceEncoder(device=device, verbose=False)
            self._ge2e.embed_utterance(np.zeros(16000, dtype=np.float32))  # the first call compiles (numba)
        else:
            self.model_name = source.test_arch or _arch_of(source)
            self.model = load_automodel(source, device=device, threads=settings.threads)

    def embed_batch(self, clips: list[np.ndarray]) -> list[SpeakerEmbedding]:
        started = time.perf_counter()
        if self.model_name == "ge2e":
            vectors = [self._ge2e.embed_utterance(to_float32(c)) for c in clips]
        else:
            longest = max(len(c) for c in clips)
            inputs = [to_float32(tile_to(c, longest)) for c in clips]
            out = self.model.generate(input=inputs, batch_size=len(inputs))
            vectors = list(np.concatenate([o["spk_embedding"].detach().cpu().float().numpy() for o in out], axis=0))
        model_ms = (time.perf_counter() - started) * 1000
        return [SpeakerEmbedding(np.asarray(v, np.float32), self.model_name, model_ms, len(clips)) for v in vectors]


def _arch_of(source: ModelSource) -> str:
    """Model name recorded with each voiceprint, from the hub id or directory name."""
    ref = source.ref.lower()
    return "campplus" if "campplus" in ref or "cam++" in ref else "eres2netv2"


@serve.deployment(max_ongoing_requests=64, health_check_period_s=2)  # same as config/serve.yaml (see SenseVoice)
class Speaker(BatchedModelHost):
    batched_methods = ("embed",)

    def __init__(self, source: ModelSource, settings: SpeakerSettings, voiceprints: VoiceprintSettings):
        super().__init__()
        self._core = SpeakerCore(source, settings, device=pick_device())
        threshold = voiceprints.thresholds.get(self._core.model_name, 0.7)
        self._identifier = Identifier(
            open_store(voiceprints.store), self._core.model_name, threshold, voiceprints.refresh_s
        )
        logger.info("Speaker %s on %s from %s, match threshold %.2f",
                    self._core.model_name, self._core.device, source.describe(), threshold)  # fmt: skip

    def _embed_and_identify(self, requests: list[SpeakerRequest]) -> list[SpeakerEmbedding]:
        out = self._core.embed_batch([r.pcm for r in requests])
        for emb, req in zip(out, requests, strict=True):
            if req.group is not None:
                match = self._identifier.identify(emb.vector, req.group)
                emb.label, emb.score, emb.speaker_id = match.label, match.score, match.speaker_id
        return out

    @serve.batch(max_batch_size=_DEFAULT_BATCH.max_batch_size, batch_wait_timeout_s=_DEFAULT_BATCH.batch_wait_timeout_s)
    async def embed(self, requests: list[SpeakerRequest]) -> list[SpeakerEmbedding]:
        return await self._run(self._embed_and_identify, requests)

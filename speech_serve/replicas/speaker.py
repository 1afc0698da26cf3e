"""Speaker: batched speaker embeddings of whole utterances, and who-spoke matching against the
enrolled voiceprints of the session's group, in the same replica (no extra service hop)."""

from __future__ import annotations

import logging
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
from ray import serve

from speech_serve.messages import SpeakerEmbedding, SpeakerRequest, to_float32, usable_embedding
from speech_serve.replicas.models import ModelSource, load_automodel
from speech_serve.replicas.worker import BatchedModelHost, pick_device
from speech_serve.settings import SpeakerSettings, VoiceprintSettings
from speech_serve.voiceprints import Candidate, Match, StoreUnavailable, VoiceprintStore, open_store, unit

logger = logging.getLogger("ray.serve")


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
        self.arch = _arch_of(source)  # picks the match threshold
        self.model_name = voiceprint_model_name(source)  # recorded with every voiceprint
        if source.backend == "ge2e":
            from resemblyzer import VoiceEncoder

            self._ge2e = VoiceEncoder(device=device, verbose=False)
            self._ge2e.embed_utterance(np.zeros(16000, dtype=np.float32))  # the first call compiles (numba)
        else:
            self.model = load_automodel(source, device=device, threads=settings.threads or 1)  # null: the builder's

    def embed_batch(self, clips: list[np.ndarray]) -> list[SpeakerEmbedding]:
        started = time.perf_counter()
        if self.arch == "ge2e":
            vectors = [self._ge2e.embed_utterance(to_float32(c)) for c in clips]
        else:
            longest = max(len(c) for c in clips)
            inputs = [to_float32(tile_to(c, longest)) for c in clips]
            out = self.model.generate(input=inputs, batch_size=len(inputs))
            vectors = list(np.concatenate([o["spk_embedding"].detach().cpu().float().numpy() for o in out], axis=0))
        model_ms = (time.perf_counter() - started) * 1000
        return [SpeakerEmbedding(np.asarray(v, np.float32), self.model_name, model_ms, len(clips)) for v in vectors]


def _arch_of(source: ModelSource) -> str:
    """The architecture, from the backend, the test build, or the hub id or directory name."""
    if source.backend == "ge2e":
        return "ge2e"
    if source.test_arch:
        return source.test_arch
    ref = source.ref.lower()
    return "campplus" if "campplus" in ref or "cam++" in ref else "eres2netv2"


def voiceprint_model_name(source: ModelSource) -> str:
    """The model name recorded with each voiceprint: embeddings are only ever compared with those of
    the same name. A random-weight test model gets a name of its own (`test-eres2netv2-tiny`): its
    embeddings are noise, and filed as `eres2netv2` they would be matched against the real model's."""
    arch = _arch_of(source)
    return f"test-{arch}-{source.test_size or 'tiny'}" if source.is_test else arch


# ---- voiceprint matching ---------------------------------------------------------------------------


def best_match(vector: np.ndarray, candidates: Sequence[Candidate], threshold: float) -> Match:
    """The closest enrolled speaker by cosine, if it clears the threshold; else unknown."""
    if not candidates:
        return Match("unknown", None)
    v = unit(vector)
    scores = [float(c.centroid @ v) for c in candidates]
    best = int(np.argmax(scores))
    score = round(scores[best], 4)
    if score >= threshold:
        return Match(candidates[best].name, score, candidates[best].speaker_id)
    return Match("unknown", None)  # no score: it would say how close the voice came to someone enrolled


class Identifier:
    """Per-replica cache of each group's candidates, refreshed when the store's revision moves
    (checked at most every `refresh_s`), so enrolments show up without a restart."""

    def __init__(self, store: VoiceprintStore, model: str, threshold: float, refresh_s: float = 1.0,
                 max_groups: int = 1024):  # fmt: skip
        self.store, self.model, self.threshold, self.refresh_s = store, model, threshold, refresh_s
        self.max_groups = max_groups  # every device has a group of its own: the least recently used go
        self._cache: OrderedDict[str, list[Candidate]] = OrderedDict()
        self._revision = -1
        self._checked_at = 0.0
        self._store_failing = False

    def identify(self, vector: np.ndarray, group: str) -> Match:
        """The best match in `group`; `unknown` while the store cannot be read (logged once per outage):
        a broken voiceprint file costs names, never transcripts."""
        try:
            candidates = self._candidates(group)
        except (StoreUnavailable, sqlite3.Error) as exc:
            if not self._store_failing:
                logger.error("voiceprint store unavailable; every speaker is `unknown` until it is fixed: %s", exc)
            self._store_failing = True
            self._checked_at = 0.0  # look again at the next utterance
            return Match("unknown", None)
        if self._store_failing:
            logger.warning("voiceprint store available again")
            self._store_failing = False
        return best_match(vector, candidates, self.threshold)

    def _candidates(self, group: str) -> list[Candidate]:
        now = time.monotonic()
        if now - self._checked_at >= self.refresh_s:
            self._checked_at = now
            revision = self.store.revision()
            if revision != self._revision:
                self._cache.clear()
                self._revision = revision
        if group in self._cache:
            self._cache.move_to_end(group)
            return self._cache[group]
        candidates = self._cache[group] = self.store.candidates(group, self.model)
        while len(self._cache) > self.max_groups:
            self._cache.popitem(last=False)
        return candidates


@serve.deployment  # its options: settings.DEFAULT_DEPLOYMENT_OPTIONS
class Speaker(BatchedModelHost):
    def __init__(self, source: ModelSource, settings: SpeakerSettings, voiceprints: VoiceprintSettings):
        self._core = SpeakerCore(source, settings, device=pick_device())
        super().__init__(self._embed_and_identify)
        threshold = voiceprints.threshold(self._core.arch)
        self._identifier = Identifier(
            open_store(voiceprints.store), self._core.model_name, threshold, voiceprints.refresh_s,
            voiceprints.cached_groups,
        )
        logger.info("Speaker %s on %s from %s, match threshold %.2f",
                    self._core.model_name, self._core.device, source.describe(), threshold)  # fmt: skip

    def _embed_and_identify(self, requests: list[SpeakerRequest]) -> list[SpeakerEmbedding]:
        out = self._core.embed_batch([r.pcm for r in requests])
        for emb, req in zip(out, requests, strict=True):
            if req.group is not None and usable_embedding(emb.vector):  # a NaN one would fail the batch
                match = self._identifier.identify(emb.vector, req.group)
                emb.label, emb.score, emb.speaker_id = match.label, match.score, match.speaker_id
        return out

    async def embed(self, request: SpeakerRequest) -> SpeakerEmbedding:
        return await self._batcher.submit(request)

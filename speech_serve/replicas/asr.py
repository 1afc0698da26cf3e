"""SenseVoice: batched transcription of whole utterances from all sessions, and the parsing of
its tagged output into fields."""

from __future__ import annotations

import logging
import re
import time
from collections import defaultdict

from ray import serve

from speech_serve.messages import AsrRequest, Transcript, to_float32
from speech_serve.replicas.models import ModelSource, load_automodel, prepare_asr
from speech_serve.replicas.worker import FINAL, INTERIM, BatchedModelHost, pick_device
from speech_serve.settings import AsrSettings

logger = logging.getLogger("ray.serve")


# ---- transcript parsing --------------------------------------------------------------------------
# Turn SenseVoice's tagged output into structured fields.
#
# SenseVoice writes `<|lang|><|EMOTION|><|Event|><|itn|>text`. funasr's
# rich_transcription_postprocess turns tags into emoji; clients want fields instead.

LANGUAGES = {"zh", "en", "yue", "ja", "ko", "nospeech"}
EMOTIONS = {"HAPPY", "SAD", "ANGRY", "NEUTRAL", "FEARFUL", "DISGUSTED", "SURPRISED", "EMO_UNKNOWN"}
EVENTS = {"Speech", "BGM", "Applause", "Laughter", "Cry", "Sneeze", "Breath", "Cough", "Event_UNK"}
_TAG = re.compile(r"<\|([^|>]*)\|>")


def parse_sensevoice(raw: str) -> tuple[str, str | None, str | None, str | None]:
    """Return (text, language, emotion, event) from SenseVoice's raw text."""
    language = emotion = event = None
    for name in _TAG.findall(raw):
        if name in LANGUAGES and language is None:
            language = name
        elif name in EMOTIONS and emotion is None:
            emotion = name.lower() if name != "EMO_UNKNOWN" else "unknown"
        elif name in EVENTS and event is None:
            event = name
    text = " ".join(_TAG.sub(" ", raw).split())
    return text, language, emotion, event


class AsrCore:
    def __init__(self, source: ModelSource, settings: AsrSettings, device: str = "cpu"):
        self.settings = settings
        self.device = device
        # funasr's fbank frontend dithers by default: random noise that can change the words
        self.model = load_automodel(
            source, device=device, threads=settings.threads, frontend_conf={"dither": settings.dither}
        )
        self.precision = prepare_asr(
            self.model, device, settings.quantize, settings.quantized_engine, settings.trace_encoder
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


@serve.deployment  # its options: settings.DEFAULT_DEPLOYMENT_OPTIONS
class SenseVoice(BatchedModelHost):
    def __init__(self, source: ModelSource, settings: AsrSettings):
        self._core = AsrCore(source, settings, device=pick_device())
        super().__init__(self._core.transcribe_batch)
        logger.info("SenseVoice on %s (%s) from %s", self._core.device, self._core.precision, source.describe())

    async def transcribe(self, request: AsrRequest) -> Transcript:
        return await self._batcher.submit(request, FINAL)

    async def transcribe_interim(self, request: AsrRequest) -> Transcript:
        """A growing segment for interim text: runs only when no final is queued."""
        return await self._batcher.submit(request, INTERIM)

"""SenseVoice: batched transcription of whole utterances from all sessions, and the parsing of
its tagged output into fields."""

from __future__ import annotations

import logging
import re
import time
from collections import defaultdict
from contextlib import nullcontext

import numpy as np
from ray import serve

from speech_serve.messages import AsrRequest, ModelTiming, Transcript, to_float32
from speech_serve.replicas.decoding import Decoder, captured
from speech_serve.replicas.models import ModelSource, load_automodel, prepare_asr
from speech_serve.replicas.worker import FINAL, INTERIM, BatchedModelHost, pick_device
from speech_serve.settings import AsrSettings, ComputeSettings
from speech_serve.wire.pcm import SAMPLE_RATE

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
            source, device=device, threads=settings.threads or 1, frontend_conf={"dither": settings.dither}
        )
        self.precision = prepare_asr(
            self.model, device, settings.quantize, settings.quantized_engine, settings.trace_encoder
        )
        self.decoder = Decoder(self.model.kwargs["tokenizer"], settings.beam_size)

    def transcribe_batch(self, requests: list[AsrRequest]) -> list[Transcript]:
        """One generate() per (language, itn) group; results in request order. Utterances that ask for
        words or carry hotwords are decoded from the same pass's posteriors (replicas/decoding.py);
        the others keep funasr's own text."""
        results: list[Transcript | None] = [None] * len(requests)
        groups: dict[tuple[str, bool], list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            groups[(req.language, req.use_itn)].append(i)
        for (language, use_itn), idx in groups.items():
            decode = any(requests[i].words or requests[i].hotwords for i in idx)
            started = time.perf_counter()
            with captured(self.model.model) if decode else nullcontext(None) as posteriors:
                out = self.model.generate(
                    input=[to_float32(requests[i].pcm) for i in idx], batch_size=len(idx),
                    language=language, use_itn=use_itn,
                )  # fmt: skip
            decoded = [self.decoder.decode(posteriors.of(j), requests[i])
                       if posteriors is not None and (requests[i].words or requests[i].hotwords)
                       else (item["text"], None, None) for j, (i, item) in enumerate(zip(idx, out, strict=True))]
            model_ms = (time.perf_counter() - started) * 1000
            for i, (raw, words, confidence) in zip(idx, decoded, strict=True):
                text, lang, emotion, event = parse_sensevoice(raw)
                results[i] = Transcript(text, lang, emotion, event, raw, model_ms, len(idx), words, confidence)
        return results  # type: ignore[return-value]

    def time_batches(self, utterance_s: float, batch: int, repeats: int = 3) -> tuple[float, float]:
        """Seconds for one utterance alone and for `batch` of them together (the fastest of `repeats`,
        after an untimed run that pays the first call's one-off costs: replicas start beside each other,
        and a run slowed by a neighbour's start is not the replica's speed). Noise stands in for speech:
        SenseVoice's work depends on an utterance's length, not on what is said."""
        noise = np.random.default_rng(0).standard_normal(int(SAMPLE_RATE * utterance_s)) * 3000
        one = [AsrRequest(noise.astype(np.int16))]
        self.transcribe_batch(one)

        def fastest_s(requests: list[AsrRequest]) -> float:
            runs = []
            for _ in range(repeats):
                started = time.perf_counter()
                self.transcribe_batch(requests)
                runs.append(time.perf_counter() - started)
            return min(runs)

        return fastest_s(one), fastest_s(one * batch)


@serve.deployment  # its options: settings.DEFAULT_DEPLOYMENT_OPTIONS
class SenseVoice(BatchedModelHost):
    def __init__(self, source: ModelSource, settings: AsrSettings, compute: ComputeSettings | None = None):
        self._core = AsrCore(source, settings, device=pick_device())
        self._warmup_s = (compute or ComputeSettings()).warmup_utterance_s
        self.timing: ModelTiming | None = None
        super().__init__(self._core.transcribe_batch)
        logger.info("SenseVoice on %s (%s) from %s", self._core.device, self._core.precision, source.describe())

    def reconfigure(self, user_config: dict) -> None:
        """The batch settings; at start, and when max_batch_size changes, the warm-up timing of
        this replica's own shapes (through the model thread: never beside a running batch)."""
        super().reconfigure(user_config)
        if self.timing is None or self.timing.batch != self.batch_settings.max_batch_size:
            self.timing = self._time(self._batcher.run_now(self._core.time_batches, self._warmup_s,
                                                           self.batch_settings.max_batch_size))  # fmt: skip

    def _time(self, measured: tuple[float, float]) -> ModelTiming:
        import ray

        single_s, batch_s = measured
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        timing = ModelTiming(serve.get_replica_context().replica_id.unique_id, self._core.device,
                             self._core.settings.threads or 1, cpus, self._warmup_s,
                             self.batch_settings.max_batch_size, round(single_s, 4), round(batch_s, 4))  # fmt: skip
        logger.info("SenseVoice warm-up: %.2f s of speech alone in %.3f s, %d together in %.3f s (%s, %d threads, "
                    "%s CPUs reserved)", timing.utterance_s, single_s, timing.batch, batch_s, timing.device,
                    timing.threads, cpus)  # fmt: skip
        return timing

    async def capacity(self) -> ModelTiming:
        """This replica's warm-up timing (the Ingress sizes admission by compute from it)."""
        if self.timing is None:  # started without user_config: time now
            self.timing = self._time(await self._batcher.run_later(self._core.time_batches, self._warmup_s,
                                                                   self.batch_settings.max_batch_size))  # fmt: skip
        return self.timing

    async def transcribe(self, request: AsrRequest) -> Transcript:
        return await self._batcher.submit(request, FINAL)

    async def transcribe_interim(self, request: AsrRequest) -> Transcript:
        """A growing segment for interim text: runs only when no final is queued."""
        return await self._batcher.submit(request, INTERIM)

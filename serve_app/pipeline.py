"""The I/O shell around `Session`: VAD calls, replay after a re-pin, and the fan-out of each
finished utterance to SenseVoice and Speaker. Protocol-agnostic: every WebSocket protocol
feeds a `StreamRunner` with PCM and gets `UtteranceResult`s back, in order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import numpy as np
from ray.exceptions import ActorUnavailableError, RayActorError

from serve_app.messages import (
    AsrRequest,
    SpeakerEmbedding,
    SpeakerInfo,
    SpeakerRequest,
    Transcript,
    Utterance,
    UtteranceResult,
    VadChunk,
    VadFeedResult,
)
from serve_app.metrics import IngressMetrics
from serve_app.session import Session
from serve_app.settings import AppSettings

logger = logging.getLogger("ray.serve")

# A replica that died or is stopping mid-call: the call is safe to repeat on another one.
REPLICA_GONE = (RayActorError, ActorUnavailableError)
MAX_ATTEMPTS = 4
RETRY_BACKOFF_S = 0.5  # times the attempt number: a replacement replica takes seconds to start


@dataclass(frozen=True)
class RecognitionOptions:
    language: str = "auto"
    use_itn: bool = True
    return_embedding: bool = False
    speaker_group: str | None = None  # whose voiceprints to match; None: the configured default


def _ms_since(t: float) -> float:
    return round((time.perf_counter() - t) * 1000, 1)


class Pipeline:
    """One per Ingress replica: the deployment handles and the settings."""

    def __init__(self, vad, asr, speaker, settings: AppSettings, models_label: str, metrics: IngressMetrics):
        self.vad, self.asr, self.speaker = vad, asr, speaker
        self.settings = settings
        self.models_label = models_label
        self.metrics = metrics

    def new_session(self, session_id: str) -> Session:
        s = self.settings.ingress
        return Session(session_id, vad_chunk_ms=s.vad_chunk_ms, max_utterance_ms=s.max_utterance_ms)

    async def feed_vad(self, session: Session, chunk: VadChunk) -> tuple[VadFeedResult, int]:
        """Send one chunk; if the session's VAD state is gone, replay the unfinished audio.

        Returns the result and how many replays it took.
        """
        sid = session.session_id
        for attempt in range(MAX_ATTEMPTS):
            try:
                result = await self.vad.feed.remote(sid, chunk.pcm, chunk.start_ms, chunk.final, chunk.restart)
            except REPLICA_GONE as exc:
                logger.warning("session %s: VAD replica lost (%s); replaying", sid, type(exc).__name__)
                await asyncio.sleep(RETRY_BACKOFF_S * attempt)
                result = VadFeedResult(events=[], state_lost=True)
            if not result.state_lost:
                return result, attempt
            chunk = session.replay_chunk()
            logger.info("session %s: replaying %d ms of audio from %d ms (attempt %d)",
                        sid, len(chunk.pcm) // 16, chunk.start_ms, attempt + 1)  # fmt: skip
        raise RuntimeError(f"session {sid}: VAD state could not be rebuilt after {MAX_ATTEMPTS} replays")

    async def close_vad(self, session_id: str) -> None:
        try:
            await self.vad.close.remote(session_id)
        except Exception:  # the replica may be gone already; nothing to clean up then
            logger.info("session %s: VAD close failed; replica gone", session_id)

    async def _retrying(self, call: Callable[[], Awaitable], what: str, session_id: str):
        for attempt in range(MAX_ATTEMPTS):
            try:
                return await call()
            except REPLICA_GONE:
                if attempt == MAX_ATTEMPTS - 1:
                    raise
                logger.warning("session %s: %s replica lost; retrying", session_id, what)
                await asyncio.sleep(RETRY_BACKOFF_S * attempt)

    async def transcribe(
        self, pcm: np.ndarray, options: RecognitionOptions, session_id: str
    ) -> tuple[Transcript, float]:
        started = time.perf_counter()
        request = AsrRequest(pcm, options.language, options.use_itn)
        transcript = await self._retrying(lambda: self.asr.transcribe.remote(request), "SenseVoice", session_id)
        return transcript, _ms_since(started)

    async def transcribe_interim(self, pcm: np.ndarray, options: RecognitionOptions) -> Transcript:
        """Text of an unfinished utterance; runs behind every final on the SenseVoice replica."""
        return await self.asr.transcribe_interim.remote(AsrRequest(pcm, options.language, options.use_itn))

    async def embed(self, pcm: np.ndarray, group: str | None, session_id: str) -> tuple[SpeakerEmbedding | None, float]:
        """Embedding and, when `group` is given, the best match among its voiceprints."""
        if not self.settings.ingress.speaker_enabled:
            return None, 0.0
        started = time.perf_counter()
        request = SpeakerRequest(pcm, group)
        embedding = await self._retrying(lambda: self.speaker.embed.remote(request), "Speaker", session_id)
        return embedding, _ms_since(started)

    async def recognise(
        self, session_id: str, utt: Utterance, options: RecognitionOptions
    ) -> tuple[UtteranceResult, SpeakerEmbedding | None]:
        """Transcript and speaker embedding of one utterance, computed concurrently."""
        group = options.speaker_group or self.settings.voiceprints.default_group
        (transcript, asr_ms), (embedding, spk_ms) = await asyncio.gather(
            self.transcribe(utt.pcm, options, session_id), self.embed(utt.pcm, group, session_id)
        )
        speaker = SpeakerInfo()
        if embedding is not None:
            speaker = SpeakerInfo(embedding.label, embedding.score, embedding.speaker_id, f"{session_id}:{utt.index}")
        if embedding is not None and options.return_embedding:
            speaker.embedding = [round(float(x), 6) for x in embedding.vector]
        latency = {"asr_ms": asr_ms, "asr_model_ms": round(transcript.model_ms, 1)}
        if embedding is not None:
            latency |= {"speaker_ms": spk_ms, "speaker_model_ms": round(embedding.model_ms, 1)}
        result = UtteranceResult(
            session_id=session_id, index=utt.index, start_ms=utt.start_ms, end_ms=utt.end_ms,
            text=transcript.text, language=transcript.language, emotion=transcript.emotion,
            event=transcript.event, raw_text=transcript.raw_text, speaker=speaker,
            models=self.models_label, forced_cut=utt.forced_cut, latency_ms=latency,
            batch_sizes={"asr": transcript.batch_size, **({"speaker": embedding.batch_size} if embedding else {})},
        )  # fmt: skip
        return result, embedding


class StreamRunner:
    """One live stream: audio in, `on_result` called once per utterance, in order.

    Optional: `on_interim(index, text)` with the growing text of the utterance being spoken,
    every `interim_interval_ms` (at most one interim request in flight per stream).
    `manual` streams (push-to-talk) skip the VAD: `end_utterance()` cuts the utterance.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        session: Session,
        options: RecognitionOptions,
        on_result: Callable[[UtteranceResult], Awaitable[None]],
        on_failure: Callable[[int, Exception], Awaitable[None]],
        on_interim: Callable[[int, str], Awaitable[None]] | None = None,
        interim_interval_ms: int = 600,
    ):
        self.pipeline = pipeline
        self.session = session
        self.options = options
        self._on_result, self._on_failure, self._on_interim = on_result, on_failure, on_interim
        self._interim_interval_ms = interim_interval_ms
        self._interim_task: asyncio.Task | None = None
        self._interim_at_ms = 0
        self._queue: asyncio.Queue[tuple[int, asyncio.Task] | None] = asyncio.Queue()
        self._in_flight: set[asyncio.Task] = set()
        self._sender = asyncio.create_task(self._send_in_order())
        self.embeddings: deque[tuple[str, SpeakerEmbedding]] = deque(maxlen=pipeline.settings.speaker.keep_embeddings)
        self.manual = False
        self.results_sent = 0
        self.vad_replays = 0

    @property
    def idle(self) -> bool:
        """Between utterances with every result sent: a safe moment to close the stream."""
        return self.session.speech_start_ms is None and not self._in_flight

    async def push(self, pcm: np.ndarray) -> None:
        for chunk in self.session.add_audio(pcm):
            await self._process(chunk)

    def begin_utterance(self) -> None:
        """Push-to-talk pressed."""
        self.manual = True
        self.session.begin_manual()

    def end_utterance(self) -> None:
        """The client ends the utterance now: push-to-talk released, or listening stopped
        mid-speech. Nothing happens if no utterance is open."""
        if not self.manual and self.session.speech_start_ms is None:
            return
        utt = self.session.end_manual()
        if utt is not None:
            self._recognise_later(utt, time.perf_counter(), 0.0, 0.0, 0)

    def abort(self) -> None:
        """Drop the utterance being spoken and every result not sent yet."""
        self.session.abort()
        for task in self._in_flight:
            task.cancel()
        if self._interim_task is not None:
            self._interim_task.cancel()

    async def finish(self) -> int:
        """End of stream: flush the VAD, wait for every result to be sent. Returns the count."""
        if self.manual:
            self.end_utterance()
        else:
            await self._process(self.session.flush())
        await self._queue.put(None)
        await self._sender
        return self.results_sent

    async def close(self) -> None:
        """The client is gone: stop work for it and free its VAD state."""
        self._sender.cancel()
        for task in [*self._in_flight, self._interim_task]:
            if task is not None:
                task.cancel()
        await self.pipeline.close_vad(self.session.session_id)

    async def _process(self, chunk: VadChunk) -> None:
        started = time.perf_counter()
        if self.manual:
            result, vad_ms = VadFeedResult(events=[]), 0.0
        else:
            result, replays = await self.pipeline.feed_vad(self.session, chunk)
            self.vad_replays += replays
            vad_ms = _ms_since(started)
            self.pipeline.metrics.vad_call(vad_ms)
        for utt in self.session.on_vad_events(result.events):
            endpoint_ms = self.session.sent_ms - utt.end_ms
            self._recognise_later(utt, started, vad_ms, result.compute_ms, endpoint_ms)
        self._maybe_interim()

    def _recognise_later(self, utt: Utterance, started: float, vad_ms: float, vad_compute_ms: float, endpoint_ms: int):
        task = asyncio.create_task(self._recognise(utt, started, vad_ms, vad_compute_ms, endpoint_ms))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)
        self._queue.put_nowait((utt.index, task))

    def _maybe_interim(self) -> None:
        if self._on_interim is None:
            return
        speech = self.session.speech_so_far()
        if speech is None:
            self._interim_at_ms = self.session.sent_ms
            return
        due = self.session.sent_ms - self._interim_at_ms >= self._interim_interval_ms
        if due and (self._interim_task is None or self._interim_task.done()):
            self._interim_at_ms = self.session.sent_ms
            self._interim_task = asyncio.create_task(self._interim(*speech))

    async def _interim(self, index: int, pcm: np.ndarray) -> None:
        try:
            transcript = await self.pipeline.transcribe_interim(pcm, self.options)
        except Exception:  # an interim is a courtesy: the final result still comes
            logger.warning("session %s: interim recognition failed", self.session.session_id, exc_info=True)
            return
        if self.session.utterances_done == index and self._on_interim is not None:  # not final yet
            await self._on_interim(index, transcript.text)

    async def _recognise(self, utt: Utterance, started: float, vad_ms: float, vad_compute_ms: float, endpoint_ms: int):
        result, embedding = await self.pipeline.recognise(self.session.session_id, utt, self.options)
        if embedding is not None and result.speaker.embedding_id:
            self.embeddings.append((result.speaker.embedding_id, embedding))
        result.latency_ms |= {
            "vad_ms": vad_ms, "vad_compute_ms": round(vad_compute_ms, 1),
            "endpoint_ms": float(endpoint_ms), "server_ms": _ms_since(started),
        }  # fmt: skip
        return result

    async def _send_in_order(self) -> None:
        while (item := await self._queue.get()) is not None:
            index, task = item
            await asyncio.wait([task])  # never raises for the task's own failure or cancellation
            if task.cancelled():  # aborted by the client: answer nothing for it
                continue
            if task.exception() is not None:
                logger.error("session %s: recognition of utterance %d failed", self.session.session_id, index,
                             exc_info=task.exception())  # fmt: skip
                await self._on_failure(index, task.exception())
                continue
            await self._on_result(task.result())
            self.results_sent += 1

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
from functools import partial

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
from serve_app.retry import ReplicaLostError, RetryClock
from serve_app.session import Session
from serve_app.settings import AppSettings

logger = logging.getLogger("ray.serve")

# A replica that died or is stopping mid-call: the call is safe to repeat on another one.
REPLICA_GONE = (RayActorError, ActorUnavailableError)


@dataclass(frozen=True)
class RecognitionOptions:
    language: str = "auto"
    use_itn: bool = True
    return_embedding: bool = False
    speaker_group: str | None = None  # whose voiceprints to match; None: the configured default


def _ms_since(t: float) -> float:
    return round((time.perf_counter() - t) * 1000, 1)


async def _awaited(response):
    """A Serve response as a coroutine (for asyncio.wait_for). Cancelling the coroutine cancels
    the request on the replica too (Serve does not do that by itself): queued model work for a
    session that has gone, or a call that timed out, is dropped there instead of computed."""
    try:
        return await response
    except asyncio.CancelledError:
        response.cancel()
        raise


class Pipeline:
    """One per Ingress replica: the deployment handles and the settings."""

    def __init__(self, vad, asr, speaker, settings: AppSettings, models_label: str, metrics: IngressMetrics):
        self.vad, self.asr, self.speaker = vad, asr, speaker
        self.settings = settings
        self.models_label = models_label
        self.metrics = metrics
        self._closing: set[asyncio.Task] = set()

    def new_session(self, session_id: str) -> Session:
        s = self.settings.ingress
        return Session(session_id, vad_chunk_ms=s.vad_chunk_ms, max_utterance_ms=s.max_utterance_ms)

    async def feed_vad(self, session: Session, chunk: VadChunk) -> tuple[VadFeedResult, int]:
        """Send one chunk; if the session's VAD state is gone, replay the unfinished audio.

        Returns the result and how many replays it took.
        """
        sid = session.session_id
        clock = RetryClock(self.settings.retry)
        replays = 0
        feed = self.vad.feed.remote
        while True:
            try:
                call = partial(feed, sid, chunk.pcm, chunk.start_ms, chunk.final, chunk.restart)
                result = await self._try(clock, call, "VADHost")
            except REPLICA_GONE as exc:  # the state went with the replica: replay on the next one
                await self._before_retry(clock, exc, "VADHost", sid)
            else:
                if not result.state_lost:
                    return result, replays
                if chunk.restart:  # a fresh start is never refused; if it is, spend the budget, never loop
                    await self._before_retry(clock, RuntimeError("state lost on a restart"), "VADHost", sid)
            chunk = session.replay_chunk()
            replays += 1
            logger.info("session %s: replaying %d ms of audio from %d ms (replay %d)",
                        sid, len(chunk.pcm) // 16, chunk.start_ms, replays)  # fmt: skip

    async def close_vad(self, session_id: str) -> None:
        try:
            await self.vad.close.remote(session_id)
        except Exception:  # the replica may be gone already; nothing to clean up then
            logger.info("session %s: VAD close failed; replica gone", session_id)

    def close_vad_later(self, session_id: str) -> None:
        """Free the session's VAD state without waiting for it (the replica may be busy)."""
        task = asyncio.create_task(self.close_vad(session_id))
        self._closing.add(task)  # a reference until done, or the loop may drop the task
        task.add_done_callback(self._closing.discard)

    async def segment(self, pcm: np.ndarray, request_id: str) -> list[tuple[int, int]]:
        """Speech segments of a whole file."""
        segments, _ = await self._retrying(partial(self.vad.segment.remote, pcm), "VADHost", request_id)
        return segments

    async def _try(self, clock: RetryClock, call: Callable[[], Awaitable], what: str):
        """One try. A try after a failure gets only the time left in the budget: with one replica
        it waits in Serve's router for the replacement, and that wait must end."""
        left = clock.remaining_s()
        if left is None:
            return await _awaited(call())
        try:
            return await asyncio.wait_for(_awaited(call()), left)
        except TimeoutError:
            raise ReplicaLostError(
                f"{what} replica lost; none answered within {clock.settings.deadline_s:g} s (retry.deadline_s)"
            ) from None

    async def _before_retry(self, clock: RetryClock, exc: Exception, what: str, session_id: str) -> None:
        wait = clock.failed()
        if wait is None:
            raise ReplicaLostError(
                f"{what} replica lost; gave up after {clock.retries} retries in {clock.settings.deadline_s:g} s "
                "(retry.deadline_s)"
            ) from exc
        logger.warning("session %s: %s replica lost (%s); retry %d in %.1f s",
                       session_id, what, type(exc).__name__, clock.retries, wait)  # fmt: skip
        await asyncio.sleep(wait)

    async def _retrying(self, call: Callable[[], Awaitable], what: str, session_id: str) -> tuple[object, int]:
        """The call's result and how many retries it took."""
        clock = RetryClock(self.settings.retry)
        while True:
            try:
                return await self._try(clock, call, what), clock.retries
            except REPLICA_GONE as exc:
                await self._before_retry(clock, exc, what, session_id)

    async def transcribe(
        self, pcm: np.ndarray, options: RecognitionOptions, session_id: str
    ) -> tuple[Transcript, float, int]:
        """Transcript, round trip in ms, retries."""
        started = time.perf_counter()
        request = AsrRequest(pcm, options.language, options.use_itn)
        call = partial(self.asr.transcribe.remote, request)
        transcript, retries = await self._retrying(call, "SenseVoice", session_id)
        return transcript, _ms_since(started), retries

    async def transcribe_interim(self, pcm: np.ndarray, options: RecognitionOptions) -> Transcript:
        """Text of an unfinished utterance; runs behind every final on the SenseVoice replica."""
        return await _awaited(self.asr.transcribe_interim.remote(AsrRequest(pcm, options.language, options.use_itn)))

    async def embed(
        self, pcm: np.ndarray, group: str | None, session_id: str
    ) -> tuple[SpeakerEmbedding | None, float, int]:
        """Embedding and, when `group` is given, the best match among its voiceprints; round trip
        in ms; retries."""
        if not self.settings.ingress.speaker_enabled:
            return None, 0.0, 0
        started = time.perf_counter()
        request = SpeakerRequest(pcm, group)
        embedding, retries = await self._retrying(partial(self.speaker.embed.remote, request), "Speaker", session_id)
        return embedding, _ms_since(started), retries

    async def recognise(
        self, session_id: str, utt: Utterance, options: RecognitionOptions
    ) -> tuple[UtteranceResult, SpeakerEmbedding | None]:
        """Transcript and speaker embedding of one utterance, computed concurrently."""
        group = options.speaker_group or self.settings.voiceprints.default_group
        (transcript, asr_ms, asr_retries), (embedding, spk_ms, spk_retries) = await asyncio.gather(
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
            retries={k: n for k, n in (("asr", asr_retries), ("speaker", spk_retries)) if n},
        )  # fmt: skip
        return result, embedding


def live_runner_tasks() -> int:
    """Tasks of `StreamRunner`s still running in this process (result sender, recognitions,
    interims). Once every stream has ended this is 0; anything else is a leak."""
    return sum(1 for t in asyncio.all_tasks() if getattr(t.get_coro(), "__qualname__", "").startswith("StreamRunner."))


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

    def close(self) -> None:
        """The client is gone: stop work for it (queued model calls are cancelled on their
        replicas) and free its VAD state in the background."""
        self._sender.cancel()
        for task in [*self._in_flight, self._interim_task]:
            if task is not None:
                task.cancel()
        self.pipeline.close_vad_later(self.session.session_id)

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

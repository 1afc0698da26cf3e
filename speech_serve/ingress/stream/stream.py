"""The utterance stream: every protocol feeds an `UtteranceStream` 16 kHz PCM and gets one `UtteranceResult`
per utterance back, in order. Inside: the `Timeline` (timeline.py: pure), the VAD calls (calls.py: sticky to
one VADHost replica, replayed on a new one if it is lost) and the `Recognition` of each finished utterance
(SenseVoice and Speaker at once). All times are milliseconds from the start of the stream's audio."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import nullcontext

import numpy as np

from speech_serve.ingress.metrics import IngressMetrics
from speech_serve.ingress.stream.calls import ModelCalls, ms_since, retrieve_exception
from speech_serve.ingress.stream.timeline import SpeechEdge, Timeline
from speech_serve.messages import (
    AsrRequest,
    RecognitionOptions,
    SpeakerEmbedding,
    SpeakerInfo,
    Transcript,
    Utterance,
    UtteranceResult,
    VadChunk,
    VadFeedResult,
    usable_embedding,
)
from speech_serve.settings import AppSettings
from speech_serve.wire.pcm import SAMPLES_PER_MS

logger = logging.getLogger("ray.serve")


Recognise = Callable[[str, Utterance, RecognitionOptions], Awaitable[tuple[UtteranceResult, SpeakerEmbedding | None]]]
Done = Awaitable[None]  # what a callback returns


class Recognition:
    """An utterance's transcript and speaker, computed at once (streams and uploads). Only a transcription
    failure fails it; the speaker is unknown, with a reason, when the utterance is too short, the models
    are behind (shed), the Speaker fails, it is `speaker.budget_ms` late after the text, or the breaker
    is open (`speaker.breaker_failures` failed or late in a row: not asked for `breaker_open_s`)."""

    def __init__(self, calls: ModelCalls, settings: AppSettings, models_label: str,
                 clock: Callable[[], float] = time.monotonic, household=None):  # fmt: skip
        """`household`: the households' hotword lists (ingress/hotwords.py), applied under the session's own."""
        self.calls, self.models_label, self.household = calls, models_label, household
        self.speaker, self.default_group = settings.speaker, settings.voiceprints.default_group
        self._clock, self._failures, self._open_until = clock, 0, float("-inf")  # the Speaker's breaker

    async def __call__(self, session_id: str, utt: Utterance, options: RecognitionOptions,
                       live: bool = True) -> tuple[UtteranceResult, SpeakerEmbedding | None]:  # fmt: skip
        """`live`: a stream's utterance, counted in the backlog (an upload's segments are not: one long file
        would shed and refuse for every session)."""
        group = options.speaker_group or self.default_group
        speaker_call = asyncio.ensure_future(self._speaker_of(utt, group, session_id))
        try:
            with self.calls.backlog.waiting() if live else nullcontext():  # admission watches live finals
                hotwords = self.household.lists.get(group) if self.household is not None else None
                hotwords = tuple((dict(hotwords) | dict(options.hotwords)).items()) if hotwords else options.hotwords
                request = AsrRequest(utt.pcm, options.language, options.use_itn, hotwords, options.words)
                transcript, asr_ms, asr_retries = await self.calls.transcribe(request, session_id)
        except BaseException:
            speaker_call.cancel()  # nobody will read it
            raise
        done, _ = await asyncio.wait({speaker_call}, timeout=self.speaker.budget_ms / 1000)
        if not done:  # the text goes out now; the late call is cancelled on its replica
            speaker_call.cancel()
            self._failed(session_id, "late")
        embedding, reason, spk_ms, spk_retries = speaker_call.result() if done else (None, "speaker_late", 0.0, 0)
        speaker = SpeakerInfo(reason=reason)
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
            models=self.models_label, forced_cut=utt.forced_cut, latency_ms=latency, confidence=transcript.confidence,
            words=None if transcript.words is None else tuple(w.shifted(utt.start_ms) for w in transcript.words),
            batch_sizes={"asr": transcript.batch_size, **({"speaker": embedding.batch_size} if embedding else {})},
            retries={k: n for k, n in (("asr", asr_retries), ("speaker", spk_retries)) if n},
        )  # fmt: skip
        return result, embedding

    async def _speaker_of(self, utt: Utterance, group: str,
                          session_id: str) -> tuple[SpeakerEmbedding | None, str | None, float, int]:  # fmt: skip
        """The usable embedding, or None and why not; round trip in ms; retries. Never raises (but for
        cancellation): a Speaker failure must not cost the transcript."""
        if not self.speaker.enabled:
            return None, None, 0.0, 0
        if utt.end_ms - utt.start_ms < self.speaker.min_utterance_ms:
            return None, "too_short", 0.0, 0
        if self.calls.backlog.shed("speaker"):  # the models are behind: the transcript goes first
            return None, "shed", 0.0, 0
        if self._clock() < self._open_until:  # the Speaker has been failing: not asked for a while
            return None, "speaker_unavailable", 0.0, 0
        try:
            embedding, spk_ms, retries = await self.calls.embed(utt.pcm, group, session_id)
        except Exception as exc:
            logger.warning("session %s: speaker of utterance %d failed (%s: %s); its text goes out with speaker "
                           "unknown", session_id, utt.index, type(exc).__name__, exc)  # fmt: skip
            self._failed(session_id, "failed")
            return None, "speaker_failed", 0.0, 0
        self._failures = 0
        if embedding is None or not usable_embedding(embedding.vector):
            logger.warning("session %s: the speaker model gave no usable embedding for utterance %d (%d ms)",
                           session_id, utt.index, utt.end_ms - utt.start_ms)  # fmt: skip
            return None, "no_embedding", spk_ms, retries
        return embedding, None, spk_ms, retries

    def _failed(self, session_id: str, how: str) -> None:
        self._failures += 1
        if self._failures >= self.speaker.breaker_failures:
            self._failures, self._open_until = 0, self._clock() + self.speaker.breaker_open_s
            logger.warning("session %s: the Speaker %s %d times in a row: not asked for %g s", session_id, how,
                           self.speaker.breaker_failures, self.speaker.breaker_open_s)  # fmt: skip


class UtteranceStreams:
    """Opens utterance streams; one per Ingress replica."""

    def __init__(self, models: ModelCalls, settings: AppSettings, metrics: IngressMetrics, models_label: str,
                 household=None):  # fmt: skip
        self.models, self.settings, self.metrics, self.models_label = models, settings, metrics, models_label
        self.recognise = Recognition(models, settings, models_label, household=household)

    def timeline(self) -> Timeline:
        s = self.settings.stream
        return Timeline(vad_chunk_ms=s.vad_chunk_ms, max_utterance_ms=s.max_utterance_ms,
                        min_utterance_ms=s.min_utterance_ms)  # fmt: skip

    def open(self, session_id: str, options: RecognitionOptions, on_result, on_failure, **extra) -> UtteranceStream:
        """A new stream; `extra`: `on_interim` with `interim_interval_ms`, `on_speech` (see UtteranceStream)."""
        if self.recognise.household is not None:  # its household's hotwords, loaded before its first utterance
            self.recognise.household.watch(options.speaker_group or self.settings.voiceprints.default_group)
        return UtteranceStream(session_id, self.timeline(), self.models, self.recognise, self.metrics, options,
                               on_result, on_failure, settings=self.settings, **extra)  # fmt: skip


def live_stream_tasks() -> int:
    """Tasks of `UtteranceStream`s still running in this process (result sender, recognitions,
    interims). Once every stream has ended this is 0; anything else is a leak."""
    return sum(
        1 for t in asyncio.all_tasks() if getattr(t.get_coro(), "__qualname__", "").startswith("UtteranceStream.")
    )


class UtteranceStream:
    """One live stream: audio in, `on_result` called once per utterance, in order.

    Optional: `on_interim(index, transcript)` with the growing transcript of the utterance being spoken,
    every `interim_interval_ms` (at most one interim request in flight per stream), and
    `on_speech(edge)` with each `SpeechEdge`, awaited before the utterance it cuts is recognised
    (so a client hears of the cut before its result).
    Push-to-talk (`begin_utterance`) skips the VAD: `end_utterance()` cuts the utterance.
    The VAD waits while `stream.max_utterances_in_flight` utterances are being recognised.

    `push` does not wait for the VAD: a feeder task sends everything that has come since its last
    call as one chunk (one call per 200 ms chunk left a session with slow calls behind for good). `push`
    waits only while the VAD is `stream.vad_max_lag_ms` behind.
    Everything that changes how audio is read (push-to-talk, clear, abort, end) first lets the
    feeder finish what came before it.
    """

    def __init__(self, session_id: str, timeline: Timeline, models: ModelCalls, recognise: Recognise,
                 metrics: IngressMetrics, options: RecognitionOptions, on_result: Callable[[UtteranceResult], Done],
                 on_failure: Callable[[int, Exception], Done], *, settings: AppSettings | None = None,
                 on_interim: Callable[[int, Transcript], Done] | None = None, interim_interval_ms: int | None = None,
                 on_speech: Callable[[SpeechEdge], Done] | None = None):  # fmt: skip
        self.session_id = session_id
        self.timeline = timeline
        self.models, self._recognise_one = models, recognise
        self.metrics = metrics
        self.options = options
        self._on_result, self._on_failure, self._on_interim = on_result, on_failure, on_interim
        self._on_speech = on_speech
        if on_interim is not None and not interim_interval_ms:
            raise ValueError("on_interim needs interim_interval_ms")
        self._interim_interval_ms = interim_interval_ms or 0
        settings = settings or AppSettings()
        self._max_in_flight = settings.stream.max_utterances_in_flight
        self._max_vad_lag_ms = settings.stream.vad_max_lag_ms
        self._ready: list[VadChunk] = []  # full chunks the VAD has not had yet, in order
        self._feeder: asyncio.Task | None = None
        self._closed = False
        self._interim_task: asyncio.Task | None = None
        self._interim_at_ms = 0
        self._queue: asyncio.Queue[tuple[int, asyncio.Task] | None] = asyncio.Queue()
        self._in_flight: set[asyncio.Task] = set()
        self._sender = asyncio.create_task(self._send_in_order())
        self.embeddings: deque[tuple[str, SpeakerEmbedding]] = deque(maxlen=settings.speaker.keep_embeddings)
        self.results_sent = 0
        self.vad_replays = 0

    @property
    def idle(self) -> bool:
        """Between utterances with every result sent: a safe moment to close the stream."""
        return self.timeline.speech_start_ms is None and not self._in_flight and self._fed

    @property
    def _fed(self) -> bool:
        return not self._ready and not self._feeding

    @property
    def _feeding(self) -> bool:
        return self._feeder is not None and not self._feeder.done()

    async def push(self, pcm: np.ndarray) -> None:
        self._raise_feed_failure()
        self._ready += self.timeline.add_audio(pcm)
        if self._ready and not self._feeding:
            self._feeder = asyncio.create_task(self._feed())
            self._feeder.add_done_callback(retrieve_exception)  # raised by the next push or settle
        if self.timeline.sent_ms - self.timeline.vad_ms > self._max_vad_lag_ms:
            await self._settle()  # backpressure: the client's frames wait in its socket

    async def _feed(self) -> None:
        while self._ready and not self._closed:  # closed: Python 3.11's wait_for can swallow the cancel
            chunk = self._take_ready()
            await self._room()
            await self._process(chunk)

    def _take_ready(self) -> VadChunk:
        """The ready chunks that continue each other, as one chunk."""
        first, n = self._ready[0], 1
        while n < len(self._ready) and not self._ready[n].restart and not self._ready[n - 1].final:
            n += 1
        taken, self._ready = self._ready[:n], self._ready[n:]
        if n == 1:
            return first
        last = taken[-1]
        pcm = np.concatenate([c.pcm for c in taken])
        return VadChunk(pcm=pcm, start_ms=first.start_ms, final=last.final, restart=first.restart,
                        end_silence_ms=last.end_silence_ms)  # fmt: skip

    async def _settle(self) -> None:
        """Every chunk pushed so far has been through the VAD (its failure re-raised here)."""
        if self._feeding:
            await asyncio.wait([self._feeder])
        self._raise_feed_failure()

    def _raise_feed_failure(self) -> None:
        if self._feeder is not None and self._feeder.done() and not self._feeder.cancelled():
            exc = self._feeder.exception()
            if exc is not None:
                self._feeder = None  # raised once; the caller ends the session
                raise exc

    async def _room(self) -> None:
        """Wait while `max_in_flight` utterances are being recognised: a client ending utterances faster than
        the models answer waits (its frames queue, within the intake bounds) instead of fanning out."""
        while len(self._in_flight) >= self._max_in_flight:
            await asyncio.wait(set(self._in_flight), return_when=asyncio.FIRST_COMPLETED)

    async def begin_utterance(self) -> None:
        """Push-to-talk pressed."""
        await self._settle()
        self.timeline.begin_manual()

    async def use_vad(self) -> None:
        """Back from push-to-talk: the VAD finds the utterances again."""
        await self._settle()
        self.timeline.manual = False

    async def end_utterance(self) -> bool:
        """The client ends the utterance now: push-to-talk released, listening stopped mid-speech,
        a commit. False (and nothing happens) if no utterance is open or it holds no audio."""
        await self._settle()
        if not self.timeline.manual and self.timeline.speech_start_ms is None:
            return False
        started = time.perf_counter()
        utt = self.timeline.end_manual()
        cut = any(edge.kind == "cut" for edge in self.timeline.edges)
        await self._report_edges()
        if utt is not None:
            await self._room()  # manual turns never reach the feeder's check: a turn flood waits here
            self._recognise_later(utt, started, 0.0, 0.0, 0)
        return cut

    async def clear(self) -> None:
        """Drop the audio not yet cut into an utterance (the utterance being spoken included);
        utterances already cut are still recognised and answered."""
        await self._settle()
        self.timeline.abort()
        if self._interim_task is not None:
            self._interim_task.cancel()

    async def abort(self) -> None:
        """Drop the utterance being spoken and every result not sent yet."""
        await self.clear()
        for task in self._in_flight:
            task.cancel()

    async def finish(self) -> int:
        """End of stream: flush the VAD, wait for every result to be sent. Returns the count."""
        await self._settle()
        if self.timeline.manual:
            await self.end_utterance()
        else:
            await self._process(self.timeline.flush())
        await self._queue.put(None)
        await self._sender
        return self.results_sent

    def close(self) -> None:
        """The client is gone: stop work for it (queued model calls are cancelled on their
        replicas) and free its VAD state in the background."""
        self._sender.cancel()
        self._closed = True
        for task in [*self._in_flight, self._interim_task, self._feeder]:
            if task is not None:
                task.cancel()
        self.models.close_vad_later(self.session_id, after=self._feeder)

    async def _process(self, chunk: VadChunk) -> None:
        started = time.perf_counter()
        if self.timeline.manual:
            result, vad_ms = VadFeedResult(events=[]), 0.0
        else:
            result, replays = await self.models.feed_vad(self.session_id, self.timeline, chunk)
            if self._closed:  # the client left while the call was out (and the cancel was swallowed)
                return
            self.vad_replays += replays
            vad_ms = ms_since(started)
            self.metrics.vad_call(vad_ms)
        utterances = self.timeline.on_vad_events(result.events, chunk.start_ms + len(chunk.pcm) // SAMPLES_PER_MS)
        await self._report_edges()
        for utt in utterances:
            endpoint_ms = self.timeline.vad_ms - utt.end_ms
            self._recognise_later(utt, started, vad_ms, result.compute_ms, endpoint_ms)
        self._maybe_interim()

    async def _report_edges(self) -> None:
        for edge in self.timeline.take_edges():
            if self._on_speech is not None:
                await self._on_speech(edge)

    def _recognise_later(self, utt: Utterance, started: float, vad_ms: float, vad_compute_ms: float, endpoint_ms: int):
        task = asyncio.create_task(self._recognise(utt, started, vad_ms, vad_compute_ms, endpoint_ms))
        self._in_flight.add(task)
        task.add_done_callback(self._in_flight.discard)
        self._queue.put_nowait((utt.index, task))

    def _maybe_interim(self) -> None:
        if self._on_interim is None:
            return
        speech = self.timeline.speech_so_far()
        if speech is None:
            self._interim_at_ms = self.timeline.sent_ms
            return
        due = self.timeline.sent_ms - self._interim_at_ms >= self._interim_interval_ms
        if due and (self._interim_task is None or self._interim_task.done()):
            self._interim_at_ms = self.timeline.sent_ms
            if not self.models.backlog.shed("interim"):  # the models are behind: finals first
                self._interim_task = asyncio.create_task(self._interim(*speech))

    async def _interim(self, index: int, pcm: np.ndarray) -> None:
        try:
            options = self.options  # the session's own hotwords and words (the final adds its household's)
            request = AsrRequest(pcm, options.language, options.use_itn, options.hotwords, options.words)
            transcript = await self.models.transcribe_interim(request)
        except Exception:  # an interim is a courtesy: the final result still comes
            logger.warning("session %s: interim recognition failed", self.session_id, exc_info=True)
            return
        if self.timeline.utterances_done == index and self._on_interim is not None:  # not final yet
            await self._on_interim(index, transcript)

    async def _recognise(self, utt: Utterance, started: float, vad_ms: float, vad_compute_ms: float, endpoint_ms: int):
        result, embedding = await self._recognise_one(self.session_id, utt, self.options)
        if embedding is not None and result.speaker.embedding_id:
            self.embeddings.append((result.speaker.embedding_id, embedding))
        result.latency_ms |= {
            "vad_ms": vad_ms, "vad_compute_ms": round(vad_compute_ms, 1),
            "endpoint_ms": float(endpoint_ms), "server_ms": ms_since(started),
        }  # fmt: skip
        return result

    async def _send_in_order(self) -> None:
        while (item := await self._queue.get()) is not None:
            index, task = item
            await asyncio.wait([task])  # never raises for the task's own failure or cancellation
            if task.cancelled():  # aborted by the client: answer nothing for it
                continue
            if task.exception() is not None:
                logger.error("session %s: recognition of utterance %d failed", self.session_id, index,
                             exc_info=task.exception())  # fmt: skip
                await self._on_failure(index, task.exception())
                continue
            await self._on_result(task.result())
            self.results_sent += 1

"""The utterance stream: audio in, one result per utterance out, in order.

Every protocol feeds an `UtteranceStream` with 16 kHz PCM and gets `UtteranceResult`s back.
Inside: the `Timeline` (the audio since the last finished utterance: a pure state machine),
the VAD calls (sticky to one VADHost replica; replayed on a new one if that replica is lost),
and the fan-out of each finished utterance to SenseVoice and Speaker (`ModelCalls`, retried
within `retry.deadline_s` when a replica is lost).

All times are milliseconds from the start of the stream's audio.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Any, Literal

import numpy as np
from ray.exceptions import ActorUnavailableError, RayActorError

from speech_serve.ingress.metrics import IngressMetrics
from speech_serve.ingress.vad_lanes import VadLanes, retrieve_exception
from speech_serve.messages import (
    AsrRequest,
    SpeakerEmbedding,
    SpeakerInfo,
    SpeakerRequest,
    Transcript,
    Utterance,
    UtteranceResult,
    VadChunk,
    VadEvent,
    VadFeedResult,
    VadItem,
    ms_to_samples,
    samples_to_ms,
    usable_embedding,
)
from speech_serve.settings import IngressSettings, RetrySettings

logger = logging.getLogger("ray.serve")

# A replica that died or is stopping mid-call: the call is safe to repeat on another one.
REPLICA_GONE = (RayActorError, ActorUnavailableError)
_EMPTY = np.zeros(0, dtype=np.int16)


@dataclass(frozen=True)
class RecognitionOptions:
    language: str = "auto"
    use_itn: bool = True
    return_embedding: bool = False
    speaker_group: str | None = None  # whose voiceprints to match; None: the configured default


@dataclass(frozen=True)
class SpeechEdge:
    """Where speech began or an utterance was cut, as the timeline decided it (Realtime's
    speech_started / speech_stopped / committed).

    started: the VAD heard speech begin at `ms` (again at a forced cut, where speech goes on).
    stopped: the utterance was cut at `ms` while the VAD heard it: its end of speech, or a forced
             cut at max_utterance_ms.
    cut:     the client ended the utterance (push-to-talk released, a commit), or push-to-talk ran
             past max_utterance_ms.
    `index`: the utterance's number (its result's `index`); None when it was too short to
    recognise and was dropped (no result follows). `start_ms`: where the cut piece began."""

    kind: Literal["started", "stopped", "cut"]
    ms: int
    index: int | None = None
    start_ms: int | None = None


def _ms_since(t: float) -> float:
    return round((time.perf_counter() - t) * 1000, 1)


async def awaited(response: Awaitable) -> Any:
    """A Serve response as a coroutine (for asyncio.wait_for). Cancelling the coroutine cancels
    the request on the replica too (Serve does not do that by itself): queued model work for a
    session that has gone, or a call that timed out, is dropped there instead of computed."""
    try:
        return await response
    except asyncio.CancelledError:
        cancel = getattr(response, "cancel", None)  # a Serve response; VAD calls come as coroutines
        if cancel is not None:
            cancel()
        raise


async def bounded(call: Awaitable, timeout_s: float | None) -> Any:
    """`asyncio.wait_for`, except that a cancel is never swallowed. Python 3.11's returns the inner
    result when the cancel and the result land in one tick (a VAD lane answers all its sessions at
    once, so they do), and the caller then goes on as if never cancelled: a closed session's feeder
    fed a chunk after its close and left VAD state behind. 3.12's wait_for raises instead.
    Only a cancel asked for during this wait counts: cleanup that runs after an earlier cancel
    (a `finally` of a cancelled task) still gets its answer."""
    task = asyncio.current_task()
    cancels_before = task.cancelling() if task is not None else 0
    result = await asyncio.wait_for(call, timeout_s)
    if task is not None and task.cancelling() > cancels_before:
        raise asyncio.CancelledError
    return result


# ---- the timeline: pure ----------------------------------------------------------------------


class AudioBuffer:
    """int16 samples appended at the end and dropped from the front, each in time linear in the
    samples moved (a client's tiny frames must not copy the whole utterance each). Samples once
    stored are never overwritten: a full array is replaced by a new one, so the views handed out
    (VAD chunks waiting for their lane's call) keep their audio."""

    def __init__(self) -> None:
        self._data = _EMPTY
        self._start = self._end = 0

    def __len__(self) -> int:
        return self._end - self._start

    def append(self, pcm: np.ndarray) -> None:
        n = len(pcm)
        if self._end + n > len(self._data):  # grow (or compact) into a new array: amortised O(1) a sample
            live = len(self)
            grown = np.empty(2 * (live + n), dtype=np.int16)
            grown[:live] = self._data[self._start : self._end]
            self._data, self._start, self._end = grown, 0, live
        self._data[self._end : self._end + n] = pcm
        self._end += n

    def view(self) -> np.ndarray:
        """The samples held, as a view: slice it; copy what must outlive later appends' growth."""
        return self._data[self._start : self._end]

    def drop(self, n: int) -> None:
        """Forget the first `n` samples."""
        self._start += min(max(n, 0), len(self))


class Timeline:
    """The audio of one utterance stream since its last finished utterance, and where the
    utterance being spoken started: a pure state machine (no I/O, no Ray).

    Audio goes in with `add_audio`, which returns the chunks to send to the VAD (at least
    `vad_chunk_ms` each, to keep the number of Serve calls low). The VAD's events go back in with
    `on_vad_events`, which returns the finished utterances sliced from the buffer. Push-to-talk
    (`manual`) skips the VAD: `begin_manual` / `end_manual` cut the utterance.

    An utterance shorter than `min_utterance_ms` (never less than 1 ms) is dropped, not numbered:
    a VAD end at or before a force-cut leaves 0 samples, and the models' fbank raises on a clip of
    a few ms, failing its whole batch. No interim goes out for so little audio either.
    """

    def __init__(self, vad_chunk_ms: int, max_utterance_ms: int, idle_keep_ms: int = 1000, min_utterance_ms: int = 0):
        self._chunk_samples = ms_to_samples(vad_chunk_ms)
        self._max_utterance_ms = max_utterance_ms
        self._min_utterance_ms = max(min_utterance_ms, 1)
        self.dropped = 0  # utterances too short to recognise
        # While nobody speaks, keep this much audio before the VAD's position: the VAD
        # reports a start a few hundred ms after it happened (lookback + confirmation).
        self._idle_keep_ms = idle_keep_ms + vad_chunk_ms
        self._buffer = AudioBuffer()  # audio from _buffer_start_ms up to received_ms
        self._buffer_start_ms = 0
        self._pending = AudioBuffer()  # received, not yet sent to the VAD
        self.sent_ms = 0  # stream position up to which audio has gone out in VAD chunks
        # Position up to which the VAD's events have been applied. Behind sent_ms while the chunks
        # of one large frame are fed one by one: trimming, force-cuts and replays count from here.
        self.vad_ms = 0
        self.speech_start_ms: int | None = None
        self.utterances_done = 0
        self.finished = False
        self._restart_vad = False  # the next chunk starts a fresh VAD state (after abort / push-to-talk)
        self.manual = False  # push-to-talk: the client, not the VAD, says where utterances end
        self.end_silence_ms: int | None = None  # this stream's end silence for the VAD; None: the replica's
        self.edges: list[SpeechEdge] = []  # since the stream last took them (take_edges)
        self._speaking = False  # a `started` edge is out and its utterance not cut yet (a replay re-reports it)

    @property
    def received_ms(self) -> int:
        return self._buffer_start_ms + samples_to_ms(len(self._buffer))

    @property
    def buffered_ms(self) -> int:
        return samples_to_ms(len(self._buffer))

    def add_audio(self, pcm: np.ndarray) -> list[VadChunk]:
        """Take client audio; return the VAD chunks that are now full."""
        if self.finished:
            raise RuntimeError("session already finished")
        self._buffer.append(pcm)
        self._pending.append(pcm)
        chunks = []
        while len(self._pending) >= self._chunk_samples:
            chunks.append(self._take_chunk(self._chunk_samples, final=False))
        return chunks

    def flush(self) -> VadChunk:
        """End of stream: the rest of the audio, marked final so the VAD closes open speech."""
        self.finished = True
        return self._take_chunk(len(self._pending), final=True)

    def _take_chunk(self, n: int, final: bool) -> VadChunk:
        chunk = VadChunk(pcm=self._pending.view()[:n], start_ms=self.sent_ms, final=final, restart=self._restart_vad,
                         end_silence_ms=self.end_silence_ms)  # fmt: skip
        self._restart_vad = False
        self._pending.drop(n)
        self.sent_ms += samples_to_ms(n)
        return chunk

    def replay_chunk(self, failed: VadChunk | None = None) -> VadChunk:
        """The audio since the last finished utterance up to the end of `failed` (the chunk whose
        call found the VAD state gone; default: all that was sent), for a fresh VAD state.

        The new replica rebuilds its state from this and reports the unfinished utterance's start
        again. It stops at `failed`: the chunks after it are still to be fed, each once.
        """
        self.speech_start_ms = None
        end_ms = self.sent_ms if failed is None else failed.start_ms + samples_to_ms(len(failed.pcm))
        final = self.finished if failed is None else failed.final
        n = ms_to_samples(end_ms - self._buffer_start_ms)
        return VadChunk(pcm=self._buffer.view()[:n], start_ms=self._buffer_start_ms, final=final, restart=True,
                        end_silence_ms=self.end_silence_ms)  # fmt: skip

    def speech_so_far(self) -> tuple[int, np.ndarray] | None:
        """The unfinished utterance (its index and audio up to what the VAD has seen), for interim text."""
        if self.speech_start_ms is None or self.vad_ms - self.speech_start_ms < self._min_utterance_ms:
            return None
        a = ms_to_samples(self.speech_start_ms - self._buffer_start_ms)
        b = ms_to_samples(self.vad_ms - self._buffer_start_ms)
        return self.utterances_done, self._buffer.view()[a:b].copy()

    def begin_manual(self) -> None:
        """Push-to-talk: the utterance starts now, whatever the VAD would say."""
        self.manual = True
        self._skip_pending()
        self._trim(self.received_ms)
        self.speech_start_ms = self.received_ms
        self._speaking = False

    def end_manual(self) -> Utterance | None:
        """Push-to-talk released: everything since `begin_manual` is the utterance."""
        start = self.speech_start_ms if self.speech_start_ms is not None else self._buffer_start_ms
        self._skip_pending()
        self.speech_start_ms = None
        self._speaking = False
        if self.received_ms <= start:
            return None
        utterance = self._cut(start, self.received_ms, forced=False)
        self._edge("cut", self.received_ms, utterance, start)
        return utterance

    def abort(self) -> None:
        """Drop the utterance being spoken and every buffered sample; the VAD starts afresh."""
        self._skip_pending()
        self.speech_start_ms = None
        self._speaking = False
        self._trim(self.received_ms)

    def take_edges(self) -> list[SpeechEdge]:
        """The speech edges since the last call, in order."""
        edges, self.edges = self.edges, []
        return edges

    def _edge(
        self, kind: Literal["started", "stopped", "cut"], ms: int, utterance: Utterance | None = None,
        start_ms: int | None = None,
    ) -> None:  # fmt: skip
        self.edges.append(SpeechEdge(kind, ms, None if utterance is None else utterance.index, start_ms))

    def _skip_pending(self) -> None:
        """Audio not yet sent to the VAD will not be; the VAD state restarts at the next chunk."""
        self._pending = AudioBuffer()
        self.sent_ms = self.vad_ms = self.received_ms
        self._restart_vad = True

    def on_vad_events(self, events: list[VadEvent], upto_ms: int | None = None) -> list[Utterance]:
        """Apply the VAD's events for the audio up to `upto_ms` (the end of the chunk they answer;
        default: all that was sent); return finished utterances in order."""
        self.vad_ms = self.sent_ms if upto_ms is None else min(max(upto_ms, self.vad_ms), self.sent_ms)
        done: list[Utterance] = []
        for event in events:
            if event.kind == "start":
                if self.speech_start_ms is None:
                    self.speech_start_ms = max(event.ms, self._buffer_start_ms)
                    self._started(self.speech_start_ms)
            else:
                start = self.speech_start_ms if self.speech_start_ms is not None else self._buffer_start_ms
                end = max(min(event.ms, self.received_ms), start)
                self._started(start)
                done.append(self._cut(start, end, forced=False))
                self._edge("stopped", end, done[-1], start)
                self._speaking = False
                self.speech_start_ms = None
        if self.speech_start_ms is not None and self.vad_ms - self.speech_start_ms >= self._max_utterance_ms:
            cut_at, start = self.vad_ms, self.speech_start_ms
            done.append(self._cut(start, cut_at, forced=True))
            self.speech_start_ms = cut_at  # the speech goes on; the VAD's end closes the next piece
            if self.manual:
                self._edge("cut", cut_at, done[-1], start)
            else:
                self._edge("stopped", cut_at, done[-1], start)
                self._edge("started", cut_at)
        if self.speech_start_ms is None:
            self._trim(self.vad_ms - self._idle_keep_ms)
        return [u for u in done if u is not None]

    def _started(self, ms: int) -> None:
        """Speech began at `ms`: one `started` edge per utterance, however often the VAD says so
        (a replay on a new VAD replica reports the start of the unfinished utterance again)."""
        if not self._speaking and not self.manual:
            self._edge("started", ms)
            self._speaking = True

    def _cut(self, start_ms: int, end_ms: int, forced: bool) -> Utterance | None:
        """The utterance from start to end, or None (dropped) if it is too short to recognise."""
        if end_ms - start_ms < self._min_utterance_ms:
            self.dropped += 1
            self._trim(end_ms)
            return None
        a = ms_to_samples(start_ms - self._buffer_start_ms)
        b = ms_to_samples(end_ms - self._buffer_start_ms)
        utterance = Utterance(self.utterances_done, start_ms, end_ms, self._buffer.view()[a:b].copy(), forced)
        self.utterances_done += 1
        self._trim(end_ms)
        return utterance

    def _trim(self, keep_from_ms: int) -> None:
        drop = ms_to_samples(keep_from_ms - self._buffer_start_ms)
        if drop > 0:
            self._buffer.drop(drop)
            self._buffer_start_ms += samples_to_ms(drop)


def utterances_of(pcm: np.ndarray, segments: list[tuple[int, int]], min_utterance_ms: int = 0) -> list[Utterance]:
    """A whole recording's utterances, from the VAD's (start_ms, end_ms) segments (empty ones, and
    those shorter than `min_utterance_ms`, skipped)."""
    shortest = max(min_utterance_ms, 1)
    return [
        Utterance(i, a, b, pcm[ms_to_samples(a) : ms_to_samples(b)])
        for i, (a, b) in enumerate(segments)
        if b - a >= shortest
    ]


# ---- retries: when to retry a call whose replica was lost, and when to give up -----------------
# A replica that dies mid-call (or is stopped by a scale-down) makes the call fail with
# `RayActorError` / `ActorUnavailableError`; the call is safe to repeat. Where another replica
# runs, Serve routes the retry there at once. Where the lost one was the only replica, the retry
# waits in the handle's router until Serve has noticed the death (`health_check_period_s`) and
# started a replacement (which reloads its model: seconds). `RetrySettings.deadline_s` bounds that
# wait: counted from the first failure, it covers every retry and the waits between them.
# Every try, the first included, is also bounded by `RetrySettings.try_timeout_s`: a replica that
# takes a call and never answers (wedged, not dead) must not hold a session for ever. A try that
# runs out is not retried: it is cancelled on the replica, and sending it again would only queue it
# behind the same backlog.


class ReplicaLostError(RuntimeError):
    """A replica was lost and no other answered within the retry budget, or a try got no answer
    within `retry.try_timeout_s`."""


class RetryClock:
    """The retries of one call. `failed()` after each failure says how long to wait before the
    next try, or None once the budget is spent; `remaining_s()` bounds each try."""

    def __init__(self, settings: RetrySettings, now: Callable[[], float] = time.monotonic):
        self.settings = settings
        self._now = now
        self._first_failure: float | None = None
        self.retries = 0

    def failed(self) -> float | None:
        """A try failed: seconds to wait before the next one, or None to give up.

        The first retry goes at once (Serve routes it to a live replica, or holds it until one
        runs); later ones back off exponentially, so a replica that keeps failing fast is not
        hammered."""
        now = self._now()
        if self._first_failure is None:
            self._first_failure = now
        left = self.settings.deadline_s - (now - self._first_failure)
        if left <= 0:
            return None
        s = self.settings
        wait = 0.0 if self.retries == 0 else min(s.backoff_s * 2 ** (self.retries - 1), s.max_backoff_s)
        self.retries += 1
        return min(wait, left)

    def remaining_s(self) -> float:
        """Time the next try may take: `try_timeout_s` (generous: a first try may queue behind
        other sessions' work under load), and after a failure no more than what is left of the
        deadline."""
        if self._first_failure is None:
            return self.settings.try_timeout_s
        left = self.settings.deadline_s - (self._now() - self._first_failure)
        return max(min(self.settings.try_timeout_s, left), 0.0)

    def timeout_error(self, what: str, limit_s: float) -> ReplicaLostError:
        """The error for a try that got no answer within `limit_s`, naming the setting that set it."""
        if self._first_failure is not None and limit_s < self.settings.try_timeout_s:
            return ReplicaLostError(
                f"{what} replica lost; none answered within {self.settings.deadline_s:g} s (retry.deadline_s)"
            )
        return ReplicaLostError(f"{what} gave no answer within {limit_s:g} s (retry.try_timeout_s)")


# ---- model calls -------------------------------------------------------------------------------


class ModelCalls:
    """The calls to the replicas, one per Ingress replica: VADHost (batched in sticky lanes),
    SenseVoice and Speaker, each retried when its replica is lost."""

    def __init__(
        self, vad, asr, speaker, retry: RetrySettings, models_label: str,
        speaker_enabled: bool = True, default_group: str = "default",
        vad_batch_interval_ms: int = 100, vad_sessions_per_lane: int = 50,
        asr_waits: Callable[[], AbstractContextManager] = nullcontext, speaker_min_ms: int = 0,
        shed: Callable[[str], bool] = lambda what: False,
    ):  # fmt: skip
        self.vad, self.asr, self.speaker = vad, asr, speaker
        self.retry = retry
        self.models_label = models_label
        self.speaker_enabled = speaker_enabled
        self.speaker_min_ms = speaker_min_ms  # shorter utterances are not sent to the Speaker
        self.default_group = default_group  # voiceprints matched when the client names no group
        self.vad_lanes = VadLanes(self._feed_many, vad_batch_interval_ms, vad_sessions_per_lane)
        self._asr_waits = asr_waits  # around each final's SenseVoice call (admission by compute watches it)
        self.shed = shed  # skip this optional work now ("interim", "speaker")? (ComputeAdmission.shed)
        self._closing: set[asyncio.Task] = set()

    async def _feed_many(self, lane: str, items: list[VadItem]) -> list[VadFeedResult]:
        """One lane's call. Bounded here, not only by each caller's try: a lane makes one call at a
        time, so a call that never returned would block every session of the lane."""
        try:
            return await bounded(awaited(self.vad.feed_many.remote(lane, items)), self.retry.try_timeout_s)
        except TimeoutError:
            raise ReplicaLostError(
                f"VADHost gave no answer within {self.retry.try_timeout_s:g} s (retry.try_timeout_s)"
            ) from None

    async def feed_vad(self, sid: str, timeline: Timeline, chunk: VadChunk) -> tuple[VadFeedResult, int]:
        """Send one chunk; if the session's VAD state is gone, replay the unfinished audio.

        Returns the result and how many replays it took.
        """
        clock = RetryClock(self.retry)
        replays = 0
        while True:
            try:
                result = await self._try(clock, partial(self.vad_lanes.feed, sid, chunk), "VADHost")
            except REPLICA_GONE as exc:  # the state went with the replica: replay on the next one
                await self._before_retry(clock, exc, "VADHost", sid)
            else:
                if not result.state_lost:
                    return result, replays
                if chunk.restart:  # a fresh start is never refused; if it is, spend the budget, never loop
                    await self._before_retry(clock, RuntimeError("state lost on a restart"), "VADHost", sid)
            chunk = timeline.replay_chunk(chunk)
            replays += 1
            logger.info("session %s: replaying %d ms of audio from %d ms (replay %d)",
                        sid, len(chunk.pcm) // 16, chunk.start_ms, replays)  # fmt: skip

    async def close_vad(self, session_id: str) -> None:
        try:
            await self.vad_lanes.close(session_id)
        except Exception:  # the replica may be gone already; nothing to clean up then
            logger.info("session %s: VAD close failed; replica gone", session_id)

    def close_vad_later(self, session_id: str, after: asyncio.Task | None = None) -> None:
        """Free the session's VAD state without waiting for it (its lane may be busy), once
        `after` (the stream's feeder, just cancelled) has ended: a feed sent after the close
        would find no state, replay from a fresh one and leave that behind."""
        task = asyncio.create_task(self._close_vad_after(session_id, after))
        self._closing.add(task)  # a reference until done, or the loop may drop the task
        task.add_done_callback(self._closing.discard)

    async def _close_vad_after(self, session_id: str, after: asyncio.Task | None) -> None:
        if after is not None and not after.done():
            await asyncio.wait([after], timeout=self.retry.try_timeout_s)  # its call is bounded by this too
        await self.close_vad(session_id)

    async def segment(self, pcm: np.ndarray, request_id: str) -> list[tuple[int, int]]:
        """Speech segments of a whole file."""
        segments, _ = await self._retrying(partial(self.vad.segment.remote, pcm), "VADHost", request_id)
        return segments

    async def _try(self, clock: RetryClock, call: Callable[[], Awaitable], what: str):
        """One try, bounded: by `try_timeout_s`, and after a failure by the time left in the
        budget (with one replica a retry waits in Serve's router for the replacement, and that
        wait must end). A try that runs out is cancelled on its replica."""
        left = clock.remaining_s()
        try:
            return await bounded(awaited(call()), left)
        except TimeoutError:
            raise clock.timeout_error(what, left) from None

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
        clock = RetryClock(self.retry)
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
        with self._asr_waits():
            transcript, retries = await self._retrying(call, "SenseVoice", session_id)
        return transcript, _ms_since(started), retries

    async def transcribe_interim(self, pcm: np.ndarray, options: RecognitionOptions) -> Transcript:
        """Text of an unfinished utterance; runs behind every final on the SenseVoice replica.
        Bounded like any try, or a wedged replica would keep the stream's one interim for ever."""
        request = AsrRequest(pcm, options.language, options.use_itn)
        return await bounded(awaited(self.asr.transcribe_interim.remote(request)), self.retry.try_timeout_s)

    async def embed(
        self, pcm: np.ndarray, group: str | None, session_id: str
    ) -> tuple[SpeakerEmbedding | None, float, int]:
        """Embedding and, when `group` is given, the best match among its voiceprints; round trip
        in ms; retries."""
        if not self.speaker_enabled:
            return None, 0.0, 0
        started = time.perf_counter()
        request = SpeakerRequest(pcm, group)
        embedding, retries = await self._retrying(partial(self.speaker.embed.remote, request), "Speaker", session_id)
        return embedding, _ms_since(started), retries

    async def _speaker_of(
        self, utt: Utterance, group: str, session_id: str
    ) -> tuple[SpeakerEmbedding | None, str | None, float, int]:
        """The utterance's usable embedding, or None and why not; round trip in ms; retries.
        Never raises (but for cancellation): a Speaker failure must not cost the transcript."""
        if not self.speaker_enabled:
            return None, None, 0.0, 0
        if utt.end_ms - utt.start_ms < self.speaker_min_ms:
            return None, "too_short", 0.0, 0
        if self.shed("speaker"):  # the models are behind: the transcript goes first
            return None, "shed", 0.0, 0
        try:
            embedding, spk_ms, retries = await self.embed(utt.pcm, group, session_id)
        except Exception as exc:
            logger.warning("session %s: speaker of utterance %d failed (%s: %s); its text goes out with speaker "
                           "unknown", session_id, utt.index, type(exc).__name__, exc)  # fmt: skip
            return None, "speaker_failed", 0.0, 0
        if embedding is None or not usable_embedding(embedding.vector):
            logger.warning("session %s: the speaker model gave no usable embedding for utterance %d (%d ms)",
                           session_id, utt.index, utt.end_ms - utt.start_ms)  # fmt: skip
            return None, "no_embedding", spk_ms, retries
        return embedding, None, spk_ms, retries

    async def recognise(
        self, session_id: str, utt: Utterance, options: RecognitionOptions
    ) -> tuple[UtteranceResult, SpeakerEmbedding | None]:
        """Transcript and speaker embedding of one utterance, computed concurrently. Only a
        transcription failure fails the utterance; a Speaker failure leaves the speaker unknown,
        with a reason."""
        group = options.speaker_group or self.default_group
        speaker_call = asyncio.ensure_future(self._speaker_of(utt, group, session_id))
        try:
            transcript, asr_ms, asr_retries = await self.transcribe(utt.pcm, options, session_id)
        except BaseException:
            speaker_call.cancel()  # nobody will read it
            raise
        embedding, reason, spk_ms, spk_retries = await speaker_call
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
            models=self.models_label, forced_cut=utt.forced_cut, latency_ms=latency,
            batch_sizes={"asr": transcript.batch_size, **({"speaker": embedding.batch_size} if embedding else {})},
            retries={k: n for k, n in (("asr", asr_retries), ("speaker", spk_retries)) if n},
        )  # fmt: skip
        return result, embedding


# ---- the stream --------------------------------------------------------------------------------


class UtteranceStreams:
    """Opens utterance streams; one per Ingress replica."""

    def __init__(self, models: ModelCalls, ingress: IngressSettings, keep_embeddings: int, metrics: IngressMetrics):
        self.models = models
        self.vad_chunk_ms, self.max_utterance_ms = ingress.vad_chunk_ms, ingress.max_utterance_ms
        self.max_in_flight = ingress.max_utterances_in_flight
        self.max_vad_lag_ms = ingress.vad_max_lag_ms
        self.min_utterance_ms = ingress.min_utterance_ms
        self.keep_embeddings = keep_embeddings
        self.metrics = metrics

    def timeline(self) -> Timeline:
        return Timeline(vad_chunk_ms=self.vad_chunk_ms, max_utterance_ms=self.max_utterance_ms,
                        min_utterance_ms=self.min_utterance_ms)  # fmt: skip

    def open(self, session_id: str, options: RecognitionOptions, on_result, on_failure, **interim) -> UtteranceStream:
        """A new stream; `interim`: `on_interim` and `interim_interval_ms` (see UtteranceStream)."""
        return UtteranceStream(
            session_id, self.timeline(), self.models, self.metrics, options, on_result, on_failure,
            keep_embeddings=self.keep_embeddings, max_in_flight=self.max_in_flight,
            max_vad_lag_ms=self.max_vad_lag_ms, **interim,
        )  # fmt: skip


def live_stream_tasks() -> int:
    """Tasks of `UtteranceStream`s still running in this process (result sender, recognitions,
    interims). Once every stream has ended this is 0; anything else is a leak."""
    return sum(
        1 for t in asyncio.all_tasks() if getattr(t.get_coro(), "__qualname__", "").startswith("UtteranceStream.")
    )


class UtteranceStream:
    """One live stream: audio in, `on_result` called once per utterance, in order.

    Optional: `on_interim(index, text)` with the growing text of the utterance being spoken,
    every `interim_interval_ms` (at most one interim request in flight per stream), and
    `on_speech(edge)` with each `SpeechEdge`, awaited before the utterance it cuts is recognised
    (so a client hears of the cut before its result).
    Push-to-talk (`begin_utterance`) skips the VAD: `end_utterance()` cuts the utterance.
    With `max_in_flight`, the VAD waits while that many utterances are being recognised.

    `push` does not wait for the VAD: a feeder task sends everything that has come since its last
    call as one chunk. Awaiting one VAD call per 200 ms chunk made a session whose calls took
    longer than that (a busy lane, a busy host) fall behind for good: it could never send more
    than one chunk per call, and its end of speech was found ever later (measured: 0.6-1.1 s at
    p50 with 20 devices on 2 cores). `push` waits only while the VAD is `max_vad_lag_ms` behind.
    Everything that changes how audio is read (push-to-talk, clear, abort, end) first lets the
    feeder finish what came before it.
    """

    def __init__(
        self,
        session_id: str,
        timeline: Timeline,
        models: ModelCalls,
        metrics: IngressMetrics,
        options: RecognitionOptions,
        on_result: Callable[[UtteranceResult], Awaitable[None]],
        on_failure: Callable[[int, Exception], Awaitable[None]],
        on_interim: Callable[[int, str], Awaitable[None]] | None = None,
        interim_interval_ms: int = 600,
        on_speech: Callable[[SpeechEdge], Awaitable[None]] | None = None,
        keep_embeddings: int = 20,
        max_in_flight: int | None = None,
        max_vad_lag_ms: int = 2000,
    ):
        self.session_id = session_id
        self.timeline = timeline
        self.models = models
        self.metrics = metrics
        self.options = options
        self._on_result, self._on_failure, self._on_interim = on_result, on_failure, on_interim
        self._on_speech = on_speech
        self._interim_interval_ms = interim_interval_ms
        self._max_in_flight = max_in_flight
        self._max_vad_lag_ms = max_vad_lag_ms
        self._ready: list[VadChunk] = []  # full chunks the VAD has not had yet, in order
        self._feeder: asyncio.Task | None = None
        self._closed = False
        self._interim_task: asyncio.Task | None = None
        self._interim_at_ms = 0
        self._queue: asyncio.Queue[tuple[int, asyncio.Task] | None] = asyncio.Queue()
        self._in_flight: set[asyncio.Task] = set()
        self._sender = asyncio.create_task(self._send_in_order())
        self.embeddings: deque[tuple[str, SpeakerEmbedding]] = deque(maxlen=keep_embeddings)
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
        """Wait while `max_in_flight` utterances are being recognised: a client whose audio ends
        utterances faster than the models answer waits (its frames queue, within the intake
        bounds) instead of fanning out without bound."""
        while self._max_in_flight is not None and len(self._in_flight) >= self._max_in_flight:
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
            vad_ms = _ms_since(started)
            self.metrics.vad_call(vad_ms)
        utterances = self.timeline.on_vad_events(result.events, chunk.start_ms + samples_to_ms(len(chunk.pcm)))
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
            if not self.models.shed("interim"):  # the models are behind: finals first
                self._interim_task = asyncio.create_task(self._interim(*speech))

    async def _interim(self, index: int, pcm: np.ndarray) -> None:
        try:
            transcript = await self.models.transcribe_interim(pcm, self.options)
        except Exception:  # an interim is a courtesy: the final result still comes
            logger.warning("session %s: interim recognition failed", self.session_id, exc_info=True)
            return
        if self.timeline.utterances_done == index and self._on_interim is not None:  # not final yet
            await self._on_interim(index, transcript.text)

    async def _recognise(self, utt: Utterance, started: float, vad_ms: float, vad_compute_ms: float, endpoint_ms: int):
        result, embedding = await self.models.recognise(self.session_id, utt, self.options)
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
                logger.error("session %s: recognition of utterance %d failed", self.session_id, index,
                             exc_info=task.exception())  # fmt: skip
                await self._on_failure(index, task.exception())
                continue
            await self._on_result(task.result())
            self.results_sent += 1

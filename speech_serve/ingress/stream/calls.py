"""Every call from an Ingress replica to the replicas, one `ModelCalls` per Ingress replica, and how
each is bounded and retried:

- VADHost: the chunks of this replica's sessions go out together in *lanes* (`VadLanes`), one
  sticky key each for the lane router (speech_serve/replicas/lane_router.py); a session whose VAD
  state was lost with its replica replays its unfinished audio on the next one.
- SenseVoice and Speaker: one utterance per call, batched on the replica; the finals in flight are
  the `Backlog`, which admission by compute reads and which sheds optional work when it grows.
- Every call can be cancelled on its replica (`awaited`), is bounded per try (`bounded`,
  `retry.try_timeout_s`) and retried when its replica is lost (`RetryClock`): a replica that dies
  mid-call (or is stopped by a scale-down) raises `RayActorError` / `ActorUnavailableError`, and the
  call is safe to repeat, until `retry.deadline_s` after the first failure (a replacement's start). A
  try that runs out is cancelled on its replica, not retried (it would queue behind the same work)."""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
from ray.exceptions import ActorUnavailableError, RayActorError

from speech_serve.ingress.stream.timeline import Timeline
from speech_serve.messages import (
    AsrRequest,
    SpeakerEmbedding,
    SpeakerRequest,
    Transcript,
    VadChunk,
    VadFeedResult,
    VadItem,
)
from speech_serve.settings import AdmissionSettings, AppSettings, RetrySettings
from speech_serve.wire.pcm import SAMPLES_PER_MS

logger = logging.getLogger("ray.serve")

REPLICA_GONE = (RayActorError, ActorUnavailableError)  # safe to repeat on another replica
SHEDDABLE = ("interim", "speaker")  # optional work, in the order it is shed


def ms_since(t: float) -> float:
    return round((time.perf_counter() - t) * 1000, 1)


async def awaited(response: Awaitable) -> Any:
    """A Serve response as a coroutine (for asyncio.wait_for) whose cancel cancels the request on the
    replica too: queued work for a session that has gone, or a call that timed out, is dropped there."""
    try:
        return await response
    except asyncio.CancelledError:
        cancel = getattr(response, "cancel", None)  # a Serve response; VAD calls come as coroutines
        if cancel is not None:
            cancel()
        raise


async def bounded(call: Awaitable, timeout_s: float | None) -> Any:
    """`asyncio.wait_for` that never swallows a cancel (3.11's returns the result when both land in one
    tick, as a lane's answer does: a closed session's feeder then fed a chunk after its close). Only a
    cancel asked for during this wait counts: a cancelled task's `finally` still gets its answer."""
    task = asyncio.current_task()
    cancels_before = task.cancelling() if task is not None else 0
    result = await asyncio.wait_for(call, timeout_s)
    if task is not None and task.cancelling() > cancels_before:
        raise asyncio.CancelledError
    return result


def detached(coro: Coroutine) -> asyncio.Task:
    """A task that is no request's child: Serve cancels the handle calls made under a request's id
    (a task inherits its creator's) with that request, e.g. when its client leaves in direct ingress."""
    return asyncio.get_running_loop().create_task(coro, context=contextvars.Context())


def retrieve_exception(future: asyncio.Future) -> None:
    """Done-callback of a future whose waiter may have left: no "exception never retrieved" noise."""
    if not future.cancelled():
        future.exception()


class ReplicaLostError(RuntimeError):
    """A replica was lost and none answered within `retry.deadline_s`, or a try ran out of time."""


class RetryClock:
    """The retries of one call. `failed()` after each failure says how long to wait before the
    next try, or None once the budget is spent; `remaining_s()` bounds each try."""

    def __init__(self, settings: RetrySettings, now: Callable[[], float] = time.monotonic):
        self.settings = settings
        self._now = now
        self._first_failure: float | None = None
        self.retries = 0

    def failed(self) -> float | None:
        """The first retry goes at once (Serve routes it to a live replica, or holds it until one runs);
        later ones back off exponentially, so a replica that keeps failing fast is not hammered."""
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
        """`try_timeout_s` (generous: a first try may queue behind other sessions' work), and after a
        failure no more than what is left of the deadline."""
        if self._first_failure is None:
            return self.settings.try_timeout_s
        left = self.settings.deadline_s - (self._now() - self._first_failure)
        return max(min(self.settings.try_timeout_s, left), 0.0)

    def timeout_error(self, what: str, limit_s: float) -> ReplicaLostError:
        """The error for a try that got no answer within `limit_s`, naming the setting that set it."""
        if self._first_failure is not None and limit_s < self.settings.try_timeout_s:
            return ReplicaLostError(f"{what} replica lost; none answered within {self.settings.deadline_s:g} s "
                                    "(retry.deadline_s)")  # fmt: skip
        return ReplicaLostError(f"{what} gave no answer within {limit_s:g} s (retry.try_timeout_s)")


# ---- VADHost: batched in lanes ------------------------------------------------------------------
# A Serve call costs far more CPU than fsmn-vad's few ms per chunk, so a lane makes one `feed_many` call
# at a time with every chunk that came since its last, at least `interval_ms` apart: under load the calls
# per second stay flat and batches grow. A lane holds up to `sessions_per_lane` sessions (what one VADHost
# replica is sized for); a session's chunks and its close go out in order. Each call runs in a fresh
# request context (Serve's router cannot route two pending requests of one request id). A caller that
# leaves does not cancel the batch: its answer is dropped. `send` is the only I/O (tested without Ray).

Send = Callable[[str, list[VadItem]], Awaitable[list[VadFeedResult]]]


class VadItemError(RuntimeError):
    """The replica could not process this session's chunk (its batch went on without it)."""


@dataclass
class _Lane:
    members: set[str] = field(default_factory=set)
    pending: list[tuple[VadItem, asyncio.Future]] = field(default_factory=list)
    busy: bool = False  # a call is scheduled or in flight
    last_sent: float = float("-inf")
    calls: int = 0


class VadLanes:
    def __init__(self, send: Send, interval_ms: int, sessions_per_lane: int, prefix: str | None = None):
        if sessions_per_lane < 1:
            raise ValueError("sessions_per_lane must be at least 1")
        self._send, self._interval_s, self._per_lane = send, interval_ms / 1000, sessions_per_lane
        self._prefix = prefix or uuid.uuid4().hex[:8]  # lanes of different Ingress replicas never share a key
        self._lanes: dict[str, _Lane] = {}
        self._lane_of: dict[str, str] = {}
        self._flushes: set[asyncio.Task] = set()

    @property
    def sessions(self) -> int:
        """Sessions holding a lane (0 once every stream has closed: anything else is a leak)."""
        return len(self._lane_of)

    @property
    def calls(self) -> int:  # made so far, over every lane
        return sum(lane.calls for lane in self._lanes.values())

    def lane_of(self, session_id: str) -> str:
        key = self._lane_of.get(session_id)
        if key is None:
            key = next((k for k, lane in self._lanes.items() if len(lane.members) < self._per_lane), None)
            if key is None:
                key = f"{self._prefix}-{len(self._lanes)}"
                self._lanes[key] = _Lane()
            self._lanes[key].members.add(session_id)
            self._lane_of[session_id] = key
        return key

    async def feed(self, session_id: str, chunk: VadChunk) -> VadFeedResult:
        result = await self._call(VadItem(session_id, chunk))
        if result.error is not None:
            raise VadItemError(f"VADHost could not process the chunk: {result.error}")
        return result

    async def close(self, session_id: str) -> None:
        """Free the session's state on its replica (after its chunks already queued)."""
        await self._call(VadItem(session_id, None))

    async def _call(self, item: VadItem) -> VadFeedResult:
        key = self.lane_of(item.session_id)
        lane = self._lanes[key]
        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(retrieve_exception)  # nobody may be waiting any more
        lane.pending.append((item, future))
        if item.chunk is None:  # the session leaves its lane; its close still goes out in order
            lane.members.discard(item.session_id)
            self._lane_of.pop(item.session_id, None)
        self._kick(key)
        return await asyncio.shield(future)

    def _kick(self, key: str) -> None:
        lane = self._lanes[key]
        if lane.busy or not lane.pending:
            return
        lane.busy = True
        loop = asyncio.get_running_loop()
        wait = lane.last_sent + self._interval_s - loop.time()
        if wait > 0:
            loop.call_later(wait, self._start, key)
        else:
            self._start(key)

    def _start(self, key: str) -> None:
        task = detached(self._flush(key))  # the lane's call carries many sessions' chunks
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    async def _flush(self, key: str) -> None:
        lane = self._lanes[key]
        batch, lane.pending = lane.pending, []
        lane.last_sent = asyncio.get_running_loop().time()
        lane.calls += 1
        try:
            results = await self._send(key, [item for item, _ in batch])
        except BaseException as exc:  # every session of the batch sees the failure (and retries)
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("VAD call cancelled"))
            if not isinstance(exc, Exception):
                raise
        else:
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
        finally:
            lane.busy = False
        self._kick(key)


class Backlog:
    """The finals this Ingress waits on: how long the oldest has waited (the queue delay), and past
    `admission.shed_*_delay_s`, which optional work is skipped (pure: the clock is injected)."""

    def __init__(self, settings: AdmissionSettings, clock: Callable[[], float] = time.monotonic,
                 on_shed: Callable[[str], None] | None = None):  # fmt: skip
        self._clock, self._on_shed = clock, on_shed  # on_shed: told each time work is skipped (metrics)
        self._shed_after = {"interim": settings.shed_interims_delay_s, "speaker": settings.shed_speaker_delay_s}
        self._waiting: dict[int, float] = {}  # token -> when sent
        self._tokens = itertools.count()

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Around one final transcription call: it counts as waiting until its answer."""
        token = next(self._tokens)
        self._waiting[token] = self._clock()
        try:
            yield
        finally:
            del self._waiting[token]

    def queue_delay_s(self) -> float:
        """How long the oldest final in flight has waited (0 with none)."""
        oldest = min(self._waiting.values(), default=None)
        return 0.0 if oldest is None else self._clock() - oldest

    def shedding(self) -> list[str]:
        """The optional work shed now (in SHEDDABLE's order)."""
        delay = self.queue_delay_s()
        return [what for what in SHEDDABLE if (limit := self._shed_after[what]) is not None and delay > limit]

    def shed(self, what: str) -> bool:
        """Skip this piece of optional work (`interim`, `speaker`) now? Counted when it is."""
        limit = self._shed_after[what]
        if limit is None or self.queue_delay_s() <= limit:
            return False
        if self._on_shed is not None:
            self._on_shed(what)
        return True


class ModelCalls:
    def __init__(self, vad, asr, speaker, settings: AppSettings, backlog: Backlog | None = None):
        self.vad, self.asr, self.speaker = vad, asr, speaker
        self.retry, self.speaker_enabled = settings.retry, settings.speaker.enabled
        self.backlog = backlog or Backlog(settings.admission)
        self.vad_lanes = VadLanes(self._feed_many, settings.stream.vad_batch_interval_ms,
                                  settings.vad.sessions_per_replica)  # fmt: skip
        self._closing: set[asyncio.Task] = set()

    async def _feed_many(self, lane: str, items: list[VadItem]) -> list[VadFeedResult]:
        """One lane's call, bounded here too: a lane makes one call at a time; one never answered blocks it."""
        try:
            return await bounded(awaited(self.vad.feed_many.remote(lane, items)), self.retry.try_timeout_s)
        except TimeoutError:
            raise RetryClock(self.retry).timeout_error("VADHost", self.retry.try_timeout_s) from None

    async def feed_vad(self, sid: str, timeline: Timeline, chunk: VadChunk) -> tuple[VadFeedResult, int]:
        """Send one chunk; if the session's VAD state is gone, replay the unfinished audio.
        Returns the result and how many replays it took."""
        clock = RetryClock(self.retry)
        replays = 0
        while True:
            try:
                result = await self.try_once(clock, partial(self.vad_lanes.feed, sid, chunk), "VADHost")
            except REPLICA_GONE as exc:  # the state went with the replica: replay on the next one
                await self.before_retry(clock, exc, "VADHost", sid)
            except VadItemError:  # the replica dropped this session's state: replay once, fresh
                if chunk.restart:
                    raise  # its fresh replay failed too
            else:
                if not result.state_lost:
                    return result, replays
                if chunk.restart:  # a fresh start is never refused; if it is, spend the budget, never loop
                    await self.before_retry(clock, RuntimeError("state lost on a restart"), "VADHost", sid)
            chunk = timeline.replay_chunk(chunk)
            replays += 1
            logger.info("session %s: replaying %d ms of audio from %d ms (replay %d)",
                        sid, len(chunk.pcm) // SAMPLES_PER_MS, chunk.start_ms, replays)  # fmt: skip

    def close_vad_later(self, session_id: str, after: asyncio.Task | None = None) -> None:
        """Free the session's VAD state without waiting for it (its lane may be busy), once `after`
        (the stream's feeder, just cancelled) has ended: a feed sent after the close would find no
        state, replay from a fresh one and leave that behind."""
        self.keep_until_done(asyncio.create_task(self._close_vad_after(session_id, after)))

    def keep_until_done(self, task: asyncio.Task) -> None:
        """A reference to a clean-up task until it is done, or the loop may drop it."""
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _close_vad_after(self, session_id: str, after: asyncio.Task | None) -> None:
        if after is not None and not after.done():
            await asyncio.wait([after], timeout=self.retry.try_timeout_s)  # its call is bounded by this too
        try:
            await self.vad_lanes.close(session_id)
        except Exception:  # the replica may be gone already; nothing to clean up then
            logger.info("session %s: VAD close failed; replica gone", session_id)

    # ---- tries and retries ----
    async def try_once(self, clock: RetryClock, call: Callable[[], Awaitable], what: str):
        """One try, bounded: by `try_timeout_s`, and after a failure by the time left in the budget
        (with one replica a retry waits in Serve's router for the replacement, and that wait must
        end). A try that runs out is cancelled on its replica."""
        left = clock.remaining_s()
        try:
            return await bounded(awaited(call()), left)
        except TimeoutError:
            raise clock.timeout_error(what, left) from None

    async def before_retry(self, clock: RetryClock, exc: Exception, what: str, session_id: str) -> None:
        wait = clock.failed()
        if wait is None:
            raise ReplicaLostError(f"{what} replica lost; gave up after {clock.retries} retries in "
                                   f"{clock.settings.deadline_s:g} s (retry.deadline_s)") from exc  # fmt: skip
        logger.warning("session %s: %s replica lost (%s); retry %d in %.1f s",
                       session_id, what, type(exc).__name__, clock.retries, wait)  # fmt: skip
        await asyncio.sleep(wait)

    async def _retrying(self, call: Callable[[], Awaitable], what: str, session_id: str) -> tuple[object, int]:
        """The call's result and how many retries it took."""
        clock = RetryClock(self.retry)
        while True:
            try:
                return await self.try_once(clock, call, what), clock.retries
            except REPLICA_GONE as exc:
                await self.before_retry(clock, exc, what, session_id)

    # ---- SenseVoice and Speaker ----
    async def transcribe(self, request: AsrRequest, session_id: str) -> tuple[Transcript, float, int]:
        """A final's transcript, round trip in ms, retries."""
        started = time.perf_counter()
        transcript, retries = await self._retrying(partial(self.asr.transcribe.remote, request), "SenseVoice",
                                                   session_id)  # fmt: skip
        return transcript, ms_since(started), retries

    async def transcribe_interim(self, request: AsrRequest) -> Transcript:
        """Text of an unfinished utterance; runs behind every final on the SenseVoice replica.
        Bounded like any try, or a wedged replica would keep the stream's one interim for ever."""
        return await bounded(awaited(self.asr.transcribe_interim.remote(request)), self.retry.try_timeout_s)

    async def embed(self, pcm: np.ndarray, group: str | None,
                    session_id: str) -> tuple[SpeakerEmbedding | None, float, int]:  # fmt: skip
        """Embedding and, when `group` is given, the best match among its voiceprints; round trip
        in ms; retries."""
        if not self.speaker_enabled:
            return None, 0.0, 0
        started = time.perf_counter()
        call = partial(self.speaker.embed.remote, SpeakerRequest(pcm, group))
        embedding, retries = await self._retrying(call, "Speaker", session_id)
        return embedding, ms_since(started), retries

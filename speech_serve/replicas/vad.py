"""VADHost: streaming fsmn-vad for many sessions on one CPU replica, and its autoscaling policy
(its sticky request router is speech_serve/replicas/lane_router.py).

`VadCore` is the plain class (testable without Serve); `VADHost` is its Serve wrapper. Each
Ingress replica batches its sessions' chunks into lanes (`VadLanes`, speech_serve/ingress/stream/calls.py): one
`feed_many` call carries many sessions' chunks, as a Serve call costs more than a VAD step.
All per-session state lives in the fsmn `cache` dict, so sessions interleave safely on one
model instance, but `generate()` is not thread-safe: every call goes through one thread.
A session's state goes on its `final` chunk or its close; state nobody has fed for
`vad.session_idle_s` (its Ingress crashed and will never close it) is forgotten.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from ray import serve

from speech_serve.messages import VadChunk, VadEvent, VadFeedResult, VadItem, to_float32
from speech_serve.replicas import fast_fbank
from speech_serve.replicas.fsmn_batch import BatchedFsmnVad, Step
from speech_serve.replicas.lane_router import LIVE_SESSIONS_STAT
from speech_serve.replicas.metrics import VadMetrics
from speech_serve.replicas.models import ModelSource, load_automodel
from speech_serve.replicas.worker import ModelThread
from speech_serve.settings import VadSettings
from speech_serve.wire.pcm import SAMPLES_PER_MS

logger = logging.getLogger("ray.serve")


@dataclass
class _FileCut:
    fed_ms: int = 0
    cache: dict = field(default_factory=dict)
    open_ms: int | None = None  # start of a segment whose end is in a later piece
    last_fed: float = 0.0


@dataclass
class _Stream:
    base_ms: int  # stream position where this fsmn cache started
    fed_ms: int
    cache: dict = field(default_factory=dict)
    in_speech: bool = False
    last_pcm: np.ndarray | None = None
    last_fed: float = 0.0  # clock time of the last chunk
    end_silence_ms: int | None = None  # the session's, from its latest chunk


class VadCore:
    def __init__(
        self, source: ModelSource, settings: VadSettings, device: str = "cpu",
        clock: Callable[[], float] = time.monotonic,
    ):  # fmt: skip
        self.settings = settings
        self._now = clock
        # funasr's fbank without its per-call set-up, where funasr's frontend still runs (VAD models
        # configured otherwise); the streaming step has its own (vad_frontend.py)
        fast_fbank.install()
        self.model = load_automodel(
            source, device=device, threads=settings.threads, max_end_silence_time=settings.max_end_silence_ms
        )
        self._engine = BatchedFsmnVad(self.model)
        self._streams: dict[str, _Stream] = {}
        self._files: dict[str, _FileCut] = {}  # uploads being cut into segments, piece by piece
        self.segment_piece("warm-up", np.zeros(600 * SAMPLES_PER_MS, dtype=np.int16), 0, final=True)  # slow 1st

    @property
    def live_sessions(self) -> int:
        """Sessions fed within `session_idle_s`. Idle ones are left out before they are evicted:
        Serve reads this for routing and autoscaling even when no call comes to evict them."""
        cutoff = self._now() - self.settings.session_idle_s
        # list(): a snapshot taken in one step (this runs on the replica's loop, feeds on the model thread)
        return sum(1 for s in list(self._streams.values()) if s.last_fed > cutoff)

    def evict_idle(self) -> list[str]:
        """Forget the sessions nobody has fed for `session_idle_s`; returns their ids."""
        cutoff = self._now() - self.settings.session_idle_s
        idle = [sid for sid, s in list(self._streams.items()) if s.last_fed <= cutoff]
        for sid in idle:
            self._streams.pop(sid, None)
        for key in [k for k, cut in list(self._files.items()) if cut.last_fed <= cutoff]:
            self._files.pop(key, None)  # an upload whose Ingress never came back
        if idle:
            logger.info("forgot the VAD state of %d session(s) idle for %g s (vad.session_idle_s): %s",
                        len(idle), self.settings.session_idle_s, ", ".join(idle[:5]))  # fmt: skip
        return idle

    def feed(
        self, session_id: str, pcm: np.ndarray, start_ms: int, final: bool = False, restart: bool = False
    ) -> VadFeedResult:
        """Feed int16 audio that starts at `start_ms` of the session's stream (one session's
        `feed_many`; a failed step raises here)."""
        result = self.feed_many([VadItem(session_id, VadChunk(pcm, start_ms, final, restart))])[0]
        if result.error is not None:
            raise RuntimeError(result.error)
        return result

    def feed_many(self, items: list[VadItem]) -> list[VadFeedResult]:
        """One batched step for many sessions, in order (a session's chunks continue each other:
        a session's second chunk of the batch goes in the next round). A chunk that fails fails
        alone: the other sessions of its batch get their results."""
        self.evict_idle()
        results: list[VadFeedResult | None] = [None] * len(items)
        pending = list(enumerate(items))
        while pending:
            this_round, later, seen = [], [], set()
            for i, item in pending:
                (later if item.session_id in seen else this_round).append((i, item))
                seen.add(item.session_id)
            self._round(this_round, results)
            pending = later
        return results  # type: ignore[return-value]

    def _round(self, batch: list[tuple[int, VadItem]], results: list[VadFeedResult | None]) -> None:
        started = time.perf_counter()
        steps = []
        for i, item in batch:
            if item.chunk is None:
                self.close(item.session_id)
                results[i] = VadFeedResult(events=[])
                continue
            stream = self._stream_for(item.session_id, item.chunk)
            if stream is None:  # a gap or a stranger: our state cannot continue it. The caller replays.
                results[i] = VadFeedResult(events=[], state_lost=True)
                continue
            try:
                stream.end_silence_ms = item.chunk.end_silence_ms
                steps.append((i, item, stream, self._step(stream, item.chunk.pcm, item.chunk.final)))
            except Exception as exc:
                results[i] = self._failed(item.session_id, exc)
        self._engine.run([step for *_, step in steps])
        compute_ms = (time.perf_counter() - started) * 1000 / max(len(steps), 1)
        for i, item, stream, step in steps:
            try:
                if step.error is not None:
                    raise step.error
                events = self._events(stream, step, item.chunk.pcm)
                if item.chunk.final:
                    self._streams.pop(item.session_id, None)
                elif not stream.in_speech and stream.fed_ms - stream.base_ms >= self.settings.reset_after_ms:
                    events += self._reset(stream)
                results[i] = VadFeedResult(events=events, compute_ms=compute_ms)
            except Exception as exc:
                results[i] = self._failed(item.session_id, exc)

    def _failed(self, session_id: str, exc: Exception) -> VadFeedResult:
        """This session's step failed: its state is dropped (the Ingress replays), the batch goes on."""
        logger.error("session %s: VAD step failed: %s: %s", session_id, type(exc).__name__, exc)
        self._streams.pop(session_id, None)
        return VadFeedResult(events=[], error=f"{type(exc).__name__}: {exc}")

    def _stream_for(self, session_id: str, chunk: VadChunk) -> _Stream | None:
        stream = self._streams.get(session_id)
        if chunk.restart or (stream is None and chunk.start_ms == 0):
            stream = self._streams[session_id] = _Stream(base_ms=chunk.start_ms, fed_ms=chunk.start_ms)
        elif stream is None or stream.fed_ms != chunk.start_ms:
            self._streams.pop(session_id, None)
            return None
        stream.last_fed = self._now()
        return stream

    @staticmethod
    def _step(stream: _Stream, pcm: np.ndarray, final: bool) -> Step:
        chunk_ms = max(len(pcm) // SAMPLES_PER_MS, 1)
        return Step(stream.cache, to_float32(pcm), final, chunk_ms=chunk_ms, end_silence_ms=stream.end_silence_ms)

    def _events(self, stream: _Stream, step: Step, pcm: np.ndarray) -> list[VadEvent]:
        stream.fed_ms += len(pcm) // SAMPLES_PER_MS
        stream.last_pcm = pcm
        events = []
        for beg, end in step.segments:
            if beg != -1:
                events.append(VadEvent("start", stream.base_ms + beg))
                stream.in_speech = True
            if end != -1:
                events.append(VadEvent("end", stream.base_ms + end))
                stream.in_speech = False
        return events

    def _reset(self, stream: _Stream) -> list[VadEvent]:
        """Start a fresh cache so memory stays flat; re-feed the last chunk so a start that
        was building up in it is not lost."""
        last = stream.last_pcm if stream.last_pcm is not None else np.zeros(0, dtype=np.int16)
        stream.cache = {}
        stream.base_ms = stream.fed_ms - len(last) // SAMPLES_PER_MS
        stream.fed_ms = stream.base_ms
        if not len(last):
            return []
        step = self._step(stream, last, final=False)
        self._engine.run([step])
        if step.error is not None:
            raise step.error
        return self._events(stream, step, last)

    def close(self, session_id: str) -> bool:
        return self._streams.pop(session_id, None) is not None

    def segment_piece(self, key: str, pcm: np.ndarray, start_ms: int, final: bool) -> list[tuple[int, int]] | None:
        """The next piece of an upload (`key`): the speech segments, as (start_ms, end_ms), that end
        in it; the last piece (`final`) closes any still open. A whole file in one step would hold the
        model thread for seconds that every session's step waits; pieces take turns with them, and
        give the same segments (the streaming model continues its cache). None: a piece that does not
        continue what this replica holds (a new replica after a re-pin): the caller starts over."""
        cut = self._files.get(key)
        if start_ms == 0:
            cut = self._files[key] = _FileCut()
        elif cut is None or cut.fed_ms != start_ms:
            self._files.pop(key, None)
            return None
        cut.last_fed = self._now()
        chunk_ms = max(len(pcm) // SAMPLES_PER_MS, 1)
        step = Step(cut.cache, to_float32(pcm), final, chunk_ms=chunk_ms)
        try:
            self._engine.run([step])
            if step.error is not None:
                raise step.error
        except Exception:
            self._files.pop(key, None)
            raise
        cut.fed_ms += len(pcm) // SAMPLES_PER_MS
        done = []
        for beg, end in step.segments:
            if beg != -1:
                cut.open_ms = beg
            if end != -1 and cut.open_ms is not None:
                done.append((cut.open_ms, end))
                cut.open_ms = None
        if final:
            self._files.pop(key, None)
        return done

    def drop_file(self, key: str) -> bool:
        return self._files.pop(key, None) is not None


@serve.deployment  # its options (lane router included): settings.DEFAULT_DEPLOYMENT_OPTIONS
class VADHost:
    def __init__(self, source: ModelSource, settings: VadSettings):
        self._core = VadCore(source, settings)
        self._thread = ModelThread("VADHost")  # one thread: generate() is not thread-safe
        self._metrics = VadMetrics()

    async def _call(self, fn, *args):
        try:
            return await self._thread.run(fn, *args)
        finally:
            self._metrics.sessions_now(self._core.live_sessions)

    async def feed_many(self, lane: str, items: list[VadItem]) -> list[VadFeedResult]:
        """The chunks of one lane (sessions of one Ingress replica; the router keeps a lane here)."""
        return await self._call(self._core.feed_many, items)

    async def segment_piece(
        self, lane: str, pcm: np.ndarray, start_ms: int, final: bool
    ) -> list[tuple[int, int]] | None:
        """The next piece of an upload; `lane` is the upload's own (sticky: its pieces stay here)."""
        return await self._call(self._core.segment_piece, lane, pcm, start_ms, final)

    async def drop_file(self, lane: str) -> bool:
        return self._core.drop_file(lane)

    def record_routing_stats(self) -> dict[str, int]:
        return {LIVE_SESSIONS_STAT: self._core.live_sessions}

    def record_autoscaling_stats(self) -> dict[str, float]:
        return {LIVE_SESSIONS_STAT: float(self._core.live_sessions),
                SIZED_FOR_STAT: float(self._core.settings.sessions_per_replica)}  # fmt: skip


# ---- autoscaling policy -------------------------------------------------------------------------
# Replicas from live sessions, not from queued requests: a VADHost call lasts a few milliseconds, so
# its request queue says little about load; the number of sessions pinned to it does. Each replica
# reports its `live_sessions` and what it is sized for (`vad.sessions_per_replica`, which is also the
# size of the Ingress's lanes, so new lanes land on new replicas) through `record_autoscaling_stats()`;
# the policy asks for ceil(sessions / sessions_per_replica) replicas. Serve then applies the
# deployment's min/max replicas, up/down delays and scaling factors around the decision.

SIZED_FOR_STAT = "sessions_per_replica"


def replicas_for_sessions(live_sessions: float, sessions_per_replica: int) -> int:
    """At least one replica; one more for every `sessions_per_replica` sessions begun."""
    return max(1, math.ceil(live_sessions / sessions_per_replica))


class SessionsPolicy:
    """`autoscaling_config.policy: {policy_function: speech_serve.replicas.vad:SessionsPolicy}` (Ray 2.60
    custom autoscaling policy). Takes no kwargs: the target per replica comes from the replicas."""

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        metrics = ctx.aggregated_metrics or {}
        live, sized = metrics.get(LIVE_SESSIONS_STAT), metrics.get(SIZED_FOR_STAT)
        if not live or not sized:  # no report yet (replicas starting): keep what we have
            return ctx.target_num_replicas, {}
        total = float(sum(live.values()))
        return replicas_for_sessions(total, max(1, round(max(sized.values())))), {"live_sessions": total}

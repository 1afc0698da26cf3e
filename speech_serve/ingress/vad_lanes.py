"""Batched VADHost calls: the VAD chunks of all sessions on this Ingress replica go out together.

A Serve call costs far more CPU than fsmn-vad's few milliseconds per chunk (measured: about
10 ms across both processes per call, against 5.6 ms of VAD work per 200 ms chunk). So the
sessions of one Ingress replica share *lanes*: each lane is one sticky key for the VADHost
router (speech_serve/replicas/lane_router.py pins a lane, not a session, to a replica) and makes one
`VADHost.feed_many` call at a time, carrying every chunk that arrived since its last call.

- At most one call in flight per lane, and calls at least `interval_ms` apart: at low load a
  chunk goes out at once; under load the calls per second stay flat while batches grow.
- A lane holds up to `sessions_per_lane` sessions (as many as one VADHost replica is sized for,
  so the VAD autoscaler's replicas each get lanes); a session keeps its lane until it closes.
- Within a lane a session's chunks and its close go out in order, so its VAD state on the
  replica always continues from the chunk before.
- Each call runs in a fresh request context: Serve's router indexes pending requests by the
  caller's request id, which every call made for one WebSocket shares, and it cannot route
  two pending requests with one id (the session that started a flush must not lend it its id).
- A caller that leaves (its client disconnected) does not cancel the batch: its answer is dropped.

Pure asyncio: `send(lane, items)` is the only I/O, so this is tested without Ray.
"""

from __future__ import annotations

import asyncio
import contextvars
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from speech_serve.messages import VadChunk, VadFeedResult, VadItem

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
        self._send = send
        self._interval_s = interval_ms / 1000
        self._per_lane = sessions_per_lane
        self._prefix = prefix or uuid.uuid4().hex[:8]  # lanes of different Ingress replicas never share a key
        self._lanes: dict[str, _Lane] = {}
        self._lane_of: dict[str, str] = {}
        self._flushes: set[asyncio.Task] = set()

    @property
    def sessions(self) -> int:
        """Sessions holding a lane (0 once every stream has closed: anything else is a leak)."""
        return len(self._lane_of)

    @property
    def calls(self) -> int:
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
        task = asyncio.create_task(self._flush(key), context=contextvars.Context())  # a request id of its own
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


def retrieve_exception(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # marks it retrieved: no "exception never retrieved" noise for gone callers

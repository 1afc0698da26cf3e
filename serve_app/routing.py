"""Sticky session routing for VADHost.

A streaming VAD state must see every chunk of its session, in order, on one replica.
The router lives in the calling Ingress replica, which is the only router instance that
ever sees a given session (the WebSocket pins the session to that Ingress replica), so a
local table session id -> replica is enough.

- A pinned session always goes to its replica, even under load (it waits rather than moves).
- A new session goes to the replica with the fewest live sessions (reported by the
  replicas through routing stats, or counted locally, whichever is larger).
- When the pinned replica is gone (died, or removed by a scale-down), the session is
  re-pinned; the new replica answers `state_lost` and the Ingress replays the audio of the
  unfinished utterance (see `Session.replay_chunk`).

`choose_replica` is the whole decision, as a pure function; `StickySessionRouter` adapts it
to Ray Serve's RequestRouter interface.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

logger = logging.getLogger("ray.serve")

SESSION_METHODS = frozenset({"feed", "close"})  # VADHost methods whose first argument is a session id
CLOSING_METHOD = "close"
LIVE_SESSIONS_STAT = "live_sessions"


def session_of(call_method: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str | None:
    if call_method not in SESSION_METHODS:
        return None
    if "session_id" in kwargs:
        return kwargs["session_id"]
    return args[0] if args else None


def choose_replica(session_id: str | None, pins: dict[str, str], loads: Mapping[str, int]) -> str | None:
    """Pick a replica id for a request and update `pins` in place.

    `loads` maps every available replica id to its live sessions. Returns None if there
    is no replica at all. Ties go to the smallest id, so the choice is deterministic.
    """
    if not loads:
        return None
    if session_id is not None:
        pinned = pins.get(session_id)
        if pinned in loads:
            return pinned
    choice = min(loads, key=lambda rid: (loads[rid], rid))
    if session_id is not None:
        if session_id in pins:
            logger.info("re-pinning VAD session %s from gone replica %s to %s", session_id, pins[session_id], choice)
        pins[session_id] = choice
    return choice


def replica_loads(pins: Mapping[str, str], reported: Mapping[str, int]) -> dict[str, int]:
    """Live sessions per replica: the larger of what it reported and what we pinned to it."""
    local = Counter(pins.values())
    return {rid: max(int(reported.get(rid, 0)), local.get(rid, 0)) for rid in reported}


class StickySessionRouter(RequestRouter):
    def initialize_state(self, **kwargs: Any) -> None:
        self._pins: dict[str, str] = {}

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        reported = {rid: (r.routing_stats or {}).get(LIVE_SESSIONS_STAT, 0) for rid, r in by_id.items()}
        session_id = None
        if pending_request is not None:
            session_id = session_of(pending_request.metadata.call_method, pending_request.args, pending_request.kwargs)
            # Our answer is final (every replica was considered), so Serve must back off before
            # asking again when the chosen replica cannot take the request yet (its queue-length
            # probe timed out). Without this the router thread retries in a tight loop, takes
            # the Ingress's GIL, and the probes never get through: every session on that Ingress
            # stalls for good. (Serve's own routers set this once they consider all replicas.)
            pending_request.routing_context.should_backoff = True
        choice = choose_replica(session_id, self._pins, replica_loads(self._pins, reported))
        return [[by_id[choice]]] if choice is not None else []

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        meta = pending_request.metadata
        if meta.call_method == CLOSING_METHOD:
            session_id = session_of(meta.call_method, pending_request.args, pending_request.kwargs)
            self._pins.pop(session_id, None)

    @property
    def pinned_sessions(self) -> int:
        return len(self._pins)

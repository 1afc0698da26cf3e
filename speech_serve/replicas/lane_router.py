"""Sticky lane routing for VADHost.

A streaming VAD state must see every chunk of its session, in order, on one replica. The
sessions of an Ingress replica go in lanes (`VadLanes` in speech_serve/ingress/stream/calls.py): a lane's
`feed_many` calls carry the chunks of all its sessions, so the router pins lanes. The router
lives in the calling Ingress replica, which is the only router instance that ever sees its
lanes, so a local table lane -> replica is enough.

- A pinned lane always goes to its replica, even under load (it waits rather than moves).
- A new lane goes to the replica with the fewest live sessions (reported by the
  replicas through routing stats, or counted locally, whichever is larger).
- When the pinned replica is gone (died, or removed by a scale-down), the lane is
  re-pinned; the new replica answers `state_lost` for its sessions and the Ingress replays
  the audio of each unfinished utterance (see `Timeline.replay_chunk` in
  speech_serve/ingress/stream/timeline.py).

`choose_replica` is the whole decision, as a pure function; `LaneRouter` adapts it
to Ray Serve's RequestRouter interface.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

logger = logging.getLogger("ray.serve")

# VADHost methods whose first argument is a lane key: a session lane's, or an upload's (its pieces)
STICKY_METHODS = frozenset({"feed_many", "segment_piece", "drop_file"})
RELEASING_METHODS = frozenset({"drop_file"})  # the lane's last call: its pin goes (uploads' lanes are one-off)
LIVE_SESSIONS_STAT = "live_sessions"


def sticky_key(call_method: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> str | None:
    if call_method not in STICKY_METHODS:
        return None
    if "lane" in kwargs:
        return kwargs["lane"]
    return args[0] if args else None


def choose_replica(
    key: str | None, pins: dict[str, str], loads: Mapping[str, int], release: bool = False
) -> str | None:
    """Pick a replica id for a request (its sticky key: a lane) and update `pins` in place
    (`release`: the lane's last call, its pin is dropped once chosen).

    `loads` maps every available replica id to its live sessions. Returns None if there
    is no replica at all. Ties go to the smallest id, so the choice is deterministic.
    """
    if not loads:
        return None
    if key is not None:
        pinned = pins.pop(key, None) if release else pins.get(key)
        if pinned in loads:
            return pinned
    choice = min(loads, key=lambda rid: (loads[rid], rid))
    if key is not None and not release:
        if key in pins:
            logger.info("re-pinning VAD lane %s from gone replica %s to %s", key, pins[key], choice)
        pins[key] = choice
    return choice


def replica_loads(pins: Mapping[str, str], reported: Mapping[str, int]) -> dict[str, int]:
    """Load per replica: the larger of the live sessions it reported and the lanes we pinned to it."""
    local = Counter(pins.values())
    return {rid: max(int(reported.get(rid, 0)), local.get(rid, 0)) for rid in reported}


class LaneRouter(RequestRouter):
    def initialize_state(self, **kwargs: Any) -> None:
        self._pins: dict[str, str] = {}

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        reported = {rid: (r.routing_stats or {}).get(LIVE_SESSIONS_STAT, 0) for rid, r in by_id.items()}
        key, release = None, False
        if pending_request is not None:
            release = pending_request.metadata.call_method in RELEASING_METHODS
            key = sticky_key(pending_request.metadata.call_method, pending_request.args, pending_request.kwargs)
            # Our answer is final (every replica was considered), so Serve must back off before
            # asking again when the chosen replica cannot take the request yet (its queue-length
            # probe timed out). Without this the router thread retries in a tight loop, takes
            # the Ingress's GIL, and the probes never get through: every session on that Ingress
            # stalls for good. (Serve's own routers set this once they consider all replicas.)
            pending_request.routing_context.should_backoff = True
        choice = choose_replica(key, self._pins, replica_loads(self._pins, reported), release)
        return [[by_id[choice]]] if choice is not None else []

    @property
    def pinned_lanes(self) -> int:
        return len(self._pins)

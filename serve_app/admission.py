"""Admission control: which new session may start, decided at connect time.

A session over a cap is refused at once with a reason and a close code: it never waits in
a proxy queue. Two layers:
  * each Ingress replica refuses beyond `max_sessions_per_replica` (kept below Serve's
    `max_ongoing_requests`, so the proxy never queues a WebSocket) and while it drains;
  * `SessionLedger`, held by the one-replica `SessionRegistry` deployment, sees every
    session of the application: the overall cap and the per-device connection limit.
Ingress replicas re-sync their live sessions with the ledger periodically (dropping sessions
whose release was lost), and the sessions of a replica that died without saying goodbye expire
after `lease_s`. A restarted registry starts empty: it undercounts until those sessions end.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from serve_app.draining import CLOSE_SERVICE_RESTART

CLOSE_POLICY = 1008  # RFC 6455: policy violation (retrying will not help until something changes)
CLOSE_TRY_AGAIN_LATER = 1013  # RFC 6455: server overloaded; retry with backoff


@dataclass(frozen=True)
class Refusal:
    code: str  # error code in the protocol's error frame, and the metrics' `reason` tag
    message: str
    close_code: int


def replica_full(limit: int) -> Refusal:
    return Refusal("server_busy", f"this server holds its maximum of {limit} sessions; retry later",
                   CLOSE_TRY_AGAIN_LATER)  # fmt: skip


DRAINING = Refusal("reconnect", "this server is shutting down; reconnect now", CLOSE_SERVICE_RESTART)


def replica_refusal(draining: bool, live_here: int, max_per_replica: int) -> Refusal | None:
    """One Ingress replica's own answer to a new session, before the application-wide caps."""
    if draining:
        return DRAINING
    return replica_full(max_per_replica) if live_here >= max_per_replica else None


@dataclass(frozen=True)
class Limits:
    max_sessions_total: int | None  # None: no overall cap
    max_connections_per_device: int | None


@dataclass
class _Entry:
    ingress: str
    device: str | None
    seq: int  # the ingress's admission number: a sync only speaks for admissions up to its own


@dataclass
class SessionLedger:
    limits: Limits
    lease_s: float
    _sessions: dict[str, _Entry] = field(default_factory=dict)
    _heard: dict[str, float] = field(default_factory=dict)  # ingress replica -> last time it spoke

    @property
    def live(self) -> int:
        return len(self._sessions)

    def admit(self, session_id: str, ingress: str, device: str | None, now: float, seq: int = 0) -> Refusal | None:
        self.expire(now)
        self._heard[ingress] = now
        cap = self.limits.max_sessions_total
        if cap is not None and len(self._sessions) >= cap:
            return Refusal("server_busy", f"the service holds its maximum of {cap} sessions; retry later",
                           CLOSE_TRY_AGAIN_LATER)  # fmt: skip
        per_device = self.limits.max_connections_per_device
        if device and per_device is not None:
            open_now = sum(e.device == device for e in self._sessions.values())
            if open_now >= per_device:
                return Refusal("too_many_connections", f"device {device!r} already has {open_now} open "
                               f"connection(s), the most allowed; close one first", CLOSE_POLICY)  # fmt: skip
        self._sessions[session_id] = _Entry(ingress, device, seq)
        return None

    def release(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def sync(self, ingress: str, live: set[str], now: float, upto_seq: int | None = None) -> None:
        """An ingress replica's live sessions as of its admission number `upto_seq`: forget its
        others admitted up to then (lost releases). A session admitted after the snapshot was
        taken may reach us before the snapshot does; its higher number keeps it."""
        self._heard[ingress] = now
        stale = [s for s, e in self._sessions.items()
                 if e.ingress == ingress and s not in live and (upto_seq is None or e.seq <= upto_seq)]  # fmt: skip
        for sid in stale:
            del self._sessions[sid]
        self.expire(now)

    def expire(self, now: float) -> None:
        """Forget the sessions of ingress replicas silent for longer than the lease (they died)."""
        gone = {i for i, t in self._heard.items() if now - t > self.lease_s}
        if gone:
            self._sessions = {s: e for s, e in self._sessions.items() if e.ingress not in gone}
            for ingress in gone:
                del self._heard[ingress]

"""SessionRegistry: the application-wide view of live sessions, for the overall session cap
and the per-device connection limit. `SessionLedger` is the logic, pure.

Ingress replicas admit through it, release, and re-sync their live sessions periodically: a sync
drops the replica's sessions whose release was lost and adds the ones the registry does not know.
So a registry lost with its node (Serve restarts it empty) is rebuilt by the next round of syncs
(`admission.sync_s`), and so is a session admitted unchecked while it was away. The sessions of a
replica that died without saying goodbye expire after `lease_s`. One replica, no model: its state
is a dict, so it must not be scaled out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ray import serve

from speech_serve.messages import Refusal
from speech_serve.settings import AdmissionSettings
from speech_serve.wire.codes import CLOSE_POLICY, CLOSE_TRY_AGAIN_LATER


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
    _released: dict[str, float] = field(default_factory=dict)  # session -> when its release came (for a lease)

    @property
    def live(self) -> int:
        return len(self._sessions)

    def admit(
        self, session_id: str, ingress: str, device: str | None, now: float, seq: int = 0,
        compute_cap: int | None = None,
    ) -> Refusal | None:  # fmt: skip
        """`compute_cap`: the sessions the model replicas serve in time, as the asking Ingress sees them."""
        self.expire(now)
        self._heard[ingress] = now
        cap = self.limits.max_sessions_total
        if cap is not None and len(self._sessions) >= cap:
            return Refusal("server_busy", f"the service holds its maximum of {cap} sessions; retry later",
                           CLOSE_TRY_AGAIN_LATER)  # fmt: skip
        if compute_cap is not None and len(self._sessions) >= compute_cap:
            return Refusal("server_busy", f"the speech models serve {compute_cap} sessions in time and hold them "
                           "all; retry later", CLOSE_TRY_AGAIN_LATER)  # fmt: skip
        per_device = self.limits.max_connections_per_device
        if device and per_device is not None:
            open_now = sum(e.device == device for e in self._sessions.values())
            if open_now >= per_device:
                return Refusal("too_many_connections", f"device {device!r} already has {open_now} open "
                               f"connection(s), the most allowed; close one first", CLOSE_POLICY)  # fmt: skip
        self._sessions[session_id] = _Entry(ingress, device, seq)
        return None

    def release(self, session_id: str, now: float) -> None:
        self._sessions.pop(session_id, None)
        self._released[session_id] = now  # a sync snapshotted before the release must not bring it back

    def sync(
        self, ingress: str, live: dict[str, str | None], now: float, upto_seq: int | None = None,
        pending: set[str] | frozenset[str] = frozenset(),
    ) -> None:  # fmt: skip
        """An ingress replica's admitted sessions (id -> device) as of its admission number
        `upto_seq`, and those whose admission is on its way (`pending`, kept but not counted:
        the admission may still be refused). Its others admitted up to then are forgotten (lost
        releases); a session admitted after the snapshot was taken may reach us before the
        snapshot does, and its higher number keeps it. Sessions we do not know are added: this
        registry restarted, or admitted them unchecked while it was away."""
        self._heard[ingress] = now
        stale = [s for s, e in self._sessions.items() if e.ingress == ingress and s not in live
                 and s not in pending and (upto_seq is None or e.seq <= upto_seq)]  # fmt: skip
        for sid in stale:
            del self._sessions[sid]
        for sid, device in live.items():
            if sid not in self._sessions and sid not in self._released:
                self._sessions[sid] = _Entry(ingress, device, upto_seq or 0)
        self.expire(now)

    def expire(self, now: float) -> None:
        """Forget the sessions of ingress replicas silent for longer than the lease (they died)."""
        gone = {i for i, t in self._heard.items() if now - t > self.lease_s}
        if gone:
            self._sessions = {s: e for s, e in self._sessions.items() if e.ingress not in gone}
            for ingress in gone:
                del self._heard[ingress]
        # a sync takes at most registry_timeout_s (well under the lease): none older is on its way
        self._released = {s: t for s, t in self._released.items() if now - t <= self.lease_s}


@serve.deployment  # its options: settings.DEFAULT_DEPLOYMENT_OPTIONS (one replica, 0 CPUs)
class SessionRegistry:
    def __init__(self, settings: AdmissionSettings):
        limits = Limits(settings.max_sessions_total, settings.max_connections_per_device)
        self._ledger = SessionLedger(limits, lease_s=settings.lease_s)

    def admit(
        self, session_id: str, ingress: str, device: str | None, seq: int = 0, compute_cap: int | None = None
    ) -> Refusal | None:
        return self._ledger.admit(session_id, ingress, device, time.monotonic(), seq, compute_cap)

    def release(self, session_id: str) -> None:
        self._ledger.release(session_id, time.monotonic())

    def live(self) -> int:
        """Sessions holding a slot now (tests check that a module leaves none behind)."""
        return self._ledger.live

    def sync(self, ingress: str, live: dict[str, str | None], upto_seq: int, pending: list[str]) -> int:
        """Returns the application's live sessions, for the ingress's log and metrics."""
        self._ledger.sync(ingress, live, time.monotonic(), upto_seq, frozenset(pending))
        return self._ledger.live

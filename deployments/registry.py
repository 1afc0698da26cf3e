"""SessionRegistry: the application-wide view of live sessions, for the overall session cap
and the per-device connection limit (`serve_app/admission.py` holds the logic).

One replica, no model: its state is a dict, so it must not be scaled out. If it is lost,
Serve restarts it empty; it undercounts until the sessions it forgot have ended.
"""

from __future__ import annotations

import time

from ray import serve

from serve_app.admission import Limits, Refusal, SessionLedger
from serve_app.settings import AdmissionSettings


@serve.deployment(num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0})
class SessionRegistry:
    def __init__(self, settings: AdmissionSettings):
        limits = Limits(settings.max_sessions_total, settings.max_connections_per_device)
        self._ledger = SessionLedger(limits, lease_s=settings.lease_s)

    def admit(self, session_id: str, ingress: str, device: str | None, seq: int = 0) -> Refusal | None:
        return self._ledger.admit(session_id, ingress, device, time.monotonic(), seq)

    def release(self, session_id: str) -> None:
        self._ledger.release(session_id)

    def live(self) -> int:
        """Sessions holding a slot now (tests check that a module leaves none behind)."""
        return self._ledger.live

    def sync(self, ingress: str, live: list[str], upto_seq: int) -> int:
        """Returns the application's live sessions, for the ingress's log and metrics."""
        self._ledger.sync(ingress, set(live), time.monotonic(), upto_seq)
        return self._ledger.live

"""Autoscaling policy for VADHost: replicas from live sessions, not from queued requests.

A VADHost call lasts a few milliseconds, so its request queue says little about load; the
number of sessions pinned to it does. Each replica reports `live_sessions` through
`record_autoscaling_stats()`; this policy sums them and asks for
ceil(sessions / sessions_per_replica) replicas. Serve then applies the deployment's
min/max replicas, up/down delays and scaling factors around the decision.
"""

from __future__ import annotations

import math
from typing import Any

from serve_app.routing import LIVE_SESSIONS_STAT


def replicas_for_sessions(live_sessions: float, sessions_per_replica: int) -> int:
    """At least one replica; one more for every `sessions_per_replica` sessions begun."""
    return max(1, math.ceil(live_sessions / sessions_per_replica))


class SessionsPolicy:
    """`autoscaling_config.policy: {policy_function: serve_app.autoscaling:SessionsPolicy,
    policy_kwargs: {sessions_per_replica: 50}}` (Ray 2.60 custom autoscaling policy)."""

    def __init__(self, sessions_per_replica: int = 50):
        if sessions_per_replica < 1:
            raise ValueError("sessions_per_replica must be at least 1")
        self.sessions_per_replica = sessions_per_replica

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        per_replica = (ctx.aggregated_metrics or {}).get(LIVE_SESSIONS_STAT)
        if not per_replica:  # no report yet (replicas starting): keep what we have
            return ctx.target_num_replicas, {}
        total = float(sum(per_replica.values()))
        return replicas_for_sessions(total, self.sessions_per_replica), {"live_sessions": total}

"""When to retry a call whose replica was lost, and when to give up: a pure clock.

A replica that dies mid-call (or is stopped by a scale-down) makes the call fail with
`RayActorError` / `ActorUnavailableError`; the call is safe to repeat. Where another replica
runs, Serve routes the retry there at once. Where the lost one was the only replica, the retry
waits in the handle's router until Serve has noticed the death (`health_check_period_s`) and
started a replacement (which reloads its model: seconds). `RetrySettings.deadline_s` bounds that
wait: counted from the first failure, it covers every retry and the waits between them.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from serve_app.settings import RetrySettings


class ReplicaLostError(RuntimeError):
    """A replica was lost and no other answered within the retry budget."""


class RetryClock:
    """The retries of one call. `failed()` after each failure says how long to wait before the
    next try, or None once the budget is spent; `remaining_s()` bounds a try after a failure."""

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

    def remaining_s(self) -> float | None:
        """Time the next try may take: None before any failure (a first try is never timed: it may
        queue behind other sessions' work under load), else what is left of the deadline."""
        if self._first_failure is None:
            return None
        return max(self.settings.deadline_s - (self._now() - self._first_failure), 0.0)

"""Per-session bounds on what one client can make the ingress do. Pure: the clock is injected."""

from __future__ import annotations

import time
from collections.abc import Callable


class SessionLimitExceeded(Exception):
    """The client went past a per-session bound; the session is closed with `code` (1008)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class TokenBucket:
    """`burst` events at once, then `rate_per_s` sustained."""

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate_per_s, self.burst = rate_per_s, burst
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def take(self) -> bool:
        """One event: True if within the bound (and counted), False if over it."""
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate_per_s)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

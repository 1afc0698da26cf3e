"""What one WebSocket client may send, for every protocol (`limits.*`), pure (the clock is injected):
frames per second, text frame size, control frames and audio pace. The connection's reader checks
each frame as it arrives; its frame loop paces audio before it goes to the stream."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from speech_serve.settings import LimitSettings
from speech_serve.wire.pcm import SAMPLE_RATE


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

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._at) * self.rate_per_s)
        self._at = now

    def take(self, cost: float = 1) -> bool:
        """One event of `cost` tokens: True if within the bound (and counted), False if over it."""
        self._refill()
        if self._tokens < cost:
            return False
        self._tokens -= cost
        return True

    def debit(self, cost: float) -> float:
        """Count `cost` tokens even past the bound; return the seconds to wait before going on so
        that the sustained rate holds (0 while within the burst)."""
        self._refill()
        self._tokens -= cost
        return max(0.0, -self._tokens / self.rate_per_s)


class SessionIntake:
    """What one WebSocket client may send, for every protocol (`limits.*`).

    Refused as frames arrive (`arrived`, before they are queued): more frames per second than
    `max_frames_per_s`, and text frames over `max_text_frame_bytes` (SessionLimitExceeded). Slowed,
    never refused (a client that sends a file faster than real time, as FunASR's own offline client
    does, is a client): audio past `max_audio_rate` x real time waits before it goes on (`audio_wait`).
    The rates are token buckets over `rate_window_s`. (Bytes received but not handled are the
    connection's own backpressure: `QueuedBytes` in connection.py.)
    """

    def __init__(self, limits: LimitSettings, clock: Callable[[], float] = time.monotonic,
                 max_text_bytes: int | None = None):  # fmt: skip
        """`max_text_bytes`: the text frame bound where it is not `limits.max_text_frame_bytes` (a
        protocol whose audio comes in text frames)."""
        window, rate = limits.rate_window_s, limits.max_audio_rate
        self.limits = limits
        self.max_text_bytes = max_text_bytes or limits.max_text_frame_bytes
        self._frames = TokenBucket(limits.max_frames_per_s, max(1, round(limits.max_frames_per_s * window)), clock)
        self._audio = None if rate is None else TokenBucket(rate * SAMPLE_RATE, round(rate * window * SAMPLE_RATE),
                                                            clock)  # fmt: skip
        self.paced_s = 0.0  # how long this session's audio was held back, in all

    def arrived(self, message: Mapping) -> None:
        """A frame just read from the socket, before it is queued."""
        limits, text, bound = self.limits, message.get("text"), self.max_text_bytes
        if text is not None and len(text) * 4 > bound:  # else it fits, whatever it holds
            size = len(text.encode("utf-8", "surrogatepass"))
            if size > bound:
                raise SessionLimitExceeded("frame_too_large", f"text frame of {size} bytes exceeds {bound}")
        if not self._frames.take():
            raise SessionLimitExceeded("too_many_messages", f"more than {limits.max_frames_per_s:g} frames per "
                                       f"second (over {limits.rate_window_s:g} s)")  # fmt: skip

    def audio_wait(self, samples: int) -> float:
        """16 kHz samples about to go to the stream: the seconds to hold them back first."""
        if self._audio is None:
            return 0.0
        wait = self._audio.debit(samples)
        self.paced_s += wait
        return wait

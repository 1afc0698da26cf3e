"""The audio every protocol ends up in: PCM16 little-endian mono at 16 kHz (every model here is a
16 kHz model). Times inside the service are milliseconds; `SAMPLES_PER_MS` converts."""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16000
SAMPLES_PER_MS = SAMPLE_RATE // 1000


class AudioFormatError(ValueError):
    """Audio the user sent cannot be used; the message says why."""


def pcm16_from_bytes(data: bytes) -> np.ndarray:
    if len(data) % 2:
        raise AudioFormatError(f"PCM16 frame has an odd length ({len(data)} bytes)")
    return np.frombuffer(data, dtype="<i2").astype(np.int16, copy=False)

"""PCM conversions and resampling. Inside the pipeline audio is int16 mono at 16 kHz."""

from __future__ import annotations

import io
from math import gcd

import numpy as np

from serve_app.settings import SAMPLE_RATE


class AudioFormatError(ValueError):
    """Audio the user sent cannot be used; the message says why."""


def pcm16_from_bytes(data: bytes) -> np.ndarray:
    if len(data) % 2:
        raise AudioFormatError(f"PCM16 frame has an odd length ({len(data)} bytes)")
    return np.frombuffer(data, dtype="<i2").astype(np.int16, copy=False)


def to_float32(pcm: np.ndarray) -> np.ndarray:
    """What funasr wants: float32 in [-1, 1]. Never hand it raw bytes (it sniffs them as MP3)."""
    return pcm.astype(np.float32) / 32768.0


def ms_to_samples(ms: int) -> int:
    return ms * SAMPLE_RATE // 1000


def samples_to_ms(n: int) -> int:
    return n * 1000 // SAMPLE_RATE


def resample(pcm: np.ndarray, from_rate: int, to_rate: int = SAMPLE_RATE) -> np.ndarray:
    if from_rate == to_rate:
        return pcm
    from scipy.signal import resample_poly

    g = gcd(from_rate, to_rate)
    out = resample_poly(pcm.astype(np.float32), to_rate // g, from_rate // g)
    return np.clip(np.round(out), -32768, 32767).astype(np.int16)


class StreamResampler:
    """Resample one live stream chunk by chunk to 16 kHz, with no clicks at chunk boundaries."""

    def __init__(self, rate: int):
        import soxr

        self._stream = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="int16") if rate != SAMPLE_RATE else None

    def __call__(self, pcm: np.ndarray, last: bool = False) -> np.ndarray:
        return pcm if self._stream is None else self._stream.resample_chunk(pcm, last=last)


def decode_file(data: bytes) -> tuple[np.ndarray, float]:
    """Decode an uploaded audio file (WAV, FLAC, OGG, MP3 via libsndfile) to 16 kHz int16 mono.

    Returns the PCM and the original duration in seconds.
    """
    import soundfile as sf

    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="int16", always_2d=True)
    except Exception as exc:  # libsndfile raises several types for unreadable input
        raise AudioFormatError(f"cannot decode the audio file: {exc}") from None
    if samples.shape[0] == 0:
        raise AudioFormatError("the audio file has no samples")
    mono = samples.mean(axis=1).astype(np.int16) if samples.shape[1] > 1 else samples[:, 0]
    return resample(mono, rate), samples.shape[0] / rate

"""Client audio in: PCM frames, streaming resampling to 16 kHz, and uploaded files."""

from __future__ import annotations

import io

import numpy as np

from serve_app.ingress.connection import ProtocolError
from serve_app.wire import SAMPLE_RATE, AudioFormatError, pcm16_from_bytes

SUPPORTED_RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)  # PCM streams (plain, FunASR)


def parse_audio(data: bytes, max_bytes: int) -> np.ndarray:
    """One binary frame of PCM16 (plain, FunASR)."""
    if len(data) > max_bytes:
        raise ProtocolError("frame_too_large", f"binary frame of {len(data)} bytes exceeds {max_bytes}")
    try:
        return pcm16_from_bytes(data)
    except AudioFormatError as exc:
        raise ProtocolError("bad_audio", str(exc)) from None


def resample(pcm: np.ndarray, from_rate: int, to_rate: int = SAMPLE_RATE) -> np.ndarray:
    """soxr: its cost is linear in the samples for any ratio (a polyphase filter's is not: a
    file claiming 1000003 Hz took seconds and ~1 GB of memory with scipy's resample_poly)."""
    if from_rate == to_rate:
        return pcm
    import soxr

    return soxr.resample(pcm.astype(np.int16, copy=False), from_rate, to_rate)


class StreamResampler:
    """Resample one live stream chunk by chunk to 16 kHz, with no clicks at chunk boundaries."""

    def __init__(self, rate: int):
        import soxr

        self._stream = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="int16") if rate != SAMPLE_RATE else None

    def __call__(self, pcm: np.ndarray, last: bool = False) -> np.ndarray:
        return pcm if self._stream is None else self._stream.resample_chunk(pcm, last=last)


class AudioTooLongError(AudioFormatError):
    """More audio than the caller accepts (HTTP 413)."""


_DECODE_BLOCK_FRAMES = 1 << 16  # frames per read: a header's rate or channel count cannot size one allocation


def decode_file(data: bytes, max_seconds: float) -> tuple[np.ndarray, float]:
    """Decode an uploaded audio file (WAV, FLAC, OGG, MP3 via libsndfile) to 16 kHz int16 mono.

    The length is checked while decoding, not after: a few kB of FLAC silence, or a WAV header
    claiming 1 Hz, holds hours of audio. AudioTooLongError past `max_seconds`.
    Returns the PCM and the original duration in seconds.
    """
    import soundfile as sf

    pieces, frames = [], 0
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate, limit = f.samplerate, int(max_seconds * f.samplerate)
            for block in f.blocks(_DECODE_BLOCK_FRAMES, dtype="int16", always_2d=True):
                frames += len(block)
                if frames > limit:
                    raise AudioTooLongError(f"the audio file is longer than {max_seconds:g} s")
                pieces.append(block.mean(axis=1).astype(np.int16) if block.shape[1] > 1 else block[:, 0].copy())
    except AudioFormatError:
        raise
    except Exception as exc:  # libsndfile raises several types for unreadable input
        raise AudioFormatError(f"cannot decode the audio file: {exc}") from None
    if frames == 0:
        raise AudioFormatError("the audio file has no samples")
    pcm = resample(np.concatenate(pieces), rate)
    if len(pcm) == 0:
        raise AudioFormatError(f"the audio file is shorter than one sample at {SAMPLE_RATE} Hz")
    return pcm, frames / rate

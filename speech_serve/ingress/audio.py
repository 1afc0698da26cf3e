"""Client audio in: PCM frames, streaming resampling to 16 kHz, and uploaded files."""

from __future__ import annotations

import io

import numpy as np

from speech_serve.ingress.protocols.parsing import ProtocolError
from speech_serve.wire.pcm import SAMPLE_RATE, AudioFormatError, pcm16_from_bytes

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


# ---- G.711 (telephony: 8 kHz, one byte a sample) -------------------------------------------------
# Table decoders (ITU-T G.711), so nothing depends on `audioop` (deprecated in 3.11, gone in 3.13).


def _ulaw_sample(code: int) -> int:
    code = ~code & 0xFF
    magnitude = ((((code & 0x0F) << 3) + 0x84) << ((code >> 4) & 0x07)) - 0x84
    return -magnitude if code & 0x80 else magnitude


def _alaw_sample(code: int) -> int:
    code ^= 0x55
    exponent, mantissa = (code >> 4) & 0x07, code & 0x0F
    magnitude = (mantissa << 4) + 8 if exponent == 0 else ((mantissa << 4) + 0x108) << (exponent - 1)
    return magnitude if code & 0x80 else -magnitude


ULAW_TABLE = np.array([_ulaw_sample(c) for c in range(256)], dtype=np.int16)
ALAW_TABLE = np.array([_alaw_sample(c) for c in range(256)], dtype=np.int16)
G711_RATE = 8000


def ulaw_to_pcm16(data: bytes) -> np.ndarray:
    """G.711 mu-law bytes -> int16 samples (8 kHz, as they came)."""
    return ULAW_TABLE[np.frombuffer(data, dtype=np.uint8)]


def alaw_to_pcm16(data: bytes) -> np.ndarray:
    """G.711 A-law bytes -> int16 samples (8 kHz, as they came)."""
    return ALAW_TABLE[np.frombuffer(data, dtype=np.uint8)]


class AudioTooLongError(AudioFormatError):
    """More audio than the caller accepts (HTTP 413)."""


_DECODE_BLOCK_SAMPLES = 1 << 16  # per read, all channels: no header field (rate, channels) sizes an allocation
MAX_FILE_RATE = max(SUPPORTED_RATES)  # what a live stream may use; files default to the same


READABLE = "WAV, FLAC, OGG Vorbis/Opus, MP3 and the other formats libsndfile reads"


def decode_file(data: bytes, max_seconds: float, max_rate: int = MAX_FILE_RATE) -> tuple[np.ndarray, float]:
    """Decode an uploaded audio file (WAV, FLAC, OGG, MP3 via libsndfile) to 16 kHz int16 mono.

    Bounded by what the header says and by what is decoded, never by the file's size: a few kB of
    FLAC silence, or a WAV header claiming 1 Hz, holds hours of audio. A rate above `max_rate` is
    refused before decoding (a FLAC header may claim 655350 Hz); the length is checked block by
    block (AudioTooLongError past `max_seconds`); each block is resampled as it is read, so only
    16 kHz audio is kept (at most `max_seconds` x 16000 samples). CPU-bound: call it off the
    event loop. Returns the PCM and the original duration in seconds.
    """
    import soundfile as sf
    import soxr

    pieces, frames = [], 0
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate, channels = f.samplerate, f.channels
            if rate > max_rate:
                raise AudioFormatError(f"sample rate {rate} Hz is not supported: at most {max_rate} Hz")
            limit = int(max_seconds * rate)
            stream = soxr.ResampleStream(rate, SAMPLE_RATE, 1, dtype="int16") if rate != SAMPLE_RATE else None
            for block in f.blocks(max(1, _DECODE_BLOCK_SAMPLES // channels), dtype="int16", always_2d=True):
                frames += len(block)
                if frames > limit:
                    raise AudioTooLongError(f"the audio file is longer than {max_seconds:g} s")
                mono = block.mean(axis=1).astype(np.int16) if channels > 1 else block[:, 0].copy()
                pieces.append(mono if stream is None else stream.resample_chunk(mono))
            if stream is not None:
                pieces.append(stream.resample_chunk(np.zeros(0, dtype=np.int16), last=True))
    except AudioFormatError:
        raise
    except Exception:  # libsndfile raises several types for unreadable input; its text names our internals
        raise AudioFormatError(f"cannot decode the audio file: not a format this server reads ({READABLE})") from None
    if frames == 0:
        raise AudioFormatError("the audio file has no samples")
    pcm = np.concatenate(pieces)
    if len(pcm) == 0:
        raise AudioFormatError(f"the audio file is shorter than one sample at {SAMPLE_RATE} Hz")
    return pcm, frames / rate

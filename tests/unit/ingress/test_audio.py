"""Client audio in (audio.py): uploaded files decoded within their bounds, resampling."""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
import pytest
import soundfile as sf

from speech_serve.ingress.audio import AudioTooLongError, StreamResampler, decode_file, resample
from speech_serve.wire.pcm import AudioFormatError

FLAC_MAX_RATE = 655_350  # the highest rate a FLAC header can state: the measured bomb's


def flac_silence(rate: int, seconds: float, channels: int = 1) -> bytes:
    out = io.BytesIO()
    sf.write(out, np.zeros((int(rate * seconds), channels), dtype=np.int16), rate, format="FLAC")
    return out.getvalue()


def test_a_file_above_48_khz_is_refused_with_a_clear_message():
    data = flac_silence(FLAC_MAX_RATE, 2.0)  # 1.3 M samples of silence in a few kB
    assert len(data) < 100_000
    with pytest.raises(AudioFormatError, match=r"655350 Hz.*at most 48000 Hz"):
        decode_file(data, max_seconds=1800)


def test_decoding_keeps_16_khz_audio_not_the_files_own_rate():
    """A minute of 48 kHz stereo: the decoder's peak memory is a small multiple of its 16 kHz
    output, not of the 48 kHz stereo input (which is 6x larger)."""
    data = flac_silence(48_000, 60.0, channels=2)
    tracemalloc.start()
    try:
        pcm, duration_s = decode_file(data, max_seconds=1800)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    out_bytes = pcm.nbytes
    assert duration_s == pytest.approx(60.0) and abs(len(pcm) - 60 * 16_000) <= 16
    input_bytes = 48_000 * 60 * 2 * 2
    assert peak < 3 * out_bytes + 2_000_000 < input_bytes, (peak, out_bytes)


def test_decode_file_resamples_to_16k(tmp_path):
    import soundfile as sf

    t = np.arange(48000) / 48000
    path = tmp_path / "tone.wav"
    sf.write(path, (0.5 * np.sin(2 * np.pi * 440 * t) * 32767).astype(np.int16), 48000)
    pcm, duration = decode_file(path.read_bytes(), max_seconds=60)
    assert duration == pytest.approx(1.0) and abs(len(pcm) - 16000) <= 2 and pcm.dtype == np.int16
    with pytest.raises(AudioFormatError) as bad:
        decode_file(b"this is not audio", max_seconds=60)
    # the library's own text ("Error opening <_io.BytesIO object at 0x...>: Format not recognised") is not echoed
    assert "BytesIO" not in str(bad.value) and "0x" not in str(bad.value) and "WAV, FLAC" in str(bad.value)
    with pytest.raises(AudioTooLongError, match="longer than 0.5 s"):
        decode_file(path.read_bytes(), max_seconds=0.5)


def test_resample_identity_and_ratio():
    pcm = np.zeros(800, dtype=np.int16)
    assert resample(pcm, 16000) is pcm
    assert len(resample(pcm, 8000)) == 1600


def test_stream_resampler_keeps_length_across_chunks():
    t = np.arange(48000 * 2) / 48000
    tone = (0.3 * np.sin(2 * np.pi * 300 * t) * 32767).astype(np.int16)
    rs = StreamResampler(48000)
    out = [rs(tone[i : i + 2880]) for i in range(0, len(tone), 2880)]  # 60 ms frames
    out.append(rs(np.zeros(0, dtype=np.int16), last=True))
    joined = np.concatenate(out)
    assert abs(len(joined) - 32000) <= 2 and joined.dtype == np.int16
    # a clean 300 Hz tone, no clicks at frame boundaries: the biggest sample step stays small
    assert np.abs(np.diff(joined[200:-200].astype(np.int32))).max() < 0.15 * 32767
    passthrough = StreamResampler(16000)
    assert passthrough(tone[:10]) is not None and len(passthrough(tone[:10])) == 10

"""PCM16 at 16 kHz -> Opus packets, as a device sends them (simulators, load tests, tests).

PyAV (FFmpeg's libopus, bundled in the PyPI wheel: nothing to install from the OS) is used
rather than opuslib, which needs the system's libopus through ctypes. The server's decoder is
in speech_serve/ingress/xiaozhi.py.
"""

from __future__ import annotations

import av
import numpy as np

from speech_serve.wire.pcm import SAMPLE_RATE

OPUS_RATES = (8000, 12000, 16000, 24000, 48000)  # what an Opus stream may declare
OPUS_FRAME_MS = (10, 20, 40, 60, 80, 100, 120)


class OpusEncoder:
    """For device simulators and tests: PCM16 16 kHz mono -> Opus packets of `frame_ms`."""

    def __init__(self, frame_ms: int = 60, bitrate: int = 24000) -> None:
        codec = av.CodecContext.create("libopus", "w")
        codec.sample_rate, codec.layout, codec.format, codec.bit_rate = SAMPLE_RATE, "mono", "s16", bitrate
        codec.options = {"frame_duration": str(frame_ms), "application": "voip"}
        codec.open()
        self._codec = codec
        self.frame_samples = SAMPLE_RATE * frame_ms // 1000
        self._pts = 0

    def encode(self, pcm: np.ndarray) -> list[bytes]:
        """Encode exactly one frame of `frame_samples` (pad the last one yourself)."""
        frame = av.AudioFrame.from_ndarray(pcm.astype(np.int16).reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate, frame.pts = SAMPLE_RATE, self._pts
        self._pts += len(pcm)
        return [bytes(p) for p in self._codec.encode(frame)]

    def flush(self) -> list[bytes]:
        return [bytes(p) for p in self._codec.encode(None)]


def encode_pcm(pcm: np.ndarray, frame_ms: int = 60) -> list[bytes]:
    """A whole clip as Opus packets, the last frame padded with silence."""
    enc = OpusEncoder(frame_ms)
    n = enc.frame_samples
    padded = np.concatenate([pcm, np.zeros((-len(pcm)) % n, dtype=np.int16)])
    packets = [p for i in range(0, len(padded), n) for p in enc.encode(padded[i : i + n])]
    return packets + enc.flush()

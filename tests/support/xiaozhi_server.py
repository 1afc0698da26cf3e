"""xiaozhi-esp32-server's FunASR-server ASR provider (vendored unchanged in tests/vendor/xiaozhi_server/)
and what that server's connection does around it: its per-connection state, its Opus decoding, its ASR
thread, and a VAD playing Silero's part."""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import queue
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from speech_serve.ingress.protocols.xiaozhi import OpusDecoder

VENDOR = Path(__file__).parents[1] / "vendor" / "xiaozhi_server"
PINNED_COMMIT = "7475ea2b2db6825551daf7be18ab610b8a237cc3"
PROVIDER = "core/providers/asr/fun_server.py"
# path -> (git blob id at PINNED_COMMIT, sha256): the files vendored byte for byte (README.md there)
UNCHANGED = {
    PROVIDER: (
        "d577a18e14fb1e3d01d2669b5fd3271256643be7",
        "0032c7f246ec8a44890b8283c3a7a32d8ec208fd73efe9b5bad597f246446fd3",
    ),
    "core/providers/asr/base.py": (
        "dcfaf3a741675ee8baa2310cab6d57f41e21d3e8",
        "929532c379d18598eff6fbecb991089f25a0c62cd77f74a25a0d1a5b8d13a713",
    ),
    "core/providers/asr/utils.py": (
        "d1f538aeba09d6f24a70df104f3fb66defdfee71",
        "64db7ba4523d494b27e8b25bd84261ec1fcfee6816b4720d84776cda4e7cedcf",
    ),
    "core/providers/asr/dto/dto.py": (
        "85b2d7b211afbfc29af6dcb277dcbf1176309b97",
        "15d2155dbffbd1968aa78977b6c327048d08162825d2632369d59523a6335c79",
    ),
    "LICENSE": (
        "579a3d73c800727f6aef79322f126226c2937a49",
        "65e7d56732b4b42f2efcd0cba4d199d153b3faa9cc6def8bfad90f0d8193d273",
    ),
}
FRAME_SAMPLES = 960  # upstream: opuslib_next.Decoder(16000, 1).decode(packet, 960), one 60 ms frame


def git_blob_id(data: bytes) -> str:
    """What `git hash-object` says: anyone can compare it with `git ls-tree <commit> <path>` upstream."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def provider_class():
    """The vendored `ASRProvider` (`type: fun_server`), imported as the server imports it: from its own
    working directory, where its modules are `core...` and `config...`."""
    if str(VENDOR) not in sys.path:
        sys.path.insert(0, str(VENDOR))
    return importlib.import_module("core.providers.asr.fun_server").ASRProvider


def pcm_frames(packets: list[bytes]) -> list[bytes]:
    """The connection's `_decode_opus_packet`: one 960-sample PCM16 frame per Opus packet. Upstream uses
    opuslib_next (the system's libopus at 16 kHz); this decodes with the service's own decoder (PyAV's
    libopus, resampled to 16 kHz) and cuts the same frames, so no OS package is needed."""
    decoder = OpusDecoder()
    pcm = np.concatenate([decoder.decode(p) for p in packets])
    return [pcm[i : i + FRAME_SAMPLES].tobytes() for i in range(0, len(pcm) - FRAME_SAMPLES + 1, FRAME_SAMPLES)]


class FixtureVad:
    """Plays Silero's part (upstream core/providers/vad/silero.py needs onnxruntime and its model): the
    frames inside `speech_ms` hold voice, and the connection's voice and stop flags are set as Silero's
    `is_vad` sets them, after `silence_ms` without voice (config.yaml's min_silence_duration_ms). Stream
    time, not wall time, so frames may come faster than real time."""

    def __init__(self, speech_ms: list[tuple[int, int]], silence_ms: int = 200):
        self.speech_ms, self.silence_ms = speech_ms, silence_ms

    def is_vad(self, conn: ServerConnection, pcm_frame: bytes) -> bool:
        start = conn.stream_ms
        conn.stream_ms += len(pcm_frame) // 32  # bytes of 16 kHz PCM16 per ms
        voice = any(a < conn.stream_ms and start < b for a, b in self.speech_ms)
        if conn.client_have_voice and not voice and conn.stream_ms - conn.last_voice_ms >= self.silence_ms:
            conn.client_voice_stop = True
        if voice:
            conn.client_have_voice, conn.last_voice_ms = True, conn.stream_ms
        return voice


class ServerConnection:
    """What the provider, its base class and the shims read and write on upstream's ConnectionHandler
    (core/connection.py), for a device in `auto` listen mode with no voiceprint provider."""

    def __init__(self, asr, vad: FixtureVad, loop: asyncio.AbstractEventLoop):
        self.asr, self.vad, self.loop = asr, vad, loop
        self.session_id = str(uuid.uuid4())
        self.client_listen_mode = "auto"
        self.voiceprint_provider = None
        self.stop_event = threading.Event()
        self.asr_audio: list[bytes] = []
        self.asr_audio_queue: queue.Queue[bytes] = queue.Queue()
        self.report_queue: queue.Queue[tuple] = queue.Queue()  # (type, text, audio frames, time ms)
        self.client_have_voice = self.client_voice_stop = False
        self.stream_ms = self.last_voice_ms = 0
        self.chat_inputs: list = []  # what startToChat got: the text the LLM would be asked
        self.frames_handled = 0

    def reset_audio_states(self) -> None:
        self.client_have_voice = self.client_voice_stop = False
        self.asr_audio.clear()

    def reports(self) -> list[tuple]:
        return [self.report_queue.get_nowait() for _ in range(self.report_queue.qsize())]


async def run_connection(provider, packets: list[bytes], vad: FixtureVad, timeout_s: float = 120) -> ServerConnection:
    """A device's Opus packets through the server's path: decoded at the connection's entry, queued,
    and taken one frame at a time by the provider's own ASR thread (`open_audio_channels`), which runs
    handleAudioMessage on this loop: VAD, `receive_audio`, and at each voice stop the provider's
    `speech_to_text` over a WebSocket of its own. The timeout is a hang guard."""
    conn = ServerConnection(provider, vad, asyncio.get_running_loop())
    await provider.open_audio_channels(conn)
    frames = pcm_frames(packets)
    for frame in frames:
        conn.asr_audio_queue.put(frame)
    deadline = time.monotonic() + timeout_s
    try:
        while conn.frames_handled < len(frames):
            assert time.monotonic() < deadline, f"{conn.frames_handled} of {len(frames)} frames handled in {timeout_s}s"
            await asyncio.sleep(0.05)
    finally:
        conn.stop_event.set()
        await asyncio.to_thread(conn.asr_priority_thread.join, 5)
    return conn

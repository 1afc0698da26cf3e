"""The Xiaozhi device protocol (78/xiaozhi-esp32 firmware, xiaozhi-esp32-server) at `/xiaozhi/v1/`:
pure parsing and rendering, the Opus decoder, then the connection.

Connection: headers (or query parameters for browsers) Authorization, Protocol-Version,
Device-Id, Client-Id (the token may also come as the `token` query parameter; the credentials
are read by the one parser every protocol uses, `auth.device_credentials`). Then JSON
control frames (`hello`, `listen`, `abort`) and binary Opus packets; Protocol-Version 2 and 3
put a small header before each packet (speech_serve/wire/xiaozhi.py).
Order of business: connection parameters and authentication first (a refused device gets an
error frame and close 1008, before any session or model work), then `hello`, then Opus audio
and `listen` / `abort` control. We answer `hello` and one `stt` per utterance, with our extra
fields beside `text`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import av
import numpy as np
import soxr

from speech_serve.ingress.connection import Connection
from speech_serve.ingress.protocols.parsing import (
    DEFAULT_LIMITS,
    ProtocolError,
    brief,
    hotword_list,
    json_object,
    text_field,
    whole_number,
)
from speech_serve.ingress.stream import RecognitionOptions
from speech_serve.messages import UtteranceResult
from speech_serve.settings import LimitSettings, XiaozhiSettings
from speech_serve.wire.opus import OPUS_FRAME_MS, OPUS_RATES
from speech_serve.wire.pcm import SAMPLE_RATE, AudioFormatError
from speech_serve.wire.xiaozhi import TYPE_JSON, TYPE_OPUS, V2_HEADER, V3_HEADER

logger = logging.getLogger("ray.serve")
LISTEN_MODES = ("auto", "manual", "realtime")


@dataclass(frozen=True)
class ConnectParams:
    """What the connection says about its framing. Its credentials are not here: they are read
    once, by `Connection.credentials()`, as on every other device path."""

    protocol_version: int


def connect_params(headers: Mapping[str, str], query: Mapping[str, str]) -> ConnectParams:
    """Headers win; browsers, which cannot set headers, use query parameters."""
    version_text = headers.get("protocol-version") or query.get("protocol-version") or "1"
    if version_text not in ("1", "2", "3"):
        message = f"Protocol-Version {brief(version_text)} not supported; use 1, 2 or 3"
        raise ProtocolError("bad_protocol_version", message)
    return ConnectParams(int(version_text))


@dataclass(frozen=True)
class Hello:
    audio_format: str = "opus"
    sample_rate: int = 16000
    channels: int = 1
    frame_duration: int = 60
    features: dict[str, Any] = field(default_factory=dict)
    hotwords: tuple[tuple[str, float], ...] = ()  # ours, beside the firmware's fields
    words: bool = False  # word times and confidences in every stt


@dataclass(frozen=True)
class Listen:
    state: Literal["start", "stop", "detect"]
    mode: str = "auto"
    text: str = ""


@dataclass(frozen=True)
class Abort:
    reason: str = ""


@dataclass(frozen=True)
class Ignored:
    """A message type devices send that needs no answer from a speech front-end (mcp, iot, goodbye)."""

    kind: str


ControlMessage = Hello | Listen | Abort | Ignored
KNOWN_IGNORED = ("mcp", "iot", "goodbye", "ping")


def parse_text(text: str, max_string_chars: int | None = None, limits: LimitSettings | None = None) -> ControlMessage:
    """`limits`: the hello's hotwords' bounds."""
    data = json_object(text, max_string_chars)
    kind = data.get("type")
    if kind == "hello":
        return _parse_hello(data, limits or DEFAULT_LIMITS)
    if kind == "listen":
        state = data.get("state")
        if state not in ("start", "stop", "detect"):
            raise ProtocolError("bad_message", f"listen state {brief(state)}; expected start, stop or detect")
        mode = data.get("mode", "auto")
        if mode not in LISTEN_MODES:
            raise ProtocolError("bad_message", f"listen mode {brief(mode)}; expected one of {LISTEN_MODES}")
        return Listen(state=state, mode=mode, text=text_field(data, "text"))
    if kind == "abort":
        return Abort(reason=text_field(data, "reason"))
    if kind in KNOWN_IGNORED:
        return Ignored(kind)
    raise ProtocolError("unknown_type", f"unknown message type {brief(kind)}")


def _parse_hello(data: dict[str, Any], limits: LimitSettings) -> Hello:
    params = data.get("audio_params") or {}
    if not isinstance(params, dict):
        raise ProtocolError("bad_message", "audio_params must be an object")
    audio_format = params.get("format", "opus")
    if audio_format != "opus":
        raise ProtocolError("unsupported_audio", f"audio format {brief(audio_format)} not supported; send opus")
    rate = whole_number(params.get("sample_rate", 16000))
    channels = whole_number(params.get("channels", 1))
    frame_ms = whole_number(params.get("frame_duration", 60))
    if rate not in OPUS_RATES:
        given = brief(params.get("sample_rate"))
        raise ProtocolError("unsupported_audio", f"sample_rate {given} not an Opus rate {OPUS_RATES}")
    if channels != 1:
        raise ProtocolError("unsupported_audio", f"channels {brief(params.get('channels'))}; send mono")
    if frame_ms not in OPUS_FRAME_MS:
        given = brief(params.get("frame_duration"))
        raise ProtocolError("unsupported_audio", f"frame_duration {given} not in {OPUS_FRAME_MS}")
    features, words = data.get("features"), data.get("words", False)
    if not isinstance(words, bool):
        raise ProtocolError("bad_message", "words must be a boolean")
    return Hello("opus", rate, channels, frame_ms, features if isinstance(features, dict) else {},
                 hotword_list(data.get("hotwords"), limits), words)  # fmt: skip


@dataclass(frozen=True)
class BinaryFrame:
    kind: Literal["opus", "json"]
    payload: bytes


def parse_binary(data: bytes, protocol_version: int, max_bytes: int) -> BinaryFrame:
    """Strip the Protocol-Version 2/3 header; version 1 frames are bare Opus packets."""
    if len(data) > max_bytes:
        raise ProtocolError("frame_too_large", f"binary frame of {len(data)} bytes exceeds {max_bytes}")
    if protocol_version == 1:
        kind, payload = TYPE_OPUS, data
    else:
        header = V2_HEADER if protocol_version == 2 else V3_HEADER
        if len(data) < header.size:
            raise ProtocolError("bad_frame", f"frame shorter than the v{protocol_version} header ({header.size} bytes)")
        fields = header.unpack_from(data)
        kind, size = (fields[1], fields[4]) if protocol_version == 2 else (fields[0], fields[2])
        payload = data[header.size :]
        if size != len(payload):
            raise ProtocolError("bad_frame", f"header says {size} payload bytes, frame carries {len(payload)}")
    if kind == TYPE_OPUS:
        return BinaryFrame("opus", payload)
    if kind == TYPE_JSON:
        return BinaryFrame("json", payload)
    raise ProtocolError("bad_frame", f"unknown binary frame type {kind}")


def render_hello(session_id: str, audio_params: dict[str, Any]) -> str:
    return json.dumps(
        {"type": "hello", "transport": "websocket", "session_id": session_id, "audio_params": audio_params}
    )


def render_stt(session_id: str, result: UtteranceResult) -> str:
    """`text` as devices show it; the rest rides along (devices ignore unknown fields)."""
    body = {
        "session_id": session_id, "type": "stt", "text": result.text,
        "index": result.index, "language": result.language, "emotion": result.emotion, "event": result.event,
        "start_ms": result.start_ms, "end_ms": result.end_ms,
        "speaker": result.speaker.fields(),
        "models": result.models, "latency_ms": result.latency_ms,
    }  # fmt: skip
    return json.dumps(body | result.word_fields(), ensure_ascii=False)  # words: the hello asked, or hotwords


def render_error(session_id: str | None, code: str, message: str) -> str:
    return json.dumps({"session_id": session_id, "type": "error", "code": code, "message": message})


# ---- Opus in ---------------------------------------------------------------------------------
# PyAV (FFmpeg's libopus, bundled in the PyPI wheel) rather than opuslib, which needs the
# system's libopus. FFmpeg's Opus decoder always outputs 48 kHz; a streaming soxr resampler
# brings it to 16 kHz without clicks (as audio.StreamResampler does for the PCM protocols).


class OpusDecoder:
    def __init__(self) -> None:
        self._codec = av.CodecContext.create("libopus", "r")
        self._codec.layout = "mono"
        self._resample: soxr.ResampleStream | None = None
        self.packets = 0

    def decode(self, packet: bytes) -> np.ndarray:
        """One Opus packet -> int16 mono at 16 kHz. Raises AudioFormatError on garbage."""
        if not packet:
            raise AudioFormatError("empty Opus packet")
        try:
            frames = self._codec.decode(av.Packet(packet))
        except av.error.FFmpegError as exc:
            raise AudioFormatError(f"not a valid Opus packet ({exc.strerror or type(exc).__name__})") from None
        out = []
        for frame in frames:
            pcm = frame.to_ndarray()
            if pcm.dtype != np.int16:  # float planar from some builds
                pcm = np.clip(pcm * 32768.0, -32768, 32767).astype(np.int16)
            if self._resample is None:
                self._resample = soxr.ResampleStream(frame.sample_rate, SAMPLE_RATE, 1, dtype="int16")
            out.append(self._resample.resample_chunk(pcm.reshape(-1)))
        self.packets += 1
        return np.concatenate(out) if out else np.zeros(0, dtype=np.int16)


# ---- the connection -------------------------------------------------------------------------


class XiaozhiConnection(Connection):
    protocol = "xiaozhi"

    def __init__(self, ws, session_id: str, streams, limits, metrics, settings: XiaozhiSettings):
        super().__init__(ws, session_id, streams, limits, metrics)
        self.settings = settings
        self.params: ConnectParams | None = None
        self.decoder: OpusDecoder | None = None
        self.bad_packets = 0

    def render_error(self, code: str, message: str) -> str:
        return render_error(self.session_id, code, message)

    async def authenticate(self, auth) -> bool:
        return await self._connect() and await super().authenticate(auth)

    async def _connect(self) -> bool:
        """The connection parameters (Protocol-Version first). False if closed."""
        try:
            self.params = connect_params(self.ws.headers, self.ws.query_params)
        except ProtocolError as exc:
            return await self.answer(exc)
        return True

    async def open(self) -> bool:
        """Until the device's hello: answer it, or explain what is missing. False if closed."""
        if self.params is None and not await self._connect():
            return False
        timeout = self.settings.hello_timeout_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                message = await self.receive(timeout_s=max(deadline - loop.time(), 0.001))
            except TimeoutError:
                return await self.answer(ProtocolError("hello_timeout", f"no hello within {timeout:g} s"))
            try:
                if message.get("text") is None:
                    raise ProtocolError("hello_required", "send hello before audio")
                parsed = parse_text(message["text"], self.limits.max_field_chars, self.limits)
                if not isinstance(parsed, Hello):
                    raise ProtocolError("hello_required", "send hello before anything else")
            except ProtocolError as exc:
                if not await self.answer(exc):
                    return False
                continue
            await self.send(render_hello(self.session_id, self.settings.hello_audio_params))
            self.decoder = OpusDecoder()
            # a device's household: its own group (mapped by security.device_groups, else its id)
            self.start_stream(RecognitionOptions(speaker_group=self.speaker_group(None, self.identity.group),
                                                 hotwords=parsed.hotwords, words=parsed.words))  # fmt: skip
            logger.info("xiaozhi session %s: device %s, protocol v%d, %s Hz opus %d ms frames",
                        self.session_id, self.identity.device_id, self.params.protocol_version,
                        parsed.sample_rate, parsed.frame_duration)  # fmt: skip
            return True

    async def on_frame(self, message: dict) -> bool:
        if message.get("bytes") is None:
            await self._control(parse_text(message.get("text") or "", self.limits.max_field_chars))
            return True
        frame = parse_binary(message["bytes"], self.params.protocol_version, self.limits.max_frame_bytes)
        if frame.kind == "json":
            self.count_control()
            await self._control(
                parse_text(frame.payload.decode("utf-8", errors="replace"), self.limits.max_field_chars)
            )
            return True
        try:
            pcm = self.decoder.decode(frame.payload)
        except AudioFormatError as exc:  # one bad packet: dropped and reported, the session goes on
            self.bad_packets += 1
            await self.report(ProtocolError("bad_audio", f"{exc}; packet dropped"))
            return True
        await self.push_audio(pcm)
        return True

    async def _control(self, message: ControlMessage) -> None:
        stream = self.stream
        if isinstance(message, Listen):
            if message.state == "start":
                if message.mode == "manual":
                    await stream.begin_utterance()
                else:
                    await stream.use_vad()
            elif message.state == "stop":
                await stream.end_utterance()
            else:  # detect: the device heard its wake word; nothing to transcribe yet
                logger.info("xiaozhi session %s: wake word %r", self.session_id, message.text)
        elif isinstance(message, Abort):
            await stream.abort()
        elif isinstance(message, Hello):
            await self.send(render_hello(self.session_id, self.settings.hello_audio_params))

    def render_result(self, result: UtteranceResult) -> str:
        return render_stt(self.session_id, result)

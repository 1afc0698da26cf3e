"""The Xiaozhi device protocol (78/xiaozhi-esp32 firmware, xiaozhi-esp32-server): pure adapter.

Connection: headers (or query parameters for browsers) Authorization, Protocol-Version,
Device-Id, Client-Id (the token may also come as the `token` query parameter). Then JSON
control frames (`hello`, `listen`, `abort`) and binary Opus packets; Protocol-Version 2 and 3
put a small header before each packet.
We answer `hello` and one `stt` per utterance, with our extra fields beside `text`.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from serve_app.messages import UtteranceResult
from serve_app.opus import OPUS_FRAME_MS, OPUS_RATES
from serve_app.protocols.errors import ProtocolError, brief, json_object, whole_number

V2_HEADER = struct.Struct(">HHIII")  # version, type, reserved, timestamp_ms, payload_size
V3_HEADER = struct.Struct(">BBH")  # type, reserved, payload_size
V3_MAX_PAYLOAD = 2**16 - 1
TYPE_OPUS, TYPE_JSON = 0, 1
LISTEN_MODES = ("auto", "manual", "realtime")


@dataclass(frozen=True)
class ConnectParams:
    device_id: str | None
    client_id: str | None
    protocol_version: int
    authorization: str | None


def connect_params(headers: Mapping[str, str], query: Mapping[str, str]) -> ConnectParams:
    """Headers win; browsers, which cannot set headers, use query parameters."""

    def get(header: str, param: str) -> str | None:
        return headers.get(header) or query.get(param) or None

    version_text = get("protocol-version", "protocol-version") or "1"
    if version_text not in ("1", "2", "3"):
        message = f"Protocol-Version {brief(version_text)} not supported; use 1, 2 or 3"
        raise ProtocolError("bad_protocol_version", message)
    return ConnectParams(
        device_id=get("device-id", "device-id"),
        client_id=get("client-id", "client-id"),
        protocol_version=int(version_text),
        authorization=get("authorization", "authorization") or query.get("token") or None,
    )


@dataclass(frozen=True)
class Hello:
    audio_format: str = "opus"
    sample_rate: int = 16000
    channels: int = 1
    frame_duration: int = 60
    features: dict[str, Any] = field(default_factory=dict)


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


def parse_text(text: str) -> ControlMessage:
    data = json_object(text)
    kind = data.get("type")
    if kind == "hello":
        return _parse_hello(data)
    if kind == "listen":
        state = data.get("state")
        if state not in ("start", "stop", "detect"):
            raise ProtocolError("bad_message", f"listen state {brief(state)}; expected start, stop or detect")
        mode = data.get("mode", "auto")
        if mode not in LISTEN_MODES:
            raise ProtocolError("bad_message", f"listen mode {brief(mode)}; expected one of {LISTEN_MODES}")
        return Listen(state=state, mode=mode, text=str(data.get("text", "")))
    if kind == "abort":
        return Abort(reason=str(data.get("reason", "")))
    if kind in KNOWN_IGNORED:
        return Ignored(kind)
    raise ProtocolError("unknown_type", f"unknown message type {brief(kind)}")


def _parse_hello(data: dict[str, Any]) -> Hello:
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
    features = data.get("features")
    return Hello("opus", rate, channels, frame_ms, features if isinstance(features, dict) else {})


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


def frame_audio(packet: bytes, protocol_version: int, timestamp_ms: int = 0) -> bytes:
    """The other way round, for device simulators. The v2 timestamp wraps at 2**32 ms as a
    device's 32-bit clock does; a v3 header cannot state more than 65535 payload bytes."""
    if protocol_version == 2:
        return V2_HEADER.pack(2, TYPE_OPUS, 0, timestamp_ms % 2**32, len(packet)) + packet
    if protocol_version == 3:
        if len(packet) > V3_MAX_PAYLOAD:
            raise ValueError(f"a v3 frame carries at most {V3_MAX_PAYLOAD} bytes, not {len(packet)}")
        return V3_HEADER.pack(TYPE_OPUS, 0, len(packet)) + packet
    return packet


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
    return json.dumps(body, ensure_ascii=False)


def render_error(session_id: str | None, code: str, message: str) -> str:
    return json.dumps({"session_id": session_id, "type": "error", "code": code, "message": message})

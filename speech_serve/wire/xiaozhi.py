"""Xiaozhi binary framing (78/xiaozhi-esp32): Protocol-Version 1 sends bare Opus packets;
versions 2 and 3 put a small header before each. The server parses with the same structs
(speech_serve/ingress/xiaozhi.py)."""

from __future__ import annotations

import struct

V2_HEADER = struct.Struct(">HHIII")  # version, type, reserved, timestamp_ms, payload_size
V3_HEADER = struct.Struct(">BBH")  # type, reserved, payload_size
V3_MAX_PAYLOAD = 2**16 - 1
TYPE_OPUS, TYPE_JSON = 0, 1


def frame_audio(packet: bytes, protocol_version: int, timestamp_ms: int = 0) -> bytes:
    """One Opus packet as a device sends it. The v2 timestamp wraps at 2**32 ms as a device's
    32-bit clock does; a v3 header cannot state more than 65535 payload bytes."""
    if protocol_version == 2:
        return V2_HEADER.pack(2, TYPE_OPUS, 0, timestamp_ms % 2**32, len(packet)) + packet
    if protocol_version == 3:
        if len(packet) > V3_MAX_PAYLOAD:
            raise ValueError(f"a v3 frame carries at most {V3_MAX_PAYLOAD} bytes, not {len(packet)}")
        return V3_HEADER.pack(TYPE_OPUS, 0, len(packet)) + packet
    return packet

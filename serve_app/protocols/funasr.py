"""The FunASR runtime WebSocket protocol (modelscope/FunASR runtime/python/websocket): pure adapter.

First text frame: the config (mode, wav_name, audio_fs, itn, hotwords, ...). Then PCM16
frames, then `{"is_speaking": false}` (newer clients add `"is_end": true` and wait for an
answer carrying `is_end`/`is_final`). Answers carry `mode`:
  offline -> "offline" per VAD segment;  online -> "online" deltas;
  2pass   -> "2pass-online" deltas while speaking, "2pass-offline" per segment.
Clients concatenate online texts, so interim text goes out as deltas (see `text_delta`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from serve_app.messages import UtteranceResult
from serve_app.protocols.errors import ProtocolError, brief, json_object, whole_number

MODES = ("offline", "online", "2pass")
SUPPORTED_RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)


@dataclass(frozen=True)
class Config:
    mode: Literal["offline", "online", "2pass"] = "2pass"
    wav_name: str = "demo"
    audio_fs: int = 16000
    wav_format: str = "pcm"
    itn: bool = True
    hotwords: str = ""
    speaker_group: str | None = None  # ours, not FunASR's: whose voiceprints to match


@dataclass(frozen=True)
class EndOfSpeech:
    is_end: bool = False


def parse_text(text: str, configured: bool) -> Config | EndOfSpeech:
    """The first frame is the config; later `is_speaking: false` ends the stream.

    A later frame with config fields and `is_speaking: true` is answered as a new config
    (FunASR clients resend it per file); the caller decides whether that is allowed.
    """
    data = json_object(text)
    if data.get("is_speaking") is False:
        return EndOfSpeech(is_end=bool(data.get("is_end", False)))
    if "mode" in data or not configured:
        return _parse_config(data)
    raise ProtocolError("bad_message", 'expected {"is_speaking": false} or a config with "mode"')


def _parse_config(data: dict[str, Any]) -> Config:
    mode = data.get("mode", "2pass")
    if mode not in MODES:
        raise ProtocolError("bad_mode", f"mode {brief(mode)} not supported; use one of {MODES}")
    given = data.get("audio_fs", 16000)
    fs = whole_number(given)
    if fs not in SUPPORTED_RATES:
        raise ProtocolError("bad_sample_rate", f"audio_fs {brief(given)} not supported; use one of {SUPPORTED_RATES}")
    wav_format = str(data.get("wav_format", "pcm"))
    if wav_format not in ("pcm", "wav"):
        raise ProtocolError("unsupported_audio", f"wav_format {brief(wav_format)}: send raw PCM16 ('pcm')")
    itn = data.get("itn", True)
    return Config(
        mode=mode, wav_name=str(data.get("wav_name", "demo")), audio_fs=fs, wav_format=wav_format,
        itn=bool(itn), hotwords=str(data.get("hotwords", "") or ""),
        speaker_group=str(data["speaker_group"]) if data.get("speaker_group") else None,
    )  # fmt: skip


def text_delta(sent: str, text: str) -> str | None:
    """What to add to the interim text already sent, or None if the new text revised it
    (the segment's final answer then sets the record straight)."""
    return text[len(sent) :] if text.startswith(sent) else None


def render_interim(config: Config, delta: str) -> str:
    mode = "online" if config.mode == "online" else "2pass-online"
    return json.dumps({"mode": mode, "text": delta, "wav_name": config.wav_name, "is_final": False}, ensure_ascii=False)


def render_final(config: Config, result: UtteranceResult, online_sent: str = "") -> str:
    """One VAD segment's result. In online mode it is the delta after the interims already sent."""
    if config.mode == "online":
        mode, text = "online", text_delta(online_sent, result.text) or ""
    else:
        mode, text = ("offline" if config.mode == "offline" else "2pass-offline"), result.text
    body = {
        "mode": mode, "text": text, "wav_name": config.wav_name, "is_final": False,
        "timestamp": json.dumps([[result.start_ms, result.end_ms]]),
        "spk_name": result.speaker.label, "spk_score": result.speaker.score,
        "language": result.language, "emotion": result.emotion, "event": result.event,
        "models": result.models, "latency_ms": result.latency_ms,
    }  # fmt: skip
    return json.dumps(body, ensure_ascii=False)


def render_end(config: Config, segments: int) -> str:
    """The answer to `is_speaking: false`: every segment's result has been sent before it."""
    mode = {"offline": "offline", "online": "online", "2pass": "2pass-offline"}[config.mode]
    body = {
        "mode": mode,
        "text": "",
        "wav_name": config.wav_name,
        "is_final": True,
        "is_end": True,
        "segments": segments,
    }
    return json.dumps(body)


def render_error(code: str, message: str) -> str:
    return json.dumps({"error": message, "code": code, "is_final": False})

"""The FunASR runtime WebSocket protocol (modelscope/FunASR runtime/python/websocket) at `/` and
`/funasr`: pure parsing and rendering, then the connection.

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

import numpy as np

from speech_serve.ingress.audio import SUPPORTED_RATES, StreamResampler, parse_audio
from speech_serve.ingress.connection import Connection
from speech_serve.ingress.protocols.parsing import (
    DEFAULT_LIMITS,
    ProtocolError,
    brief,
    hotword_list,
    json_object,
    text_delta,
    text_field,
    whole_number,
)
from speech_serve.ingress.stream import RecognitionOptions
from speech_serve.messages import Transcript, UtteranceResult
from speech_serve.settings import FunasrSettings, LimitSettings

MODES = ("offline", "online", "2pass")
FUNASR_WEIGHT_SCALE = 20.0  # FunASR's hotword weights (10-100) over our bonus per token


@dataclass(frozen=True)
class Config:
    mode: Literal["offline", "online", "2pass"] = "2pass"
    wav_name: str = "demo"
    audio_fs: int = 16000
    wav_format: str = "pcm"
    itn: bool = True
    hotwords: tuple[tuple[str, float], ...] = ()  # from FunASR's JSON {"phrase": weight} (or "a b c")
    speaker_group: str | None = None  # ours, not FunASR's: whose voiceprints to match


@dataclass(frozen=True)
class EndOfSpeech:
    is_end: bool = False


def parse_text(text: str, configured: bool, max_string_chars: int | None = None,
               limits: LimitSettings | None = None) -> Config | EndOfSpeech:  # fmt: skip
    """The first frame is the config; later `is_speaking: false` ends the stream.

    A later frame with config fields and `is_speaking: true` is answered as a new config
    (FunASR clients resend it per file); the caller decides whether that is allowed.
    """
    data = json_object(text, max_string_chars)
    if data.get("is_speaking") is False:
        return EndOfSpeech(is_end=bool(data.get("is_end", False)))
    if "mode" in data or not configured:
        return _parse_config(data, limits or DEFAULT_LIMITS)
    raise ProtocolError("bad_message", 'expected {"is_speaking": false} or a config with "mode"')


def funasr_hotwords(value: str, limits: LimitSettings) -> tuple[tuple[str, float], ...]:
    """FunASR's clients send their hotword file as a JSON object string, weights in tens
    (`{"阿里巴巴": 20}`: 20 is a bonus of 1.0 per token); older ones a string of words."""
    if value.lstrip().startswith("{"):
        try:
            return hotword_list(json.loads(value), limits, scale=FUNASR_WEIGHT_SCALE)
        except json.JSONDecodeError:
            raise ProtocolError("bad_hotwords", "hotwords is not a JSON object {phrase: weight}") from None
    return hotword_list(value, limits)


def _parse_config(data: dict[str, Any], limits: LimitSettings) -> Config:
    mode = data.get("mode", "2pass")
    if mode not in MODES:
        raise ProtocolError("bad_mode", f"mode {brief(mode)} not supported; use one of {MODES}")
    given = data.get("audio_fs", 16000)
    fs = whole_number(given)
    if fs not in SUPPORTED_RATES:
        raise ProtocolError("bad_sample_rate", f"audio_fs {brief(given)} not supported; use one of {SUPPORTED_RATES}")
    wav_format = text_field(data, "wav_format", "pcm")
    if wav_format not in ("pcm", "wav"):
        raise ProtocolError("unsupported_audio", f"wav_format {brief(wav_format)}: send raw PCM16 ('pcm')")
    itn = data.get("itn", True)
    return Config(
        mode=mode, wav_name=text_field(data, "wav_name", "demo"), audio_fs=fs, wav_format=wav_format,
        itn=bool(itn), hotwords=funasr_hotwords(text_field(data, "hotwords"), limits),
        speaker_group=text_field(data, "speaker_group") or None,
    )  # fmt: skip


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
        "timestamp": json.dumps([[result.start_ms, result.end_ms]] if not result.words else
                                [[w.start_ms, w.end_ms] for w in result.words]),  # per word, as FunASR's server
        "spk_name": result.speaker.label, "spk_score": result.speaker.score,
        "language": result.language, "emotion": result.emotion, "event": result.event,
        "models": result.models, "latency_ms": result.latency_ms,
    }  # fmt: skip
    if result.speaker.reason is not None:  # ours: why no match was tried (shed, too_short, ...), as other protocols say
        body["spk_reason"] = result.speaker.reason
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


# ---- the connection -----------------------------------------------------------------------


class FunasrConnection(Connection):
    """FunASR clients may stream several files over one connection: config, audio, end; config,
    audio, end. Each config starts a new utterance stream (with a stream id of its own: `<id>-2`,
    ...; the session keeps the id it was admitted under); each end is answered once every
    segment's result is out, with `is_final` and `is_end`."""

    protocol = "funasr"

    def __init__(self, ws, session_id: str, streams, limits, metrics, settings: FunasrSettings):
        super().__init__(ws, session_id, streams, limits, metrics)
        self.interim_interval_ms = settings.interim_interval_ms
        self.max_frame_bytes = settings.max_frame_bytes  # whole utterances in one frame: see FunasrSettings
        self.files = 0
        self.config: Config | None = None
        self.resample = StreamResampler(16000)
        self.online_sent: dict[int, str] = {}  # interim text already sent, per utterance index

    def render_error(self, code: str, message: str) -> str:
        return render_error(code, message)

    async def on_frame(self, message: dict) -> bool:
        if message.get("bytes") is not None:
            pcm = parse_audio(message["bytes"], self.max_frame_bytes)
            if self.stream is None:
                self._start(self.config or Config())
            await self.push_audio(self.resample(pcm))
            return True
        limits = self.limits
        parsed = parse_text(message.get("text") or "", self.config is not None, limits.max_field_chars, limits)
        if isinstance(parsed, Config):
            self.speaker_group(parsed.speaker_group)  # one the device may not use is refused here
            if self.stream is not None:
                await self._end()  # a new file on the same connection closes the last one
            self.config = parsed
            return True
        await self._end()
        return True

    def _start(self, config: Config) -> None:
        self.config = config
        self.files += 1
        self.resample = StreamResampler(config.audio_fs)
        self.online_sent = {}
        interim = config.mode in ("online", "2pass")
        self.start_stream(
            RecognitionOptions(use_itn=config.itn, speaker_group=self.speaker_group(config.speaker_group),
                               hotwords=config.hotwords, words=bool(config.hotwords)),  # the beam search gives them
            stream_id=self.session_id if self.files == 1 else f"{self.session_id}-{self.files}",
            on_interim=self._on_interim if interim else None,
            interim_interval_ms=self.interim_interval_ms,
        )

    async def _end(self) -> None:
        if self.stream is None:  # end with no audio: still answer, clients wait for it
            self._start(self.config or Config())
        tail = self.resample(np.zeros(0, dtype=np.int16), last=True)
        if len(tail):
            await self.stream.push(tail)
        count, _ = await self.finish_stream()
        await self.send(render_end(self.config, count))

    async def _on_interim(self, index: int, transcript: Transcript) -> None:
        delta = text_delta(self.online_sent.get(index, ""), transcript.text)
        if delta:
            self.online_sent[index] = self.online_sent.get(index, "") + delta
            await self.send(render_interim(self.config, delta))

    def render_result(self, result: UtteranceResult) -> str:
        return render_final(self.config, result, self.online_sent.pop(result.index, ""))

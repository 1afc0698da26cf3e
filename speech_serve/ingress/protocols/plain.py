"""Our own plain JSON protocol (browsers, scripts) at `/v1/stream`: pure parsing and rendering,
then the connection.

Client -> server
  text   {"type": "start", "sample_rate": 16000, "language": "auto", "itn": true,
          "return_embedding": false, "speaker_group": "home-1",
          "hotwords": {"Xiaozhi": 2.0}, "words": true}   optional, before any audio
  binary PCM16 little-endian mono frames at the session's sample rate
  text   {"type": "end"}                                  flush; results follow, then "done"

Server -> client
  {"type": "ready", "session_id": ..., "sample_rate": 16000, "models": "real"|"test", ...}
  {"type": "result", "index": 0, "text": ..., "language": ..., "emotion": ..., "event": ...,
   "start_ms": ..., "end_ms": ..., "speaker": {...}, "latency_ms": {...}, "models": ...,
   "retries": {"asr": 1},   stages called again after their replica was lost ({} normally)
   "words": [{"text", "start_ms", "end_ms", "confidence"}], "confidence": 0.93}   with words or hotwords
  {"type": "error", "code": ..., "message": ...}
  {"type": "done", "utterances": N, "vad_replays": R}
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from speech_serve.ingress.audio import SUPPORTED_RATES, StreamResampler, parse_audio
from speech_serve.ingress.connection import Connection
from speech_serve.ingress.protocols.parsing import (
    DEFAULT_LIMITS,
    ProtocolError,
    brief,
    hotword_list,
    json_object,
    whole_number,
)
from speech_serve.ingress.stream import RecognitionOptions, UtteranceStream
from speech_serve.messages import UtteranceResult
from speech_serve.settings import LimitSettings
from speech_serve.wire.codes import CLOSE_NORMAL


@dataclass(frozen=True)
class StartMessage:
    sample_rate: int = 16000
    language: str = "auto"
    itn: bool = True
    return_embedding: bool = False
    speaker_group: str | None = None
    hotwords: tuple[tuple[str, float], ...] = ()
    words: bool = False


@dataclass(frozen=True)
class EndMessage:
    pass


ClientMessage = StartMessage | EndMessage


def parse_text(text: str, max_string_chars: int | None = None, limits: LimitSettings | None = None) -> ClientMessage:
    """`max_string_chars`: the bound on string fields (None: none, for tools); `limits`: the hotwords'."""
    data = json_object(text, max_string_chars)
    kind = data.get("type")
    if kind == "end":
        return EndMessage()
    if kind == "start":
        return _parse_start(data, limits or DEFAULT_LIMITS)
    raise ProtocolError("unknown_type", f"unknown message type {brief(kind)}; expected 'start' or 'end'")


def _parse_start(data: dict[str, Any], limits: LimitSettings) -> StartMessage:
    given = data.get("sample_rate", 16000)
    rate = whole_number(given)
    if rate not in SUPPORTED_RATES:
        message = f"sample_rate {brief(given)} not supported; use one of {SUPPORTED_RATES}"
        raise ProtocolError("bad_sample_rate", message)
    language = data.get("language", "auto")
    if not isinstance(language, str):
        raise ProtocolError("bad_message", "language must be a string")
    itn, emb, words = data.get("itn", True), data.get("return_embedding", False), data.get("words", False)
    if not all(isinstance(flag, bool) for flag in (itn, emb, words)):
        raise ProtocolError("bad_message", "itn, return_embedding and words must be booleans")
    group = data.get("speaker_group")
    if group is not None and (not isinstance(group, str) or not group):
        raise ProtocolError("bad_message", "speaker_group must be a non-empty string")
    return StartMessage(sample_rate=rate, language=language, itn=itn, return_embedding=emb, speaker_group=group,
                        hotwords=hotword_list(data.get("hotwords"), limits), words=words)  # fmt: skip


def render_ready(session_id: str, start: StartMessage, models: str, vad_chunk_ms: int) -> str:
    return json.dumps(
        {
            "type": "ready",
            "session_id": session_id,
            "sample_rate": start.sample_rate,
            "models": models,
            "vad_chunk_ms": vad_chunk_ms,
        }  # fmt: skip
    )


def result_fields(result: UtteranceResult) -> dict[str, Any]:
    """Every field we have for one utterance (words and confidence when the session asked); other
    protocols pick from this."""
    fields = {**asdict(result), "speaker": result.speaker.fields()}
    del fields["words"], fields["confidence"]
    return fields | result.word_fields()


def render_result(result: UtteranceResult) -> str:
    return json.dumps({"type": "result", **result_fields(result)}, ensure_ascii=False)


def render_error(code: str, message: str) -> str:
    return json.dumps({"type": "error", "code": code, "message": message})


def render_reconnect(message: str, received_ms: int) -> str:
    """Close 1012 follows: reconnect now and resend the audio from `received_ms` of this stream."""
    return json.dumps({"type": "error", "code": "reconnect", "message": message, "received_ms": received_ms})


def render_done(utterances: int, vad_replays: int = 0) -> str:
    """`vad_replays`: times the session's VAD state was rebuilt on another replica."""
    return json.dumps({"type": "done", "utterances": utterances, "vad_replays": vad_replays})


# ---- the connection -----------------------------------------------------------------------


class PlainConnection(Connection):
    protocol = "plain"

    async def open(self) -> bool:
        self.start = StartMessage()
        self.resample = StreamResampler(self.start.sample_rate)
        await self._send_ready()
        return True

    async def on_frame(self, message: dict) -> bool:
        if message.get("bytes") is not None:
            pcm = parse_audio(message["bytes"], self.limits.max_frame_bytes)
            self._stream()
            await self.push_audio(self.resample(pcm))
            return True
        parsed = parse_text(message.get("text") or "", self.limits.max_field_chars, self.limits)
        if isinstance(parsed, StartMessage):
            if self.stream is not None:
                raise ProtocolError("bad_order", "'start' must come before any audio")
            self.speaker_group(parsed.speaker_group)  # one the device may not use is refused here
            self.start, self.resample = parsed, StreamResampler(parsed.sample_rate)
            await self._send_ready()
            return True
        await self._finish()
        return False

    def _stream(self) -> UtteranceStream:
        if self.stream is None:
            s = self.start
            group = self.speaker_group(s.speaker_group)
            self.start_stream(RecognitionOptions(s.language, s.itn, s.return_embedding, group, s.hotwords, s.words))
        return self.stream

    async def _finish(self) -> None:
        stream = self._stream()
        tail = self.resample(np.zeros(0, dtype=np.int16), last=True)
        if len(tail):
            await stream.push(tail)
        count, replays = await self.finish_stream()
        await self.send(render_done(count, replays))
        await self.ws.close(CLOSE_NORMAL)

    async def _send_ready(self) -> None:
        chunk_ms = self.streams.settings.stream.vad_chunk_ms
        await self.send(render_ready(self.session_id, self.start, self.streams.models_label, chunk_ms))

    def render_result(self, result: UtteranceResult) -> str:
        return render_result(result)

    def render_error(self, code: str, message: str) -> str:
        return render_error(code, message)

    def render_reconnect(self, message: str, received_ms: int) -> str:
        return render_reconnect(message, received_ms)

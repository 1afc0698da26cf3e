"""The OpenAI Realtime transcription session: its audio in, what it sends (pure rendering), and its
connection. The protocol as a whole: __init__.py; the client events: events.py."""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import replace
from typing import Any

import numpy as np

from speech_serve.ingress.audio import G711_RATE, StreamResampler, alaw_to_pcm16, ulaw_to_pcm16
from speech_serve.ingress.auth import Credentials, device_credentials
from speech_serve.ingress.connection import Connection
from speech_serve.ingress.limits import SessionIntake
from speech_serve.ingress.protocols.parsing import ProtocolError, text_delta
from speech_serve.ingress.protocols.realtime.events import (
    BETA_FORMATS,
    EXTRA,
    LOGPROBS,
    PCM_RATE,
    SERVER_ERRORS,
    Append,
    Clear,
    Commit,
    EventError,
    SessionConfig,
    SessionUpdate,
    TurnDetection,
    apply_update,
    effective,
    parse_event,
    session_hotwords,
)
from speech_serve.ingress.stream import RecognitionOptions, SpeechEdge
from speech_serve.messages import Transcript, UtteranceResult
from speech_serve.settings import RealtimeSettings
from speech_serve.wire.pcm import SAMPLE_RATE, AudioFormatError, pcm16_from_bytes

# ---- audio in ---------------------------------------------------------------------------------


class InputAudio:
    """One session's appended audio in its format -> 16 kHz int16, resampled as a stream (no
    clicks at append boundaries)."""

    def __init__(self, audio_format: str, pcm_rate: int = PCM_RATE):
        self.format = audio_format
        self._resample = StreamResampler(pcm_rate if audio_format == "audio/pcm" else G711_RATE)

    def __call__(self, data: bytes) -> np.ndarray:
        """Raises AudioFormatError (PCM16 of odd length)."""
        if self.format == "audio/pcmu":
            pcm = ulaw_to_pcm16(data)
        elif self.format == "audio/pcma":
            pcm = alaw_to_pcm16(data)
        else:
            pcm = pcm16_from_bytes(data)
        return self._resample(pcm)


# ---- rendering: pure --------------------------------------------------------------------------


def event(kind: str, event_id: str, **fields: Any) -> str:
    return json.dumps({"type": kind, "event_id": event_id, **fields}, ensure_ascii=False)


def _turn_fields(turn: TurnDetection | None) -> dict[str, Any] | None:
    if turn is None:
        return None
    return {"type": turn.type, "threshold": turn.threshold, "prefix_padding_ms": turn.prefix_padding_ms,
            "silence_duration_ms": turn.silence_duration_ms}  # fmt: skip


def _transcription_fields(config: SessionConfig) -> dict[str, Any]:
    return {"model": config.model, "language": config.language, "prompt": config.prompt}


def session_fields(session_id: str, config: SessionConfig) -> dict[str, Any]:
    """The GA transcription session object."""
    fmt = {"type": config.audio_format, **({"rate": config.pcm_rate} if config.audio_format == "audio/pcm" else {})}
    audio_input = {
        "format": fmt,
        "noise_reduction": None,
        "transcription": _transcription_fields(config),
        "turn_detection": _turn_fields(config.turn_detection),
    }
    return {"id": f"sess_{session_id}", "object": "realtime.transcription_session", "type": "transcription",
            "audio": {"input": audio_input}, "include": [LOGPROBS] if config.logprobs else []}  # fmt: skip


def beta_session_fields(session_id: str, config: SessionConfig) -> dict[str, Any]:
    """The beta transcription session object (answer to transcription_session.update)."""
    beta_format = {v: k for k, v in BETA_FORMATS.items()}[config.audio_format]
    return {"id": f"sess_{session_id}", "object": "realtime.transcription_session", "modalities": ["text"],
            "input_audio_format": beta_format, "input_audio_transcription": _transcription_fields(config),
            "turn_detection": _turn_fields(config.turn_detection), "input_audio_noise_reduction": None,
            "include": [LOGPROBS] if config.logprobs else []}  # fmt: skip


def render_session(kind: str, event_id: str, session_id: str, config: SessionConfig) -> str:
    """session.created / session.updated (GA shape) or transcription_session.updated (beta shape)."""
    beta = kind.startswith("transcription_session.")
    session = beta_session_fields(session_id, config) if beta else session_fields(session_id, config)
    return event(kind, event_id, session=session)


def word_logprobs(words) -> list[dict[str, Any]]:
    """OpenAI's `logprobs` entries, one per word: its text, the mean log-probability of its tokens."""
    return [{"token": w.text, "logprob": round(math.log(max(w.confidence, 1e-12)), 4),
             "bytes": list(w.text.encode())} for w in words]  # fmt: skip


def render_completed(event_id: str, item_id: str, result: UtteranceResult, logprobs: bool = False) -> str:
    """The utterance's transcript, with our fields in `speech_serve` (EXTRA); `logprobs` when the session's
    `include` asks (and word times among our fields whenever the words were decoded)."""
    extra = {
        "index": result.index, "start_ms": result.start_ms, "end_ms": result.end_ms,
        "language": result.language, "emotion": result.emotion, "event": result.event,
        "speaker": result.speaker.fields(), "latency_ms": result.latency_ms, "models": result.models,
        "forced_cut": result.forced_cut,
    }  # fmt: skip
    if result.words is not None:
        extra |= {"words": [w.fields() for w in result.words], "confidence": result.confidence}
    asked = {"logprobs": word_logprobs(result.words or ())} if logprobs else {}
    usage = {"type": "duration", "seconds": round((result.end_ms - result.start_ms) / 1000, 3)}
    return event("conversation.item.input_audio_transcription.completed", event_id, item_id=item_id,
                 content_index=0, transcript=result.text, usage=usage, **asked, **{EXTRA: extra})  # fmt: skip


def render_dropped(event_id: str, item_id: str, start_ms: int, end_ms: int) -> str:
    """A committed piece too short to hold a word (under stream.min_utterance_ms): an empty transcript."""
    usage = {"type": "duration", "seconds": round((end_ms - start_ms) / 1000, 3)}
    extra = {"index": None, "start_ms": start_ms, "end_ms": end_ms, "skipped": "too_short"}
    return event("conversation.item.input_audio_transcription.completed", event_id, item_id=item_id,
                 content_index=0, transcript="", usage=usage, **{EXTRA: extra})  # fmt: skip


def render_error(
    event_id: str, code: str, message: str, param: str | None = None, client_event_id: str | None = None
) -> str:
    kind = "server_error" if code in SERVER_ERRORS else "invalid_request_error"
    error = {"type": kind, "code": code, "message": message, "param": param, "event_id": client_event_id}
    return event("error", event_id, error=error)


# ---- the connection -----------------------------------------------------------------------


class RealtimeConnection(Connection):
    """One transcription session. Its utterance stream opens at connect (times count from the first
    append); server_vad lets fsmn-vad cut utterances (its end silence from silence_duration_ms),
    turn_detection null cuts them at each commit (push-to-talk)."""

    protocol = "realtime"
    text_is_control = False  # appends carry audio: only the other events count as control

    def __init__(self, ws, session_id: str, streams, limits, metrics, settings: RealtimeSettings,
                 default_silence_ms: int):  # fmt: skip
        super().__init__(ws, session_id, streams, limits, metrics)
        self.intake = SessionIntake(limits, max_text_bytes=settings.max_event_bytes)  # appends carry audio
        self.settings, self.default_silence_ms = settings, default_silence_ms
        self.config = effective(SessionConfig(), default_silence_ms, settings)
        self.audio = InputAudio(self.config.audio_format, self.config.pcm_rate)
        self._event_numbers = itertools.count(1)
        self._item_numbers = itertools.count(1)
        self._open_item: str | None = None  # the item of the speech being spoken (not committed yet)
        self._last_item: str | None = None  # the latest committed item: the next one's previous_item_id
        self._items: dict[int, str] = {}  # utterance index -> item id, committed and awaiting its result
        self._deltas: dict[str, str] = {}  # item id -> the text sent as deltas so far

    def _event_id(self) -> str:
        return f"event_{self.session_id}_{next(self._event_numbers)}"

    def _new_item(self) -> str:
        return f"item_{self.session_id}_{next(self._item_numbers)}"

    def credentials(self) -> Credentials:
        """Also the key OpenAI's browser clients offer as a subprotocol (`KEY_SUBPROTOCOL`)."""
        return device_credentials(self.ws.headers, self.ws.query_params, self.ws.scope.get("subprotocols", ()))

    # ---- errors ----
    def render_error(self, code: str, message: str) -> str:
        return render_error(self._event_id(), code, message)

    def render_protocol_error(self, exc: ProtocolError) -> str:
        return render_error(self._event_id(), exc.code, str(exc), exc.param, getattr(exc, "event_id", None))

    # ---- the session ----
    async def open(self) -> bool:
        interim = self.settings.interim_interval_ms
        self.start_stream(
            RecognitionOptions(language=self.config.language or "auto",
                               speaker_group=self.speaker_group(None, self.identity.group)),
            on_interim=self._on_interim if interim else None, interim_interval_ms=interim or 0,
            on_speech=self._on_speech,
        )  # fmt: skip
        await self._apply_turn_detection()
        await self.send(render_session("session.created", self._event_id(), self.session_id, self.config))
        return True

    async def on_frame(self, message: dict) -> bool:
        if message.get("bytes") is not None:
            self.count_control()
            raise ProtocolError("invalid_value", "binary frames are not events: send audio as "
                                "input_audio_buffer.append with base64 `audio` in a JSON text frame")  # fmt: skip
        try:
            parsed = parse_event(message.get("text") or "", self.limits.max_field_chars)
        except ProtocolError:
            self.count_control()
            raise
        if isinstance(parsed, Append):
            await self._append(parsed, len(message["text"]))
            return True
        self.count_control()
        if isinstance(parsed, Commit):
            await self._commit(parsed)
        elif isinstance(parsed, Clear):
            await self._clear()
            await self.send(event("input_audio_buffer.cleared", self._event_id()))
        else:
            await self._update(parsed)
        return True

    async def _append(self, append: Append, chars: int) -> None:
        try:
            pcm = self.audio(append.audio)
        except AudioFormatError as exc:
            raise EventError("invalid_value", f"{exc}; audio/pcm is 16-bit samples", "audio", append.event_id) from None
        # paced as the audio its JSON could carry (base64 PCM16 at the session's rate), whatever it holds:
        # an append padded around empty audio costs a parse like a full one
        could_carry = round(chars * 3 / 8 * SAMPLE_RATE / self.config.pcm_rate)
        await self.push_audio(pcm, paced_as=could_carry)

    async def _commit(self, commit: Commit) -> None:
        cut = await self.stream.end_utterance()
        if self.config.turn_detection is None:
            await self.stream.begin_utterance()  # the next turn's audio starts now
        if not cut:  # answered, not counted against max_protocol_errors: clients commonly commit after
            # every turn even with server_vad, which has committed it already (OpenAI answers the same)
            message = "nothing to commit: " + ("no audio since the last commit" if self.config.turn_detection is None
                                               else "no speech since the last committed utterance")  # fmt: skip
            empty = EventError("input_audio_buffer_commit_empty", message, None, commit.event_id)
            await self.send(self.render_protocol_error(empty))

    async def _clear(self) -> None:
        """Drop the uncommitted audio; committed items are still answered."""
        await self.stream.clear()
        if self._open_item is not None:  # its deltas' text goes with it: no result will come for it
            self._deltas.pop(self._open_item, None)
        self._open_item = None
        if self.config.turn_detection is None:
            await self.stream.begin_utterance()  # push-to-talk: the next turn's audio starts now
        else:
            await self.stream.use_vad()

    async def _update(self, update: SessionUpdate) -> None:
        before = self.config
        config = effective(apply_update(before, update), self.default_silence_ms, self.settings)
        hotwords = session_hotwords(config, self.limits, update.event_id)  # a bad list leaves the session as it was
        self.config = config
        if (self.config.audio_format, self.config.pcm_rate) != (before.audio_format, before.pcm_rate):
            self.audio = InputAudio(self.config.audio_format, self.config.pcm_rate)
        self.stream.options = replace(self.stream.options, language=config.language or "auto", hotwords=hotwords,
                                      words=config.logprobs)  # fmt: skip
        await self._apply_turn_detection()
        kind = "transcription_session.updated" if update.beta else "session.updated"
        await self.send(render_session(kind, self._event_id(), self.session_id, self.config))

    async def _apply_turn_detection(self) -> None:
        """VAD or manual turns as the session says, and the VAD's end silence (from the next chunk
        on). Switching between them drops the uncommitted audio (it was being cut the other way)."""
        turn, timeline = self.config.turn_detection, self.stream.timeline
        timeline.end_silence_ms = None if turn is None else turn.silence_duration_ms
        if (turn is None) != timeline.manual:
            await self._clear()

    # ---- from the utterance stream ----
    async def _on_speech(self, edge: SpeechEdge) -> None:
        if edge.kind == "started":
            self._open_item = self._new_item()
            await self.send(event("input_audio_buffer.speech_started", self._event_id(), audio_start_ms=edge.ms,
                                  item_id=self._open_item))  # fmt: skip
            return
        item, self._open_item = self._open_item or self._new_item(), None
        if edge.kind == "stopped":
            await self.send(event("input_audio_buffer.speech_stopped", self._event_id(), audio_end_ms=edge.ms,
                                  item_id=item))  # fmt: skip
        await self.send(event("input_audio_buffer.committed", self._event_id(), item_id=item,
                              previous_item_id=self._last_item))  # fmt: skip
        self._last_item = item
        if edge.index is None:  # too short to recognise: no result will come
            self._deltas.pop(item, None)
            start = edge.start_ms if edge.start_ms is not None else edge.ms
            await self.send(render_dropped(self._event_id(), item, start, edge.ms))
        else:
            self._items[edge.index] = item

    async def _on_interim(self, index: int, transcript: Transcript) -> None:
        text = transcript.text
        if self._open_item is None:  # manual turns: the item exists from its first words on
            self._open_item = self._new_item()
        item = self._open_item
        sent = self._deltas.get(item, "")
        delta = text_delta(sent, text)
        if delta:
            self._deltas[item] = sent + delta
            # the delta's words' log-probabilities, when asked: the last words of the interim's decode
            words = transcript.words or ()
            asked = {"logprobs": word_logprobs(words[-len(delta.split()) :] if delta.split() else ())}
            await self.send(event("conversation.item.input_audio_transcription.delta", self._event_id(), item_id=item,
                                  content_index=0, delta=delta, **(asked if self.config.logprobs else {})))  # fmt: skip

    def render_result(self, result: UtteranceResult) -> str:
        item = self._items.pop(result.index, None) or self._new_item()
        self._deltas.pop(item, None)
        return render_completed(self._event_id(), item, result, self.config.logprobs)

    def render_failure(self, index: int) -> str:
        item = self._items.pop(index, None) or self._new_item()
        self._deltas.pop(item, None)
        error = {"type": "server_error", "code": "recognition_failed",
                 "message": f"utterance {index} could not be recognised", "param": None}  # fmt: skip
        return event("conversation.item.input_audio_transcription.failed", self._event_id(), item_id=item,
                     content_index=0, error=error)  # fmt: skip

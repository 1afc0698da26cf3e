"""The OpenAI Realtime API, transcription sessions, at `/v1/realtime` (`?intent=transcription`):
pure parsing and rendering, then the connection. The contract voice-agent frameworks speak to a
speech-to-text service; OpenAI's own SDK (`client.realtime.connect`) drives it unchanged.

Client -> server (JSON text frames; every event may carry an `event_id`)
  session.update                 {"session": {"type": "transcription", "audio": {"input": {
                                    "format": {"type": "audio/pcm", "rate": 24000} | {"type": "audio/pcmu|pcma"},
                                    "transcription": {"model", "language", "prompt"},
                                    "turn_detection": {"type": "server_vad", "silence_duration_ms", ...} | null}}}}
  transcription_session.update   the beta shape: {"session": {"input_audio_format": "pcm16"|"g711_ulaw"|"g711_alaw",
                                    "input_audio_transcription": {...}, "turn_detection": {...} | null}}
  input_audio_buffer.append      {"audio": <base64>}  PCM16 24 kHz mono little-endian, or G.711 at 8 kHz
  input_audio_buffer.commit      ends the utterance now (the only way with turn_detection null)
  input_audio_buffer.clear       drops the audio not yet committed
Only the fields present in an update change; others we do not use (noise_reduction, include,
prompt's effect) are accepted and ignored.

Server -> client, each with a unique `event_id`
  session.created (on connect) / session.updated / transcription_session.updated: the effective session
  input_audio_buffer.speech_started {audio_start_ms, item_id}   server_vad only: fsmn-vad heard speech
  input_audio_buffer.speech_stopped {audio_end_ms, item_id}
  input_audio_buffer.committed {item_id, previous_item_id}       one per utterance (VAD end or commit)
  conversation.item.input_audio_transcription.delta {item_id, content_index, delta}   while speaking
  conversation.item.input_audio_transcription.completed {item_id, content_index, transcript, usage,
      speech_serve: {...}}   our extra fields in one object (see `render_completed`)
  conversation.item.input_audio_transcription.failed {item_id, content_index, error}
  input_audio_buffer.cleared
  error {error: {type, code, message, param, event_id}}   the session goes on (up to max_protocol_errors)
Times are milliseconds of the session's audio (16 kHz after resampling), from its first append.
"""

from __future__ import annotations

import base64
import binascii
import itertools
import json
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from speech_serve.ingress.audio import G711_RATE, SUPPORTED_RATES, StreamResampler, alaw_to_pcm16, ulaw_to_pcm16
from speech_serve.ingress.connection import Connection, ProtocolError, brief, json_object, whole_number
from speech_serve.ingress.protocols.funasr import text_delta
from speech_serve.ingress.recognition import RecognitionOptions, SpeechEdge
from speech_serve.ingress.security import Credentials, device_credentials
from speech_serve.messages import AudioFormatError, UtteranceResult, pcm16_from_bytes
from speech_serve.settings import RealtimeSettings

PCM_RATE = 24000  # the only PCM rate OpenAI's Realtime API has; ours takes SUPPORTED_RATES (an extension)
FORMATS = ("audio/pcm", "audio/pcmu", "audio/pcma")
BETA_FORMATS = {"pcm16": "audio/pcm", "g711_ulaw": "audio/pcmu", "g711_alaw": "audio/pcma"}
TURN_TYPES = ("server_vad", "semantic_vad")  # semantic_vad is served by the same fsmn-vad
DEFAULT_MODEL = "sensevoice"
EXTRA = "speech_serve"  # the one object on .completed that holds our fields (strict clients ignore it)
# Error codes of our own failures: `server_error` in the error's type; any other is the client's.
SERVER_ERRORS = {"server_busy", "reconnect", "internal", "recognition_failed", "idle_timeout"}


class EventError(ProtocolError):
    """A client event we cannot take; `event_id` is the client's, echoed in the error."""

    def __init__(self, code: str, message: str, param: str | None = None, event_id: str | None = None):
        super().__init__(code, message, param)
        self.event_id = event_id


@dataclass(frozen=True)
class TurnDetection:
    silence_duration_ms: int | None = None  # None: the server's (vad.max_end_silence_ms)
    prefix_padding_ms: int = 300  # accepted and echoed; fsmn-vad places the start itself
    threshold: float = 0.5  # accepted and echoed; fsmn-vad has its own speech/noise decision
    type: str = "server_vad"


@dataclass(frozen=True)
class SessionConfig:
    audio_format: str = "audio/pcm"
    pcm_rate: int = PCM_RATE  # audio/pcm only
    model: str = DEFAULT_MODEL
    language: str | None = None  # None: SenseVoice detects it
    prompt: str = ""
    turn_detection: TurnDetection | None = field(default_factory=TurnDetection)  # None: manual turns (commit)


@dataclass(frozen=True)
class SessionUpdate:
    """The fields an update gives (SessionConfig names; turn_detection: its given fields, or None)."""

    changes: dict[str, Any]
    beta: bool = False  # transcription_session.update: answered with transcription_session.updated
    event_id: str | None = None


@dataclass(frozen=True)
class Append:
    audio: bytes
    event_id: str | None = None


@dataclass(frozen=True)
class Commit:
    event_id: str | None = None


@dataclass(frozen=True)
class Clear:
    event_id: str | None = None


ClientEvent = SessionUpdate | Append | Commit | Clear


# ---- parsing: pure ----------------------------------------------------------------------------


def parse_event(text: str, max_string_chars: int) -> ClientEvent:
    """One client event. Raises ProtocolError (EventError once the event's id is known)."""
    data = json_object(text)  # not bounded per field here: an append's audio is one long string
    event_id = data.get("event_id")
    event_id = event_id if isinstance(event_id, str) and len(event_id) <= max_string_chars else None
    try:
        return _parse(data, event_id, max_string_chars)
    except EventError as exc:
        exc.event_id = event_id
        raise


def _parse(data: dict[str, Any], event_id: str | None, max_chars: int) -> ClientEvent:
    kind = data.get("type")
    if kind == "input_audio_buffer.append":
        audio = data.get("audio")
        if not isinstance(audio, str):
            raise EventError("missing_required_parameter", "input_audio_buffer.append needs `audio`: base64 audio",
                             "audio")  # fmt: skip
        try:
            return Append(base64.b64decode(audio, validate=True), event_id)
        except (binascii.Error, ValueError):
            raise EventError("invalid_value", "audio is not valid base64", "audio") from None
    if kind == "input_audio_buffer.commit":
        return Commit(event_id)
    if kind == "input_audio_buffer.clear":
        return Clear(event_id)
    if kind in ("session.update", "transcription_session.update"):
        session = data.get("session")
        if not isinstance(session, dict):
            raise EventError("missing_required_parameter", f"{kind} needs a `session` object", "session")
        return SessionUpdate(_session_changes(session, max_chars), kind == "transcription_session.update", event_id)
    raise EventError(
        "invalid_value",
        f"unsupported event type {brief(kind)}: this transcription endpoint takes session.update, "
        "transcription_session.update and input_audio_buffer.append / commit / clear",
        "type",
    )


def _object(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise EventError("invalid_type", f"{param} must be an object", param)
    return value


def _session_changes(session: dict[str, Any], max_chars: int) -> dict[str, Any]:
    """The GA shape (`session.audio.input`) and the beta one (`input_audio_*` at the top), in one."""
    kind = session.get("type")
    if kind not in (None, "transcription"):
        raise EventError("invalid_value", f"session.type {brief(kind)}: this server runs transcription sessions "
                         "only (session.type 'transcription')", "session.type")  # fmt: skip
    changes: dict[str, Any] = {}
    given_input = (session.get("audio") or {}).get("input") if isinstance(session.get("audio"), dict) else None
    if session.get("audio") is not None:
        _object(session["audio"], "session.audio")
    if given_input is not None:
        audio_in = _object(given_input, "session.audio.input")
        if audio_in.get("format") is not None:
            changes["audio_format"], changes["pcm_rate"] = _ga_format(audio_in["format"])
        if audio_in.get("transcription") is not None:
            changes |= _transcription(audio_in["transcription"], "session.audio.input.transcription", max_chars)
        if "turn_detection" in audio_in:
            changes["turn_detection"] = _turn(audio_in["turn_detection"], "session.audio.input.turn_detection")
    if session.get("input_audio_format") is not None:
        given = session["input_audio_format"]
        if not isinstance(given, str) or given not in BETA_FORMATS:
            raise EventError("invalid_value", f"input_audio_format {brief(given)}: use one of "
                             f"{', '.join(BETA_FORMATS)}", "session.input_audio_format")  # fmt: skip
        changes["audio_format"], changes["pcm_rate"] = BETA_FORMATS[given], PCM_RATE
    if session.get("input_audio_transcription") is not None:
        changes |= _transcription(session["input_audio_transcription"], "session.input_audio_transcription", max_chars)
    if "turn_detection" in session:
        changes["turn_detection"] = _turn(session["turn_detection"], "session.turn_detection")
    return changes


def _ga_format(value: Any) -> tuple[str, int]:
    """(type, PCM rate). OpenAI's PCM is 24 kHz only; we also take the other rates our PCM
    protocols take (a browser page may capture at 16 kHz), said in `rate`."""
    fmt = _object(value, "session.audio.input.format")
    kind = fmt.get("type", "audio/pcm")
    if kind not in FORMATS:
        raise EventError("invalid_value", f"audio format {brief(kind)}: use one of {', '.join(FORMATS)}",
                         "session.audio.input.format.type")  # fmt: skip
    rate = fmt.get("rate")
    if kind != "audio/pcm" or rate is None:
        return kind, PCM_RATE
    if whole_number(rate) not in SUPPORTED_RATES:
        raise EventError("invalid_value", f"audio/pcm rate {brief(rate)}: use {PCM_RATE} (or one of "
                         f"{SUPPORTED_RATES})", "session.audio.input.format.rate")  # fmt: skip
    return kind, whole_number(rate)


def _transcription(value: Any, param: str, max_chars: int) -> dict[str, Any]:
    given = _object(value, param)
    changes: dict[str, Any] = {}
    for name in ("model", "language", "prompt"):
        if given.get(name) is None:
            continue
        text = given[name]
        if not isinstance(text, str):
            raise EventError("invalid_type", f"{param}.{name} must be a string", f"{param}.{name}")
        if len(text) > max_chars:
            raise EventError("string_above_max_length", f"{param}.{name} is {len(text)} characters long; at most "
                             f"{max_chars}", f"{param}.{name}")  # fmt: skip
        changes[name] = text
    if changes.get("language") == "":  # "" is "not given" to several clients
        changes["language"] = None
    return changes


def _turn(value: Any, param: str) -> dict[str, Any] | None:
    if value is None:
        return None
    given = _object(value, param)
    kind = given.get("type", "server_vad")
    if kind not in TURN_TYPES:
        raise EventError("invalid_value", f"turn_detection type {brief(kind)}: use server_vad, or null for manual "
                         "turns (commit)", f"{param}.type")  # fmt: skip
    changes: dict[str, Any] = {}
    for name in ("silence_duration_ms", "prefix_padding_ms"):
        if given.get(name) is not None:
            ms = whole_number(given[name])
            if ms is None or ms < 0:
                raise EventError("invalid_value", f"{name} must be a whole number of milliseconds >= 0",
                                 f"{param}.{name}")  # fmt: skip
            changes[name] = ms
    threshold = given.get("threshold")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 <= threshold <= 1:
            raise EventError("invalid_value", "threshold must be a number from 0 to 1", f"{param}.threshold")
        changes["threshold"] = float(threshold)
    return changes


def apply_update(config: SessionConfig, update: SessionUpdate) -> SessionConfig:
    """The session after an update: only the fields given change."""
    changes = dict(update.changes)
    turn = changes.get("turn_detection")
    if turn is not None:
        changes["turn_detection"] = replace(config.turn_detection or TurnDetection(), **turn, type="server_vad")
    return replace(config, **changes)


def effective(config: SessionConfig, default_silence_ms: int, settings: RealtimeSettings) -> SessionConfig:
    """The session as it is served: the end silence filled in and kept within the settings' bounds."""
    turn = config.turn_detection
    if turn is None:
        return config
    wanted = turn.silence_duration_ms if turn.silence_duration_ms is not None else default_silence_ms
    silence = min(max(wanted, settings.min_silence_duration_ms), settings.max_silence_duration_ms)
    return replace(config, turn_detection=replace(turn, silence_duration_ms=silence))


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
            "audio": {"input": audio_input}, "include": []}  # fmt: skip


def beta_session_fields(session_id: str, config: SessionConfig) -> dict[str, Any]:
    """The beta transcription session object (answer to transcription_session.update)."""
    beta_format = {v: k for k, v in BETA_FORMATS.items()}[config.audio_format]
    return {"id": f"sess_{session_id}", "object": "realtime.transcription_session", "modalities": ["text"],
            "input_audio_format": beta_format, "input_audio_transcription": _transcription_fields(config),
            "turn_detection": _turn_fields(config.turn_detection), "input_audio_noise_reduction": None,
            "include": []}  # fmt: skip


def render_session(kind: str, event_id: str, session_id: str, config: SessionConfig) -> str:
    """session.created / session.updated (GA shape) or transcription_session.updated (beta shape)."""
    beta = kind.startswith("transcription_session.")
    session = beta_session_fields(session_id, config) if beta else session_fields(session_id, config)
    return event(kind, event_id, session=session)


def render_completed(event_id: str, item_id: str, result: UtteranceResult) -> str:
    """The utterance's transcript, with our fields in `speech_serve` (EXTRA)."""
    extra = {
        "index": result.index, "start_ms": result.start_ms, "end_ms": result.end_ms,
        "language": result.language, "emotion": result.emotion, "event": result.event,
        "speaker": result.speaker.fields(), "latency_ms": result.latency_ms, "models": result.models,
        "forced_cut": result.forced_cut,
    }  # fmt: skip
    usage = {"type": "duration", "seconds": round((result.end_ms - result.start_ms) / 1000, 3)}
    return event("conversation.item.input_audio_transcription.completed", event_id, item_id=item_id,
                 content_index=0, transcript=result.text, usage=usage, **{EXTRA: extra})  # fmt: skip


def render_dropped(event_id: str, item_id: str, start_ms: int, end_ms: int) -> str:
    """A committed piece too short to hold a word (under ingress.min_utterance_ms): an empty transcript."""
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
            await self._append(parsed)
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

    async def _append(self, append: Append) -> None:
        try:
            pcm = self.audio(append.audio)
        except AudioFormatError as exc:
            raise EventError("invalid_value", f"{exc}; audio/pcm is 16-bit samples", "audio", append.event_id) from None
        if len(pcm):
            await self.push_audio(pcm)

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
        self._open_item = None
        if self.config.turn_detection is None:
            await self.stream.begin_utterance()  # push-to-talk: the next turn's audio starts now
        else:
            await self.stream.use_vad()

    async def _update(self, update: SessionUpdate) -> None:
        before = self.config
        self.config = effective(apply_update(before, update), self.default_silence_ms, self.settings)
        if (self.config.audio_format, self.config.pcm_rate) != (before.audio_format, before.pcm_rate):
            self.audio = InputAudio(self.config.audio_format, self.config.pcm_rate)
        self.stream.options = replace(self.stream.options, language=self.config.language or "auto")
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

    async def _on_interim(self, index: int, text: str) -> None:
        if self._open_item is None:  # manual turns: the item exists from its first words on
            self._open_item = self._new_item()
        item = self._open_item
        sent = self._deltas.get(item, "")
        delta = text_delta(sent, text)
        if delta:
            self._deltas[item] = sent + delta
            await self.send(event("conversation.item.input_audio_transcription.delta", self._event_id(),
                                  item_id=item, content_index=0, delta=delta))  # fmt: skip

    async def on_result(self, result: UtteranceResult) -> None:
        item = self._items.pop(result.index, None) or self._new_item()
        self._deltas.pop(item, None)
        await self.send(render_completed(self._event_id(), item, result))

    async def on_failure(self, index: int, exc: Exception) -> None:
        item = self._items.pop(index, None) or self._new_item()
        self._deltas.pop(item, None)
        error = {"type": "server_error", "code": "recognition_failed",
                 "message": f"utterance {index} could not be recognised", "param": None}  # fmt: skip
        await self.send(event("conversation.item.input_audio_transcription.failed", self._event_id(), item_id=item,
                              content_index=0, error=error))  # fmt: skip

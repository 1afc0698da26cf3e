"""The OpenAI Realtime API's client events, pure: parsing them (`parse_event`) and what a session
update does to the session (`apply_update`, `effective`). The protocol as a whole: __init__.py."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field, replace
from typing import Any

from speech_serve.ingress.audio import SUPPORTED_RATES
from speech_serve.ingress.protocols.parsing import (
    ProtocolError,
    brief,
    hotword_list,
    json_object,
    prompt_phrases,
    whole_number,
)
from speech_serve.settings import LimitSettings, RealtimeSettings

PCM_RATE = 24000  # the only PCM rate OpenAI's Realtime API has; ours takes SUPPORTED_RATES (an extension)
FORMATS = ("audio/pcm", "audio/pcmu", "audio/pcma")
BETA_FORMATS = {"pcm16": "audio/pcm", "g711_ulaw": "audio/pcmu", "g711_alaw": "audio/pcma"}
TURN_TYPES = ("server_vad", "semantic_vad")  # semantic_vad is served by the same fsmn-vad
DEFAULT_MODEL = "sensevoice"
EXTRA = "speech_serve"  # the one object on .completed that holds our fields (strict clients ignore it)
# Error codes of our own failures: `server_error` in the error's type; any other is the client's.
SERVER_ERRORS = {"server_busy", "reconnect", "internal", "recognition_failed", "idle_timeout"}
LOGPROBS = "item.input_audio_transcription.logprobs"  # the one `include` value OpenAI defines


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
    prompt: str = ""  # comma-separated phrases: hotwords
    keywords: tuple[str, ...] = ()  # hotwords, as OpenAI's newer live models take them
    logprobs: bool = False  # `include` asked for LOGPROBS: word log-probabilities on deltas and .completed
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
        if "\n" in audio or "\r" in audio:  # MIME-style base64 (76-char lines), as some encoders write it
            audio = audio.replace("\r", "").replace("\n", "")
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
    if session.get("include") is not None:
        include = session["include"]
        if not isinstance(include, list) or not all(isinstance(v, str) for v in include):
            raise EventError("invalid_type", f"session.include must be a list of strings, like [{LOGPROBS!r}]",
                             "session.include")  # fmt: skip
        changes["logprobs"] = LOGPROBS in include
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
    keywords = given.get("keywords")
    if keywords is not None:
        if not isinstance(keywords, list) or not all(isinstance(k, str) and len(k) <= max_chars for k in keywords):
            raise EventError("invalid_type", f"{param}.keywords must be a list of strings", f"{param}.keywords")
        changes["keywords"] = tuple(keywords)
    return changes


def session_hotwords(config: SessionConfig, limits: LimitSettings,
                     event_id: str | None = None) -> tuple[tuple[str, float], ...]:  # fmt: skip
    """The session's hotwords: its prompt's comma-separated phrases and its keywords, bounded as every
    protocol's (EventError names the field)."""
    phrases = prompt_phrases(config.prompt) + list(config.keywords)
    try:
        return hotword_list(list(dict.fromkeys(phrases)), limits)
    except ProtocolError as exc:
        raise EventError("invalid_value", f"{exc} (from the transcription's prompt and keywords)",
                         "session.audio.input.transcription", event_id) from None


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

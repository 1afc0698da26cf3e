"""What the protocol modules share: the error a client's mistake raises, reading a JSON text frame
within bounds, string fields, quoting a client's value safely, whole numbers, interim text as deltas,
and hotword lists."""

from __future__ import annotations

import json
import reprlib
from typing import Any

from speech_serve.settings import LimitSettings

DEFAULT_LIMITS = LimitSettings()  # where a parser is called without the session's (tools, tests)


class ProtocolError(ValueError):
    """The client broke the protocol. `code` goes into the error frame; `param` names the field
    at fault, for protocols whose error frames say so (Realtime)."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code = code
        self.param = param


_BRIEF_CHARS = 40
_brief = reprlib.Repr()  # never builds the whole repr of a huge or deeply nested value
_brief.maxstring = _brief.maxother = _BRIEF_CHARS
_brief.maxlist = _brief.maxdict = _brief.maxtuple = 3
_brief.maxlevel = 1


def brief(value: Any) -> str:
    """A client's value, short enough to quote in an error message (the frame may be megabytes)."""
    text = _brief.repr(value)
    return text if len(text) <= _BRIEF_CHARS else text[: _BRIEF_CHARS - 3] + "..."


def json_object(text: str, max_string_chars: int | None = None) -> dict[str, Any]:
    """A text frame as a JSON object, or the protocol error every adapter answers with.
    `max_string_chars` bounds its top-level string fields (wav_name, speaker_group, ...: some are
    echoed in every answer or kept for the session)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProtocolError("invalid_json", f"text frame is not JSON: {exc.msg}") from None
    except RecursionError:  # '[[[[...' deeper than the decoder's recursion limit
        raise ProtocolError("invalid_json", "text frame is nested too deeply") from None
    except ValueError:  # an integer past Python's limit on digits (4300)
        raise ProtocolError("invalid_json", "text frame holds a number with too many digits") from None
    if not isinstance(data, dict):
        raise ProtocolError("bad_message", "text frame must be a JSON object")
    if "\\u" in text:  # only escapes can make a lone surrogate: the frame itself was UTF-8
        _check_unicode(data)
    if max_string_chars is not None:
        for key, value in data.items():
            if isinstance(value, str) and len(value) > max_string_chars:
                raise ProtocolError(
                    "field_too_long", f"{brief(key)} is {len(value)} characters long; at most {max_string_chars}"
                )
    return data


def text_field(data: dict[str, Any], key: str, default: str = "") -> str:
    """A string field, or `default` when absent or null. Anything else is the client's mistake: a list
    or an object would be str()ed whole into answers and logs, past the bound `json_object` puts on
    top-level strings."""
    value = data.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise ProtocolError("bad_message", f"{brief(key)} must be a string, not {type(value).__name__}")
    return value


def _check_unicode(data: dict[str, Any]) -> None:
    """A lone surrogate escape ("\\ud800") is valid JSON but not text: it cannot be echoed in a text frame
    (FunASR answers echo wav_name) nor bound in SQLite (speaker_group)."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError("invalid_json", "text frame escapes a lone UTF-16 surrogate (\\ud800-\\udfff)") from None
    except RecursionError:
        raise ProtocolError("invalid_json", "text frame is nested too deeply") from None


def whole_number(value: Any) -> int | None:
    """A JSON number that is a whole number (16000 or 16000.0) as an int; None for anything
    else, booleans included (True == 1 in Python)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def text_delta(sent: str, text: str) -> str | None:
    """What to add to the interim text already sent, or None if the new text revised it
    (the segment's final answer then sets the record straight)."""
    return text[len(sent) :] if text.startswith(sent) else None


def prompt_phrases(prompt: str) -> list[str]:
    """The phrases of an OpenAI `prompt` taken as hotwords: separated by commas or line breaks."""
    return [p.strip() for p in prompt.replace("\n", ",").split(",") if p.strip()]


def hotword_list(value: Any, limits: LimitSettings, scale: float = 1.0) -> tuple[tuple[str, float], ...]:
    """A client's hotwords as (phrase, bonus per token): `{"phrase": weight, ...}`, a list of phrases,
    or one string of phrases separated by spaces or commas (FunASR's older clients); a weight given is
    divided by `scale` (FunASR's clients weigh in tens), one left out is `limits.hotword_weight`.
    Bounded: `max_hotwords` phrases of `max_hotword_chars`, weights in (0, `max_hotword_weight`]."""
    if value is None or value == "" or value == [] or value == {}:
        return ()
    if isinstance(value, str):
        value = value.replace(",", " ").split()
    if isinstance(value, list):
        value = {phrase: None for phrase in value}
    if not isinstance(value, dict):
        raise ProtocolError("bad_hotwords", "hotwords must be an object {phrase: weight}, a list or a string")
    if len(value) > limits.max_hotwords:
        raise ProtocolError("bad_hotwords", f"{len(value)} hotwords; at most {limits.max_hotwords}")
    out = []
    for phrase, weight in value.items():
        if not isinstance(phrase, str) or not phrase.strip() or len(phrase) > limits.max_hotword_chars:
            raise ProtocolError("bad_hotwords", f"hotword {brief(phrase)}: a phrase of 1 to "
                                f"{limits.max_hotword_chars} characters")  # fmt: skip
        if weight is None:
            bonus = limits.hotword_weight
        elif isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
            raise ProtocolError("bad_hotwords", f"hotword {brief(phrase)}: its weight must be a positive number")
        else:
            bonus = min(weight / scale, limits.max_hotword_weight)
        out.append((phrase.strip(), float(bonus)))
    return tuple(out)

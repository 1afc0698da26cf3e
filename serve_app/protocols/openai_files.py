"""`POST /v1/audio/transcriptions`, shaped like OpenAI's endpoint: pure request checks and rendering.

One entry in `segments` per VAD segment, with our extra fields beside OpenAI's.
"""

from __future__ import annotations

import json
from collections import Counter

from serve_app.messages import UtteranceResult
from serve_app.protocols.errors import brief

RESPONSE_FORMATS = ("json", "text", "verbose_json")


class TranscriptionRequestError(ValueError):
    """A bad request; the ingress answers it with HTTP 400 and this message."""


def check_response_format(response_format: str) -> str:
    if response_format not in RESPONSE_FORMATS:
        raise TranscriptionRequestError(
            f"response_format {brief(response_format)} is not supported; use one of {', '.join(RESPONSE_FORMATS)}"
        )
    return response_format


def _join(results: list[UtteranceResult]) -> str:
    return " ".join(r.text for r in results if r.text).strip()


def _main_language(results: list[UtteranceResult]) -> str | None:
    langs = Counter(r.language for r in results if r.language)
    return langs.most_common(1)[0][0] if langs else None


def render(response_format: str, results: list[UtteranceResult], duration_s: float, models: str) -> tuple[str, str]:
    """Return (body, media type)."""
    text = _join(results)
    if response_format == "text":
        return text + "\n", "text/plain; charset=utf-8"
    if response_format == "json":
        return json.dumps({"text": text, "models": models}, ensure_ascii=False), "application/json"
    body = {
        "task": "transcribe",
        "language": _main_language(results),
        "duration": round(duration_s, 3),
        "text": text,
        "models": models,
        "segments": [
            {
                "id": r.index,
                "start": r.start_ms / 1000,
                "end": r.end_ms / 1000,
                "text": r.text,
                "language": r.language,
                "emotion": r.emotion,
                "event": r.event,
                "speaker": {"label": r.speaker.label, "score": r.speaker.score},
                "latency_ms": r.latency_ms,
            }  # fmt: skip
            for r in results
        ],
    }
    return json.dumps(body, ensure_ascii=False), "application/json"

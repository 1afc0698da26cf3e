"""Turn SenseVoice's tagged output into structured fields.

SenseVoice writes `<|lang|><|EMOTION|><|Event|><|itn|>text`. funasr's
rich_transcription_postprocess turns tags into emoji; clients want fields instead.
"""

from __future__ import annotations

import re

LANGUAGES = {"zh", "en", "yue", "ja", "ko", "nospeech"}
EMOTIONS = {"HAPPY", "SAD", "ANGRY", "NEUTRAL", "FEARFUL", "DISGUSTED", "SURPRISED", "EMO_UNKNOWN"}
EVENTS = {"Speech", "BGM", "Applause", "Laughter", "Cry", "Sneeze", "Breath", "Cough", "Event_UNK"}
_TAG = re.compile(r"<\|([^|>]*)\|>")


def parse_sensevoice(raw: str) -> tuple[str, str | None, str | None, str | None]:
    """Return (text, language, emotion, event) from SenseVoice's raw text."""
    language = emotion = event = None
    for name in _TAG.findall(raw):
        if name in LANGUAGES and language is None:
            language = name
        elif name in EMOTIONS and emotion is None:
            emotion = name.lower() if name != "EMO_UNKNOWN" else "unknown"
        elif name in EVENTS and event is None:
            event = name
    text = " ".join(_TAG.sub(" ", raw).split())
    return text, language, emotion, event

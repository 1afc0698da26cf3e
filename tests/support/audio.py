"""The committed audio fixtures."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).parents[1] / "fixtures"
TWO_UTTERANCES_WAV = FIXTURES / "two_utterances.wav"
# Where speech is in two_utterances.wav (from the espeak-ng clips and the sox padding).
TWO_UTTERANCES_SPEECH_MS = [(500, 2800), (4300, 7000)]
# What the espeak-ng clips say (docs/development.md): a check only for real models, not the test ones.
TWO_UTTERANCES_TEXT = ["Turn on the kitchen light, please.", "What is the weather like tomorrow morning?"]
CORPUS = Path(__file__).parents[2] / "loadtest" / "corpus"


def read_pcm(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.int16)

"""Shared fixtures: the test WAV and tiny random-weight models built once per run."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest

from speech_serve.replicas.models import ModelSource, ResolvedModels, materialize, resolve_models
from speech_serve.settings import ModelSettings

FIXTURES = Path(__file__).parent / "fixtures"
TWO_UTTERANCES_WAV = FIXTURES / "two_utterances.wav"
# Where speech is in two_utterances.wav (from the espeak-ng clips and the sox padding).
TWO_UTTERANCES_SPEECH_MS = [(500, 2800), (4300, 7000)]


def read_pcm(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as w:
        assert w.getframerate() == 16000 and w.getnchannels() == 1 and w.getsampwidth() == 2
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.int16)


@pytest.fixture(scope="session")
def two_utterances() -> np.ndarray:
    return read_pcm(TWO_UTTERANCES_WAV)


@pytest.fixture(scope="session")
def model_settings(tmp_path_factory) -> ModelSettings:
    """Offline settings: bundled fsmn-vad, tiny random SenseVoice and ERes2NetV2."""
    return ModelSettings(cache_dir=str(tmp_path_factory.mktemp("models")), hub_probe_timeout_s=0.5)


@pytest.fixture(scope="session")
def tiny_models(model_settings) -> ResolvedModels:
    resolved = resolve_models(model_settings, hub_up=False)
    for source in (resolved.asr, resolved.speaker):
        materialize(source)
    return resolved


def source_of(resolved: ResolvedModels, role: str) -> ModelSource:
    return getattr(resolved, role)

"""Shared fixtures: the test WAV and tiny random-weight models built once per run."""

from __future__ import annotations

import numpy as np
import pytest

from speech_serve.replicas.models import ResolvedModels, materialize, resolve_models
from speech_serve.settings import ModelSettings
from speech_serve.voiceprints import open_store
from tests.support.audio import TWO_UTTERANCES_WAV, read_pcm


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


@pytest.fixture
def store(tmp_path):
    """An empty voiceprint store of this test's own."""
    return open_store(f"sqlite:///{tmp_path}/vp.sqlite3")

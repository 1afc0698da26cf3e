"""Shared fixtures: the test WAV, tiny random-weight models built once per run, and the voiceprint
store on each backend (a throwaway PostgreSQL server started once per run: tests/support/postgres.py)."""

from __future__ import annotations

import numpy as np
import pytest

from speech_serve.replicas.models import ResolvedModels, materialize, resolve_models
from speech_serve.settings import ModelSettings
from speech_serve.voiceprints import open_store
from tests.support.audio import TWO_UTTERANCES_WAV, read_pcm
from tests.support.postgres import PostgresServer, remove_server, start_server


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


@pytest.fixture(scope="session")
def postgres() -> PostgresServer:
    """A private PostgreSQL server for this run (fails, never skips, where the binaries are missing)."""
    server = start_server()
    yield server
    remove_server(server)


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    """An empty voiceprint store of this test's own, on each backend."""
    if request.param == "postgres":
        return open_store(request.getfixturevalue("postgres").create_database())
    return open_store(f"sqlite:///{tmp_path}/vp.sqlite3")

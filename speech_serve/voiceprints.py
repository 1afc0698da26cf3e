"""Enrolled voiceprints and each household's hotword list: the store, shared by the admin API
(speech_serve/ingress/speakers.py writes) and the Speaker replicas (speech_serve/replicas/speaker.py
matches). Like messages.py, it is what crosses processes: here through a database rather than a call.

`VoiceprintStore` is the interface the rest of the code uses; `open_store(url)` picks the backend
(speech_serve/stores/): `SqliteVoiceprintStore`, the default (one private file on one host), or
`PostgresVoiceprintStore`, a server that every pod of a cluster shares. Both open without failing
(calls raise `StoreUnavailable` while the file or server cannot be used: the service transcribes
without names meanwhile) and migrate their schema to this release's when they open.

A speaker keeps every enrolled embedding; matching compares an utterance with each
speaker's centroid (the normalised mean). An embedding made by one model is never compared
with another model's: every query names the model.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from speech_serve.stores.base import Candidate, StoreUnavailable, Voiceprint, VoiceprintStore, unit
from speech_serve.stores.postgres import PostgresVoiceprintStore
from speech_serve.stores.sqlite import SqliteVoiceprintStore

__all__ = [
    "Candidate", "Match", "PostgresVoiceprintStore", "SqliteVoiceprintStore", "StoreUnavailable", "Voiceprint",
    "VoiceprintStore", "open_store", "store_url", "unit",
]  # fmt: skip


@dataclass(frozen=True)
class Match:
    label: str  # the speaker's name, or "unknown"
    score: float | None  # cosine with the best candidate
    speaker_id: str | None = None


def store_url(url: str) -> str:
    """The URL itself, or for `env:NAME` the value of the environment variable NAME, read now (so a
    database password lives in a Kubernetes Secret, not in YAML)."""
    if not url.startswith("env:"):
        return url
    name = url.removeprefix("env:")
    value = os.environ.get(name, "").strip()
    if not value:
        raise ValueError(
            f"voiceprints.store is {url!r}, but the environment variable {name!r} is not set (or is empty) in "
            f"this process: set it to the store URL on every Ingress and Speaker host"
        )
    return value


def open_store(url: str) -> VoiceprintStore:
    """`postgresql://user:password@host:port/db` (or `postgres://...`, any libpq URL): PostgreSQL.
    `sqlite:///abs/path.sqlite3`, `sqlite:///~/x.sqlite3`, or a plain file path: SQLite.
    `env:NAME`: the URL is the environment variable NAME's value."""
    url = store_url(url)
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme in ("postgres", "postgresql"):
        return PostgresVoiceprintStore(url)
    if scheme not in ("", "sqlite"):
        raise ValueError(f"voiceprints.store: unknown scheme {scheme!r}; use postgresql://..., sqlite:///... or a path")
    path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url
    return SqliteVoiceprintStore(Path(path).expanduser())

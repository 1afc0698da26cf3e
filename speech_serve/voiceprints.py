"""Enrolled voiceprints: the store, shared by the admin API (speech_serve/ingress/speakers.py writes)
and the Speaker replicas (speech_serve/replicas/speaker.py matches). Like messages.py, it is what crosses
processes: here through a database rather than a call.

`VoiceprintStore` is the interface the rest of the code uses; `SqliteVoiceprintStore` is the
default (one file, survives restarts, safe under concurrent writers through SQLite's own
locking). A shared database for a multi-node cluster implements the same interface.

The file holds biometric data: it and SQLite's side files (-wal, -shm, which SQLite creates with
the database's mode) are the owner's only (0600). Opening never fails: a file that cannot be
opened (corrupt, unreadable) makes each call raise `StoreUnavailable`, so the service starts and
transcribes without names, and the store opens on its first call after the file is fixed.

A speaker keeps every enrolled embedding; matching compares an utterance with each
speaker's centroid (the normalised mean). An embedding made by one model is never compared
with another model's: every query names the model.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class Voiceprint:
    id: str
    name: str
    group: str
    model: str
    dim: int
    embeddings: int
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class Candidate:
    speaker_id: str
    name: str
    centroid: np.ndarray  # unit length


@dataclass(frozen=True)
class Match:
    label: str  # the speaker's name, or "unknown"
    score: float | None  # cosine with the best candidate
    speaker_id: str | None = None


class StoreUnavailable(RuntimeError):
    """The voiceprint store cannot be opened; the message says which file and why."""


class VoiceprintStore(Protocol):
    def create(self, name: str, group: str, model: str, vectors: Sequence[np.ndarray]) -> Voiceprint: ...
    def get(self, speaker_id: str) -> Voiceprint | None: ...
    def list(self, group: str | None = None) -> list[Voiceprint]: ...
    def rename(self, speaker_id: str, name: str) -> Voiceprint | None: ...
    def replace_embeddings(self, speaker_id: str, model: str, vectors: Sequence[np.ndarray]) -> Voiceprint | None: ...
    def delete(self, speaker_id: str) -> bool: ...
    def candidates(self, group: str, model: str) -> list[Candidate]: ...
    def revision(self) -> int: ...


def open_store(url: str) -> VoiceprintStore:
    """`sqlite:///abs/path.sqlite3`, `sqlite:///~/x.sqlite3`, or a plain file path."""
    if url.startswith(("postgres://", "postgresql://")):
        raise ValueError(
            "no Postgres VoiceprintStore is built in yet: implement speech_serve.voiceprints.VoiceprintStore "
            "over your database and return it from open_store; use a sqlite path on a single node"
        )
    path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url
    return SqliteVoiceprintStore(Path(path).expanduser())


def unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(v))
    if not np.isfinite(norm) or norm == 0:
        raise ValueError("embedding is zero or not finite")
    return v / norm


class SqliteVoiceprintStore:
    _SCHEMA = """
    CREATE TABLE IF NOT EXISTS speakers (
        id TEXT PRIMARY KEY, name TEXT NOT NULL, grp TEXT NOT NULL, model TEXT NOT NULL,
        dim INTEGER NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL);
    CREATE INDEX IF NOT EXISTS speakers_grp_model ON speakers (grp, model);
    CREATE TABLE IF NOT EXISTS embeddings (
        speaker_id TEXT NOT NULL REFERENCES speakers(id) ON DELETE CASCADE, vector BLOB NOT NULL);
    CREATE INDEX IF NOT EXISTS embeddings_speaker ON embeddings (speaker_id);
    CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
    INSERT OR IGNORE INTO meta VALUES ('revision', 0);
    """

    PRIVATE = 0o600  # biometric data: the owner only
    SIDE_FILES = ("-wal", "-shm", "-journal")

    def __init__(self, path: Path):
        self.path = path
        self._local = threading.local()
        self._schema_ready = False  # set once the file opened and holds the schema (any thread)
        try:  # now, so a bad file is reported at start and an old one made private at once
            self._db()
        except StoreUnavailable as exc:
            logger.error("%s; speakers are `unknown` and the admin API answers 503 until it is fixed", exc)

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:  # one connection per thread: sqlite3 connections are not shared across threads
            db = self._open()
            self._local.db = db
        return db

    def _open(self) -> sqlite3.Connection:
        """A connection to a private file holding the schema, or StoreUnavailable."""
        db = None
        try:
            if not self._schema_ready:
                self._make_private()
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA foreign_keys=ON")
            if not self._schema_ready:
                db.executescript(self._SCHEMA)  # idempotent; executescript manages its own transaction
                self._schema_ready = True
            return db
        except (sqlite3.Error, OSError) as exc:
            if db is not None:
                db.close()
            raise StoreUnavailable(f"voiceprint store {self.path} cannot be opened: {exc}") from exc

    def _make_private(self) -> None:
        """Create the file 0600 before SQLite does (its side files copy its mode); tighten a file
        (and side files) made before this rule."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, self.PRIVATE))
        for file in (self.path, *(self.path.with_name(self.path.name + s) for s in self.SIDE_FILES)):
            if file.exists():
                file.chmod(self.PRIVATE)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT: writers queue on SQLite's lock instead of failing. Whatever
        fails, the COMMIT itself included, leaves no transaction open on this thread's connection
        (every later write would fail with "cannot start a transaction within a transaction")."""
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    @staticmethod
    def _bump(db: sqlite3.Connection) -> None:
        db.execute("UPDATE meta SET value = value + 1 WHERE key = 'revision'")

    def _row(self, db: sqlite3.Connection, speaker_id: str) -> Voiceprint | None:
        row = db.execute(
            "SELECT s.id, s.name, s.grp, s.model, s.dim, COUNT(e.rowid), s.created_at, s.updated_at "
            "FROM speakers s LEFT JOIN embeddings e ON e.speaker_id = s.id WHERE s.id = ? GROUP BY s.id",
            (speaker_id,),
        ).fetchone()
        return Voiceprint(*row) if row else None

    def create(self, name: str, group: str, model: str, vectors: Sequence[np.ndarray]) -> Voiceprint:
        units = [unit(v) for v in vectors]
        if not units:
            raise ValueError("at least one embedding is needed")
        speaker_id, now = uuid.uuid4().hex[:12], time.time()
        with self._tx() as db:
            db.execute(
                "INSERT INTO speakers VALUES (?, ?, ?, ?, ?, ?, ?)",
                (speaker_id, name, group, model, len(units[0]), now, now),
            )
            db.executemany("INSERT INTO embeddings VALUES (?, ?)", [(speaker_id, u.tobytes()) for u in units])
            self._bump(db)
            return self._row(db, speaker_id)

    def get(self, speaker_id: str) -> Voiceprint | None:
        return self._row(self._db(), speaker_id)

    def list(self, group: str | None = None) -> list[Voiceprint]:
        ids = (
            self._db()
            .execute("SELECT id FROM speakers WHERE (? IS NULL OR grp = ?) ORDER BY created_at", (group, group))
            .fetchall()
        )
        return [v for (i,) in ids if (v := self.get(i)) is not None]

    def rename(self, speaker_id: str, name: str) -> Voiceprint | None:
        with self._tx() as db:
            if not db.execute(
                "UPDATE speakers SET name = ?, updated_at = ? WHERE id = ?", (name, time.time(), speaker_id)
            ).rowcount:
                return None
            self._bump(db)
            return self._row(db, speaker_id)

    def replace_embeddings(self, speaker_id: str, model: str, vectors: Sequence[np.ndarray]) -> Voiceprint | None:
        units = [unit(v) for v in vectors]
        if not units:
            raise ValueError("at least one embedding is needed")
        with self._tx() as db:
            updated = db.execute(
                "UPDATE speakers SET model = ?, dim = ?, updated_at = ? WHERE id = ?",
                (model, len(units[0]), time.time(), speaker_id),
            ).rowcount
            if not updated:
                return None
            db.execute("DELETE FROM embeddings WHERE speaker_id = ?", (speaker_id,))
            db.executemany("INSERT INTO embeddings VALUES (?, ?)", [(speaker_id, u.tobytes()) for u in units])
            self._bump(db)
            return self._row(db, speaker_id)

    def delete(self, speaker_id: str) -> bool:
        with self._tx() as db:
            gone = db.execute("DELETE FROM speakers WHERE id = ?", (speaker_id,)).rowcount > 0
            if gone:
                self._bump(db)
            return gone

    def candidates(self, group: str, model: str) -> list[Candidate]:
        rows = (
            self._db()
            .execute(
                "SELECT s.id, s.name, e.vector FROM speakers s JOIN embeddings e ON e.speaker_id = s.id "
                "WHERE s.grp = ? AND s.model = ? ORDER BY s.id",
                (group, model),
            )
            .fetchall()
        )
        by_speaker: dict[str, tuple[str, list[np.ndarray]]] = {}
        for sid, name, blob in rows:
            by_speaker.setdefault(sid, (name, []))[1].append(np.frombuffer(blob, dtype=np.float32))
        return [Candidate(sid, name, unit(np.mean(vs, axis=0))) for sid, (name, vs) in by_speaker.items()]

    def revision(self) -> int:
        return int(self._db().execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()[0])

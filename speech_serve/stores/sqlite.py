"""The default store: one SQLite file on one host (survives restarts; concurrent writers, threads or
processes, queue on SQLite's own lock).

The file holds biometric data: it and SQLite's side files (-wal, -shm, which SQLite creates with
the database's mode) are the owner's only (0600). Opening never fails: a file that cannot be
opened (corrupt, unreadable) makes each call raise `StoreUnavailable`, so the service starts and
transcribes without names, and the store opens on its first call after the file is fixed.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from speech_serve.stores.base import StoreUnavailable
from speech_serve.stores.migrations import migrate
from speech_serve.stores.sql import SqlStore, T

logger = logging.getLogger("ray.serve")


class SqliteVoiceprintStore(SqlStore):
    PRIVATE = 0o600  # biometric data: the owner only
    SIDE_FILES = ("-wal", "-shm", "-journal")

    def __init__(self, path: Path):
        self.path = path
        self._local = threading.local()
        self._schema_ready = False  # set once the file opened and holds the latest schema (any thread)
        try:  # now, so a bad file is reported at start and an old one made private and migrated at once
            self._db()
        except StoreUnavailable as exc:
            logger.error("%s; speakers are `unknown` and the admin API answers 503 until it is fixed", exc)

    def __repr__(self) -> str:
        return f"SqliteVoiceprintStore({str(self.path)!r})"

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:  # one connection per thread: sqlite3 connections are not shared across threads
            db = self._open()
            self._local.db = db
        return db

    def _open(self) -> sqlite3.Connection:
        """A connection to a private file holding the latest schema, or StoreUnavailable."""
        db = None
        try:
            if not self._schema_ready:
                self._make_private()
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA foreign_keys=ON")
            if not self._schema_ready:
                self._migrate(db)
                self._schema_ready = True
            return db
        except (sqlite3.Error, OSError) as exc:
            if db is not None:
                db.close()
            raise StoreUnavailable(f"voiceprint store {self.path} cannot be opened: {exc}") from exc

    def _migrate(self, db: sqlite3.Connection) -> None:
        """The schema steps this file lacks, under BEGIN IMMEDIATE: a second process opening the file
        at the same time waits, then finds them applied."""

        def version() -> int | None:
            row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            return row[0] if row else None

        with self._tx_on(db):
            migrate(db.execute, version, "sqlite")

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
        with self._tx_on(self._db()) as db:
            yield db

    @staticmethod
    @contextmanager
    def _tx_on(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT: writers queue on SQLite's lock instead of failing. Whatever
        fails, the COMMIT itself included, leaves no transaction open on this thread's connection
        (every later write would fail with "cannot start a transaction within a transaction")."""
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        with self._tx() as db:
            return work(db)

    def _read(self, work: Callable[[sqlite3.Connection], T]) -> T:
        return work(self._db())

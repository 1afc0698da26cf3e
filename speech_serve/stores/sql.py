"""The queries both SQL backends run, written once with `?` placeholders, each as a unit of work (a
function of a `Db`). A backend runs them: `_write(work)` in one transaction that waits for the other
writers (so revisions never collide and a list is replaced whole), `_read(work)` on a connection to
read on (a backend whose server can go away may run a unit again on a new connection).

Every change moves the revision in the transaction that makes it: a reader that sees the new
revision sees the change.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol, TypeVar

import numpy as np

from speech_serve.stores.base import Candidate, Voiceprint, checked_hotwords, unit


class Db(Protocol):
    """What a unit of work runs statements on (a sqlite3 connection is one as it is)."""

    def execute(self, sql: str, parameters: Sequence[Any] = ...) -> Any: ...
    def executemany(self, sql: str, seq: Iterator[Sequence[Any]] | list[Sequence[Any]]) -> Any: ...


T = TypeVar("T")
VOICEPRINT = (
    "SELECT s.id, s.name, s.grp, s.model, s.dim, COUNT(e.speaker_id), s.created_at, s.updated_at "
    "FROM speakers s LEFT JOIN embeddings e ON e.speaker_id = s.id "
)


class SqlStore:
    """VoiceprintStore over SQL; see the module docstring for what a backend adds."""

    def _write(self, work: Callable[[Db], T]) -> T:
        raise NotImplementedError

    def _read(self, work: Callable[[Db], T]) -> T:
        raise NotImplementedError

    @staticmethod
    def _bump(db: Db) -> None:
        db.execute("UPDATE meta SET value = value + 1 WHERE key = 'revision'")

    @staticmethod
    def _row(db: Db, speaker_id: str) -> Voiceprint | None:
        row = db.execute(VOICEPRINT + "WHERE s.id = ? GROUP BY s.id", (speaker_id,)).fetchone()
        return Voiceprint(*row) if row else None

    @staticmethod
    def _insert_embeddings(db: Db, speaker_id: str, units: list[np.ndarray]) -> None:
        db.executemany("INSERT INTO embeddings (speaker_id, vector) VALUES (?, ?)",
                       [(speaker_id, u.tobytes()) for u in units])  # fmt: skip

    def create(self, name: str, group: str, model: str, vectors: Sequence[np.ndarray]) -> Voiceprint:
        units = _units(vectors)

        def work(db: Db) -> Voiceprint:
            speaker_id, now = uuid.uuid4().hex[:12], time.time()
            db.execute("INSERT INTO speakers VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (speaker_id, name, group, model, len(units[0]), now, now))  # fmt: skip
            self._insert_embeddings(db, speaker_id, units)
            self._bump(db)
            return self._row(db, speaker_id)

        return self._write(work)

    def get(self, speaker_id: str) -> Voiceprint | None:
        return self._read(lambda db: self._row(db, speaker_id))

    def list(self, group: str | None = None) -> list[Voiceprint]:
        def work(db: Db) -> list[Voiceprint]:
            rows = db.execute(VOICEPRINT + "WHERE (CAST(? AS TEXT) IS NULL OR s.grp = ?) GROUP BY s.id "
                              "ORDER BY s.created_at, s.id", (group, group)).fetchall()  # fmt: skip
            return [Voiceprint(*row) for row in rows]

        return self._read(work)

    def rename(self, speaker_id: str, name: str) -> Voiceprint | None:
        def work(db: Db) -> Voiceprint | None:
            changed = db.execute("UPDATE speakers SET name = ?, updated_at = ? WHERE id = ?",
                                 (name, time.time(), speaker_id)).rowcount  # fmt: skip
            if not changed:
                return None
            self._bump(db)
            return self._row(db, speaker_id)

        return self._write(work)

    def replace_embeddings(self, speaker_id: str, model: str, vectors: Sequence[np.ndarray]) -> Voiceprint | None:
        units = _units(vectors)

        def work(db: Db) -> Voiceprint | None:
            changed = db.execute("UPDATE speakers SET model = ?, dim = ?, updated_at = ? WHERE id = ?",
                                 (model, len(units[0]), time.time(), speaker_id)).rowcount  # fmt: skip
            if not changed:
                return None
            db.execute("DELETE FROM embeddings WHERE speaker_id = ?", (speaker_id,))
            self._insert_embeddings(db, speaker_id, units)
            self._bump(db)
            return self._row(db, speaker_id)

        return self._write(work)

    def delete(self, speaker_id: str) -> bool:
        def work(db: Db) -> bool:
            gone = db.execute("DELETE FROM speakers WHERE id = ?", (speaker_id,)).rowcount > 0
            if gone:
                self._bump(db)
            return gone

        return self._write(work)

    def candidates(self, group: str, model: str) -> list[Candidate]:
        rows = self._read(lambda db: db.execute(
            "SELECT s.id, s.name, e.vector FROM speakers s JOIN embeddings e ON e.speaker_id = s.id "
            "WHERE s.grp = ? AND s.model = ? ORDER BY s.id", (group, model)).fetchall())  # fmt: skip
        by_speaker: dict[str, tuple[str, list[np.ndarray]]] = {}
        for sid, name, blob in rows:
            by_speaker.setdefault(sid, (name, []))[1].append(np.frombuffer(blob, dtype=np.float32))
        return [Candidate(sid, name, unit(np.mean(vs, axis=0))) for sid, (name, vs) in by_speaker.items()]

    def hotwords(self, group: str) -> dict[str, float]:
        rows = self._read(lambda db: db.execute(
            "SELECT phrase, weight FROM hotwords WHERE grp = ? ORDER BY phrase", (group,)).fetchall())  # fmt: skip
        return {phrase: float(weight) for phrase, weight in rows}

    def set_hotwords(self, group: str, hotwords: Mapping[str, float]) -> None:
        """Replace the group's whole list (an empty one deletes it) in one transaction: a reader sees
        the old list or the new one, never a mix. Moves the revision even when nothing differs."""
        entries = [(group, phrase, weight) for phrase, weight in checked_hotwords(hotwords).items()]

        def work(db: Db) -> None:
            db.execute("DELETE FROM hotwords WHERE grp = ?", (group,))
            if entries:
                db.executemany("INSERT INTO hotwords (grp, phrase, weight) VALUES (?, ?, ?)", entries)
            self._bump(db)

        self._write(work)

    def revision(self) -> int:
        return int(self._read(lambda db: db.execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()[0]))


def _units(vectors: Sequence[np.ndarray]) -> list[np.ndarray]:
    units = [unit(v) for v in vectors]
    if not units:
        raise ValueError("at least one embedding is needed")
    return units

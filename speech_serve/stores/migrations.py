"""The stores' schema, as numbered steps applied in order when a store opens.

The version reached is the row `schema` of the table `meta` (which also holds the `revision`). A
database made before versions (today's SQLite files: speakers, embeddings, meta) reads as version 0,
and step 1 is written so that it finds its tables there and changes nothing: such a file migrates in
place. Steps only add, so a replica of an older release keeps working on a newer schema.

The caller runs `migrate` inside one transaction that no other opener can run at the same time
(SQLite: BEGIN IMMEDIATE; PostgreSQL: an advisory lock), so two processes opening at once apply each
step once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

logger = logging.getLogger("ray.serve")
Dialect = Literal["sqlite", "postgres"]


@dataclass(frozen=True)
class Step:
    version: int
    why: str
    sqlite: tuple[str, ...]
    postgres: tuple[str, ...]


# Made first, outside the steps: where the version is read from. Today's SQLite files have it already.
META = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BIGINT NOT NULL)"

STEPS = (
    Step(
        1,
        "speakers, their embeddings and the revision (the schema of the files made before versions)",
        sqlite=(
            "CREATE TABLE IF NOT EXISTS speakers (id TEXT PRIMARY KEY, name TEXT NOT NULL, grp TEXT NOT NULL, "
            "model TEXT NOT NULL, dim INTEGER NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL)",
            "CREATE INDEX IF NOT EXISTS speakers_grp_model ON speakers (grp, model)",
            "CREATE TABLE IF NOT EXISTS embeddings (speaker_id TEXT NOT NULL REFERENCES speakers(id) "
            "ON DELETE CASCADE, vector BLOB NOT NULL)",
            "CREATE INDEX IF NOT EXISTS embeddings_speaker ON embeddings (speaker_id)",
            "INSERT OR IGNORE INTO meta VALUES ('revision', 0)",
        ),
        postgres=(
            "CREATE TABLE speakers (id TEXT PRIMARY KEY, name TEXT NOT NULL, grp TEXT NOT NULL, "
            "model TEXT NOT NULL, dim INTEGER NOT NULL, created_at DOUBLE PRECISION NOT NULL, "
            "updated_at DOUBLE PRECISION NOT NULL)",
            "CREATE INDEX speakers_grp_model ON speakers (grp, model)",
            "CREATE TABLE embeddings (speaker_id TEXT NOT NULL REFERENCES speakers(id) ON DELETE CASCADE, "
            "vector BYTEA NOT NULL)",
            "CREATE INDEX embeddings_speaker ON embeddings (speaker_id)",
            "INSERT INTO meta VALUES ('revision', 0) ON CONFLICT DO NOTHING",
        ),
    ),
    Step(
        2,
        "each household's hotword list: phrase -> weight",
        sqlite=(
            "CREATE TABLE hotwords (grp TEXT NOT NULL, phrase TEXT NOT NULL, weight REAL NOT NULL, "
            "PRIMARY KEY (grp, phrase))",
        ),
        postgres=(
            "CREATE TABLE hotwords (grp TEXT NOT NULL, phrase TEXT NOT NULL, weight DOUBLE PRECISION NOT NULL, "
            "PRIMARY KEY (grp, phrase))",
        ),
    ),
)
LATEST = STEPS[-1].version
assert [s.version for s in STEPS] == list(range(1, LATEST + 1)), "steps are numbered 1, 2, ... in order"


def migrate(execute: Callable[..., Any], read_version: Callable[[], int | None], dialect: Dialect) -> list[int]:
    """Apply the steps past the database's version; the versions applied. `execute(sql, params=())`
    runs one statement; `read_version()` is the `schema` row of meta (None: a database before versions)."""
    execute(META)
    current = read_version() or 0
    if current > LATEST:
        logger.warning("voiceprint store schema is version %d, newer than this release's %d: using it as is "
                       "(steps only add)", current, LATEST)  # fmt: skip
        return []
    applied = []
    for step in STEPS[current:]:
        for statement in getattr(step, dialect):
            execute(statement)
        applied.append(step.version)
    if applied:
        upsert = "INSERT INTO meta VALUES ('schema', {p}) ON CONFLICT (key) DO UPDATE SET value = excluded.value"
        execute(upsert.format(p="?" if dialect == "sqlite" else "%s"), (LATEST,))
        logger.info("voiceprint store schema migrated to version %d (steps %s)", LATEST, applied)
    return applied

"""What only the SQLite file does: it is private to its owner, a broken file is reported and not
fatal, a failed COMMIT leaves no transaction open, and a file from before schema versions migrates in
place. (The store's shared promises, on both backends: tests/unit/test_voiceprints.py.)"""

import multiprocessing
import os
import sqlite3
import stat

import pytest

from speech_serve.replicas.speaker import Identifier
from speech_serve.stores.migrations import LATEST
from speech_serve.voiceprints import SqliteVoiceprintStore, StoreUnavailable, open_store
from tests.support.fakes import vec

# The schema every file had before schema versions (speech_serve/voiceprints.py until hotwords came),
# verbatim: such files exist on hosts and must open as they are.
UNVERSIONED_SCHEMA = """
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


def _unversioned_file(path) -> None:
    """A file as the release before schema versions left it: alice enrolled, revision 1."""
    db = sqlite3.connect(path)
    db.executescript(UNVERSIONED_SCHEMA)
    db.execute("INSERT INTO speakers VALUES ('a1', 'alice', 'home', 'ge2e', 4, 1.0, 1.0)")
    db.execute("INSERT INTO embeddings VALUES ('a1', ?)", (vec(1, 0).tobytes(),))
    db.execute("UPDATE meta SET value = 1 WHERE key = 'revision'")
    db.commit()
    db.close()


def _schema_version(path) -> int:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]


def test_a_file_from_before_schema_versions_migrates_in_place(tmp_path):
    path = tmp_path / "vp.sqlite3"
    _unversioned_file(path)
    store = open_store(str(path))
    assert _schema_version(path) == LATEST
    assert [(v.id, v.name, v.embeddings) for v in store.list()] == [("a1", "alice", 1)]
    assert [c.name for c in store.candidates("home", "ge2e")] == ["alice"] and store.revision() == 1
    store.set_hotwords("home", {"lights": 1.0})  # the new table is there
    assert store.hotwords("home") == {"lights": 1.0} and store.revision() == 2
    again = open_store(str(path))  # migrating is idempotent: a second open applies nothing
    assert again.hotwords("home") == {"lights": 1.0} and _schema_version(path) == LATEST


def _open_and_list(path: str) -> None:
    assert [v.name for v in open_store(path).list()] == ["alice"]


def test_processes_opening_an_old_file_at_once_migrate_it_once(tmp_path):
    path = tmp_path / "vp.sqlite3"
    _unversioned_file(path)
    procs = [multiprocessing.get_context("spawn").Process(target=_open_and_list, args=(str(path),)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0] and _schema_version(path) == LATEST


def test_the_database_and_its_wal_are_private_to_the_owner(tmp_path):
    old = os.umask(0o022)  # the usual umask: files would be world-readable
    try:
        store = open_store(str(tmp_path / "vp.sqlite3"))
        store.create("alice", "home", "ge2e", [vec(1, 0)])  # the WAL and its index exist from here
    finally:
        os.umask(old)
    files = sorted(tmp_path.glob("vp.sqlite3*"))
    assert {f.name for f in files} >= {"vp.sqlite3", "vp.sqlite3-wal", "vp.sqlite3-shm"}
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {f.name: "0o600" for f in files}


def test_an_existing_world_readable_database_is_made_private(tmp_path):
    path = tmp_path / "vp.sqlite3"
    open_store(str(path)).create("alice", "home", "ge2e", [vec(1, 0)])
    path.chmod(0o644)
    open_store(str(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_failed_commit_is_rolled_back_and_the_store_goes_on(tmp_path):
    """A COMMIT can fail (a deferred constraint, a full disk, SQLITE_BUSY): the transaction must not
    stay open, or every later write fails with 'cannot start a transaction within a transaction'."""
    store = SqliteVoiceprintStore(tmp_path / "vp.sqlite3")
    with pytest.raises(sqlite3.IntegrityError):
        with store._tx() as db:
            db.execute("PRAGMA defer_foreign_keys = ON")  # the FK check moves to COMMIT, which fails
            db.execute("INSERT INTO embeddings VALUES ('no-such-speaker', x'00')")
    assert store.create("alice", "home", "ge2e", [vec(1, 0)]).name == "alice"
    ghosts = store._db().execute("SELECT COUNT(*) FROM embeddings WHERE speaker_id = 'no-such-speaker'")
    assert ghosts.fetchone() == (0,)


def test_a_corrupt_database_is_reported_not_fatal(tmp_path):
    """Opening never raises (the Ingress and Speaker replicas start, the speaker model may be off);
    the store's calls say what is wrong, and matching answers `unknown`."""
    path = tmp_path / "vp.sqlite3"
    path.write_bytes(b"this is not a SQLite database" * 100)
    store = open_store(str(path))
    with pytest.raises(StoreUnavailable, match="vp.sqlite3"):
        store.list()
    with pytest.raises(StoreUnavailable, match="vp.sqlite3"):
        store.hotwords("home")
    match = Identifier(store, "ge2e", threshold=0.8, refresh_s=0.0).identify(vec(1, 0), "home")
    assert (match.label, match.score) == ("unknown", None)
    path.unlink()  # the operator moves the bad file away: the store opens on its next use
    assert store.list() == [] and store.hotwords("home") == {}

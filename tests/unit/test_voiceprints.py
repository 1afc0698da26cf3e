import multiprocessing
import threading

import numpy as np
import pytest

from speech_serve.replicas.speaker import Identifier
from speech_serve.voiceprints import SqliteVoiceprintStore, open_store
from tests.support.fakes import vec


def _enrol_many(path: str, worker: int, n: int) -> None:
    s = open_store(path)
    for i in range(n):
        s.create(f"w{worker}-{i}", "g", "m", [vec(1, worker, i)])


def test_create_list_rename_reenroll_delete(store):
    rev0 = store.revision()
    alice = store.create("alice", "home", "ge2e", [vec(1, 0), vec(0.9, 0.1)])
    assert (alice.name, alice.group, alice.model, alice.dim, alice.embeddings) == ("alice", "home", "ge2e", 4, 2)
    bob = store.create("bob", "office", "ge2e", [vec(0, 1)])
    assert [v.name for v in store.list()] == ["alice", "bob"] and [v.name for v in store.list("home")] == ["alice"]
    assert store.rename(alice.id, "Alice").name == "Alice"
    assert store.replace_embeddings(bob.id, "ge2e", [vec(0, 1), vec(0, 0.8, 0.2), vec(0, 1, 0.1)]).embeddings == 3
    assert store.delete(alice.id) and not store.delete(alice.id)
    assert store.get(alice.id) is None and store.rename("nope", "x") is None
    assert store.revision() == rev0 + 5  # every change moves the revision: replicas refresh on it


def test_embeddings_of_another_model_are_never_candidates(store):
    store.create("alice", "home", "ge2e", [vec(1, 0)])
    store.create("alice-eres", "home", "eres2netv2", [vec(1, 0, dim=6)])
    assert [c.name for c in store.candidates("home", "ge2e")] == ["alice"]
    assert [c.name for c in store.candidates("home", "eres2netv2")] == ["alice-eres"]
    assert store.candidates("elsewhere", "ge2e") == []


def test_centroid_is_the_normalised_mean(store):
    store.create("a", "g", "m", [vec(1, 0), vec(0, 1)])
    (c,) = store.candidates("g", "m")
    assert np.allclose(c.centroid, vec(1, 1) / np.sqrt(2))


def test_store_survives_reopening(tmp_path):
    path = tmp_path / "vp.sqlite3"
    speaker_id = SqliteVoiceprintStore(path).create("alice", "home", "ge2e", [vec(1, 0)]).id
    reopened = SqliteVoiceprintStore(path)
    assert reopened.get(speaker_id).name == "alice" and len(reopened.candidates("home", "ge2e")) == 1


def test_bad_embeddings_are_refused(store):
    with pytest.raises(ValueError):
        store.create("x", "g", "m", [])
    with pytest.raises(ValueError):
        store.create("x", "g", "m", [vec(0, 0)])
    assert store.list() == []


def test_concurrent_enrolments_from_threads_and_processes_all_land(tmp_path):
    path = str(tmp_path / "vp.sqlite3")
    open_store(path)  # schema first
    threads = [threading.Thread(target=_enrol_many, args=(path, w, 10)) for w in range(8)]
    procs = [
        multiprocessing.get_context("spawn").Process(target=_enrol_many, args=(path, 100 + w, 10)) for w in range(3)
    ]
    for t in threads + procs:
        t.start()
    for t in threads + procs:
        t.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs)
    store = open_store(path)
    names = [v.name for v in store.list()]
    assert len(names) == len(set(names)) == 110
    assert len(store.candidates("g", "m")) == 110 and store.revision() == 110


def test_the_database_and_its_wal_are_private_to_the_owner(tmp_path):
    import os
    import stat

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
    import stat

    path = tmp_path / "vp.sqlite3"
    open_store(str(path)).create("alice", "home", "ge2e", [vec(1, 0)])
    path.chmod(0o644)
    open_store(str(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_failed_commit_is_rolled_back_and_the_store_goes_on(store):
    """A COMMIT can fail (a deferred constraint, a full disk, SQLITE_BUSY): the transaction must not
    stay open, or every later write fails with 'cannot start a transaction within a transaction'."""
    import sqlite3

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
    from speech_serve.voiceprints import StoreUnavailable

    path = tmp_path / "vp.sqlite3"
    path.write_bytes(b"this is not a SQLite database" * 100)
    store = open_store(str(path))
    with pytest.raises(StoreUnavailable, match="vp.sqlite3"):
        store.list()
    match = Identifier(store, "ge2e", threshold=0.8, refresh_s=0.0).identify(vec(1, 0), "home")
    assert (match.label, match.score) == ("unknown", None)
    path.unlink()  # the operator moves the bad file away: the store opens on its next use
    assert store.list() == []

import multiprocessing
import threading

import numpy as np
import pytest

from speech_serve.ingress.speakers import EnrollmentError, decode_uploads
from speech_serve.replicas.speaker import Identifier, best_match
from speech_serve.settings import VoiceprintSettings
from speech_serve.voiceprints import Candidate, SqliteVoiceprintStore, open_store
from tests.conftest import FIXTURES


def vec(*xs: float, dim: int = 4) -> np.ndarray:
    v = np.zeros(dim, dtype=np.float32)
    v[: len(xs)] = xs
    return v


@pytest.fixture
def store(tmp_path):
    return open_store(f"sqlite:///{tmp_path}/vp.sqlite3")


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


def _enrol_many(path: str, worker: int, n: int) -> None:
    s = open_store(path)
    for i in range(n):
        s.create(f"w{worker}-{i}", "g", "m", [vec(1, worker, i)])


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


def test_best_match_needs_the_threshold():
    cands = [Candidate("a", "alice", vec(1, 0)), Candidate("b", "bob", vec(0, 1))]
    assert best_match(vec(0.95, 0.1), cands, 0.8).label == "alice"
    low = best_match(vec(1, 1), cands, 0.8)
    # no score for `unknown`: it would tell a client how close it came to someone else's voiceprint
    assert (low.label, low.score, low.speaker_id) == ("unknown", None, None)
    assert best_match(vec(1, 0), [], 0.8).label == "unknown"


def test_identifier_sees_new_enrolments_after_refresh(store):
    ident = Identifier(store, "ge2e", threshold=0.8, refresh_s=0.0)
    assert ident.identify(vec(1, 0), "home").label == "unknown"
    store.create("alice", "home", "ge2e", [vec(1, 0)])
    assert ident.identify(vec(1, 0), "home").label == "alice"
    cached = Identifier(store, "ge2e", threshold=0.8, refresh_s=3600)
    assert cached.identify(vec(0, 1), "home").label == "unknown"
    store.create("bob", "home", "ge2e", [vec(0, 1)])
    assert cached.identify(vec(0, 1), "home").label == "unknown"  # not refreshed yet: cache holds


def test_enrolment_uploads_are_checked():
    settings = VoiceprintSettings(min_enroll_s=1.0, max_enroll_s=5.0, max_enroll_files=2)
    good = (FIXTURES / "voices" / "alice_enroll_1.wav").read_bytes()
    assert len(decode_uploads([("a.wav", good)], settings)) == 1
    cases = [
        ([], 400, "at least one"),
        ([("a.wav", good)] * 3, 400, "at most 2"),
        ([("x.wav", b"not audio")], 400, "x.wav: cannot decode"),
        ([("short.wav", good[: 44 + 16000])], 400, "at least 1 s"),
        ([("long.wav", (FIXTURES / "voices" / "three_speakers.wav").read_bytes())], 413, "at most 5 s"),
    ]
    for files, status, text in cases:
        with pytest.raises(EnrollmentError) as err:
            decode_uploads(files, settings)
        assert err.value.status == status and text in str(err.value)


# ---- hardening: biometric data private, transactions clean, a bad file no outage -------------


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


def test_the_admin_api_answers_503_while_the_store_is_unavailable(tmp_path):
    import asyncio
    import json

    from starlette.requests import Request

    from speech_serve.ingress.routes import store_unavailable

    path = tmp_path / "vp.sqlite3"
    path.write_bytes(b"not a database" * 100)
    request = Request({"type": "http", "method": "GET", "path": "/v1/speakers", "headers": [], "query_string": b""})
    try:
        open_store(str(path)).list()
    except Exception as exc:
        response = asyncio.run(store_unavailable(request, exc))
    assert response.status_code == 503 and "cannot be opened" in json.loads(response.body)["detail"]

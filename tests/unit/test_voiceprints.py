"""The voiceprint store's promises, on each backend (the `store` fixture: SQLite and a real PostgreSQL),
and `open_store`'s URLs. What only one backend does: tests/unit/stores/."""

import multiprocessing
import threading

import numpy as np
import pytest

from speech_serve.voiceprints import PostgresVoiceprintStore, SqliteVoiceprintStore, open_store
from tests.support.fakes import vec


@pytest.fixture(params=["sqlite", "postgres"])
def url(request, tmp_path) -> str:
    """A new store's URL on each backend (for tests that open it from several places)."""
    if request.param == "postgres":
        return request.getfixturevalue("postgres").create_database()
    return str(tmp_path / "vp.sqlite3")


def _enrol_many(url: str, worker: int, n: int) -> None:
    s = open_store(url)
    for i in range(n):
        s.create(f"w{worker}-{i}", "g", "m", [vec(1, worker, i)])


def test_create_list_rename_reenroll_delete(store):
    rev0 = store.revision()
    alice = store.create("alice", "home", "ge2e", [vec(1, 0), vec(0.9, 0.1)])
    assert (alice.name, alice.group, alice.model, alice.dim, alice.embeddings) == ("alice", "home", "ge2e", 4, 2)
    bob = store.create("bob", "office", "ge2e", [vec(0, 1)])
    assert [v.name for v in store.list()] == ["alice", "bob"] and [v.name for v in store.list("home")] == ["alice"]
    assert store.list("home")[0] == store.get(alice.id)  # the list's counts are get's
    assert store.rename(alice.id, "Alice").name == "Alice"
    assert store.replace_embeddings(bob.id, "ge2e", [vec(0, 1), vec(0, 0.8, 0.2), vec(0, 1, 0.1)]).embeddings == 3
    assert store.replace_embeddings("nope", "ge2e", [vec(1)]) is None
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


def test_store_survives_reopening(url):
    speaker_id = open_store(url).create("alice", "home", "ge2e", [vec(1, 0)]).id
    reopened = open_store(url)
    assert reopened.get(speaker_id).name == "alice" and len(reopened.candidates("home", "ge2e")) == 1
    assert reopened.revision() == 1


def test_bad_embeddings_are_refused(store):
    with pytest.raises(ValueError):
        store.create("x", "g", "m", [])
    with pytest.raises(ValueError):
        store.create("x", "g", "m", [vec(0, 0)])
    assert store.list() == [] and store.revision() == 0


def test_concurrent_enrolments_from_threads_and_processes_all_land(url):
    """Eight threads and three processes, each with its own connections, enrol at once: nothing is
    lost and the revision moved once per enrolment (no two writers read the same revision)."""
    open_store(url)  # schema first
    threads = [threading.Thread(target=_enrol_many, args=(url, w, 10)) for w in range(8)]
    procs = [
        multiprocessing.get_context("spawn").Process(target=_enrol_many, args=(url, 100 + w, 10)) for w in range(3)
    ]
    for t in threads + procs:
        t.start()
    for t in threads + procs:
        t.join(timeout=120)
    assert all(p.exitcode == 0 for p in procs)
    store = open_store(url)
    names = [v.name for v in store.list()]
    assert len(names) == len(set(names)) == 110
    assert len(store.candidates("g", "m")) == 110 and store.revision() == 110


def test_the_revision_only_grows_while_others_write(url):
    """A Speaker replica polls the revision while the admin API writes: it never sees it go back."""
    writer, reader = open_store(url), open_store(url)
    seen, done = [], threading.Event()

    def poll() -> None:
        while not done.is_set():
            seen.append(reader.revision())

    poller = threading.Thread(target=poll)
    poller.start()
    for i in range(20):
        writer.create(f"s{i}", "g", "m", [vec(1, i)])
        writer.set_hotwords("g", {f"word {i}": 1.0})
    done.set()
    poller.join()
    assert seen == sorted(seen) and reader.revision() == 40


def test_open_store_picks_the_backend_by_url(tmp_path, postgres):
    assert isinstance(open_store(str(tmp_path / "a.sqlite3")), SqliteVoiceprintStore)
    assert isinstance(open_store(f"sqlite:///{tmp_path}/b.sqlite3"), SqliteVoiceprintStore)
    url = postgres.create_database()
    for form in (url, url.replace("postgresql://", "postgres://", 1)):
        assert isinstance(open_store(form), PostgresVoiceprintStore) and open_store(form).list() == []
    with pytest.raises(ValueError, match="unknown scheme 'mysql'"):
        open_store("mysql://x/y")


def test_env_urls_are_read_from_the_environment_when_opened(monkeypatch, tmp_path, postgres):
    """`env:NAME` keeps a database password out of YAML: the URL is read when the store opens."""
    url = postgres.create_database()
    monkeypatch.setenv("SPEECH_TEST_STORE", url)
    store = open_store("env:SPEECH_TEST_STORE")
    assert isinstance(store, PostgresVoiceprintStore) and store.revision() == 0
    monkeypatch.setenv("SPEECH_TEST_STORE", str(tmp_path / "vp.sqlite3"))
    assert isinstance(open_store("env:SPEECH_TEST_STORE"), SqliteVoiceprintStore)
    monkeypatch.delenv("SPEECH_TEST_STORE")
    with pytest.raises(ValueError, match="environment variable 'SPEECH_TEST_STORE' is not set"):
        open_store("env:SPEECH_TEST_STORE")

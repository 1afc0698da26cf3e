"""What only the PostgreSQL store does, against a real server (tests/support/postgres.py): a server
that is down or refuses us costs names, never the start, and never shows the password; connections
come back after a restart; openers at once migrate once; the schema version is recorded."""

import threading
import time

import psycopg
import pytest

from speech_serve.replicas.speaker import Identifier
from speech_serve.stores.migrations import LATEST
from speech_serve.stores.postgres import MIGRATION_LOCK, PostgresVoiceprintStore, describe
from speech_serve.voiceprints import StoreUnavailable, open_store
from tests.support.fakes import vec
from tests.support.postgres import PASSWORD


def _until_back(call, timeout_s: float = 15.0):
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return call()
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _schema_version(url: str) -> int:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()[0]


def test_a_down_server_costs_names_not_the_start_and_never_shows_the_password(postgres, monkeypatch):
    monkeypatch.setattr(PostgresVoiceprintStore, "RETRY_AFTER_S", 0.2)
    url = postgres.create_database()
    dbname = url.rsplit("/", 1)[1]
    alive = open_store(url)
    alive.create("alice", "home", "ge2e", [vec(1, 0)])
    postgres.stop()
    try:
        opened_while_down = open_store(url)  # opening does not raise: the replica starts
        for store in (alive, opened_while_down):
            with pytest.raises(StoreUnavailable) as err:
                store.candidates("home", "ge2e")
            message = str(err.value)
            assert f"127.0.0.1:{postgres.port}/{dbname}" in message and "speech@" in message
            assert PASSWORD not in message and PASSWORD not in repr(err.value.__cause__)
        with pytest.raises(StoreUnavailable):
            alive.set_hotwords("home", {"lights": 1.0})
        match = Identifier(alive, "ge2e", threshold=0.8, refresh_s=0.0).identify(vec(1, 0), "home")
        assert match.label == "unknown"  # transcripts go on without names
    finally:
        postgres.start()
    for store in (alive, opened_while_down):  # both reconnect by themselves
        assert [c.name for c in _until_back(lambda s=store: s.candidates("home", "ge2e"))] == ["alice"]
    assert opened_while_down.hotwords("home") == {} and _schema_version(url) == LATEST


def test_a_wrong_password_is_refused_without_showing_it(postgres):
    url = postgres.create_database()
    wrong = url.replace(PASSWORD, "wrong-secret-42")
    with pytest.raises(StoreUnavailable, match="password authentication failed") as err:
        open_store(wrong).list()
    assert "wrong-secret-42" not in str(err.value) and PASSWORD not in str(err.value)
    assert "wrong-secret-42" not in repr(open_store(wrong))


def test_connections_come_back_after_a_restart_without_an_error(postgres):
    """The server restarts between two calls (a failover, an upgrade): the thread's dropped
    connection is replaced and the call run again, unseen by the caller."""
    url = postgres.create_database()
    store = open_store(url)
    store.create("alice", "home", "ge2e", [vec(1, 0)])
    postgres.stop()
    postgres.start()
    assert [v.name for v in store.list()] == ["alice"]  # a read on the dropped connection, run again
    postgres.stop()
    postgres.start()
    store.set_hotwords("home", {"lights": 1.0})  # a write whose BEGIN met the dropped connection
    assert store.hotwords("home") == {"lights": 1.0} and store.revision() == 2


def test_an_opener_migrates_only_under_the_advisory_lock(postgres):
    """Replicas start together: without the lock, two CREATE TABLEs of one table collide. While
    another holds the lock, an opener waits, then finds the steps applied or applies them."""
    url = postgres.create_database()
    with psycopg.connect(url, autocommit=True) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK,))
        opener = threading.Thread(target=lambda: open_store(url).revision())
        opener.start()
        opener.join(timeout=1.0)
        assert opener.is_alive()  # waiting for the lock, not migrating beside its holder
        assert holder.execute("SELECT to_regclass('speakers')").fetchone() == (None,)
        holder.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK,))
        opener.join(timeout=30)
    assert not opener.is_alive() and _schema_version(url) == LATEST


def test_openers_at_once_all_open(postgres):
    url = postgres.create_database()
    start, errors = threading.Barrier(6), []

    def open_and_read() -> None:
        start.wait()
        try:
            open_store(url).revision()
        except Exception as exc:  # noqa: BLE001 - collected, the assertion names it
            errors.append(exc)

    threads = [threading.Thread(target=open_and_read) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == [] and _schema_version(url) == LATEST


def test_messages_name_the_server_and_database_only():
    where, password, own_timeout = describe("postgresql://svc:s3cret@db.internal:6432/voices?connect_timeout=3")
    assert (where, password, own_timeout) == ("postgresql://svc@db.internal:6432/voices", "s3cret", True)
    where, password, own_timeout = describe("postgres:///voices?host=/run/pg&user=svc&password=s3cret")
    assert (where, password, own_timeout) == ("postgresql://svc@/run/pg/voices", "s3cret", False)
    with pytest.raises(ValueError, match="not a PostgreSQL URL") as err:
        describe("postgresql://svc:s3cret@db/voices?nonsense=1")
    assert "s3cret" not in str(err.value)


def test_without_the_server_binaries_the_tests_fail_saying_how_to_get_them(monkeypatch):
    """Never a skip: a CI host without PostgreSQL would pass with the shared store untested."""
    from tests.support import postgres as support

    monkeypatch.setattr(support, "server_binaries", lambda: None)
    with pytest.raises(pytest.fail.Exception, match="`make test` installs them"):
        support.start_server()

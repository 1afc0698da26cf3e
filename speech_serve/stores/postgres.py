"""The shared store: a PostgreSQL server every pod of a cluster reaches (psycopg 3).

Same promises as the SQLite file: opening never fails (a server that is down or refuses us makes
each call raise `StoreUnavailable`, naming the server and database but never the password: the
service starts and transcribes without names); writers queue on one row lock, so concurrent
enrolments from any number of processes all land and the revision moves by one per change.

One connection per thread (a store is called from the Ingress's worker threads and a Speaker's batch
thread), made on first use. A connection the server dropped (a restart, a failover) is replaced
and the call run again once, unless the break came while committing: then whether it committed
cannot be known, and the caller is told so rather than enrolling a speaker twice.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict

from speech_serve.stores.base import StoreUnavailable
from speech_serve.stores.migrations import migrate
from speech_serve.stores.sql import SqlStore, T

logger = logging.getLogger("ray.serve")
MIGRATION_LOCK = 0x5EEC4_5E12  # pg_advisory_xact_lock key: one opener migrates at a time


class _Db:
    """A psycopg connection that takes the shared queries' `?` placeholders."""

    def __init__(self, conn: psycopg.Connection):
        self.conn = conn

    def execute(self, sql: str, parameters: Sequence[Any] = ()) -> psycopg.Cursor:
        return self.conn.execute(sql.replace("?", "%s"), parameters)

    def executemany(self, sql: str, seq: Sequence[Sequence[Any]]) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(sql.replace("?", "%s"), seq)


def describe(url: str) -> tuple[str, str, bool]:
    """`postgresql://user@host:port/db` (what messages name), the password (what they must not), and
    whether the URL sets its own connect_timeout."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.Error as exc:
        password = _url_password(url)
        raise ValueError(
            f"voiceprints.store is not a PostgreSQL URL psycopg can read: {_scrub(str(exc), password)}"
        ) from None
    user = f"{params['user']}@" if params.get("user") else ""
    port = f":{params['port']}" if params.get("port") else ""
    where = f"postgresql://{user}{params.get('host', '')}{port}/{params.get('dbname', '')}"
    return where, params.get("password", ""), "connect_timeout" in params


def _url_password(url: str) -> str:
    try:
        return urlsplit(url).password or ""
    except ValueError:
        return ""


def _application_name() -> str:
    """What pg_stat_activity shows for our connections: which process (and pod) holds each."""
    return f"speech-serve {os.getpid()} {socket.gethostname()}"[:63]  # PostgreSQL keeps 63 bytes


def _scrub(text: str, password: str) -> str:
    """libpq's message on one line, with the password (should it ever appear) masked."""
    text = " ".join(text.split())
    return text.replace(password, "***") if password else text


class PostgresVoiceprintStore(SqlStore):
    CONNECT_TIMEOUT_S = 5  # unless the URL sets connect_timeout: a host that drops packets would hang each call
    RETRY_AFTER_S = 2.0  # after a failed connect, calls fail at once this long: no stall per utterance

    def __init__(self, url: str):
        self.where, self._password, own_timeout = describe(url)
        self._url = url
        self._options = {} if own_timeout else {"connect_timeout": self.CONNECT_TIMEOUT_S}
        self._local = threading.local()
        self._schema_ready = False  # set once a connection found (or made) the latest schema
        self._schema_lock = threading.Lock()
        self._down: tuple[float, str] | None = None  # (until when, why) after a failed connect
        try:  # now, so a bad URL or a down server is reported at start and the schema migrated at once
            self.revision()
        except StoreUnavailable as exc:
            logger.error("%s; speakers are `unknown` and the admin API answers 503 until it is back", exc)

    def __repr__(self) -> str:
        return f"PostgresVoiceprintStore({self.where!r})"

    def _unavailable(self, exc: BaseException, doing: str = "is unavailable") -> StoreUnavailable:
        return StoreUnavailable(f"voiceprint store {self.where} {doing}: {_scrub(str(exc), self._password)}")

    def _connect(self) -> psycopg.Connection:
        if self._down and time.monotonic() < self._down[0]:
            raise StoreUnavailable(self._down[1])
        try:
            conn = psycopg.connect(self._url, autocommit=True, application_name=_application_name(), **self._options)
        except psycopg.Error as exc:
            error = self._unavailable(exc)
            self._down = (time.monotonic() + self.RETRY_AFTER_S, str(error))
            raise error from None  # psycopg's own traceback may carry the connection string
        self._down = None
        try:
            if not self._schema_ready:
                with self._schema_lock:  # this process's threads; the advisory lock covers other processes
                    if not self._schema_ready:
                        self._migrate(conn)
                        self._schema_ready = True
        except psycopg.Error as exc:
            conn.close()
            raise self._unavailable(exc, "cannot be migrated") from None
        return conn

    @staticmethod
    def _migrate(conn: psycopg.Connection) -> None:
        db = _Db(conn)

        def version() -> int | None:
            row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            return row[0] if row else None

        with conn.transaction():
            db.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
            migrate(db.execute, version, "postgres")

    def _conn(self) -> tuple[psycopg.Connection, bool]:
        """This thread's connection, and whether it is new (made by this call)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None and not conn.closed:
            return conn, False
        self._local.conn = conn = self._connect()
        return conn, True

    def _run(self, work: Callable[[_Db], T], write: bool) -> T:
        for attempt in (1, 2):
            conn, new = self._conn()
            committing = False
            try:
                if not write:
                    return work(_Db(conn))
                with conn.transaction():
                    db = _Db(conn)
                    # Writers queue on the revision row, as BEGIN IMMEDIATE queues them in SQLite: a list
                    # replaced by two writers at once is one writer's, not a mix, and revisions never collide.
                    db.execute("SELECT value FROM meta WHERE key = 'revision' FOR UPDATE")
                    result = work(db)
                    committing = True
                return result
            except psycopg.Error as exc:
                if not conn.broken:
                    raise self._unavailable(exc, "failed") from None
                conn.close()
                if committing:
                    raise self._unavailable(exc, "lost the connection while committing (the change may or may "
                                                 "not have been made)") from None  # fmt: skip
                if new or attempt == 2:
                    raise self._unavailable(exc) from None
                logger.warning("voiceprint store %s: connection lost (%s); reconnecting", self.where,
                               _scrub(str(exc), self._password))  # fmt: skip
        raise AssertionError("unreachable")

    def _write(self, work: Callable[[_Db], T]) -> T:
        return self._run(work, write=True)

    def _read(self, work: Callable[[_Db], T]) -> T:
        return self._run(work, write=False)

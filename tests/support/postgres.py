"""A private, throwaway PostgreSQL server for the tests (the shared voiceprint store's real backend).

Debian's server binaries (`make test` installs the package `postgresql`) run on a fresh data directory
in /tmp, on a free localhost port, with password authentication over TCP; nothing is started as a
service and nothing outlives the run. PostgreSQL refuses to run as root, so as root (CI) initdb and
pg_ctl run as the `postgres` system user, which owns the directory.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from speech_serve.app import free_port

USER, PASSWORD = "speech", "pg-test-password-not-for-production"
MISSING = ("PostgreSQL's server binaries (initdb, pg_ctl) are not installed (looked in /usr/lib/postgresql/*/bin): "
           "`make test` installs them (Debian package postgresql), or run "
           "`apt-get install -y postgresql`")  # fmt: skip


def server_binaries() -> Path | None:
    """The newest installed /usr/lib/postgresql/<version>/bin holding initdb and pg_ctl."""
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]
    found = [d for d in found if (d / "pg_ctl").exists()]
    return max(found, key=lambda d: int(d.parent.name) if d.parent.name.isdigit() else 0) if found else None


@dataclass
class PostgresServer:
    bin: Path
    root: Path  # owned by the server's user: data/, the socket, the log
    port: int

    @property
    def data(self) -> Path:
        return self.root / "data"

    def url(self, dbname: str = "postgres", password: str = PASSWORD) -> str:
        return f"postgresql://{USER}:{password}@127.0.0.1:{self.port}/{dbname}"

    def _run(self, *args: str) -> None:
        command = [str(self.bin / args[0]), *args[1:]]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "postgres", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode:
            log = (self.root / "server.log").read_text() if (self.root / "server.log").exists() else ""
            raise RuntimeError(f"{' '.join(args[:2])} failed ({done.returncode}): {done.stdout}{done.stderr}\n{log}")

    def init(self) -> None:
        pwfile = self.root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        self._own(pwfile)
        self._run("initdb", "-D", str(self.data), "-U", USER, f"--pwfile={pwfile}", "--auth-local=trust",
                  "--auth-host=scram-sha-256", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync")  # fmt: skip

    def start(self) -> None:
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")  # fmt: skip
        self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.root / "server.log"),
                  "-o", options)  # fmt: skip

    def stop(self) -> None:
        """Fast shutdown: the server ends every connection, as a restart or failover does."""
        self._run("pg_ctl", "stop", "-w", "-m", "fast", "-D", str(self.data))

    def _own(self, path: Path) -> None:
        if os.geteuid() == 0:
            shutil.chown(path, "postgres", "postgres")

    def create_database(self) -> str:
        """A new empty database; its URL (each test gets its own: no test sees another's speakers)."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def start_server() -> PostgresServer:
    """A started throwaway server, or a test failure saying how to install one (never a skip: CI must
    not pass with the shared store untested)."""
    binaries = server_binaries()
    if binaries is None:
        pytest.fail(MISSING, pytrace=False)
    root = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp"))  # short: a unix socket's path holds 107 bytes
    root.chmod(0o700)
    server = PostgresServer(binaries, root, free_port())
    server._own(root)
    server.init()
    server.start()
    return server


def remove_server(server: PostgresServer) -> None:
    try:
        server.stop()
    except RuntimeError:
        pass  # already stopped (a test that stopped it failed before starting it again)
    shutil.rmtree(server.root, ignore_errors=True)

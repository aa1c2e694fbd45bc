"""A real PostgreSQL for the tests that need one.

Which server: $DATABASE_URL if it answers, else a private cluster started here (initdb and
pg_ctl on a free port, as the `postgres` OS user when running as root: initdb refuses root),
stopped when the block ends. Without either a test is skipped, and under CI=true it fails
instead (`missing_postgres`). Each test gets a database of its own (`fresh_database`).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn
from urllib.parse import urlsplit, urlunsplit

import psycopg
import pytest

from tests.conftest import free_port

IN_CI = os.environ.get("CI", "").lower() == "true"


def answers(url: str) -> bool:
    """Whether a PostgreSQL at `url` accepts a connection within two seconds."""
    try:
        with psycopg.connect(url, connect_timeout=2) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def missing_postgres(why: str) -> NoReturn:
    """Skip the test for want of PostgreSQL; under CI=true fail it instead."""
    if IN_CI:
        pytest.fail(f"PostgreSQL needed under CI=true: {why}")
    pytest.skip(why)


def _bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


class PostgresCluster:
    """A throw-away cluster in a temp dir, trusting local connections (tests only)."""

    def __init__(self, port: int | None = None, *, durable: bool = False) -> None:
        self.port = port or free_port()
        self.durable = durable  # fsync on: for benchmarks; tests run without it
        self.workdir = tempfile.mkdtemp(prefix="joulegate-pg-")
        self._as_postgres = os.geteuid() == 0

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *cmd: str) -> None:
        prefix = ["runuser", "-u", "postgres", "--"] if self._as_postgres else []
        done = subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{os.path.basename(cmd[0])} failed: {done.stderr.strip()[-500:]}")

    def start(self) -> None:
        initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
        if initdb is None or pg_ctl is None:
            raise RuntimeError("initdb/pg_ctl not found")
        if self._as_postgres:
            shutil.chown(self.workdir, "postgres", "postgres")
        self._run(initdb, "-D", self.data, "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        self._pg_ctl_start(pg_ctl)

    @property
    def data(self) -> str:
        return os.path.join(self.workdir, "data")

    def _pg_ctl_start(self, pg_ctl: str) -> None:
        settings = f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1"
        if not self.durable:
            settings += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        # -l: the server must not inherit our pipes, or the run would wait for it to exit.
        self._run(pg_ctl, "-D", self.data, "-o", settings, "-l", os.path.join(self.workdir, "log"),
                  "-w", "-t", "60", "start")

    def restart(self) -> None:
        """Stop (ending every session) and start again on the same port, data kept."""
        pg_ctl = _bin("pg_ctl")
        assert pg_ctl is not None
        self._run(pg_ctl, "-D", self.data, "-m", "fast", "-w", "stop")
        self._pg_ctl_start(pg_ctl)

    def stop(self) -> None:
        pg_ctl = _bin("pg_ctl")
        if pg_ctl is not None and os.path.isdir(self.data):
            try:
                self._run(pg_ctl, "-D", self.data, "-m", "immediate", "stop")
            except RuntimeError:
                pass  # never started, or already gone
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextmanager
def usable_postgres(*, durable: bool = False) -> Iterator[str]:
    """The URL of a PostgreSQL that answers (a superuser's, or one allowed CREATE DATABASE):
    $DATABASE_URL, else a private cluster started here and stopped when the block ends."""
    url = os.environ.get("DATABASE_URL")
    if url:
        if not answers(url):
            missing_postgres(f"DATABASE_URL is set but no PostgreSQL answers at {urlsplit(url).hostname}")
        yield url
        return
    cluster = PostgresCluster(durable=durable)
    try:
        cluster.start()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        cluster.stop()
        missing_postgres(f"no DATABASE_URL and no private cluster: {exc}")
    try:
        yield cluster.url
    finally:
        cluster.stop()


def create_database(url: str) -> str:
    """A new empty database on the server of `url`; returns its URL."""
    name = f"jg_test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}", query=""))


def drop_database(url: str, db_url: str) -> None:
    """Drop the database of `db_url` (made by `create_database`), its sessions too."""
    name = urlsplit(db_url).path.lstrip("/")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def fresh_database(url: str) -> Iterator[str]:
    """A database of its own for one test, dropped afterwards."""
    db_url = create_database(url)
    try:
        yield db_url
    finally:
        drop_database(url, db_url)

"""A real Redis for the tests that need one.

Which Redis: $REDIS_URL, else 127.0.0.1:6379, else a `redis-server` started here on a free port
(`usable_redis`). Without any of them a test is skipped, and under CI=true it fails instead
(`missing_redis`). `RedisServer` is also for tests that kill, freeze or restart their own Redis.
Per-file specifics (key prefixes, a claimed database number) stay in the test files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import pytest
import redis

from tests.conftest import free_port

IN_CI = os.environ.get("CI", "").lower() == "true"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def pings(url: str) -> bool:
    """Whether a Redis answers PING at `url` within half a second."""
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except redis.RedisError:
        return False


class RedisServer:
    """A redis-server of our own on a fixed port, so it can be killed and started again."""

    def __init__(self, workdir: Path, port: int | None = None, persist: bool = False) -> None:
        self.port = port or free_port()
        self.workdir = workdir
        self.persist = persist
        self.popen: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        # Persisting with appendfsync always: what was acknowledged survives SIGKILL.
        durability = (["--appendonly", "yes", "--appendfsync", "always"] if self.persist
                      else ["--appendonly", "no"])
        self.popen = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--dir", str(self.workdir), *durability],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not pings(self.url):
            if self.popen.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)


def missing_redis(why: str) -> NoReturn:
    """Skip the test for want of Redis; under CI=true fail it instead."""
    if IN_CI:
        pytest.fail(f"Redis needed under CI=true: {why}")
    pytest.skip(why)


def need_redis_server(why: str) -> None:
    """For tests that run their own `RedisServer`: `missing_redis(why)` unless one can start."""
    if shutil.which("redis-server") is None:
        missing_redis(why)


@contextmanager
def usable_redis(tmp_path_factory: pytest.TempPathFactory, basename: str = "redis") -> Iterator[str]:
    """The URL of a Redis that answers: $REDIS_URL, else 127.0.0.1:6379, else a redis-server
    started here (its files in a fresh `basename` temp folder), killed when the block ends."""
    url = os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
    if pings(url):
        yield url
        return
    need_redis_server(f"no Redis at {url} and no redis-server to start")
    server = RedisServer(tmp_path_factory.mktemp(basename))
    server.start()
    try:
        yield server.url
    finally:
        server.kill()

"""Shared fixtures. The harness itself lives in tests/support/ (see its modules)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest
import redis

from tests.support.fake_services import FakeMailService, FakeUserService
from tests.support.process import AuthsessionFactory, AuthsessionProcess
from tests.support.redis_server import RedisServer


# --------------------------------------------------------------------------- Redis
@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server per test session (so one per xdist worker). Share it; never kill
    or pause it (use ``dedicated_redis`` for that). Use ``redis_client`` for a clean DB."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def dedicated_redis() -> Iterator[RedisServer]:
    """A redis-server for this test alone: kill, restart, pause at will."""
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A sync client (decode_responses=True) on ``redis_server``, after FLUSHALL."""
    if redis_server.paused:
        redis_server.resume()
    if not redis_server.is_running():
        redis_server.restart()
    client = redis_server.client()
    try:
        client.flushall()
        yield client
    finally:
        client.close()


# --------------------------------------------------------------------------- fake services
@pytest.fixture
def fake_user_service() -> Iterator[FakeUserService]:
    with FakeUserService() as service:
        yield service


@pytest.fixture
def fake_mail_service() -> Iterator[FakeMailService]:
    with FakeMailService() as service:
        yield service


# --------------------------------------------------------------------------- authsession
@pytest.fixture
def authsession_process(tmp_path: Path) -> Iterator[AuthsessionFactory]:
    """Factory: ``authsession_process(env) -> AuthsessionProcess``, already started (call
    ``.wait_ready()`` or ``.wait_exit()``). Sets ``AUTHSESSION_PUBLIC_HTTP_ADDR`` /
    ``AUTHSESSION_INTERNAL_HTTP_ADDR`` to free loopback ports and
    ``AUTHSESSION_LOG_FORMAT=json`` unless ``env`` gives them; ``max_open_files=N`` starts
    it with ``RLIMIT_NOFILE`` lowered to N. Every process is killed at
    teardown; its output is printed then (pytest shows it for failed tests)."""
    processes: list[AuthsessionProcess] = []
    counter = itertools.count(1)

    def factory(
        env: Mapping[str, str],
        *,
        argv: Sequence[str] | None = None,
        max_open_files: int | None = None,
    ) -> AuthsessionProcess:
        process = AuthsessionProcess.on_free_ports(
            env,
            argv=argv,
            workdir=tmp_path / f"authsession-{next(counter)}",
            max_open_files=max_open_files,
        )
        processes.append(process)
        process.start()
        return process

    yield factory

    for process in processes:
        process.close()
        print(f"===== {process!r} =====\n{process.output_report()}")

"""The core's lifecycle: its periodic jobs start once, and one close undoes it in order."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import fakeredis
import httpx
import pytest

from authsession.services import http_client
from authsession.settings import MEMORY_STORE, Settings
from authsession.wiring import Core, Shutdown, build_core

Closer = Callable[[], Awaitable[None]]


def _recording(order: list[str], name: str, closer: Closer) -> Closer:
    async def close() -> None:
        order.append(name)
        await closer()

    return close


def _core(monkeypatch: pytest.MonkeyPatch, order: list[str]) -> Core:
    """A core over an embedded Redis and both REST services, every close recorded."""

    def create_client(base_url: str, timeout: timedelta, **kwargs: Any) -> httpx.AsyncClient:
        client = httpx.AsyncClient(base_url=base_url)
        monkeypatch.setattr(client, "aclose", _recording(order, base_url, client.aclose))
        return client

    monkeypatch.setattr(http_client, "create_client", create_client)
    redis = fakeredis.FakeAsyncRedis(decode_responses=True)
    monkeypatch.setattr(redis, "aclose", _recording(order, "redis", redis.aclose))
    settings = Settings(  # type: ignore[call-arg]
        REDIS_ADDR=MEMORY_STORE,
        USER_SERVICE_MODE="rest",
        USER_SERVICE_BASE_URL="http://users.test",
        USER_SERVICE_REQUEST_TIMEOUT="1s",
        MAIL_SERVICE_MODE="rest",
        MAIL_SERVICE_BASE_URL="http://mail.test",
        MAIL_SERVICE_REQUEST_TIMEOUT="1s",
        PROJECTION_RECONCILE_INTERVAL="1h",
    )
    core = build_core(settings, redis=redis)
    for index, job in enumerate(core.jobs):
        monkeypatch.setattr(job, "stop", _recording(order, f"job{index}", job.stop))
    return core


async def test_closing_stops_the_jobs_then_the_outbound_clients_then_redis(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    order: list[str] = []
    core = _core(monkeypatch, order)
    assert len(core.jobs) == 3  # config refresh, token scrub, reconciliation
    core.start_background()
    core.start_background()  # a second start changes nothing
    await core.aclose()
    await core.aclose()  # nor does a second close
    assert order == [
        "job2",
        "job1",
        "job0",
        "http://mail.test",
        "http://users.test",
        "redis",
    ]


async def test_a_core_never_started_closes_only_its_clients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    order: list[str] = []
    core = _core(monkeypatch, order)
    await core.aclose()
    assert order == ["http://mail.test", "http://users.test", "redis"]


async def test_a_failing_or_hanging_step_does_not_keep_the_next_from_running() -> None:
    order: list[str] = []

    async def fails() -> None:
        order.append("fails")
        raise RuntimeError("boom")

    async def hangs() -> None:
        order.append("hangs")
        await asyncio.sleep(10)

    async def last() -> None:
        order.append("last")

    shutdown = Shutdown(timedelta(milliseconds=50))
    for closer in (last, hangs, fails):
        shutdown.push(closer)
    await asyncio.wait_for(shutdown.aclose(), timeout=5)
    assert order == ["fails", "hangs", "last"]

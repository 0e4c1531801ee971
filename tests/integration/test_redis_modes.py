"""The whole core over Redis Sentinel and Redis Cluster (CONTRACT §3 ``REDIS_MODE``, §7).

Each test configures the service from ``AUTHSESSION_*`` variables exactly as the process
does (``load_settings`` → ``build_core`` → ``create_redis``), against real processes:
a master watched by two sentinels (the address list also names a dead sentinel first),
and a three-master cluster. The flows cross hash slots (challenge → session → user index
→ projection key → stream), so on the cluster they also prove that every script and
``MULTI`` stays within one slot and that the multi-key read pipeline is split by node.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

import httpx
import pytest
import redis
import redis.cluster
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from authsession.http.internal import create_internal_app
from authsession.http.public import create_public_app
from authsession.redis.reconciler import DriftKind
from authsession.services.mail_stub import StubMailSender
from authsession.services.users_stub import StubUserDirectory, stub_user_id
from authsession.settings import Settings, load_settings
from authsession.wiring import Core, StartupCheckFailed, build_core
from tests.contract import index_key, session_key
from tests.integration.conftest import AppEnv, ManualClock
from tests.support.net import LOOPBACK, free_port
from tests.support.redis_topologies import (
    ClusterTopology,
    SentinelTopology,
    TopologyUnavailable,
)

PREFIX = "authsession:"
SNAPSHOT_PREFIX = "gateway:session:"
STREAM = "gateway:session_events"
INTERNAL = "/api/v1/internal"
FAILOVER_BUDGET = 10.0  # seconds; slower than that, the failover test skips
EMAIL = "jane@example.com"


# --------------------------------------------------------------------------- topologies
@pytest.fixture(scope="module")
def sentinel_topology() -> Iterator[SentinelTopology]:
    """One master and two sentinels for the module (per xdist worker)."""
    try:
        topology = SentinelTopology(sentinels=2).start()
    except TopologyUnavailable as exc:
        pytest.skip(f"no Redis Sentinel with this redis-server: {exc}")
    yield topology
    topology.stop()


@pytest.fixture(scope="module")
def cluster_topology() -> Iterator[ClusterTopology]:
    """Three cluster masters for the module (per xdist worker)."""
    try:
        topology = ClusterTopology(3).start()
    except TopologyUnavailable as exc:
        pytest.skip(f"no Redis Cluster with this redis-server: {exc}")
    yield topology
    topology.stop()


@dataclass
class Deployment:
    """How to reach one topology: the service's variables and a sync client for asserts."""

    mode: str
    env: dict[str, str]
    sync: redis.Redis | redis.cluster.RedisCluster
    topology: SentinelTopology | ClusterTopology


def sentinel_env(topology: SentinelTopology) -> dict[str, str]:
    dead_sentinel = f"{LOOPBACK}:{free_port()}"  # nothing listens: the client moves on
    return {
        "REDIS_MODE": "sentinel",
        "REDIS_ADDR": ",".join([dead_sentinel, *topology.sentinel_addrs]),
        "REDIS_SENTINEL_MASTER": topology.master_name,
        "REDIS_DB": "0",
    }


def cluster_env(topology: ClusterTopology) -> dict[str, str]:
    # Two seeds are enough: the client discovers the third node from CLUSTER SLOTS.
    return {"REDIS_MODE": "cluster", "REDIS_ADDR": ",".join(topology.addrs[:2])}


@pytest.fixture(params=["sentinel", "cluster"])
def deployment(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    """Each topology in turn, emptied first."""
    mode: str = request.param
    topology: SentinelTopology | ClusterTopology = request.getfixturevalue(f"{mode}_topology")
    topology.flush()
    if isinstance(topology, SentinelTopology):
        env, sync = sentinel_env(topology), topology.master_client()
    else:
        env, sync = cluster_env(topology), topology.client()
    yield Deployment(mode, env, sync, topology)
    sync.close()


def configure(monkeypatch: pytest.MonkeyPatch, **variables: str) -> Settings:
    """``load_settings`` over exactly these ``AUTHSESSION_*`` variables."""
    for name in list(os.environ):
        if name.startswith("AUTHSESSION_"):
            monkeypatch.delenv(name)
    for name, value in variables.items():
        monkeypatch.setenv(f"AUTHSESSION_{name}", value)
    return load_settings()


@dataclass
class Running:
    app: AppEnv
    deployment: Deployment


async def start_app(settings: Settings, sync: Any) -> AppEnv:
    clock = ManualClock()
    users, mail = StubUserDirectory(), StubMailSender()
    core = build_core(settings, users=users, mail=mail, clock=clock)  # create_redis inside
    await core.check()
    public = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_public_app(core), client=("203.0.113.7", 4000)),
        base_url="http://public.test",
    )
    internal = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_internal_app(core), client=("10.0.0.2", 4000)),
        base_url="http://internal.test",
    )
    return AppEnv(core, settings, clock, public, internal, cast(redis.Redis, sync), users, mail)


async def stop_app(app: AppEnv) -> None:
    await app.public.aclose()
    await app.internal.aclose()
    await app.core.aclose()


@pytest.fixture
async def running(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Running]:
    # A short resend cooldown (a real-time Redis expiry) lets one user log in repeatedly.
    settings = configure(monkeypatch, **deployment.env, RESEND_COOLDOWN="1ms")
    app = await start_app(settings, deployment.sync)
    try:
        yield Running(app, deployment)
    finally:
        await stop_app(app)


# --------------------------------------------------------------------------- helpers
def events_for(app: AppEnv, device_session_id: str) -> list[tuple[str, str]]:
    return [
        (fields["status"], fields["version"])
        for _, fields in cast(Any, app.redis.xrange(STREAM))
        if fields.get("device_session_id") == device_session_id
    ]


def snapshot(app: AppEnv, device_session_id: str) -> dict[str, Any]:
    raw = app.redis.get(SNAPSHOT_PREFIX + device_session_id)
    assert raw is not None, device_session_id
    document: dict[str, Any] = json.loads(str(raw))
    return document


async def login_again(app: AppEnv, email: str = EMAIL) -> dict[str, Any]:
    """Another full login, later (the cooldown is 1 ms; the clock orders the sessions)."""
    app.clock.advance(timedelta(minutes=2))
    await asyncio.sleep(0.005)
    return await app.login(email)


# --------------------------------------------------------------------------- the flows
async def test_the_client_matches_the_mode(running: Running) -> None:
    client = running.app.core.redis
    if running.deployment.mode == "cluster":
        assert isinstance(client, RedisCluster)
    else:
        assert isinstance(client, Redis)
        # Sentinel-managed: the pool asks the sentinels where the master is.
        assert type(client.connection_pool).__name__ == "_SentinelMasterPool"


async def test_login_and_listing_across_slots(running: Running) -> None:
    app = running.app
    user_id = stub_user_id(EMAIL)
    first = await app.login()
    second = await login_again(app)
    third = await login_again(app)
    ids = [b["device_session_id"] for b in (first, second, third)]
    assert len(set(ids)) == 3
    assert all(b["created"] for b in (first, second, third))

    for dsid in ids:
        record = app.redis.hgetall(session_key(dsid, PREFIX))
        assert record["status"] == "active"
        assert record["user_id"] == user_id
        assert snapshot(app, dsid)["status"] == "active"
        assert events_for(app, dsid) == [("active", "1")]
    assert sorted(app.redis.zrange(index_key(user_id, PREFIX), 0, -1)) == sorted(ids)

    # The listing reads every session record in one pipeline (split by node on a cluster).
    response = await app.internal.get(f"{INTERNAL}/users/{user_id}/sessions")
    assert response.status_code == 200, response.text
    assert [s["device_session_id"] for s in response.json()["sessions"]] == ids[::-1]

    if isinstance(app.redis, redis.cluster.RedisCluster):
        keys = [
            *(session_key(dsid, PREFIX) for dsid in ids),
            *(SNAPSHOT_PREFIX + dsid for dsid in ids),
            index_key(user_id, PREFIX),
            STREAM,
        ]
        nodes = {app.redis.get_node_from_key(key).name for key in keys}
        assert len(nodes) >= 2, nodes  # the flow really crossed nodes


async def test_revoke_publishes_the_snapshot_and_the_event(running: Running) -> None:
    app = running.app
    user_id = stub_user_id(EMAIL)
    dsid = (await app.login())["device_session_id"]

    response = await app.internal.post(
        f"{INTERNAL}/sessions/{dsid}/revoke", json={"reason": "logout"}
    )

    assert response.status_code == 200, response.text
    assert response.json()["status"] == "revoked"
    assert response.json()["version"] == 2
    assert app.redis.hget(session_key(dsid, PREFIX), "status") == "revoked"
    document = snapshot(app, dsid)
    assert (document["status"], document["version"]) == ("revoked", 2)
    assert document["revoke_reason"] == "logout"
    assert events_for(app, dsid) == [("active", "1"), ("revoked", "2")]

    # Revoking every session of the user revokes only what is still active.
    other = (await login_again(app))["device_session_id"]
    response = await app.internal.post(f"{INTERNAL}/users/{user_id}/sessions/revoke")
    assert response.status_code == 200, response.text
    assert response.json()["revoked_session_ids"] == [other]
    assert events_for(app, other) == [("active", "1"), ("revoked", "2")]
    assert events_for(app, dsid) == [("active", "1"), ("revoked", "2")]


async def test_concurrent_confirms_create_one_session(running: Running) -> None:
    app = running.app
    challenge_id, code = await app.send_code()
    assert code is not None

    responses = await asyncio.gather(*(app.confirm(challenge_id, code) for _ in range(20)))

    assert [r.status_code for r in responses] == [200] * 20, [r.text for r in responses]
    bodies = [r.json() for r in responses]
    assert sum(b["created"] for b in bodies) == 1
    assert len({(b["device_session_id"], b["session_token"]) for b in bodies}) == 1
    dsid = bodies[0]["device_session_id"]
    user_id = stub_user_id(EMAIL)
    assert app.redis.zrange(index_key(user_id, PREFIX), 0, -1) == [dsid]
    assert app.redis.hget(session_key(dsid, PREFIX), "version") == "1"
    assert snapshot(app, dsid)["version"] == 1
    # Replayed confirms may announce the same snapshot again, never another one.
    assert set(events_for(app, dsid)) == {("active", "1")}


# --------------------------------------------------------------------------- failures
async def test_unreachable_topology_fails_the_startup_check(
    deployment: Deployment, monkeypatch: pytest.MonkeyPatch
) -> None:
    env = dict(deployment.env)
    if deployment.mode == "sentinel":
        env["REDIS_SENTINEL_MASTER"] = "no-such-master"
        expected = "MasterNotFoundError"
    else:
        env["REDIS_ADDR"] = f"{LOOPBACK}:{free_port()},{LOOPBACK}:{free_port()}"
        expected = "cannot be connected"
    settings = configure(monkeypatch, **env, STARTUP_CHECK_TIMEOUT="2s")
    core: Core = build_core(settings, users=StubUserDirectory(), mail=StubMailSender())
    try:
        with pytest.raises(StartupCheckFailed) as info:
            await asyncio.wait_for(core.check(), timeout=5)
    finally:
        await core.aclose()
    assert info.value.component == "challenge_store"
    assert expected in info.value.cause


async def test_sentinel_failover_keeps_the_service_working(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    try:
        topology = SentinelTopology(sentinels=1, replica=True).start()
    except TopologyUnavailable as exc:
        pytest.skip(f"no Redis Sentinel with this redis-server: {exc}")
    try:
        settings = configure(
            monkeypatch,
            **sentinel_env(topology),
            REDIS_OPERATION_TIMEOUT="500ms",
            RESEND_COOLDOWN="1ms",
        )
        sync = topology.master_client()
        app = await start_app(settings, sync)
        try:
            before = (await app.login())["device_session_id"]
            try:
                await asyncio.to_thread(topology.failover_after_master_crash, FAILOVER_BUDGET)
            except TimeoutError as exc:
                pytest.skip(f"the failover took more than {FAILOVER_BUDGET}s: {exc}")
            app.redis = cast(redis.Redis, topology.master_client())
            sync.close()
            sync = app.redis

            # The same client finds the promoted replica through the sentinel; the
            # session written before the crash was replicated to it.
            response = await app.internal.get(f"{INTERNAL}/sessions/{before}")
            assert response.status_code == 200, response.text
            assert response.json()["status"] == "active"
            after = (await login_again(app))["device_session_id"]
            assert app.redis.hget(session_key(after, PREFIX), "status") == "active"
        finally:
            await stop_app(app)
            sync.close()
    finally:
        topology.stop()


async def test_the_reconciler_and_the_atomic_steps_work_on_every_deployment(
    running: Running,
) -> None:
    # Several users, so that their sessions land on several masters of the cluster.
    app = running.app
    sessions = [await app.login(f"user{n}@example.com") for n in range(8)]
    user_id = stub_user_id("user0@example.com")
    # The user-slot scripts: revoke-all and the session limit.
    again = await login_again(app, "user0@example.com")
    revoked = await app.internal.post(
        f"/api/v1/internal/users/{user_id}/sessions/revoke",
        json={"except_session_id": again["device_session_id"]},
    )
    assert revoked.json()["revoked_session_ids"] == [sessions[0]["device_session_id"]]
    # Drift on several nodes: a lost snapshot and a lost record.
    lost_snapshot, lost_record = sessions[1]["device_session_id"], sessions[2]["device_session_id"]
    app.redis.delete(SNAPSHOT_PREFIX + lost_snapshot)
    app.redis.delete(session_key(lost_record, PREFIX))

    report = await app.core.reconciler.run(repair=True)

    assert report.sessions == 8  # every master scanned (one record lost, one extra login)
    assert report.found[DriftKind.MISSING_SNAPSHOT] == 1
    assert report.found[DriftKind.ORPHAN] == 1
    assert snapshot(app, lost_snapshot)["status"] == "active"
    assert snapshot(app, lost_record)["revoke_reason"] == "source_lost"
    assert (await app.core.reconciler.run(repair=False)).drift == 0

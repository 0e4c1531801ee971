"""The Redis client built from settings in each ``REDIS_MODE`` (no server needed), and the
configuration rules of the modes (CONTRACT §3): one stderr line naming the variables,
exit status 2."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis, SSLConnection
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import (
    SentinelConnectionPool,
    SentinelManagedConnection,
    SentinelManagedSSLConnection,
)

from authsession import cli
from authsession.redis.connection import MAX_CONNECTIONS, create_redis, parse_nodes
from authsession.settings import ConfigError, Settings, load_settings

P = "AUTHSESSION_"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(P):
            monkeypatch.delenv(name)


def settings(**overrides: Any) -> Settings:
    return Settings(**overrides)


@pytest.fixture
def ca_file(tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    path.write_text("-----BEGIN CERTIFICATE-----\n")
    return str(path)


# --------------------------------------------------------------------------- addresses
@pytest.mark.parametrize(
    ("text", "nodes"),
    [
        ("10.0.0.1:26379", [("10.0.0.1", 26379)]),
        (
            "s1.internal:26379, s2.internal:26380 ,s3:26381",
            [("s1.internal", 26379), ("s2.internal", 26380), ("s3", 26381)],
        ),
        ("[::1]:7000,[fd00::2]:7001", [("::1", 7000), ("fd00::2", 7001)]),
    ],
)
def test_parse_nodes(text: str, nodes: list[tuple[str, int]]) -> None:
    assert parse_nodes(text) == nodes


@pytest.mark.parametrize("text", ["redis://h:6379", "h1:1,h2", "h1:1,,h2:2", ":6379", "h:port"])
def test_parse_nodes_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"URL|address"):
        parse_nodes(text)


# --------------------------------------------------------------------------- standalone
def test_standalone_client_options(ca_file: str) -> None:
    client = create_redis(
        settings(
            REDIS_ADDR="redis.internal:6380",
            REDIS_DB=3,
            REDIS_USERNAME="svc",
            REDIS_PASSWORD="pw",
            REDIS_OPERATION_TIMEOUT="250ms",
            REDIS_TLS_ENABLED=True,
            REDIS_TLS_CA_FILE=ca_file,
        )
    )
    assert type(client) is Redis
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("redis.internal", 6380, 3)
    assert (kwargs["username"], kwargs["password"]) == ("svc", "pw")
    assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 0.25
    assert kwargs["retry"].get_retries() == 1
    assert client.connection_pool.connection_class is SSLConnection
    assert kwargs["ssl_ca_certs"] == ca_file
    assert client.connection_pool.max_connections == MAX_CONNECTIONS


def test_standalone_url() -> None:
    client = create_redis(settings(REDIS_ADDR="redis://127.0.0.1:6390/4"))
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["port"], kwargs["db"], kwargs["decode_responses"]) == (6390, 4, True)


# --------------------------------------------------------------------------- sentinel
def sentinel_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "REDIS_MODE": "sentinel",
        "REDIS_ADDR": "s1.internal:26379,[fd00::7]:26380",
        "REDIS_SENTINEL_MASTER": "mymaster",
        "REDIS_OPERATION_TIMEOUT": "300ms",
    }
    return settings(**(values | overrides))


def test_sentinel_client_is_the_master_for_the_name() -> None:
    client = create_redis(sentinel_settings(REDIS_DB=2, REDIS_USERNAME="svc", REDIS_PASSWORD="pw"))
    assert type(client) is Redis
    pool = client.connection_pool
    assert isinstance(pool, SentinelConnectionPool)
    assert pool.service_name == "mymaster"
    assert pool.is_master
    assert pool.connection_class is SentinelManagedConnection
    assert pool.max_connections == MAX_CONNECTIONS
    kwargs = pool.connection_kwargs
    assert kwargs["db"] == 2
    assert (kwargs["username"], kwargs["password"]) == ("svc", "pw")
    assert kwargs["decode_responses"] is True
    assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 0.3
    assert kwargs["retry"].get_retries() == 1
    assert "host" not in kwargs  # the address comes from the sentinels


def test_sentinel_client_asks_every_listed_sentinel_with_the_same_options() -> None:
    client = create_redis(sentinel_settings(REDIS_USERNAME="svc", REDIS_PASSWORD="pw"))
    sentinels = client.connection_pool.sentinel_manager.sentinels
    addresses = [
        (s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
        for s in sentinels
    ]
    assert addresses == [("s1.internal", 26379), ("fd00::7", 26380)]
    for sentinel in sentinels:
        kwargs = sentinel.connection_pool.connection_kwargs
        assert (kwargs["username"], kwargs["password"]) == ("svc", "pw")
        assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 0.3
        assert kwargs.get("db", 0) == 0  # sentinels have no databases


def test_sentinel_tls_reaches_master_and_sentinels(ca_file: str) -> None:
    client = create_redis(sentinel_settings(REDIS_TLS_ENABLED=True, REDIS_TLS_CA_FILE=ca_file))
    pool = client.connection_pool
    assert pool.connection_class is SentinelManagedSSLConnection
    assert pool.connection_kwargs["ssl_ca_certs"] == ca_file
    assert pool.connection_kwargs["ssl_cert_reqs"] == "required"
    for sentinel in pool.sentinel_manager.sentinels:
        assert sentinel.connection_pool.connection_class is SSLConnection
        assert sentinel.connection_pool.connection_kwargs["ssl_ca_certs"] == ca_file


def test_sentinel_without_a_master_name_is_refused() -> None:
    with pytest.raises(ValueError, match="REDIS_SENTINEL_MASTER"):
        create_redis(sentinel_settings(REDIS_SENTINEL_MASTER=None))


async def test_closing_the_sentinel_client_closes_the_sentinel_connections() -> None:
    client = create_redis(sentinel_settings())
    closed: list[int] = []
    for index, sentinel in enumerate(client.connection_pool.sentinel_manager.sentinels):

        async def record(index: int = index, **_: Any) -> None:
            closed.append(index)

        sentinel.aclose = record
    await client.aclose()
    assert closed == [0, 1]


# --------------------------------------------------------------------------- cluster
def cluster_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "REDIS_MODE": "cluster",
        "REDIS_ADDR": "n1.internal:7000,n2.internal:7001",
        "REDIS_OPERATION_TIMEOUT": "400ms",
    }
    return settings(**(values | overrides))


def test_cluster_client_is_seeded_with_every_address() -> None:
    client = create_redis(cluster_settings(REDIS_USERNAME="svc", REDIS_PASSWORD="pw"))
    assert isinstance(client, RedisCluster)
    assert [(n.host, n.port) for n in client.startup_nodes] == [
        ("n1.internal", 7000),
        ("n2.internal", 7001),
    ]
    kwargs = client.connection_kwargs
    assert (kwargs["username"], kwargs["password"]) == ("svc", "pw")
    assert kwargs["decode_responses"] is True
    assert kwargs["socket_timeout"] == kwargs["socket_connect_timeout"] == 0.4
    assert kwargs["max_connections"] == MAX_CONNECTIONS
    assert "db" not in kwargs
    assert client.retry.get_retries() == 1
    assert client.nodes_manager.require_full_coverage is True


def test_cluster_tls(ca_file: str) -> None:
    client = create_redis(cluster_settings(REDIS_TLS_ENABLED=True, REDIS_TLS_CA_FILE=ca_file))
    assert isinstance(client, RedisCluster)
    assert client.connection_kwargs["connection_class"] is SSLConnection
    assert client.connection_kwargs["ssl_ca_certs"] == ca_file


def test_cluster_refuses_a_database_number() -> None:
    with pytest.raises(ValueError, match="REDIS_DB"):
        create_redis(cluster_settings(REDIS_DB=1))


# --------------------------------------------------------------------------- validation
def load(monkeypatch: pytest.MonkeyPatch, **variables: str) -> Settings:
    for name, value in variables.items():
        monkeypatch.setenv(P + name, value)
    return load_settings()


def problems(monkeypatch: pytest.MonkeyPatch, **variables: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(monkeypatch, **variables)
    line = info.value.one_line()
    assert "\n" not in line
    for name in info.value.problems:
        assert name in line
    return info.value


SENTINEL = {"REDIS_MODE": "sentinel", "REDIS_ADDR": "s1:26379,s2:26379,s3:26379"}
CLUSTER = {"REDIS_MODE": "cluster", "REDIS_ADDR": "n1:7000,n2:7000,n3:7000"}


def test_a_sentinel_configuration_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load(monkeypatch, **SENTINEL, REDIS_SENTINEL_MASTER="mymaster", REDIS_DB="5")
    assert (s.REDIS_MODE, s.REDIS_SENTINEL_MASTER, s.REDIS_DB) == ("sentinel", "mymaster", 5)


def test_a_cluster_configuration_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load(monkeypatch, **CLUSTER, REDIS_DB="0")
    assert s.REDIS_MODE == "cluster"
    assert load(monkeypatch, REDIS_MODE="cluster", REDIS_ADDR="n1:7000").REDIS_ADDR == "n1:7000"


@pytest.mark.parametrize("master", [None, "", "   "])
def test_sentinel_needs_the_master_name(
    monkeypatch: pytest.MonkeyPatch, master: str | None
) -> None:
    extra = {} if master is None else {"REDIS_SENTINEL_MASTER": master}
    error = problems(monkeypatch, **SENTINEL, **extra)
    assert list(error.problems) == [P + "REDIS_SENTINEL_MASTER"]
    assert "required" in error.problems[P + "REDIS_SENTINEL_MASTER"]
    assert "REDIS_MODE=sentinel" in error.problems[P + "REDIS_SENTINEL_MASTER"]


@pytest.mark.parametrize("mode", ["sentinel", "cluster"])
@pytest.mark.parametrize("addr", ["redis://h:6379", "rediss://h:6380/0"])
def test_sentinel_and_cluster_take_host_port_lists_not_urls(
    monkeypatch: pytest.MonkeyPatch, mode: str, addr: str
) -> None:
    error = problems(
        monkeypatch, REDIS_MODE=mode, REDIS_ADDR=addr, REDIS_SENTINEL_MASTER="mymaster"
    )
    assert list(error.problems) == [P + "REDIS_ADDR"]
    assert "host:port" in error.problems[P + "REDIS_ADDR"]


@pytest.mark.parametrize("mode", ["sentinel", "cluster"])
@pytest.mark.parametrize("addr", ["s1:26379,s2", "s1:26379,,s2:26379", "s1:26379,s2:99999"])
def test_every_listed_address_must_be_host_port(
    monkeypatch: pytest.MonkeyPatch, mode: str, addr: str
) -> None:
    error = problems(
        monkeypatch, REDIS_MODE=mode, REDIS_ADDR=addr, REDIS_SENTINEL_MASTER="mymaster"
    )
    assert list(error.problems) == [P + "REDIS_ADDR"]


@pytest.mark.parametrize("mode", ["sentinel", "cluster"])
def test_memory_store_is_standalone_only(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    error = problems(
        monkeypatch, REDIS_MODE=mode, REDIS_ADDR="memory://", REDIS_SENTINEL_MASTER="m"
    )
    assert list(error.problems) == [P + "REDIS_MODE"]
    assert "standalone" in error.problems[P + "REDIS_MODE"]


@pytest.mark.parametrize("db", ["1", "15"])
def test_cluster_has_only_database_zero(monkeypatch: pytest.MonkeyPatch, db: str) -> None:
    error = problems(monkeypatch, **CLUSTER, REDIS_DB=db)
    assert list(error.problems) == [P + "REDIS_DB"]
    assert "must be 0" in error.problems[P + "REDIS_DB"]


def test_cluster_with_a_non_numeric_database_reports_the_field_error_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    error = problems(monkeypatch, **CLUSTER, REDIS_DB="one")
    assert list(error.problems) == [P + "REDIS_DB"]
    assert "must be 0" not in error.problems[P + "REDIS_DB"]


def test_standalone_takes_one_address(monkeypatch: pytest.MonkeyPatch) -> None:
    error = problems(monkeypatch, REDIS_ADDR="h1:6379,h2:6379")
    assert list(error.problems) == [P + "REDIS_ADDR"]
    assert "sentinel or cluster" in error.problems[P + "REDIS_ADDR"]


def test_every_mode_problem_is_named_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    error = problems(
        monkeypatch, REDIS_MODE="sentinel", REDIS_ADDR="redis://h:6379", CHALLENGE_TTL="10x"
    )
    assert sorted(error.problems) == [
        P + "CHALLENGE_TTL",
        P + "REDIS_ADDR",
        P + "REDIS_SENTINEL_MASTER",
    ]


def test_the_process_exits_2_on_a_bad_mode_configuration(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, value in {**CLUSTER, "REDIS_DB": "3"}.items():
        monkeypatch.setenv(P + name, value)

    assert cli.main([]) == 2

    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert P + "REDIS_DB" in err
    assert "cluster" in err

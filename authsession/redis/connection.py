"""Redis clients from settings: standalone, Sentinel or Cluster, with ACL, DB, TLS; or memory://.

Every mode shares the same connection options (decoded replies, the operation timeout as
socket and connect timeout, one immediate retry on a broken connection, ACL credentials,
TLS), so the adapters behave the same whatever the deployment. Every Lua script and every
``MULTI`` of the adapters touches keys of one hash slot only (CONTRACT §7), which is what
lets the same adapters run on a Redis Cluster.
"""

from __future__ import annotations

import logging
from typing import Any, assert_never
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from authsession.redis.base import RedisClient
from authsession.settings import MEMORY_STORE, Settings

log = logging.getLogger("authsession.redis")

# Connections per pool: the one pool of a standalone or Sentinel-managed master, or each
# node's pool in a cluster.
MAX_CONNECTIONS = 256
HEALTH_CHECK_INTERVAL = 30


def create_redis(settings: Settings) -> RedisClient:
    """Build the one shared asyncio Redis client of the process."""
    if settings.memory_store:
        return _memory_client()
    match settings.REDIS_MODE:
        case "standalone":
            return _standalone_client(settings)
        case "sentinel":
            return _sentinel_client(settings)
        case "cluster":
            return _cluster_client(settings)
        case _ as unreachable:
            assert_never(unreachable)


def parse_nodes(addr: str) -> list[tuple[str, int]]:
    """``host:port[,host:port…]`` (IPv6 hosts in brackets) → ``[(host, port), …]``."""
    if "://" in addr:
        raise ValueError(f"expected host:port addresses, not a URL: {addr!r}")
    nodes: list[tuple[str, int]] = []
    for part in addr.split(","):
        host, sep, port = part.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"invalid host:port address {part.strip()!r}")
        nodes.append((host.strip("[]"), int(port)))
    return nodes


def _memory_client() -> Redis:
    import fakeredis

    log.warning(
        f"REDIS_ADDR={MEMORY_STORE} uses an embedded in-process store: nothing is shared with "
        "gateways or other replicas and everything is lost at exit; for development only",
        extra={"component": "redis"},
    )
    client: Redis = fakeredis.FakeAsyncRedis(decode_responses=True)
    return client


def _retry() -> Retry:
    # One immediate retry (a restarted or failed-over Redis leaves dead connections in the
    # pool). Standalone and Sentinel retry only connection errors, not timeouts: a call
    # that timed out has used its budget, and the caller answers 503 after one operation
    # timeout. (The cluster client decides itself which errors it retries; see below.)
    return Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,))


def _common_options(settings: Settings) -> dict[str, Any]:
    """Options every connection to a data node gets, in every mode."""
    timeout = settings.REDIS_OPERATION_TIMEOUT.total_seconds()
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": _retry(),
        "health_check_interval": HEALTH_CHECK_INTERVAL,
        "max_connections": MAX_CONNECTIONS,
    }
    options.update(_credentials(settings))
    return options


def _credentials(settings: Settings) -> dict[str, Any]:
    options: dict[str, Any] = {}
    if settings.REDIS_USERNAME:
        options["username"] = settings.REDIS_USERNAME
    if settings.REDIS_PASSWORD is not None:
        options["password"] = settings.REDIS_PASSWORD.get_secret_value()
    return options


def _standalone_client(settings: Settings) -> Redis:
    options = _common_options(settings)
    options["retry_on_error"] = [RedisConnectionError]
    addr = settings.REDIS_ADDR.strip()
    tls = settings.REDIS_TLS_ENABLED
    if "://" in addr:
        parts = urlsplit(addr)
        tls = tls or parts.scheme == "rediss"
        url_options = dict(options)
        if settings.REDIS_DB and not parts.path.strip("/"):
            url_options["db"] = settings.REDIS_DB
        if tls:
            url_options.update(_tls_options(settings, url=True))
        client: Redis = Redis.from_url(addr, **url_options)
        return client
    host, _, port = addr.rpartition(":")
    options.update(host=host.strip("[]") or "127.0.0.1", port=int(port), db=settings.REDIS_DB)
    if tls:
        options.update(_tls_options(settings, url=False))
    return Redis(**options)


def _sentinel_client(settings: Settings) -> Redis:
    """The master named ``REDIS_SENTINEL_MASTER``, discovered through the sentinels.

    The client asks the sentinels for the master's address whenever it opens a connection;
    after a failover the old connections fail (or the demoted master answers READONLY) and
    the retry reconnects to the new master. The sentinels get the same credentials, TLS and
    timeouts as the data nodes.
    """
    master = (settings.REDIS_SENTINEL_MASTER or "").strip()
    if not master:
        raise ValueError("REDIS_MODE=sentinel needs REDIS_SENTINEL_MASTER")
    timeout = settings.REDIS_OPERATION_TIMEOUT.total_seconds()
    sentinel_options: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": _retry(),
        "retry_on_error": [RedisConnectionError],
        **_credentials(settings),
    }
    options = _common_options(settings)
    options.update(retry_on_error=[RedisConnectionError], db=settings.REDIS_DB)
    if settings.REDIS_TLS_ENABLED:
        sentinel_options.update(_tls_options(settings, url=False))
        options.update(_tls_options(settings, url=False))
    sentinel = Sentinel(  # type: ignore[no-untyped-call]  # redis-py leaves it unannotated
        parse_nodes(settings.REDIS_ADDR),
        sentinel_kwargs=sentinel_options,
        socket_timeout=timeout,
    )
    client: Redis = sentinel.master_for(
        master, connection_pool_class=_SentinelMasterPool, **options
    )
    return client


class _SentinelMasterPool(SentinelConnectionPool):
    """The master's pool, which also closes the connections to the sentinels.

    Closing the client closes its pool; without this the sentinels' connections would
    stay open until garbage collection.
    """

    async def aclose(self) -> None:
        await super().aclose()
        for sentinel in self.sentinel_manager.sentinels:
            await sentinel.aclose()


def _cluster_client(settings: Settings) -> RedisCluster:
    """A cluster client seeded with ``REDIS_ADDR``'s nodes; it discovers the others.

    redis-py's cluster client retries connection errors, timeouts and ``CLUSTERDOWN`` once
    after refreshing the slot map (``retry`` counts the attempts; it does not let timeouts
    be excluded), so a call can take up to two operation timeouts there.
    """
    if settings.REDIS_DB:
        raise ValueError("REDIS_MODE=cluster has only database 0 (REDIS_DB must be 0)")
    options = _common_options(settings)
    if settings.REDIS_TLS_ENABLED:
        options.update(_tls_options(settings, url=False))
    nodes = [ClusterNode(host, port) for host, port in parse_nodes(settings.REDIS_ADDR)]
    return RedisCluster(startup_nodes=nodes, require_full_coverage=True, **options)


def _tls_options(settings: Settings, *, url: bool) -> dict[str, Any]:
    options: dict[str, Any] = {"ssl_cert_reqs": "required"}
    if not url:
        options["ssl"] = True
    if settings.REDIS_TLS_CA_FILE:
        options["ssl_ca_certs"] = settings.REDIS_TLS_CA_FILE
    return options

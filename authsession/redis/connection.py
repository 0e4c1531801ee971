"""Redis clients from settings: standalone host:port or URL, ACL, DB, TLS, or memory://.

Sentinel and Cluster are accepted by the contract's configuration but rejected by
settings validation until they are implemented here (the ``match`` below is where they go).
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError

from authsession.settings import Settings

log = logging.getLogger("authsession.redis")


def create_redis(settings: Settings) -> Redis:
    """Build the one shared asyncio Redis client of the process."""
    if settings.memory_store:
        return _memory_client()
    match settings.REDIS_MODE:
        case "standalone":
            return _standalone_client(settings)
        case "sentinel" | "cluster":
            raise NotImplementedError(f"REDIS_MODE={settings.REDIS_MODE} is not supported yet")


def _memory_client() -> Redis:
    import fakeredis

    log.warning(
        "REDIS_ADDR=memory:// uses an embedded in-process store: nothing is shared with "
        "gateways or other replicas and everything is lost at exit; for development only",
        extra={"component": "redis"},
    )
    client: Redis = fakeredis.FakeAsyncRedis(decode_responses=True)
    return client


def _standalone_client(settings: Settings) -> Redis:
    timeout = settings.REDIS_OPERATION_TIMEOUT.total_seconds()
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        # One immediate retry on a broken connection (a restarted Redis leaves dead
        # connections in the pool). Timeouts are not retried: a call that timed out has
        # used its budget, and the caller answers 503 after one operation timeout.
        "retry": Retry(NoBackoff(), 1),
        "retry_on_error": [RedisConnectionError],
        "health_check_interval": 30,
        "max_connections": 256,
    }
    if settings.REDIS_USERNAME:
        options["username"] = settings.REDIS_USERNAME
    if settings.REDIS_PASSWORD is not None:
        options["password"] = settings.REDIS_PASSWORD.get_secret_value()
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


def _tls_options(settings: Settings, *, url: bool) -> dict[str, Any]:
    options: dict[str, Any] = {"ssl_cert_reqs": "required"}
    if not url:
        options["ssl"] = True
    if settings.REDIS_TLS_CA_FILE:
        options["ssl_ca_certs"] = settings.REDIS_TLS_CA_FILE
    return options

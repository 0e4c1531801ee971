"""What every Redis adapter shares: key names, script loading, error translation."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import secrets
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import timedelta
from importlib import resources
from typing import Any, ParamSpec, TypeVar

from opentelemetry import trace
from opentelemetry.trace import SpanKind
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import RedisClusterException, RedisError

from authsession.aio import cancel_and_wait
from authsession.domain.codes import slot_tag, tag_of_session
from authsession.domain.errors import ServiceUnavailable

P = ParamSpec("P")
T = TypeVar("T")

# The shared client: a plain (standalone or Sentinel-managed) Redis or a cluster client.
RedisClient = Redis | RedisCluster
_tracer = trace.get_tracer("authsession.redis")
_log = logging.getLogger("authsession.redis")


@dataclass(frozen=True, slots=True)
class Keys:
    """The source-of-truth key layout of CONTRACT §7 (§12: with hash tags) under one prefix.

    A user's sessions, index and block marker carry the user's slot tag
    (``{<tag>}``, see :func:`~authsession.domain.codes.slot_tag`); a device session id
    starts with the same tag, so its record is found from the id alone and one script can
    act on a user's index and all of the user's sessions at once, on Redis Cluster too.
    """

    prefix: str

    def challenge(self, challenge_id: str) -> str:
        """``<prefix>challenge:<challenge_id>``."""
        return f"{self.prefix}challenge:{challenge_id}"

    def throttle(self, email_hash: str) -> str:
        """``<prefix>throttle:<email_hash>``."""
        return f"{self.prefix}throttle:{email_hash}"

    def failures(self, email_hash: str) -> str:
        """``<prefix>failures:<email_hash>``."""
        return f"{self.prefix}failures:{email_hash}"

    def throttle_user(self, user_id: str) -> str:
        """``<prefix>throttle_user:{<tag>}:<user_id>`` (CONTRACT §12/§5)."""
        return f"{self.prefix}throttle_user:{{{slot_tag(user_id)}}}:{user_id}"

    def failures_user(self, user_id: str) -> str:
        """``<prefix>failures_user:{<tag>}:<user_id>`` (CONTRACT §12/§5)."""
        return f"{self.prefix}failures_user:{{{slot_tag(user_id)}}}:{user_id}"

    def session(self, device_session_id: str) -> str:
        """``<prefix>session:{<tag>}:<device_session_id>`` (the tag the id starts with)."""
        return f"{self.prefix}session:{{{tag_of_session(device_session_id)}}}:{device_session_id}"

    def session_pattern(self) -> str:
        """``SCAN MATCH`` pattern of every session record."""
        return f"{glob_escape(self.prefix)}session:*"

    def session_id_of(self, key: str) -> str:
        """The device session id of a session record's key."""
        return key.rpartition(":")[2]

    def user_sessions(self, user_id: str) -> str:
        """``<prefix>user_sessions:{<tag>}:<user_id>``."""
        return f"{self.prefix}user_sessions:{{{slot_tag(user_id)}}}:{user_id}"

    def blocked_user(self, user_id: str) -> str:
        """``<prefix>blocked_user:{<tag>}:<user_id>``: recent blocks, checked at confirm."""
        return f"{self.prefix}blocked_user:{{{slot_tag(user_id)}}}:{user_id}"

    def projection_pending(self, snapshot_key: str) -> str:
        """``<prefix>projection_pending:{<snapshot key>}``: an event not yet appended.

        The hash tag is the whole snapshot key, so the marker shares the snapshot's slot
        and the publish script sets it together with the snapshot.
        """
        return f"{self.prefix}projection_pending:{{{snapshot_key}}}"

    def projection_pending_pattern(self) -> str:
        """``SCAN MATCH`` pattern of every pending-event marker."""
        return f"{glob_escape(self.prefix)}projection_pending:*"

    def lease(self, job: str) -> str:
        """``<prefix>lease:<job>``: the one runner of a periodic job across processes."""
        return f"{self.prefix}lease:{job}"

    def token_scrub(self) -> str:
        """``<prefix>token_scrub``: confirmed challenges by the end of their window."""
        return f"{self.prefix}token_scrub"

    def config(self) -> str:
        """``<prefix>config``."""
        return f"{self.prefix}config"

    def rate_limit(self, client: str, window: int) -> str:
        """``<prefix>ratelimit:<client>:<window index>``."""
        return f"{self.prefix}ratelimit:{client}:{window}"


def glob_escape(text: str) -> str:
    """``text`` with the glob characters of ``SCAN MATCH`` escaped."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def load_script(client: RedisClient, name: str) -> AsyncScript:
    """Register ``scripts/<name>.lua`` (EVALSHA, falling back to EVAL after a flush)."""
    text = resources.files("authsession.redis").joinpath("scripts", f"{name}.lua").read_text()
    return client.register_script(text)


def redis_call(
    fn: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    """A traced adapter method whose Redis failures become ``ServiceUnavailable('redis')``."""
    call = traced(fn)

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await call(*args, **kwargs)
        except (RedisError, RedisClusterException) as exc:
            raise ServiceUnavailable("redis", f"{type(exc).__name__}: {exc}") from exc
        except OSError as exc:  # a socket error that redis-py did not wrap
            raise ServiceUnavailable("redis", f"{type(exc).__name__}: {exc}") from exc

    return wrapper


def as_strings(raw: Any) -> dict[str, str]:
    """A decoded hash reply (``decode_responses=True``) typed as ``dict[str, str]``."""
    return {str(k): str(v) for k, v in raw.items()}


# Set while a periodic job runs: its Redis calls make no spans, so that a job running
# every second on every replica does not fill the trace backend with root traces.
_untraced: contextvars.ContextVar[bool] = contextvars.ContextVar("untraced", default=False)
# Whether Redis calls make client spans at all (see set_client_spans).
_client_spans = True


def set_client_spans(enabled: bool) -> None:
    """Turn the Redis client spans on or off for the process.

    The process turns them off when nothing records spans: a span that is not recorded
    still costs its context switches on every Redis call, and unlike the request's own
    span (which carries the trace id into logs and outbound calls) it carries nothing.
    """
    global _client_spans
    _client_spans = enabled


def traced(
    fn: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    """A client span around an adapter method that translates its own errors."""
    span_name = f"redis {fn.__qualname__}"

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        if not _client_spans or _untraced.get():
            return await fn(*args, **kwargs)
        with _tracer.start_as_current_span(
            span_name, kind=SpanKind.CLIENT, attributes={"db.system.name": "redis"}
        ):
            return await fn(*args, **kwargs)

    return wrapper


def pairs(flat: Sequence[Any]) -> dict[str, str]:
    """``[k1, v1, k2, v2, …]`` (as HGETALL returns inside Lua) → dict."""
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


class RedisComponent:
    """Base of the Redis adapters: holds the client and answers the startup ``PING``."""

    def __init__(self, client: RedisClient) -> None:
        self._redis = client

    @redis_call
    async def ping(self) -> None:
        """One ``PING`` round trip."""
        await self._redis.ping()


class Lease:
    """A Redis lease that lets one process at a time run a periodic job.

    Every replica and worker runs the job's loop; before each run the loop takes or
    renews the lease (``scripts/lease_acquire.lua``), and only its holder runs the step.
    A holder that dies stops renewing, and another takes over once the lease runs out.
    """

    def __init__(self, client: RedisClient, key: str, ttl: timedelta) -> None:
        self._key = key
        self._ttl_ms = max(1, int(ttl.total_seconds() * 1000))
        self._holder = secrets.token_hex(8)
        self._acquire = load_script(client, "lease_acquire")

    @redis_call
    async def hold(self) -> bool:
        """Take or renew the lease; whether this process holds it now."""
        return bool(await self._acquire(keys=[self._key], args=[self._holder, self._ttl_ms]))


class PeriodicTask:
    """Runs ``step`` every ``interval`` in the background until stopped.

    A Redis failure of one run is logged as ``failure_event`` and the next run comes at
    the usual time: background work never stops on a transient outage. With a ``lease``,
    only the lease's holder runs the step. Its Redis calls make no spans.
    """

    def __init__(
        self,
        name: str,
        interval: timedelta,
        step: Callable[[], Coroutine[Any, Any, object]],
        failure_event: str,
        lease: Lease | None = None,
    ) -> None:
        self._name = name
        self._interval = interval.total_seconds()
        self._step = step
        self._failure_event = failure_event
        self._lease = lease
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the background runs (idempotent)."""
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=self._name)

    async def stop(self) -> None:
        """Cancel the background runs and wait for them to end."""
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None

    async def _loop(self) -> None:
        _untraced.set(True)  # this task's own context: the request path is untouched
        while True:
            try:
                if self._lease is None or await self._lease.hold():
                    await self._step()
            except ServiceUnavailable as exc:
                _log.warning(self._failure_event, extra={"cause": exc.cause})
            await asyncio.sleep(self._interval)

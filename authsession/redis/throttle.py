"""The resend cooldown, the per-e-mail failure budget and the per-IP rate limit."""

from __future__ import annotations

import contextlib
import math
import secrets
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisError

from authsession.domain.errors import ServiceUnavailable
from authsession.domain.ports import Scope
from authsession.domain.units import RateLimit, to_epoch_ms
from authsession.redis.base import Keys, RedisClient, RedisComponent, load_script, redis_call

# Replies slower than this round trip are not used to estimate the clock offset.
_OFFSET_SAMPLE_MAX_RTT = 0.05
# The deadline leaves this share of the operation timeout for the reply to travel back.
_DEADLINE_SHARE = 0.8


class RedisResendThrottle(RedisComponent):
    """``<prefix>throttle:<email_hash>``: a fixed window opened once (``SET NX PX``).

    The window is opened by ``scripts/throttle_acquire.lua`` with a deadline in Redis's
    clock, so that a call that times out here (answered 503) and is executed by Redis
    later (a paused Redis resuming) opens no window that would throttle the retry.
    """

    def __init__(
        self, client: RedisClient, keys: Keys, operation_timeout: timedelta | None = None
    ) -> None:
        super().__init__(client)
        self._keys = keys
        self._release = load_script(client, "throttle_release")
        self._acquire = load_script(client, "throttle_acquire")
        self._timeout_ms = (
            operation_timeout.total_seconds() * 1000 if operation_timeout is not None else None
        )
        # Redis's clock minus ours, in ms, from the last quick reply (None: not known yet).
        self._offset_ms: float | None = None

    @redis_call
    async def ping(self) -> None:
        """One ``TIME`` round trip: answers like ``PING`` and measures the clock offset."""
        started = time.time()
        seconds, micros = await self._redis.time()
        self._sample(started, seconds * 1000 + micros / 1000)

    def _sample(self, started: float, redis_ms: float) -> None:
        ended = time.time()
        if ended - started <= _OFFSET_SAMPLE_MAX_RTT:
            self._offset_ms = redis_ms - (started + ended) * 500

    def _key(self, subject: str, scope: Scope) -> str:
        return (
            self._keys.throttle(subject) if scope == "email" else self._keys.throttle_user(subject)
        )

    @redis_call
    async def acquire(
        self, subject: str, owner: str, cooldown: timedelta, scope: Scope = "email"
    ) -> bool:
        """Open the window; ``False`` if one is open (throttled requests never extend it)."""
        ms = max(1, int(cooldown.total_seconds() * 1000))
        started = time.time()
        deadline = 0
        if self._offset_ms is not None and self._timeout_ms is not None:
            deadline = int(started * 1000 + self._offset_ms + self._timeout_ms * _DEADLINE_SHARE)
        result, redis_ms = await self._acquire(
            keys=[self._key(subject, scope)], args=[owner, ms, deadline]
        )
        self._sample(started, float(redis_ms))
        if int(result) < 0:
            # Executed after this caller would have given up: nothing was written.
            raise ServiceUnavailable("redis", "Redis answered past the operation deadline")
        return int(result) == 1

    @redis_call
    async def release(self, subject: str, owner: str, scope: Scope = "email") -> None:
        """Close the window if ``owner`` opened it."""
        await self._release(keys=[self._key(subject, scope)], args=[owner])


class RedisFailureBudget(RedisComponent):
    """``<prefix>failures:<email_hash>``: a sorted set of failure times (rolling window)."""

    def __init__(self, client: RedisClient, keys: Keys) -> None:
        super().__init__(client)
        self._keys = keys
        self._reserve = load_script(client, "failures_reserve")

    def _key(self, subject: str, scope: Scope) -> str:
        return (
            self._keys.failures(subject) if scope == "email" else self._keys.failures_user(subject)
        )

    @redis_call
    async def reserve(
        self, subject: str, now: datetime, window: timedelta, limit: int, scope: Scope = "email"
    ) -> str | None:
        """Take one slot of the budget (see ``scripts/failures_reserve.lua``)."""
        member = _member(now)
        reserved = await self._reserve(
            keys=[self._key(subject, scope)], args=[*_reserve_args(now, window, limit), member]
        )
        return member if reserved else None

    @redis_call
    async def reserve_all(
        self, subjects: Sequence[tuple[str, Scope]], now: datetime, window: timedelta, limit: int
    ) -> list[tuple[str, str, Scope]] | None:
        """Take a slot of each budget, in one round trip where the client can pipeline them.

        The budgets are in different hash slots, so each is its own script call; when one
        is full or a call fails, the slots the others took are given back. redis-py refuses
        scripts in a cluster pipeline, so on Cluster the calls go one after the other.
        """
        args = _reserve_args(now, window, limit)
        wanted = [(subject, _member(now), scope) for subject, scope in subjects]
        if isinstance(self._redis, RedisCluster):
            replies, failure = await self._reserve_in_turn(wanted, args)
        else:
            replies, failure = await self._reserve_pipelined(wanted, args)
        taken = [slot for slot, reply in zip(wanted, replies, strict=True) if reply]
        if failure is None and len(taken) == len(wanted):
            return taken
        if taken:
            with contextlib.suppress(RedisError, OSError):
                await self._release_each(taken)
        if failure is not None:
            raise failure
        return None

    async def _reserve_in_turn(
        self, wanted: Sequence[tuple[str, str, Scope]], args: list[int]
    ) -> tuple[list[bool], RedisError | None]:
        """Each reservation in its own call, stopping at the first full budget or failure."""
        replies = [False] * len(wanted)
        for index, (subject, member, scope) in enumerate(wanted):
            try:
                replies[index] = bool(
                    await self._reserve(keys=[self._key(subject, scope)], args=[*args, member])
                )
            except RedisError as exc:
                return replies, exc
            if not replies[index]:
                break
        return replies, None

    async def _reserve_pipelined(
        self, wanted: Sequence[tuple[str, str, Scope]], args: list[int]
    ) -> tuple[list[bool], RedisError | None]:
        """Every reservation in one pipeline of ``EVALSHA``."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for subject, member, scope in wanted:
                pipe.evalsha(self._reserve.sha, 1, self._key(subject, scope), *args, member)
            raw: list[Any] = await pipe.execute(raise_on_error=False)
        replies = [False] * len(wanted)
        failure: RedisError | None = None
        for index, ((subject, member, scope), reply) in enumerate(zip(wanted, raw, strict=True)):
            if isinstance(reply, NoScriptError):
                # Redis no longer knows the script (a restart, SCRIPT FLUSH): the script
                # object loads it again.
                try:
                    reply = await self._reserve(
                        keys=[self._key(subject, scope)], args=[*args, member]
                    )
                except RedisError as exc:
                    reply = exc
            if isinstance(reply, RedisError):
                failure = failure or reply
            else:
                replies[index] = bool(reply)
        return replies, failure

    async def _release_each(self, slots: Sequence[tuple[str, str, Scope]]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for subject, member, scope in slots:
                pipe.zrem(self._key(subject, scope), member)
            await pipe.execute()

    @redis_call
    async def release(self, subject: str, member: str, scope: Scope = "email") -> None:
        """Give back a slot whose confirm turned out not to be a wrong code."""
        await self._redis.zrem(self._key(subject, scope), member)

    @redis_call
    async def release_all(self, slots: Sequence[tuple[str, str, Scope]]) -> None:
        """Give back several slots in one round trip (one pipeline, split by node)."""
        await self._release_each(slots)


class RedisRateLimiter(RedisComponent):
    """Fixed-window request counter per client IP, shared by every replica."""

    def __init__(self, client: RedisClient, keys: Keys) -> None:
        super().__init__(client)
        self._keys = keys
        self._hit = load_script(client, "rate_limit_hit")

    @redis_call
    async def hit(self, client: str, limit: RateLimit, now: datetime) -> int | None:
        """Count one request; seconds until the window ends when over the limit."""
        period_ms = limit.period_seconds * 1000
        now_ms = to_epoch_ms(now)
        window = now_ms // period_ms
        count = int(await self._hit(keys=[self._keys.rate_limit(client, window)], args=[period_ms]))
        if count <= limit.count:
            return None
        return max(1, math.ceil(((window + 1) * period_ms - now_ms) / 1000))


def _member(now: datetime) -> str:
    """A unique member of a failure budget, scored by ``now``."""
    return f"{to_epoch_ms(now)}:{secrets.token_hex(6)}"


def _reserve_args(now: datetime, window: timedelta, limit: int) -> list[int]:
    """``failures_reserve.lua``'s ARGV but the member: now and window (ms), the limit."""
    return [to_epoch_ms(now), int(window.total_seconds() * 1000), limit]

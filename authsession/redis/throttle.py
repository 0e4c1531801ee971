"""The resend cooldown, the per-e-mail failure budget and the per-IP rate limit."""

from __future__ import annotations

import math
import secrets
from datetime import datetime, timedelta

from authsession.domain.units import RateLimit, to_epoch_ms
from authsession.redis.base import Keys, RedisClient, RedisComponent, load_script, redis_call


class RedisResendThrottle(RedisComponent):
    """``<prefix>throttle:<email_hash>``: a fixed window opened with ``SET NX PX``."""

    def __init__(self, client: RedisClient, keys: Keys) -> None:
        super().__init__(client)
        self._keys = keys
        self._release = load_script(client, "throttle_release")

    @redis_call
    async def acquire(self, email_hash: str, owner: str, cooldown: timedelta) -> bool:
        """Open the window; ``False`` if one is open (throttled requests never extend it)."""
        ms = max(1, int(cooldown.total_seconds() * 1000))
        return bool(await self._redis.set(self._keys.throttle(email_hash), owner, nx=True, px=ms))

    @redis_call
    async def release(self, email_hash: str, owner: str) -> None:
        """Close the window if ``owner`` opened it."""
        await self._release(keys=[self._keys.throttle(email_hash)], args=[owner])


class RedisFailureBudget(RedisComponent):
    """``<prefix>failures:<email_hash>``: a sorted set of failure times (rolling window)."""

    def __init__(self, client: RedisClient, keys: Keys) -> None:
        super().__init__(client)
        self._keys = keys
        self._reserve = load_script(client, "failures_reserve")

    @redis_call
    async def count(self, email_hash: str, now: datetime, window: timedelta) -> int:
        """Failures in ``(now - window, now]``."""
        since = to_epoch_ms(now - window)
        return int(await self._redis.zcount(self._keys.failures(email_hash), f"({since}", "+inf"))

    @redis_call
    async def reserve(
        self, email_hash: str, now: datetime, window: timedelta, limit: int
    ) -> str | None:
        """Take one slot of the budget (see ``scripts/failures_reserve.lua``)."""
        member = f"{to_epoch_ms(now)}:{secrets.token_hex(6)}"
        reserved = await self._reserve(
            keys=[self._keys.failures(email_hash)],
            args=[to_epoch_ms(now), int(window.total_seconds() * 1000), limit, member],
        )
        return member if reserved else None

    @redis_call
    async def release(self, email_hash: str, member: str) -> None:
        """Give back a slot whose confirm turned out not to be a wrong code."""
        await self._redis.zrem(self._keys.failures(email_hash), member)


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

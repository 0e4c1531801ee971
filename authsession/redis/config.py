"""Runtime config provider: environment defaults overridden by the ``<prefix>config`` hash."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from typing import Any

from authsession.domain.model import RuntimeConfig
from authsession.domain.units import parse_bool, parse_duration, parse_rate_limit
from authsession.redis.base import (
    Keys,
    PeriodicTask,
    RedisClient,
    RedisComponent,
    as_strings,
    redis_call,
)

log = logging.getLogger("authsession.config")


def _positive_duration(text: str) -> timedelta:
    value = parse_duration(text)
    if value <= timedelta(0):
        raise ValueError("must be positive")
    return value


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text.strip())
        if value < minimum:
            raise ValueError(f"must be at least {minimum}")
        return value

    return parse


# The fields of CONTRACT §3 that the config hash may override, with their parsers.
FIELD_PARSERS: dict[str, Callable[[str], Any]] = {
    "signup_enabled": parse_bool,
    "challenge_ttl": _positive_duration,
    "session_ttl": _positive_duration,
    "max_confirm_attempts": _int_at_least(1),
    "max_failed_confirms_per_email": _int_at_least(1),
    "max_active_sessions_per_user": _int_at_least(0),
    "public_rate_limit": parse_rate_limit,
}


class RedisConfigProvider(RedisComponent):
    """Keeps the last good runtime config; re-reads Redis every ``interval``."""

    def __init__(
        self, client: RedisClient, keys: Keys, defaults: RuntimeConfig, interval: timedelta
    ) -> None:
        super().__init__(client)
        self._keys = keys
        self._defaults = defaults
        self._interval = interval
        self._current = defaults
        # The last good value of each overridden field: a field that stops parsing keeps it.
        self._good: dict[str, Any] = {}
        self._warned: dict[str, str] = {}  # field -> the bad value already warned about
        self._refresher = PeriodicTask(
            "config-refresh", interval, self.refresh, "runtime config refresh failed"
        )

    def current(self) -> RuntimeConfig:
        """The configuration in force (no I/O)."""
        return self._current

    @redis_call
    async def refresh(self) -> RuntimeConfig:
        """Read the hash once and apply every field that parses."""
        raw = as_strings(await self._redis.hgetall(self._keys.config()))
        good: dict[str, Any] = {}
        for name, parse in FIELD_PARSERS.items():
            if name not in raw:
                continue  # removed from the hash: back to the environment's value
            try:
                good[name] = parse(raw[name])
            except ValueError as exc:
                if name in self._good:
                    good[name] = self._good[name]
                if self._warned.get(name) != raw[name]:  # once per bad value, not per refresh
                    log.warning(
                        "ignoring runtime config field that does not parse",
                        extra={"field": name, "reason": str(exc)},
                    )
                    self._warned[name] = raw[name]
        for name in sorted(set(raw) - set(FIELD_PARSERS)):
            if self._warned.get(name) != raw[name]:
                log.warning("ignoring unknown runtime config field", extra={"field": name})
                self._warned[name] = raw[name]
        self._warned = {k: v for k, v in self._warned.items() if raw.get(k) == v}
        if good != self._good:
            log.info("runtime config changed", extra={"overrides": sorted(good)})
        self._good = good
        self._current = replace(self._defaults, **good)
        return self._current

    def start(self) -> None:
        """Start re-reading in the background."""
        self._refresher.start()

    async def stop(self) -> None:
        """Stop the background refresh."""
        await self._refresher.stop()

"""Parsing of the contract's textual units: Go durations, rate limits, booleans, times."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
# ASCII digits only: \d and float() would also take other scripts' digits. durationpy, the
# ready-made Go-duration parser, is not used for that reason and because it also takes
# d/w/mm/y units and spaces between the parts ("1h 30m"), which the contract rejects.
_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> timedelta:
    """Parse a Go duration (``300ms``, ``1h30m``, ``720h``); ``0`` alone is zero."""
    raw = text.strip()
    if raw == "0":
        return timedelta(0)
    if not raw:
        raise ValueError("empty duration")
    pos = 0
    total = 0.0
    while pos < len(raw):
        match = _DURATION_PART.match(raw, pos)
        if match is None:
            raise ValueError(f"invalid duration {text!r} (use Go syntax such as 300ms, 2s, 1h30m)")
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    try:
        return timedelta(seconds=total)
    except OverflowError:
        raise ValueError(f"duration {text!r} is out of range") from None


def format_duration(value: timedelta) -> str:
    """Render a duration in Go syntax (whole milliseconds)."""
    ms = round(value.total_seconds() * 1000)
    if ms == 0:
        return "0s"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    out = ""
    if hours:
        out += f"{hours}h"
    if minutes:
        out += f"{minutes}m"
    if millis:
        out += f"{seconds}.{millis:03d}".rstrip("0") + "s"
    elif seconds:
        out += f"{seconds}s"
    return out


_BOOL_WORDS = {"true": True, "1": True, "false": False, "0": False}


def parse_bool(text: str) -> bool:
    """Parse the contract's booleans: ``true``/``false``/``1``/``0``."""
    try:
        return _BOOL_WORDS[text.strip().lower()]
    except KeyError:
        raise ValueError(f"invalid boolean {text!r} (use true, false, 1 or 0)") from None


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``count`` requests per ``period_seconds`` window."""

    count: int
    period_seconds: int

    def __str__(self) -> str:
        unit = {1: "s", 60: "m", 3600: "h"}[self.period_seconds]
        return f"{self.count}/{unit}"


_RATE = re.compile(r"^([0-9]+)/([smh])$")


def parse_rate_limit(text: str) -> RateLimit | None:
    """Parse ``N/s``, ``N/m`` or ``N/h``; ``0`` (or ``0/…``) means no limit."""
    raw = text.strip()
    if raw == "0":
        return None
    match = _RATE.match(raw)
    if match is None:
        raise ValueError(f"invalid rate limit {text!r} (use N/s, N/m, N/h or 0)")
    count = int(match.group(1))
    if count == 0:
        return None
    return RateLimit(count=count, period_seconds={"s": 1, "m": 60, "h": 3600}[match.group(2)])


def format_time(value: datetime) -> str:
    """RFC 3339 in UTC with millisecond precision and a ``Z`` suffix.

    The fixed width makes these strings sort chronologically, which the Lua scripts rely
    on when they compare ``expires_at`` with the current time.
    """
    utc = value.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def parse_time(text: str) -> datetime:
    """Inverse of :func:`format_time`: any RFC 3339 time with an offset (``Z`` or ``z``
    for UTC), as an aware UTC datetime."""
    return datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00")).astimezone(
        UTC
    )


def from_epoch_ms(value: int) -> datetime:
    """Inverse of :func:`to_epoch_ms` (UTC)."""
    return datetime.fromtimestamp(value / 1000, UTC)


def to_epoch_ms(value: datetime) -> int:
    """Milliseconds since the epoch, for ``PEXPIREAT``-style commands."""
    return round(value.timestamp() * 1000)

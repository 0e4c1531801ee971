"""The real clock, in UTC: read by the service and by the gateway library alike.

It imports nothing of the service, so the gateway library can use it too.
"""

from __future__ import annotations

from datetime import UTC, datetime


def utc_now() -> datetime:
    """The current instant, timezone-aware in UTC."""
    return datetime.now(UTC)


class SystemClock:
    """The real clock, as the domain's ``Clock`` port."""

    def now(self) -> datetime:
        """The current instant."""
        return utc_now()

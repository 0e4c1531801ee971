"""The ports only the HTTP layer needs, as Protocols (the domain's are in ``domain/ports.py``).

The Redis adapter is :class:`~authsession.redis.throttle.RedisRateLimiter`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from authsession.domain.ports import Component
from authsession.domain.units import RateLimit


class RateLimiter(Component, Protocol):
    """The per-client-IP limit of the public listener, shared by replicas."""

    async def hit(self, client: str, limit: RateLimit, now: datetime) -> int | None:
        """Count one request; the ``Retry-After`` seconds when over the limit, else ``None``."""
        ...

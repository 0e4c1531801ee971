"""Gateway projection publisher (CONTRACT §9): snapshot key first, then the stream event.

The key and the stream are in different hash slots; the key write is a compare-and-set
on the version (``scripts/projection_publish.lua``), then ``XADD MAXLEN ~``. A failure of
either is a ``ServiceUnavailable('projection')``: the caller answers 503 and a retry
publishes again, which is safe because the same version is never rewritten.
"""

from __future__ import annotations

import json
from datetime import datetime

from redis.exceptions import RedisClusterException, RedisError

from authsession.domain.errors import ServiceUnavailable
from authsession.domain.model import Session, Snapshot
from authsession.domain.ports import PublishResult
from authsession.domain.units import to_epoch_ms
from authsession.redis.base import RedisClient, RedisComponent, load_script, traced


class RedisProjectionPublisher(RedisComponent):
    """Publishes session snapshots for gateways."""

    def __init__(self, client: RedisClient, key_prefix: str, stream: str, maxlen: int) -> None:
        super().__init__(client)
        self._key_prefix = key_prefix
        self._stream = stream
        self._maxlen = maxlen
        self._publish = load_script(client, "projection_publish")

    def snapshot_key(self, device_session_id: str) -> str:
        """``<GATEWAY_SESSION_KEY_PREFIX><device_session_id>``."""
        return self._key_prefix + device_session_id

    @traced
    async def publish(self, session: Session, now: datetime) -> PublishResult:
        """Write the snapshot (unless a same or higher version is there), then the event."""
        snapshot = Snapshot(session=session, published_at=now)
        document = snapshot.to_json()
        status = snapshot.status
        try:
            reply = await self._publish(
                keys=[self.snapshot_key(session.device_session_id)],
                args=[session.version, document, to_epoch_ms(session.expires_at), to_epoch_ms(now)],
            )
            result = PublishResult(str(reply[0]))
            if result is PublishResult.STALE:
                return result
            if result is PublishResult.UNCHANGED:
                document = str(reply[1])
                status = str(json.loads(document).get("status", status))
            await self._redis.xadd(
                self._stream,
                {
                    "event": "session_snapshot",
                    "device_session_id": session.device_session_id,
                    "user_id": session.user_id,
                    "status": status,
                    "version": str(session.version),
                    "snapshot": document,
                },
                maxlen=self._maxlen,
                approximate=True,
            )
        except (RedisError, RedisClusterException, OSError, ValueError) as exc:
            raise ServiceUnavailable("projection", f"{type(exc).__name__}: {exc}") from exc
        return result

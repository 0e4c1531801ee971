"""Gateway projection publisher (CONTRACT §9): snapshot key first, then the stream event.

The key and the stream are in different hash slots. The key write is a compare-and-set on
the version (``scripts/projection_publish.lua``) that also sets a pending-event marker in
the key's slot; then ``XADD MAXLEN ~``; then the marker is cleared. A publication whose
event failed therefore leaves a marker, and the next publication of that version (a
caller's retry) or the reconciler appends the event: a snapshot is never written without
its event reaching the stream eventually. A failure of any step is a
``ServiceUnavailable('projection')``: the caller answers 503 and a retry publishes again,
which is safe because the same version is never rewritten.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from redis.exceptions import RedisClusterException, RedisError

from authsession.domain.errors import ServiceUnavailable
from authsession.domain.model import RevokeReason, Session
from authsession.domain.ports import AppendPolicy, PublishResult
from authsession.domain.units import to_epoch_ms
from authsession.projection_codec import SessionSnapshot, SnapshotError, event_fields
from authsession.redis.base import Keys, RedisClient, RedisComponent, load_script, traced

DEFAULT_PREFIX = "authsession:"
_ERRORS = (RedisError, RedisClusterException, OSError, ValueError, KeyError, TypeError)


class RedisProjectionPublisher(RedisComponent):
    """Publishes session snapshots for gateways."""

    def __init__(
        self,
        client: RedisClient,
        key_prefix: str,
        stream: str,
        maxlen: int,
        *,
        keys: Keys | None = None,
    ) -> None:
        super().__init__(client)
        self._keys = keys or Keys(DEFAULT_PREFIX)
        self._key_prefix = key_prefix
        self._stream = stream
        self._maxlen = maxlen
        self._publish = load_script(client, "projection_publish")
        self._clear = load_script(client, "projection_clear")

    @property
    def key_prefix(self) -> str:
        """``GATEWAY_SESSION_KEY_PREFIX``."""
        return self._key_prefix

    def snapshot_key(self, device_session_id: str) -> str:
        """``<GATEWAY_SESSION_KEY_PREFIX><device_session_id>``."""
        return self._key_prefix + device_session_id

    @traced
    async def publish(
        self, session: Session, now: datetime, append: AppendPolicy = "always"
    ) -> PublishResult:
        """Write the snapshot (unless a same or higher version is there), then the event.

        An unchanged snapshot appends its event again with ``always``, and with
        ``if_needed`` only when that version's event never made it to the stream.
        """
        return await self._write(session.device_session_id, session.snapshot(now), now, append)

    @traced
    async def revoke_orphan(self, device_session_id: str, now: datetime) -> PublishResult | None:
        """Answer an active snapshot that has no source record with a ``source_lost`` one."""
        try:
            held = await self._redis.get(self.snapshot_key(device_session_id))
            if held is None:
                return None
            snapshot = SessionSnapshot.from_json(held)
        except _ERRORS as exc:
            raise ServiceUnavailable("projection", f"{type(exc).__name__}: {exc}") from exc
        if not snapshot.active:
            return PublishResult.UNCHANGED
        lost = snapshot.revoked(now, RevokeReason.SOURCE_LOST)
        # Written under the key it was read from, whatever its document says.
        return await self._write(device_session_id, lost, now, "always")

    async def append_pending(self, device_session_id: str) -> bool:
        """Append the event of a snapshot whose marker says it never made it; ``True`` if
        an event was appended (the reconciler's repair of a missing event)."""
        key = self.snapshot_key(device_session_id)
        try:
            held = await self._redis.get(key)
            marker = await self._redis.get(self._keys.projection_pending(key))
            if held is None or marker is None:
                return False
            snapshot = SessionSnapshot.from_json(held)
            if int(str(marker).partition(":")[0]) != snapshot.version:
                return False
            await self._append(
                device_session_id, snapshot.user_id, snapshot.version, snapshot.status, str(held)
            )
            await self._clear(keys=[self._keys.projection_pending(key)], args=[snapshot.version])
        except _ERRORS as exc:
            raise ServiceUnavailable("projection", f"{type(exc).__name__}: {exc}") from exc
        return True

    async def _write(
        self,
        device_session_id: str,
        snapshot: SessionSnapshot,
        now: datetime,
        append: AppendPolicy,
    ) -> PublishResult:
        key = self.snapshot_key(device_session_id)
        marker = self._keys.projection_pending(key)
        document = snapshot.to_json()
        status = snapshot.status
        try:
            reply = await self._publish(
                keys=[key, marker],
                args=[
                    snapshot.version,
                    document,
                    to_epoch_ms(snapshot.expires_at),
                    to_epoch_ms(now),
                ],
            )
            result = PublishResult(str(reply[0]))
            if result is PublishResult.STALE:
                return result
            if result is PublishResult.UNCHANGED:
                document = str(reply[1])
                marked = int(reply[2]) == 1
                if not marked and append == "if_needed":
                    return result
                status = _held_status(document)
            else:
                marked = int(reply[1]) == 1
            await self._append(
                device_session_id, snapshot.user_id, snapshot.version, status, document
            )
            if marked:
                await self._clear(keys=[marker], args=[snapshot.version])
        except _ERRORS as exc:
            raise ServiceUnavailable("projection", f"{type(exc).__name__}: {exc}") from exc
        return result

    async def _append(
        self, device_session_id: str, user_id: str, version: int, status: str, document: str
    ) -> None:
        # redis-py types the fields as a dict of its encodable types; ours are all str.
        fields: dict[Any, Any] = event_fields(device_session_id, user_id, version, status, document)
        await self._redis.xadd(
            self._stream,
            fields,
            maxlen=self._maxlen,
            approximate=True,
        )


def _held_status(document: str) -> str:
    """The status of a snapshot the key already holds, for the event that repeats it.

    A document gateways cannot read is still repeated (it is what the key holds), with an
    empty status.
    """
    try:
        return SessionSnapshot.from_json(document).status
    except SnapshotError:
        return ""

"""Session store: ``<prefix>session:{<tag>}:<id>`` hashes and the per-user index.

A user's records, index (``<prefix>user_sessions:{<tag>}:<user>``) and block marker share
the user's hash slot (the tag; a session id starts with it), so creation with the session
limit and revoke-all are each one atomic script. Those scripts declare every key they
touch: the adapter reads the index first and passes its members; a script that finds the
index changed since answers ``retry`` and the adapter reads again. An index member whose
record is gone is pruned on read.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

from authsession.domain.errors import ServiceUnavailable
from authsession.domain.model import Session
from authsession.domain.ports import Clock, CreateOutcome, CreateResult, ExtendResult, RevokedAll
from authsession.domain.units import format_time, from_epoch_ms, parse_time, to_epoch_ms
from authsession.projection_codec import snapshot_status
from authsession.redis.base import (
    Keys,
    RedisClient,
    RedisComponent,
    as_strings,
    load_script,
    pairs,
    redis_call,
)

# How old an index member without a record must be before a read prunes it.
PRUNE_GRACE = timedelta(minutes=1)
# Rounds of "the index changed under us" before giving up (each is one concurrent change).
MAX_INDEX_RETRIES = 50


def session_fields(session: Session) -> dict[str, str]:
    """The hash fields of a session (null values are not written)."""
    fields = {
        "device_session_id": session.device_session_id,
        "user_id": session.user_id,
        "status": snapshot_status(session.revoked_at),
        "created_at": format_time(session.created_at),
        "expires_at": format_time(session.expires_at),
        "client_ip": session.client_ip,
        "user_agent": session.user_agent,
        "version": str(session.version),
        "token_sha256": session.token_sha256,
    }
    if session.device_name is not None:
        fields["device_name"] = session.device_name
    if session.revoked_at is not None:
        fields["revoked_at"] = format_time(session.revoked_at)
    if session.revoke_reason is not None:
        fields["revoke_reason"] = session.revoke_reason
    return fields


def session_from(fields: dict[str, str]) -> Session:
    """Rebuild a session from its hash fields."""
    revoked_at = fields.get("revoked_at")
    return Session(
        device_session_id=fields["device_session_id"],
        user_id=fields["user_id"],
        token_sha256=fields["token_sha256"],
        created_at=parse_time(fields["created_at"]),
        expires_at=parse_time(fields["expires_at"]),
        client_ip=fields.get("client_ip", ""),
        user_agent=fields.get("user_agent", ""),
        version=int(fields.get("version", "1")),
        device_name=fields.get("device_name"),
        revoked_at=parse_time(revoked_at) if revoked_at else None,
        revoke_reason=fields.get("revoke_reason"),
    )


class RedisSessionStore(RedisComponent):
    """Sessions in Redis; every change of a record is one Lua script on its key."""

    def __init__(self, client: RedisClient, keys: Keys, clock: Clock) -> None:
        super().__init__(client)
        self._keys = keys
        self._clock = clock
        self._create = load_script(client, "session_create")
        self._revoke_all = load_script(client, "session_revoke_all")
        self._revoke = load_script(client, "session_revoke")
        self._extend = load_script(client, "session_extend")
        self._index_add = load_script(client, "user_index_add")

    @redis_call
    async def create(
        self, session: Session, retention: timedelta, *, limit: int, now: datetime
    ) -> CreateOutcome:
        """See ``scripts/session_create.lua``."""
        key_expiry = to_epoch_ms(session.expires_at + retention)
        index = self._keys.user_sessions(session.user_id)
        keys = [index, self._keys.session(session.device_session_id)]
        keys.append(self._keys.blocked_user(session.user_id))
        for _ in range(MAX_INDEX_RETRIES):
            members = await self._members(index) if limit > 0 else None
            fields = session_fields(session)
            flat: list[str | int] = []
            for field, value in fields.items():
                flat += [field, value]
            ids = members or []
            reply = await self._create(
                keys=keys + [self._keys.session(m) for m in ids],
                args=[
                    key_expiry,
                    to_epoch_ms(session.created_at),
                    limit,
                    format_time(now),
                    to_epoch_ms(now),
                    -1 if members is None else len(ids),
                    *ids,
                    *flat,
                ],
            )
            kind = str(reply[0])
            if kind == "retry":
                continue
            if kind == "older":
                # Someone created a later session meanwhile: ours must be the newest.
                newest = from_epoch_ms(int(float(reply[1])) + 1)
                session = replace(session, created_at=max(newest, session.created_at))
                continue
            if kind == "exists":
                return CreateOutcome(CreateResult.EXISTS, session_from(pairs(reply[1:])))
            if kind == "blocked":
                return CreateOutcome(CreateResult.BLOCKED)
            evicted = tuple(session_from(pairs(r)) for r in reply[1:])
            return CreateOutcome(CreateResult.CREATED, session, evicted)
        raise ServiceUnavailable("redis", "the user's session index kept changing")

    async def _members(self, index: str) -> list[str]:
        return [str(m) for m in await self._redis.zrange(index, 0, -1)]

    @redis_call
    async def get(self, device_session_id: str) -> Session | None:
        """Read one session."""
        fields = as_strings(await self._redis.hgetall(self._keys.session(device_session_id)))
        return session_from(fields) if fields else None

    @redis_call
    async def list_for_user(self, user_id: str) -> list[Session]:
        """Newest first; members whose record Redis dropped are removed from the index."""
        index = self._keys.user_sessions(user_id)
        reply: list[Any] = await self._redis.zrevrange(index, 0, -1, withscores=True)
        members = [(str(pair[0]), float(pair[1])) for pair in reply]
        if not members:
            return []
        async with self._redis.pipeline(transaction=False) as pipe:
            for device_session_id, _ in members:
                pipe.hgetall(self._keys.session(device_session_id))
            records = [as_strings(r) for r in await pipe.execute()]
        sessions = [session_from(r) for r in records if r]
        # A member without a record is either dropped by Redis (stale) or a session being
        # created right now (indexed, not yet written): only old members are pruned.
        horizon = to_epoch_ms(self._clock.now() - PRUNE_GRACE)
        stale = [
            device_session_id
            for (device_session_id, score), record in zip(members, records, strict=True)
            if not record and score < horizon
        ]
        if stale:
            await self._redis.zrem(index, *stale)
        return sessions

    @redis_call
    async def revoke(
        self, device_session_id: str, reason: str, now: datetime
    ) -> tuple[Session, bool] | None:
        """See ``scripts/session_revoke.lua``; the key keeps its expiry."""
        reply = await self._revoke(
            keys=[self._keys.session(device_session_id)], args=[format_time(now), reason]
        )
        kind = str(reply[0])
        if kind == "not_found":
            return None
        return session_from(pairs(reply[1:])), kind == "revoked"

    @redis_call
    async def revoke_all(
        self, user_id: str, reason: str, now: datetime, except_session_id: str | None
    ) -> RevokedAll:
        """See ``scripts/session_revoke_all.lua``."""
        index = self._keys.user_sessions(user_id)
        for _ in range(MAX_INDEX_RETRIES):
            ids = await self._members(index)
            reply = await self._revoke_all(
                keys=[index, *(self._keys.session(m) for m in ids)],
                args=[len(ids), *ids, format_time(now), reason, except_session_id or ""],
            )
            if str(reply[0]) == "retry":
                continue
            sessions = [(session_from(pairs(r[1:])), int(r[0]) == 1) for r in reply[1:]]
            found = {s.device_session_id for s, _ in sessions}
            lost = [m for m in ids if m not in found and m != except_session_id]
            return RevokedAll(sessions, lost)
        raise ServiceUnavailable("redis", "the user's session index kept changing")

    @redis_call
    async def extend(
        self, device_session_id: str, expires_at: datetime, now: datetime, retention: timedelta
    ) -> tuple[ExtendResult, Session | None]:
        """See ``scripts/session_extend.lua``; the user index is kept alive as long."""
        key_expiry = to_epoch_ms(expires_at + retention)
        reply = await self._extend(
            keys=[self._keys.session(device_session_id)],
            args=[format_time(now), format_time(expires_at), key_expiry],
        )
        kind = ExtendResult(str(reply[0]))
        if kind is not ExtendResult.EXTENDED:
            return kind, None
        session = session_from(pairs(reply[1:]))
        await self._index_add(
            keys=[self._keys.user_sessions(session.user_id)],
            args=[
                to_epoch_ms(session.created_at),
                session.device_session_id,
                to_epoch_ms(now),
                key_expiry,
            ],
        )
        return kind, session

    @redis_call
    async def mark_user_blocked(self, user_id: str, ttl: timedelta) -> None:
        """Remember a block for ``ttl`` so codes sent before it cannot be confirmed."""
        await self._redis.set(
            self._keys.blocked_user(user_id), "1", px=max(1, int(ttl.total_seconds() * 1000))
        )

    @redis_call
    async def is_user_blocked(self, user_id: str) -> bool:
        """Whether a block was recorded within the last ``ttl``."""
        return bool(await self._redis.exists(self._keys.blocked_user(user_id)))

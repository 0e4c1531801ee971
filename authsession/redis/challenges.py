"""Challenge store: ``<prefix>challenge:<id>`` hashes (CONTRACT §7)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from authsession.domain.model import Challenge, ChallengeStatus
from authsession.domain.ports import AttemptOutcome, AttemptResult, Clock, Confirmation
from authsession.domain.units import format_time, parse_time, to_epoch_ms
from authsession.redis.base import (
    Keys,
    Lease,
    PeriodicTask,
    RedisClient,
    RedisComponent,
    as_strings,
    load_script,
    pairs,
    redis_call,
)

SCRUB_BATCH = 500


def challenge_fields(challenge: Challenge) -> dict[str, str]:
    """The hash fields of a challenge; absent values are simply not written."""
    fields = {
        "status": challenge.status.value,
        "email_hash": challenge.email_hash,
        "attempts": str(challenge.attempts),
        "created_at": format_time(challenge.created_at),
        "expires_at": format_time(challenge.expires_at),
    }
    optional = {
        "user_id": challenge.user_id,
        "email": challenge.email,
        "code_hmac": challenge.code_hmac,
        "code_salt": challenge.code_salt,
        "device_session_id": challenge.device_session_id,
        "session_token": challenge.session_token,
    }
    fields.update({k: v for k, v in optional.items() if v is not None})
    return fields


def challenge_from(challenge_id: str, fields: dict[str, str]) -> Challenge:
    """Rebuild a challenge from its hash fields."""
    return Challenge(
        challenge_id=challenge_id,
        status=ChallengeStatus(fields["status"]),
        email_hash=fields["email_hash"],
        created_at=parse_time(fields["created_at"]),
        expires_at=parse_time(fields["expires_at"]),
        attempts=int(fields.get("attempts", "0")),
        user_id=fields.get("user_id"),
        email=fields.get("email"),
        code_hmac=fields.get("code_hmac"),
        code_salt=fields.get("code_salt"),
        device_session_id=fields.get("device_session_id"),
        session_token=fields.get("session_token"),
    )


class RedisChallengeStore(RedisComponent):
    """Challenges in Redis; every state change is one Lua script on one key."""

    def __init__(self, client: RedisClient, keys: Keys) -> None:
        super().__init__(client)
        self._keys = keys
        self._attempt = load_script(client, "challenge_attempt")
        self._confirm = load_script(client, "challenge_confirm")
        self._set_delivery = load_script(client, "challenge_set_delivery")

    @redis_call
    async def create(self, challenge: Challenge, retention: timedelta) -> None:
        """Write the hash and its expiry (``expires_at`` + retention) in one transaction."""
        key = self._keys.challenge(challenge.challenge_id)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hset(key, mapping=dict[Any, Any](challenge_fields(challenge)))
            pipe.pexpireat(key, to_epoch_ms(challenge.expires_at + retention))
            await pipe.execute()

    @redis_call
    async def get(self, challenge_id: str) -> Challenge | None:
        """Read one challenge."""
        fields = as_strings(await self._redis.hgetall(self._keys.challenge(challenge_id)))
        return challenge_from(challenge_id, fields) if fields else None

    @redis_call
    async def set_delivery_status(self, challenge_id: str, status: ChallengeStatus) -> None:
        """``pending_delivery`` → ``sent`` / ``delivery_failed``."""
        await self._set_delivery(keys=[self._keys.challenge(challenge_id)], args=[status.value])

    @redis_call
    async def attempt(
        self, challenge_id: str, candidate_hmac: str, now: datetime, max_attempts: int
    ) -> AttemptOutcome:
        """See ``scripts/challenge_attempt.lua``."""
        reply = await self._attempt(
            keys=[self._keys.challenge(challenge_id)],
            args=[format_time(now), candidate_hmac, max_attempts],
        )
        kind = str(reply[0])
        if kind == "match":
            challenge = challenge_from(challenge_id, pairs(reply[1:]))
            result = (
                AttemptResult.MATCH_CONFIRMED
                if challenge.status is ChallengeStatus.CONFIRMED_PENDING_EXPIRE
                else AttemptResult.MATCH_SENT
            )
            return AttemptOutcome(result, max_attempts - challenge.attempts, challenge)
        if kind == "wrong":
            return AttemptOutcome(AttemptResult.WRONG, max(0, int(reply[1])))
        return AttemptOutcome(AttemptResult(kind))

    @redis_call
    async def confirm(
        self,
        challenge_id: str,
        confirmation: Confirmation,
        *,
        now: datetime,
        max_attempts: int,
        retention: timedelta,
    ) -> Challenge | None:
        """See ``scripts/challenge_confirm.lua``.

        The scrub of the plain token is scheduled first: scheduling one for a challenge
        that then is not confirmed is harmless, while a confirm whose scheduling failed
        would keep its token for the whole retention.
        """
        expires_at = confirmation.expires_at
        await self._redis.zadd(
            self._keys.token_scrub(), {challenge_id: to_epoch_ms(expires_at)}, nx=True
        )
        reply = await self._confirm(
            keys=[self._keys.challenge(challenge_id)],
            args=[
                format_time(now),
                max_attempts,
                confirmation.device_session_id,
                confirmation.session_token,
                confirmation.user_id,
                format_time(expires_at),
                to_epoch_ms(expires_at + retention),
            ],
        )
        if str(reply[0]) != "confirmed":
            return None
        return challenge_from(challenge_id, pairs(reply[1:]))

    @redis_call
    async def scrub_tokens(self, now: datetime, batch: int = SCRUB_BATCH) -> int:
        """Remove the plain ``session_token`` of challenges past their idempotency window.

        The contract keeps the token in plain form only for the idempotency window, but
        the record itself stays for ``CHALLENGE_RETENTION`` (to answer 410): the token
        field is deleted once the window is over. Idempotent, so every replica may run it.
        Returns how many challenges were scrubbed.
        """
        due = [
            str(member)
            for member in await self._redis.zrangebyscore(
                self._keys.token_scrub(), "-inf", to_epoch_ms(now), start=0, num=batch
            )
        ]
        if not due:
            return 0
        async with self._redis.pipeline(transaction=False) as pipe:
            for challenge_id in due:
                pipe.hdel(self._keys.challenge(challenge_id), "session_token")
            await pipe.execute()
        await self._redis.zrem(self._keys.token_scrub(), *due)
        return len(due)


def token_scrubber(
    store: RedisChallengeStore, clock: Clock, interval: timedelta, lease: Lease | None = None
) -> PeriodicTask:
    """Runs :meth:`RedisChallengeStore.scrub_tokens` every ``interval`` (by one process at
    a time when given a ``lease``)."""

    async def scrub_due() -> None:
        while await store.scrub_tokens(clock.now()) == SCRUB_BATCH:
            pass  # a full batch: more may be due

    return PeriodicTask("token-scrub", interval, scrub_due, "token scrub failed", lease)

"""The login use cases of CONTRACT §5: send-email-code and confirm."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import datetime

from authsession.domain import codes
from authsession.domain.email import email_hash, mask_email, normalize_email
from authsession.domain.errors import (
    ChallengeExpired,
    ChallengeNotFound,
    InvalidCode,
    ServiceUnavailable,
    SessionRevoked,
    TooManyAttempts,
    UserBlocked,
)
from authsession.domain.model import (
    Challenge,
    ChallengeStatus,
    FixedConfig,
    RuntimeConfig,
    SessionStatus,
)
from authsession.domain.ports import (
    AttemptResult,
    ChallengeStore,
    Clock,
    ConfigProvider,
    Confirmation,
    FailureBudget,
    LoginCodeMessage,
    LoginMetrics,
    MailSender,
    ResendThrottle,
    Scope,
    UserDirectory,
    UserResolution,
)
from authsession.domain.sessions import ClientInfo, SessionService

log = logging.getLogger("authsession.login")


class NoLoginMetrics:
    """Metrics that go nowhere."""

    def challenge(self, status: str) -> None:
        """Ignore."""

    def confirm(self, result: str) -> None:
        """Ignore."""


@dataclass(frozen=True, slots=True)
class ChallengeIssued:
    """Answer of send-email-code."""

    challenge_id: str
    expires_at: datetime


@dataclass(frozen=True, slots=True)
class Confirmed:
    """Answer of confirm."""

    device_session_id: str
    session_token: str
    user_id: str
    expires_at: datetime
    created: bool


class LoginService:
    """send-email-code and confirm over the ports."""

    def __init__(
        self,
        *,
        challenges: ChallengeStore,
        throttle: ResendThrottle,
        failures: FailureBudget,
        sessions: SessionService,
        config: ConfigProvider,
        users: UserDirectory,
        mail: MailSender,
        clock: Clock,
        fixed: FixedConfig,
        metrics: LoginMetrics | None = None,
    ) -> None:
        self._challenges = challenges
        self._throttle = throttle
        self._failures = failures
        self._sessions = sessions
        self._config = config
        self._users = users
        self._mail = mail
        self._clock = clock
        self._fixed = fixed
        self._metrics = metrics or NoLoginMetrics()

    # -- send-email-code ---------------------------------------------------------------

    async def send_email_code(self, raw_email: str, locale: str | None) -> ChallengeIssued:
        """Issue a fresh challenge; mail a code unless throttled or suppressed.

        The answer is the same shape whatever the outcome, so it reveals nothing about
        the address. The cooldown is released when the user or mail service fails.
        """
        email = normalize_email(raw_email)
        hashed = email_hash(email)
        config = self._config.current()
        now = self._clock.now()
        challenge_id = codes.new_id()
        base = Challenge(
            challenge_id=challenge_id,
            status=ChallengeStatus.DELIVERY_THROTTLED,
            email_hash=hashed,
            created_at=now,
            expires_at=now + config.challenge_ttl,
        )
        if not await self._throttle.acquire(hashed, challenge_id, self._fixed.resend_cooldown):
            return await self._record(base)
        try:
            return await self._deliver(base, email, locale, config.signup_enabled)
        except ServiceUnavailable:
            await self._release_cooldown(hashed, challenge_id)
            raise

    async def _deliver(
        self, base: Challenge, email: str, locale: str | None, signup_enabled: bool
    ) -> ChallengeIssued:
        user = await self._users.resolve_by_email(email)
        user_id = user.user_id if user.outcome in ("existing", "blocked") else None
        # The cooldown is the account's too: another spelling of the same user (plus-tags,
        # dots) is throttled as well (CONTRACT §12/§5). An address without an account gets
        # an account window keyed by its e-mail hash, so that every non-throttled outcome
        # does the same Redis work and its timing tells nothing (§12/§3).
        account = user_id or base.email_hash
        cooldown = self._fixed.resend_cooldown
        if not await self._throttle.acquire(account, base.challenge_id, cooldown, "user"):
            return await self._record(replace(base, user_id=user_id))
        try:
            return await self._deliver_to(base, email, locale, user, signup_enabled)
        except ServiceUnavailable:
            await self._release_cooldown(account, base.challenge_id, "user")
            raise

    async def _deliver_to(
        self,
        base: Challenge,
        email: str,
        locale: str | None,
        user: UserResolution,
        signup_enabled: bool,
    ) -> ChallengeIssued:
        if user.outcome == "blocked" or (user.outcome == "unknown" and not signup_enabled):
            # The same Redis writes as a delivery (record, then the outcome), so that the
            # work done does not tell a deliverable address from a suppressed one.
            suppressed = replace(
                base, status=ChallengeStatus.PENDING_DELIVERY, user_id=user.user_id
            )
            await self._challenges.create(suppressed, self._fixed.challenge_retention)
            await self._challenges.set_delivery_status(
                base.challenge_id, ChallengeStatus.DELIVERY_SUPPRESSED
            )
            self._metrics.challenge(ChallengeStatus.DELIVERY_SUPPRESSED.value)
            return ChallengeIssued(base.challenge_id, base.expires_at)
        code = codes.generate_code()
        salt = codes.new_salt()
        pending = replace(
            base,
            status=ChallengeStatus.PENDING_DELIVERY,
            user_id=user.user_id if user.outcome == "existing" else None,
            # The address is kept only where the user must be created at confirm.
            email=email if user.outcome != "existing" else None,
            code_salt=salt,
            code_hmac=codes.code_hmac(salt, code),
        )
        await self._challenges.create(pending, self._fixed.challenge_retention)
        message = LoginCodeMessage(
            email=email,
            code=code,
            challenge_id=base.challenge_id,
            expires_at=base.expires_at,
            locale=locale,
        )
        try:
            await self._mail.send_login_code(message)
        except ServiceUnavailable:
            self._metrics.challenge(ChallengeStatus.DELIVERY_FAILED.value)
            try:
                await self._challenges.set_delivery_status(
                    base.challenge_id, ChallengeStatus.DELIVERY_FAILED
                )
            except ServiceUnavailable as exc:
                log.warning("could not record delivery_failed", extra={"cause": exc.cause})
            raise
        await self._challenges.set_delivery_status(base.challenge_id, ChallengeStatus.SENT)
        self._metrics.challenge(ChallengeStatus.SENT.value)
        log.info(
            "login code sent",
            extra={"challenge_id": base.challenge_id, "email": mask_email(email)},
        )
        return ChallengeIssued(base.challenge_id, base.expires_at)

    async def _record(self, challenge: Challenge) -> ChallengeIssued:
        await self._challenges.create(challenge, self._fixed.challenge_retention)
        self._metrics.challenge(challenge.status.value)
        return ChallengeIssued(challenge.challenge_id, challenge.expires_at)

    async def _release_cooldown(self, subject: str, owner: str, scope: Scope = "email") -> None:
        try:
            await self._throttle.release(subject, owner, scope)
        except ServiceUnavailable as exc:
            # The window then simply runs out by itself.
            log.warning("could not release the resend cooldown", extra={"cause": exc.cause})

    # -- confirm -----------------------------------------------------------------------

    async def confirm(
        self, challenge_id: str, code: str, device_name: str | None, client: ClientInfo
    ) -> Confirmed:
        """Rules 1-5 of CONTRACT §5, in order."""
        try:
            result = await self._confirm(challenge_id, code, device_name, client)
        except Exception as exc:
            self._metrics.confirm(getattr(exc, "code", "internal_error"))
            raise
        self._metrics.confirm("created" if result.created else "replayed")
        return result

    async def _confirm(
        self, challenge_id: str, code: str, device_name: str | None, client: ClientInfo
    ) -> Confirmed:
        config = self._config.current()
        now = self._clock.now()
        challenge = await self._challenges.get(challenge_id)
        # Rule 1.
        if challenge is None:
            raise ChallengeNotFound()
        if now >= challenge.expires_at:
            raise ChallengeExpired()
        # Rule 2. The e-mail's hourly budget: a slot is reserved before the code is
        # evaluated, so concurrent wrong codes cannot overshoot it; it is kept only if
        # the code is wrong. The challenge's own budget is checked by the attempt script.
        # The user's budget too, where the user is known: wrong codes sent through several
        # spellings of one account share it (CONTRACT §12/§5).
        slots = await self._reserve_failure_slots(challenge, now, config)
        candidate = codes.code_hmac(challenge.code_salt, code) if challenge.code_salt else ""
        try:
            outcome = await self._challenges.attempt(
                challenge_id, candidate, now, config.max_confirm_attempts
            )
        except ServiceUnavailable:
            await self._release_slots(slots)
            raise
        if outcome.result is not AttemptResult.WRONG:
            await self._release_slots(slots)
        match outcome.result:
            case AttemptResult.NOT_FOUND:
                raise ChallengeNotFound()
            case AttemptResult.EXPIRED:
                raise ChallengeExpired()
            case AttemptResult.EXHAUSTED:
                raise TooManyAttempts()
            case AttemptResult.WRONG:
                # Rule 4: counted against the challenge, the e-mail and the user (kept slots).
                raise InvalidCode(outcome.attempts_remaining)
            case AttemptResult.MATCH_CONFIRMED:
                assert outcome.challenge is not None
                return await self._replay(outcome.challenge, device_name, client)
            case AttemptResult.MATCH_SENT:
                assert outcome.challenge is not None
                return await self._first_confirm(outcome.challenge, device_name, client)

    async def _reserve_failure_slots(
        self, challenge: Challenge, now: datetime, config: RuntimeConfig
    ) -> list[tuple[str, str, Scope]]:
        """One slot of each budget the attempt counts against, or ``TooManyAttempts``."""
        limit = config.max_failed_confirms_per_email
        window = self._fixed.failure_window
        subjects: list[tuple[str, Scope]] = [(challenge.email_hash, "email")]
        if challenge.user_id is not None:
            subjects.append((challenge.user_id, "user"))
        slots = await self._failures.reserve_all(subjects, now, window, limit)
        if slots is None:
            raise TooManyAttempts()
        return slots

    async def _release_slots(self, slots: list[tuple[str, str, Scope]]) -> None:
        if not slots:
            return
        try:
            await self._failures.release_all(slots)
        except ServiceUnavailable as exc:
            # The slots then count as failures until they leave the window.
            log.warning("could not release failure-budget slots", extra={"cause": exc.cause})

    async def _first_confirm(
        self, challenge: Challenge, device_name: str | None, client: ClientInfo
    ) -> Confirmed:
        """Rule 5: resolve the user, transition the challenge, write, publish."""
        user_id = challenge.user_id
        if user_id is None:
            if challenge.email is None:  # a record written by something else than us
                raise ServiceUnavailable("redis", "challenge has neither user_id nor email")
            ensured = await self._users.ensure(challenge.email)
            if ensured.outcome == "blocked" or ensured.user_id is None:
                raise UserBlocked()
            user_id = ensured.user_id
        elif await self._users.user_status(user_id) != "active":
            # Asked now, not at send time: a block made directly in the user service (or
            # a user deleted there) stops a code mailed before it (CONTRACT §12/§5).
            raise UserBlocked()
        # A block made through this service is seen by the session-creating script itself
        # (it checks the recent-block marker atomically), so no separate read here.
        config = self._config.current()
        now = self._clock.now()
        device_session_id = codes.new_session_id(user_id)
        confirmation = Confirmation(
            device_session_id=device_session_id,
            session_token=codes.new_session_token(device_session_id),
            user_id=user_id,
            expires_at=now + self._fixed.confirm_idempotency_window,
        )
        confirmed = await self._challenges.confirm(
            challenge.challenge_id,
            confirmation,
            now=now,
            max_attempts=config.max_confirm_attempts,
            retention=self._fixed.challenge_retention,
        )
        if confirmed is None:
            raise await self._why_not_confirmable(challenge.challenge_id)
        if confirmed.device_session_id != device_session_id:
            # A concurrent confirm won the transition: this one is a replay of it.
            return await self._replay(confirmed, device_name, client)
        return await self._complete(confirmed, device_name, client, created=True)

    async def _replay(
        self, challenge: Challenge, device_name: str | None, client: ClientInfo
    ) -> Confirmed:
        """Rule 3: same session and token; completes whatever the first attempt left undone
        (session record, projection) and answers 409 if the session was revoked since."""
        return await self._complete(challenge, device_name, client, created=False)

    async def _complete(
        self, challenge: Challenge, device_name: str | None, client: ClientInfo, *, created: bool
    ) -> Confirmed:
        assert challenge.device_session_id is not None
        assert challenge.session_token is not None
        assert challenge.user_id is not None
        session = await self._sessions.materialize(
            device_session_id=challenge.device_session_id,
            session_token=challenge.session_token,
            user_id=challenge.user_id,
            client=client,
            device_name=device_name,
        )
        if session.status_at(self._clock.now()) is not SessionStatus.ACTIVE:
            raise SessionRevoked()
        if created:
            log.info(
                "session created",
                extra={
                    "device_session_id": session.device_session_id,
                    "user_id": session.user_id,
                    "challenge_id": challenge.challenge_id,
                },
            )
        return Confirmed(
            device_session_id=session.device_session_id,
            session_token=challenge.session_token,
            user_id=session.user_id,
            expires_at=session.expires_at,
            created=created,
        )

    async def _why_not_confirmable(self, challenge_id: str) -> Exception:
        challenge = await self._challenges.get(challenge_id)
        if challenge is None:
            return ChallengeNotFound()
        if self._clock.now() >= challenge.expires_at:
            return ChallengeExpired()
        return TooManyAttempts()

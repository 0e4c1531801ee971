"""The one composition root: builds the domain core and its adapters from settings.

Tests call :func:`build_core` too, passing fakes or a specific Redis client.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import httpx

from authsession.domain.errors import ServiceUnavailable
from authsession.domain.login import LoginService
from authsession.domain.ports import Clock, Component, MailSender, UserDirectory
from authsession.domain.sessions import SessionService
from authsession.redis.base import Keys, Lease, PeriodicTask, RedisClient
from authsession.redis.challenges import RedisChallengeStore, token_scrubber
from authsession.redis.config import RedisConfigProvider
from authsession.redis.connection import create_redis
from authsession.redis.projection import RedisProjectionPublisher
from authsession.redis.reconciler import ProjectionReconciler
from authsession.redis.sessions import RedisSessionStore
from authsession.redis.throttle import RedisFailureBudget, RedisRateLimiter, RedisResendThrottle
from authsession.settings import Settings
from authsession.telemetry import Telemetry

log = logging.getLogger("authsession")

Closer = Callable[[], Awaitable[None]]
# How often plain session tokens past their idempotency window are removed.
TOKEN_SCRUB_INTERVAL = timedelta(seconds=1)
# The token scrub's lease: a holder that stops renewing is replaced after this.
LEASE_TTL = timedelta(seconds=5)


class SystemClock:
    """The real clock, in UTC."""

    def now(self) -> datetime:
        """The current instant."""
        return datetime.now(UTC)


class StartupCheckFailed(Exception):
    """A component did not answer its startup ``PING``."""

    def __init__(self, component: str, cause: str) -> None:
        super().__init__(f"{component}: {cause}")
        self.component = component
        self.cause = cause


@dataclass
class Core:
    """Everything both apps share; built once per process."""

    settings: Settings
    redis: RedisClient
    clock: Clock
    login: LoginService
    sessions: SessionService
    config: RedisConfigProvider
    rate_limiter: RedisRateLimiter
    users: UserDirectory
    mail: MailSender
    components: dict[str, Component]
    telemetry: Telemetry
    scrubber: PeriodicTask
    reconciler: ProjectionReconciler
    closers: list[Closer] = field(default_factory=list)
    background: list[PeriodicTask] = field(default_factory=list)

    def start_background(self) -> None:
        """Start the periodic jobs: config refresh, token scrub, reconciliation."""
        self.config.start()
        for task in self.background:
            task.start()

    async def stop_background(self) -> None:
        """Stop the periodic jobs (idempotent)."""
        await self.config.stop()
        for task in self.background:
            await task.stop()

    def _checks(self) -> list[tuple[str, Callable[[], Awaitable[object]]]]:
        """The startup checks in order: a ``PING`` per component, then the first config read."""
        steps: list[tuple[str, Callable[[], Awaitable[object]]]] = [
            (name, component.ping) for name, component in self.components.items()
        ]
        # First read of the runtime config, so the first request sees the overrides.
        steps.append(("config_provider", self.config.refresh))
        return steps

    async def _check_one(self, name: str, step: Callable[[], Awaitable[object]]) -> None:
        bound = self.settings.STARTUP_CHECK_TIMEOUT.total_seconds()
        try:
            async with asyncio.timeout(bound):
                await step()
        except TimeoutError:
            raise StartupCheckFailed(name, f"no answer within {bound:g}s") from None
        except ServiceUnavailable as exc:
            raise StartupCheckFailed(name, exc.cause or str(exc)) from None

    async def check(self) -> None:
        """Bounded ``PING`` of each domain component, in order; raise on the first failure."""
        for name, step in self._checks():
            await self._check_one(name, step)

    async def check_each(self) -> dict[str, str | None]:
        """The same checks, reported per component: ``None`` when it passed, else the cause.

        Like :meth:`check`, it stops at the first failure (the components share one Redis
        connection pool, so the others would only wait for the same cause); the components
        it did not reach are missing from the result.
        """
        results: dict[str, str | None] = {}
        for name, step in self._checks():
            try:
                await self._check_one(name, step)
            except StartupCheckFailed as exc:
                results[name] = exc.cause
                break
            results.setdefault(name, None)
        return results

    async def aclose(self) -> None:
        """Close outbound clients, then Redis; each bounded by the shutdown budget."""
        budget = self.settings.SHUTDOWN_TIMEOUT.total_seconds()
        await self.stop_background()
        for closer in [*self.closers, self.redis.aclose]:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(budget):
                    await closer()


def _service_client(
    base_url: str | None, timeout: timedelta | None, closers: list[Closer]
) -> httpx.AsyncClient:
    """The shared client of one REST service, closed at shutdown."""
    from authsession.services.http_client import create_client

    # Settings validation guarantees both in rest mode.
    assert base_url is not None
    assert timeout is not None
    client = create_client(base_url, timeout)
    closers.append(client.aclose)
    return client


def build_users(settings: Settings, closers: list[Closer], telemetry: Telemetry) -> UserDirectory:
    """The user service adapter selected by ``USER_SERVICE_MODE``."""
    match settings.USER_SERVICE_MODE:
        case "stub":
            from authsession.services.users_stub import StubUserDirectory

            log.warning(
                "USER_SERVICE_MODE=stub: every e-mail is an existing user; "
                "for development and isolated testing only",
                extra={"component": "user_service"},
            )
            return StubUserDirectory()
        case "rest":
            from authsession.services.users_rest import RestUserDirectory

            client = _service_client(
                settings.USER_SERVICE_BASE_URL, settings.USER_SERVICE_REQUEST_TIMEOUT, closers
            )
            return RestUserDirectory(client, on_result=telemetry.outbound)
        case other:
            raise ValueError(f"unknown USER_SERVICE_MODE {other!r}")


def build_mail(settings: Settings, closers: list[Closer], telemetry: Telemetry) -> MailSender:
    """The mail service adapter selected by ``MAIL_SERVICE_MODE``."""
    match settings.MAIL_SERVICE_MODE:
        case "stub":
            from authsession.services.mail_stub import StubMailSender

            log.warning(
                "MAIL_SERVICE_MODE=stub: no mail is sent, codes are logged; "
                "for development and isolated testing only",
                extra={"component": "mail_service"},
            )
            return StubMailSender()
        case "rest":
            from authsession.services.mail_rest import RestMailSender

            client = _service_client(
                settings.MAIL_SERVICE_BASE_URL, settings.MAIL_SERVICE_REQUEST_TIMEOUT, closers
            )
            return RestMailSender(client, on_result=telemetry.outbound)
        case other:
            raise ValueError(f"unknown MAIL_SERVICE_MODE {other!r}")


def build_core(
    settings: Settings,
    *,
    redis: RedisClient | None = None,
    users: UserDirectory | None = None,
    mail: MailSender | None = None,
    clock: Clock | None = None,
    telemetry: Telemetry | None = None,
) -> Core:
    """Wire the core from settings; any argument given replaces the configured adapter."""
    closers: list[Closer] = []
    client = redis if redis is not None else create_redis(settings)
    keys = Keys(settings.REDIS_KEY_PREFIX)
    clock = clock or SystemClock()
    telemetry = telemetry or Telemetry(install_global=False)
    users = users if users is not None else build_users(settings, closers, telemetry)
    mail = mail if mail is not None else build_mail(settings, closers, telemetry)
    fixed = settings.fixed_config()

    challenges = RedisChallengeStore(client, keys)
    session_store = RedisSessionStore(client, keys, clock)
    config = RedisConfigProvider(
        client, keys, settings.runtime_defaults(), settings.CONFIG_REFRESH_INTERVAL
    )
    projection = RedisProjectionPublisher(
        client,
        settings.GATEWAY_SESSION_KEY_PREFIX,
        settings.GATEWAY_SESSION_EVENTS_STREAM,
        settings.GATEWAY_SESSION_EVENTS_MAXLEN,
        keys=keys,
    )
    throttle = RedisResendThrottle(client, keys, settings.REDIS_OPERATION_TIMEOUT)
    failures = RedisFailureBudget(client, keys)
    sessions = SessionService(
        store=session_store,
        projection=projection,
        config=config,
        users=users,
        blocks=session_store,
        clock=clock,
        fixed=fixed,
        metrics=telemetry,
    )
    login = LoginService(
        challenges=challenges,
        throttle=throttle,
        failures=failures,
        sessions=sessions,
        config=config,
        users=users,
        mail=mail,
        clock=clock,
        fixed=fixed,
        metrics=telemetry,
    )
    scrubber = token_scrubber(
        challenges,
        clock,
        TOKEN_SCRUB_INTERVAL,
        Lease(client, keys.lease("token_scrub"), LEASE_TTL),
    )
    reconciler = ProjectionReconciler(
        client, keys, projection, sessions.publish, clock, metrics=telemetry
    )
    background = [scrubber]
    interval = settings.PROJECTION_RECONCILE_INTERVAL
    if interval > timedelta(0):
        # Renewed before every run and between the batches of a run, so the holder keeps
        # it for as long as it works; another process takes over once it runs out.
        lease = Lease(client, keys.lease("projection_reconcile"), max(interval * 2, LEASE_TTL))
        background.append(
            PeriodicTask(
                "projection-reconcile",
                interval,
                functools.partial(reconciler.run_leased, lease),
                "projection reconciliation failed",
                lease,
            )
        )
    return Core(
        settings=settings,
        redis=client,
        clock=clock,
        login=login,
        sessions=sessions,
        config=config,
        rate_limiter=RedisRateLimiter(client, keys),
        users=users,
        mail=mail,
        components={
            "challenge_store": challenges,
            "session_store": session_store,
            "config_provider": config,
            "projection_publisher": projection,
            "resend_throttle": throttle,
        },
        telemetry=telemetry,
        scrubber=scrubber,
        reconciler=reconciler,
        closers=closers,
        background=background,
    )

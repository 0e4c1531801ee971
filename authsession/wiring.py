"""The one composition root: builds the domain core and its adapters from settings.

:func:`build_services` wires the two domain services over any set of ports: the Redis
adapters here, the in-memory fakes in tests. :func:`build_core` builds those adapters, the
outbound clients and the periodic jobs around them; the :class:`Core` owns them all, with
one start (:meth:`Core.start_background`) and one ordered close (:meth:`Core.aclose`).
Tests call :func:`build_core` too, passing fakes or a specific Redis client.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Protocol

import httpx

from authsession.clock import SystemClock
from authsession.domain.errors import ServiceUnavailable
from authsession.domain.login import LoginService
from authsession.domain.model import FixedConfig
from authsession.domain.ports import (
    BlockMarkers,
    ChallengeStore,
    Clock,
    Component,
    ConfigProvider,
    FailureBudget,
    LoginMetrics,
    MailSender,
    ProjectionPublisher,
    ResendThrottle,
    SessionMetrics,
    SessionStore,
    UserDirectory,
)
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


class StartupCheckFailed(Exception):
    """A component did not answer its startup ``PING``."""

    def __init__(self, component: str, cause: str) -> None:
        super().__init__(f"{component}: {cause}")
        self.component = component
        self.cause = cause


class ServiceMetrics(LoginMetrics, SessionMetrics, Protocol):
    """The counters of both domain services (what :class:`Telemetry` implements)."""


@dataclass(frozen=True, slots=True)
class Ports:
    """What the two domain services are wired over: stores, throttles, config, outbound."""

    challenges: ChallengeStore
    throttle: ResendThrottle
    failures: FailureBudget
    store: SessionStore
    blocks: BlockMarkers
    projection: ProjectionPublisher
    config: ConfigProvider
    users: UserDirectory
    mail: MailSender


@dataclass(frozen=True, slots=True)
class Services:
    """The two domain services, the session service shared by the login flow."""

    login: LoginService
    sessions: SessionService


def build_services(
    ports: Ports, clock: Clock, fixed: FixedConfig, metrics: ServiceMetrics | None = None
) -> Services:
    """Wire ``SessionService`` and ``LoginService`` over ``ports``."""
    sessions = SessionService(
        store=ports.store,
        projection=ports.projection,
        config=ports.config,
        users=ports.users,
        blocks=ports.blocks,
        clock=clock,
        fixed=fixed,
        metrics=metrics,
    )
    login = LoginService(
        challenges=ports.challenges,
        throttle=ports.throttle,
        failures=ports.failures,
        sessions=sessions,
        config=ports.config,
        users=ports.users,
        mail=ports.mail,
        clock=clock,
        fixed=fixed,
        metrics=metrics,
    )
    return Services(login=login, sessions=sessions)


class Job(Protocol):
    """A periodic job of the core: the config refresh, the token scrub, reconciliation."""

    def start(self) -> None:
        """Start the background runs."""
        ...

    async def stop(self) -> None:
        """Stop them and wait until they have ended."""
        ...


class Shutdown:
    """What the core closes, the last acquired first, each step within the shutdown budget.

    Filled as things are built (Redis, then the outbound clients) and as the periodic jobs
    start, so that closing stops the jobs first, then the outbound clients, then Redis.
    """

    def __init__(self, budget: timedelta) -> None:
        self._budget = budget.total_seconds()
        self._stack = contextlib.AsyncExitStack()

    def push(self, closer: Closer) -> None:
        """Run ``closer`` at close, before everything pushed earlier."""
        self._stack.push_async_callback(self._bounded, closer)

    async def _bounded(self, closer: Closer) -> None:
        # A step that fails or hangs must not keep the next ones from running.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self._budget):
                await closer()

    async def aclose(self) -> None:
        """Run every step once; a later call has nothing left to run."""
        await self._stack.aclose()


@dataclass
class Core:
    """Everything both apps share; built once per process, owner of what it started."""

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
    jobs: tuple[Job, ...]
    shutdown: Shutdown
    _started: bool = field(default=False, init=False)

    def start_background(self) -> None:
        """Start the periodic jobs, once; :meth:`aclose` stops them before anything else."""
        if self._started:
            return
        self._started = True
        for job in self.jobs:
            job.start()
            self.shutdown.push(job.stop)

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
        """Stop the periodic jobs, close the outbound clients, then Redis (see Shutdown)."""
        await self.shutdown.aclose()


def _service_client(
    base_url: str | None, timeout: timedelta | None, shutdown: Shutdown
) -> httpx.AsyncClient:
    """The shared client of one REST service, closed at shutdown."""
    from authsession.services.http_client import create_client

    # Settings validation guarantees both in rest mode.
    assert base_url is not None
    assert timeout is not None
    client = create_client(base_url, timeout)
    shutdown.push(client.aclose)
    return client


def build_users(settings: Settings, telemetry: Telemetry, shutdown: Shutdown) -> UserDirectory:
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
                settings.USER_SERVICE_BASE_URL, settings.USER_SERVICE_REQUEST_TIMEOUT, shutdown
            )
            return RestUserDirectory(client, on_result=telemetry.outbound)
        case other:
            raise ValueError(f"unknown USER_SERVICE_MODE {other!r}")


def build_mail(settings: Settings, telemetry: Telemetry, shutdown: Shutdown) -> MailSender:
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
                settings.MAIL_SERVICE_BASE_URL, settings.MAIL_SERVICE_REQUEST_TIMEOUT, shutdown
            )
            return RestMailSender(client, on_result=telemetry.outbound)
        case other:
            raise ValueError(f"unknown MAIL_SERVICE_MODE {other!r}")


@dataclass(frozen=True, slots=True)
class _RedisAdapters:
    """The Redis adapters of the ports, over the one shared client."""

    challenges: RedisChallengeStore
    store: RedisSessionStore
    config: RedisConfigProvider
    projection: RedisProjectionPublisher
    throttle: RedisResendThrottle
    failures: RedisFailureBudget

    @classmethod
    def build(
        cls, client: RedisClient, keys: Keys, settings: Settings, clock: Clock
    ) -> _RedisAdapters:
        """Every adapter, configured from ``settings``."""
        return cls(
            challenges=RedisChallengeStore(client, keys),
            store=RedisSessionStore(client, keys, clock),
            config=RedisConfigProvider(
                client, keys, settings.runtime_defaults(), settings.CONFIG_REFRESH_INTERVAL
            ),
            projection=RedisProjectionPublisher(
                client,
                settings.GATEWAY_SESSION_KEY_PREFIX,
                settings.GATEWAY_SESSION_EVENTS_STREAM,
                settings.GATEWAY_SESSION_EVENTS_MAXLEN,
                keys=keys,
            ),
            throttle=RedisResendThrottle(client, keys, settings.REDIS_OPERATION_TIMEOUT),
            failures=RedisFailureBudget(client, keys),
        )

    def ports(self, users: UserDirectory, mail: MailSender) -> Ports:
        """The domain's ports: these adapters plus the outbound services."""
        return Ports(
            challenges=self.challenges,
            throttle=self.throttle,
            failures=self.failures,
            store=self.store,
            blocks=self.store,
            projection=self.projection,
            config=self.config,
            users=users,
            mail=mail,
        )

    def components(self) -> dict[str, Component]:
        """What the startup checks ``PING``, in order."""
        return {
            "challenge_store": self.challenges,
            "session_store": self.store,
            "config_provider": self.config,
            "projection_publisher": self.projection,
            "resend_throttle": self.throttle,
        }


def _reconcile_job(
    reconciler: ProjectionReconciler, client: RedisClient, keys: Keys, interval: timedelta
) -> PeriodicTask | None:
    """The periodic reconciliation, by one process at a time; ``None`` when turned off."""
    if interval <= timedelta(0):
        return None
    # Renewed before every run and between the batches of a run, so the holder keeps it
    # for as long as it works; another process takes over once it runs out.
    lease = Lease(client, keys.lease("projection_reconcile"), max(interval * 2, LEASE_TTL))
    return PeriodicTask(
        "projection-reconcile",
        interval,
        functools.partial(reconciler.run_leased, lease),
        "projection reconciliation failed",
        lease,
    )


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
    shutdown = Shutdown(settings.SHUTDOWN_TIMEOUT)
    client = redis if redis is not None else create_redis(settings)
    shutdown.push(client.aclose)
    clock = clock or SystemClock()
    telemetry = telemetry or Telemetry(install_global=False)
    users = users if users is not None else build_users(settings, telemetry, shutdown)
    mail = mail if mail is not None else build_mail(settings, telemetry, shutdown)
    keys = Keys(settings.REDIS_KEY_PREFIX)
    adapters = _RedisAdapters.build(client, keys, settings, clock)
    services = build_services(
        adapters.ports(users, mail), clock, settings.fixed_config(), metrics=telemetry
    )
    scrubber = token_scrubber(
        adapters.challenges,
        clock,
        TOKEN_SCRUB_INTERVAL,
        Lease(client, keys.lease("token_scrub"), LEASE_TTL),
    )
    reconciler = ProjectionReconciler(
        client, keys, adapters.projection, services.sessions.publish, clock, metrics=telemetry
    )
    jobs: list[Job] = [adapters.config, scrubber]
    reconcile = _reconcile_job(reconciler, client, keys, settings.PROJECTION_RECONCILE_INTERVAL)
    if reconcile is not None:
        jobs.append(reconcile)
    return Core(
        settings=settings,
        redis=client,
        clock=clock,
        login=services.login,
        sessions=services.sessions,
        config=adapters.config,
        rate_limiter=RedisRateLimiter(client, keys),
        users=users,
        mail=mail,
        components=adapters.components(),
        telemetry=telemetry,
        scrubber=scrubber,
        reconciler=reconciler,
        jobs=tuple(jobs),
        shutdown=shutdown,
    )

"""In-process apps over a real redis-server, with a controllable clock and stub services.

``make_app(**settings)`` builds the whole core through ``wiring.build_core`` (the same
composition root as the process), with any settings overridden by keyword (field names
as in ``authsession.settings.Settings``, e.g. ``MAX_CONFIRM_ATTEMPTS=3``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio

from authsession.domain.ports import MailSender, UserDirectory
from authsession.http.internal import create_internal_app
from authsession.http.public import create_public_app
from authsession.services.mail_stub import StubMailSender
from authsession.services.users_stub import StubUserDirectory
from authsession.settings import Settings
from authsession.wiring import Core, build_core
from tests.support.redis_server import RedisServer


@dataclass
class ManualClock:
    """A clock that moves only when told to.

    It starts at the real time: Redis expiries are absolute (``PEXPIREAT``) and computed
    from this clock, so moving it forward makes records look expired to the service
    without Redis dropping them.
    """

    current: datetime = field(default_factory=lambda: datetime.now(UTC))

    def now(self) -> datetime:
        return self.current

    def advance(self, delta: timedelta) -> None:
        self.current += delta


@dataclass
class AppEnv:
    """One wired core with both apps reachable through httpx."""

    core: Core
    settings: Settings
    clock: ManualClock
    public: httpx.AsyncClient
    internal: httpx.AsyncClient
    redis: redis.Redis  # sync client for assertions on the raw keys
    users: UserDirectory
    mail: MailSender

    @property
    def stub_mail(self) -> StubMailSender:
        assert isinstance(self.mail, StubMailSender)
        return self.mail

    async def send_code(self, email: str = "jane@example.com") -> tuple[str, str | None]:
        """send-email-code; the challenge id and the code the stub mail received (if any)."""
        response = await self.public.post(
            "/api/v1/public/auth/send-email-code", json={"email": email}
        )
        assert response.status_code == 200, response.text
        challenge_id = response.json()["challenge_id"]
        code = None
        if isinstance(self.mail, StubMailSender):
            sent = [m for m in self.mail.messages if m.challenge_id == challenge_id]
            code = sent[-1].code if sent else None
        return challenge_id, code

    async def confirm(self, challenge_id: str, code: str, **extra: Any) -> httpx.Response:
        return await self.public.post(
            "/api/v1/public/auth/confirm",
            json={"challenge_id": challenge_id, "code": code, **extra},
        )

    async def login(self, email: str = "jane@example.com") -> dict[str, Any]:
        """A full login; the confirm body."""
        challenge_id, code = await self.send_code(email)
        assert code is not None
        response = await self.confirm(challenge_id, code)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body


AppFactory = Callable[..., Awaitable[AppEnv]]


@pytest.fixture
async def make_app(
    redis_server: RedisServer, redis_client: redis.Redis
) -> AsyncIterator[AppFactory]:
    """Factory: ``await make_app(users=..., mail=..., **settings_overrides)``."""
    created: list[tuple[Core, httpx.AsyncClient, httpx.AsyncClient]] = []

    async def factory(
        *,
        users: UserDirectory | None = None,
        mail: MailSender | None = None,
        clock: ManualClock | None = None,
        client_ip: str = "203.0.113.7",
        redis_user: tuple[str, str] | None = None,
        **overrides: Any,
    ) -> AppEnv:
        """``redis_user``: ``(username, password)`` the service connects as (ACL tests)."""
        # No send-email-code timing floor unless a test asks for it (it only slows tests).
        overrides.setdefault("SEND_EMAIL_CODE_MIN_DURATION", "0")
        settings = Settings(REDIS_ADDR=redis_server.addr, **overrides)  # type: ignore[call-arg]
        clock = clock or ManualClock()
        users = users if users is not None else StubUserDirectory()
        mail = mail if mail is not None else StubMailSender()
        username, password = redis_user or (None, None)
        client = redis.asyncio.Redis(
            host=redis_server.host,
            port=redis_server.port,
            username=username,
            password=password,
            decode_responses=True,
        )
        core = build_core(settings, redis=client, users=users, mail=mail, clock=clock)
        await core.check()
        public = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_public_app(core), client=(client_ip, 40000)),
            base_url="http://public.test",
        )
        internal = httpx.AsyncClient(
            transport=httpx.ASGITransport(
                app=create_internal_app(core), client=("10.0.0.2", 40000)
            ),
            base_url="http://internal.test",
        )
        created.append((core, public, internal))
        return AppEnv(core, settings, clock, public, internal, redis_client, users, mail)

    yield factory
    for core, public, internal in created:
        await public.aclose()
        await internal.aclose()
        await core.aclose()


@pytest.fixture
async def app(make_app: AppFactory) -> AppEnv:
    """The default wiring: stub services, contract defaults, a manual clock."""
    return await make_app()

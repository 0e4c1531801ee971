"""The mail service over REST (CONTRACT §8): hand a login code over, never retried."""

from __future__ import annotations

import httpx

from authsession.domain.ports import LoginCodeMessage
from authsession.domain.units import format_time
from authsession.services.http_client import (
    OnResult,
    ServiceCaller,
    expect_success,
)

SERVICE = "mail_service"


class RestMailSender:
    """:class:`~authsession.domain.ports.MailSender` over the mail service's REST API."""

    def __init__(self, client: httpx.AsyncClient, *, on_result: OnResult | None = None) -> None:
        self._caller = ServiceCaller(client, SERVICE, on_result)

    async def send_login_code(self, message: LoginCodeMessage) -> None:
        """Hand the code to the mail service; any non-2xx or transport failure is a 503."""
        # No retry here: a timed-out send may still have been delivered, and a second mail
        # with the same code is worse than asking the user to press "resend". The
        # Idempotency-Key lets the mail service drop duplicates of a retry from elsewhere.
        await self._caller.call(
            "send_login_code",
            route="/api/v1/mail/login-code",
            body={
                "email": message.email,
                "code": message.code,
                "challenge_id": message.challenge_id,
                "expires_at": format_time(message.expires_at),
                "locale": message.locale,
            },
            headers={"Idempotency-Key": message.challenge_id},
            parse=expect_success,
        )

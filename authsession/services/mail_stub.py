"""In-process mail service for development and isolated tests (CONTRACT §8 "Stub modes").

It sends nothing. It logs the code with the masked address (the only place a code is
ever logged) and keeps the last 100 messages in memory.
"""

from __future__ import annotations

import logging
from collections import deque

from authsession.domain.email import mask_email
from authsession.domain.ports import LoginCodeMessage
from authsession.domain.units import format_time

log = logging.getLogger("authsession.mail.stub")


class StubMailSender:
    """Keeps messages instead of sending them."""

    def __init__(self, capacity: int = 100) -> None:
        self.messages: deque[LoginCodeMessage] = deque(maxlen=capacity)

    async def send_login_code(self, message: LoginCodeMessage) -> None:
        """Record the message and log its code for the developer."""
        self.messages.append(message)
        log.info(
            "stub mail: login code",
            extra={
                "email": mask_email(message.email),
                "code": message.code,
                "challenge_id": message.challenge_id,
                "expires_at": format_time(message.expires_at),
            },
        )

    def last_code_for(self, email: str) -> str | None:
        """The code of the newest message to a normalized address."""
        for message in reversed(self.messages):
            if message.email == email:
                return message.code
        return None

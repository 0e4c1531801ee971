"""In-process user service for development and isolated tests (CONTRACT §8 "Stub modes").

Every e-mail resolves to ``existing`` with a stable id derived from the address; users
blocked through the internal API are remembered for the life of the process. The stub
knows exactly the ids of its own form (``usr_`` + 32 hex digits): blocking any other id
is ``user_not_found``.
"""

from __future__ import annotations

import hashlib
import re

from authsession.domain.errors import UserNotFound
from authsession.domain.ports import UserResolution, UserStatus

_STUB_ID = re.compile(r"^usr_[0-9a-f]{32}$")


def stub_user_id(email: str) -> str:
    """The stable user id the stub gives a normalized e-mail."""
    return "usr_" + hashlib.sha256(b"authsession-stub-user:" + email.encode()).hexdigest()[:32]


class StubUserDirectory:
    """A user service that knows everyone and forgets nothing until exit."""

    def __init__(self) -> None:
        self.blocked: set[str] = set()

    def _resolve(self, email: str) -> UserResolution:
        user_id = stub_user_id(email)
        return UserResolution("blocked" if user_id in self.blocked else "existing", user_id)

    async def resolve_by_email(self, email: str) -> UserResolution:
        """Always ``existing`` (or ``blocked``)."""
        return self._resolve(email)

    async def ensure(self, email: str) -> UserResolution:
        """Same as resolve: every address already exists."""
        return self._resolve(email)

    async def user_status(self, user_id: str) -> UserStatus | None:
        """``blocked`` once blocked; every id of the stub's form exists."""
        if not _STUB_ID.fullmatch(user_id):
            return None
        return "blocked" if user_id in self.blocked else "active"

    async def block(self, user_id: str, reason: str) -> None:
        """Remember the block; ids not of the stub's form are unknown."""
        if not _STUB_ID.fullmatch(user_id):
            raise UserNotFound()
        self.blocked.add(user_id)

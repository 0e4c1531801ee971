"""The snapshot document of CONTRACT §9, parsed for gateways."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

_SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")
# RFC 3339 requires an offset; without one fromisoformat would read local time.
_UTC_OFFSET = re.compile(r"(?:[Zz]|[+-][0-9]{2}:[0-9]{2})$")


class SnapshotError(ValueError):
    """A snapshot document that is not JSON or lacks a field the gateway needs."""


@dataclass(frozen=True, slots=True)
class SessionSnapshot:
    """One published version of a device session, as a gateway reads it."""

    device_session_id: str
    user_id: str
    status: str
    token_sha256: str
    expires_at: datetime
    version: int
    created_at: datetime | None = None
    revoked_at: datetime | None = None
    revoke_reason: str | None = None
    published_at: datetime | None = None

    @property
    def active(self) -> bool:
        """Whether the session was active when published (expiry is checked separately)."""
        return self.status == "active"

    @classmethod
    def from_json(cls, document: str | bytes) -> SessionSnapshot:
        """Parse the JSON stored under the snapshot key or carried by an event."""
        try:
            raw = json.loads(document)
        except (ValueError, TypeError) as exc:  # JSONDecodeError and bad UTF-8 bytes
            raise SnapshotError(f"snapshot is not JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise SnapshotError("snapshot is not a JSON object")
        token_hash = _text(raw, "token_sha256")
        if _SHA256_HEX.fullmatch(token_hash) is None:
            raise SnapshotError("token_sha256 is not a hex SHA-256")
        version = raw.get("version")
        # bool is an int subclass; a JSON true is not a version.
        if not isinstance(version, int) or isinstance(version, bool):
            raise SnapshotError("version is not an integer")
        return cls(
            device_session_id=_text(raw, "device_session_id"),
            user_id=_text(raw, "user_id"),
            status=_text(raw, "status"),
            # Lower-cased so that the comparison with hashlib's hexdigest is exact.
            token_sha256=token_hash.lower(),
            expires_at=_time(raw, "expires_at"),
            version=version,
            # The fields below are informative: tolerate their absence so that a gateway
            # keeps working if a publisher leaves them out.
            created_at=_optional_time(raw, "created_at"),
            revoked_at=_optional_time(raw, "revoked_at"),
            revoke_reason=_optional_text(raw, "revoke_reason"),
            published_at=_optional_time(raw, "published_at"),
        )


def _text(raw: dict[str, Any], name: str) -> str:
    value = raw.get(name)
    if not isinstance(value, str) or not value:
        raise SnapshotError(f"{name} is missing or not a string")
    return value


def _optional_text(raw: dict[str, Any], name: str) -> str | None:
    value = raw.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise SnapshotError(f"{name} is not a string")
    return value


def _time(raw: dict[str, Any], name: str) -> datetime:
    value = _text(raw, name)
    if _UTC_OFFSET.search(value) is not None:
        try:
            return parse_time(value)
        except ValueError:
            pass
    raise SnapshotError(f"{name} is not an RFC 3339 time")


def parse_time(text: str) -> datetime:
    """An RFC 3339 time with an offset, as an aware UTC datetime."""
    return datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00")).astimezone(
        UTC
    )


def _optional_time(raw: dict[str, Any], name: str) -> datetime | None:
    if raw.get(name) is None:
        return None
    return _time(raw, name)

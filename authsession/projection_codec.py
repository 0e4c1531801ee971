"""The gateway projection's wire format (CONTRACT §9): the snapshot document, the fields
of its stream event, and the default key prefix and stream that gateways share.

The service writes it and the gateway library reads it, so this module depends on the
standard library only (and the domain's time format, which is pure).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from authsession.domain.units import format_time, parse_time

DEFAULT_KEY_PREFIX = "gateway:session:"
DEFAULT_EVENTS_STREAM = "gateway:session_events"
EVENT_KIND = "session_snapshot"
ACTIVE = "active"
REVOKED = "revoked"

_SHA256_HEX = re.compile(r"^[0-9a-fA-F]{64}$")
# RFC 3339 requires an offset; without one fromisoformat would read local time.
_UTC_OFFSET = re.compile(r"(?:[Zz]|[+-][0-9]{2}:[0-9]{2})$")


class SnapshotError(ValueError):
    """A snapshot document that is not JSON or lacks a field the gateway needs."""


def snapshot_status(revoked_at: datetime | None) -> str:
    """``revoked`` once revoked, else ``active``: gateways check ``expires_at`` themselves."""
    return REVOKED if revoked_at is not None else ACTIVE


@dataclass(frozen=True, slots=True)
class SessionSnapshot:
    """One published version of a device session, as the snapshot document holds it."""

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
        return self.status == ACTIVE

    def revoked(self, now: datetime, reason: str) -> SessionSnapshot:
        """The next version of this snapshot, revoked at ``now`` for ``reason``."""
        return replace(
            self,
            status=REVOKED,
            revoked_at=now,
            revoke_reason=reason,
            version=self.version + 1,
            published_at=now,
        )

    def to_json(self) -> str:
        """The exact JSON document stored under the snapshot key and in the event."""
        # Field order, compact separators and the millisecond ``Z`` times are part of the
        # contract's bytes: gateways in other languages compare and log them as they are.
        return json.dumps(
            {
                "device_session_id": self.device_session_id,
                "user_id": self.user_id,
                "status": self.status,
                "token_sha256": self.token_sha256,
                "created_at": _format_optional(self.created_at),
                "expires_at": format_time(self.expires_at),
                "revoked_at": _format_optional(self.revoked_at),
                "revoke_reason": self.revoke_reason,
                "version": self.version,
                "published_at": _format_optional(self.published_at),
            },
            separators=(",", ":"),
        )

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


def event_fields(
    device_session_id: str, user_id: str, version: int, status: str, document: str
) -> dict[str, str]:
    """The fields of the stream event that announces ``document`` (a snapshot's JSON)."""
    return {
        "event": EVENT_KIND,
        "device_session_id": device_session_id,
        "user_id": user_id,
        "status": status,
        "version": str(version),
        "snapshot": document,
    }


def _format_optional(value: datetime | None) -> str | None:
    return format_time(value) if value is not None else None


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


def _optional_time(raw: dict[str, Any], name: str) -> datetime | None:
    if raw.get(name) is None:
        return None
    return _time(raw, name)

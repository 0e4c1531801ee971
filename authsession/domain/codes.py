"""Secrets: login codes, their salted HMAC, identifiers and session tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets

CODE_DIGITS = 6
ID_PATTERN = r"^[A-Za-z0-9_-]{16,64}$"
USER_ID_PATTERN = r"^[A-Za-z0-9._:@-]{1,128}$"
CODE_PATTERN = r"^[0-9]{6}$"
_ID_RE = re.compile(ID_PATTERN)


def generate_code() -> str:
    """A uniformly random 6-digit code from the OS CSPRNG."""
    return f"{secrets.randbelow(10**CODE_DIGITS):0{CODE_DIGITS}d}"


def new_salt() -> str:
    """A fresh 128-bit salt, hex."""
    return secrets.token_hex(16)


def code_hmac(salt: str, code: str) -> str:
    """HMAC-SHA-256 of the code keyed by the challenge's salt, hex."""
    return hmac.new(bytes.fromhex(salt), code.encode("ascii"), hashlib.sha256).hexdigest()


def new_id() -> str:
    """An opaque URL-safe identifier with 192 bits from the CSPRNG (32 characters)."""
    return secrets.token_urlsafe(24)


SLOT_TAG_LENGTH = 4


def slot_tag(value: str) -> str:
    """A short URL-safe tag of ``value``: the Redis hash tag of the keys that belong to it.

    Keys that share a tag share a Redis Cluster hash slot, so one script can act on all of
    them (CONTRACT §12/§7). 24 bits are far more than the 16384 slots need.
    """
    digest = hashlib.sha256(value.encode("utf-8")).digest()
    return base64.urlsafe_b64encode(digest[:3]).decode("ascii")


def new_session_id(user_id: str) -> str:
    """A device session id: the user's slot tag, then 192 bits from the CSPRNG.

    Starting with the tag lets every adapter find the session's keys (which live in the
    user's hash slot, beside the user's index) from the id alone. The tag reveals nothing
    the holder of a session does not already know: confirm answers with the user id.
    """
    return slot_tag(user_id) + new_id()


def tag_of_session(device_session_id: str) -> str:
    """The slot tag a device session id starts with."""
    return device_session_id[:SLOT_TAG_LENGTH]


def is_valid_id(value: str) -> bool:
    """Whether ``value`` has the contract's identifier form."""
    return _ID_RE.fullmatch(value) is not None


def new_session_token(device_session_id: str) -> str:
    """``<device_session_id>.<secret>`` with a 256-bit secret."""
    return f"{device_session_id}.{secrets.token_urlsafe(32)}"


def split_session_token(token: str) -> tuple[str, str] | None:
    """``(device_session_id, secret)`` of ``<id>.<secret>``, or ``None`` if malformed."""
    device_session_id, dot, secret = token.rpartition(".")
    if not dot or not secret or len(token) > 256 or not is_valid_id(device_session_id):
        return None
    return device_session_id, secret


def token_sha256(token: str) -> str:
    """Hex SHA-256 of a whole session token: what the projection and session record keep."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()

"""E-mail normalization, hashing and masking."""

from __future__ import annotations

import hashlib
import unicodedata

import idna
from email_validator import EmailNotValidError, validate_email

from authsession.domain.errors import InvalidRequest

MAX_EMAIL_LENGTH = 254


def normalize_email(raw: str) -> str:
    """Trim, NFC, lower-case, IDNA-encode the domain, then check the syntax (≤ 254 chars).

    Raises :class:`InvalidRequest` for anything that is not a valid address.
    """
    text = unicodedata.normalize("NFC", raw.strip()).lower()
    local, at, domain = text.rpartition("@")
    if not at or not local or not domain:
        raise InvalidRequest("email is not a valid address", {"field": "email"})
    try:
        ascii_domain = idna.encode(domain, uts46=True).decode("ascii")
    except idna.IDNAError:
        raise InvalidRequest("email has an invalid domain", {"field": "email"}) from None
    address = f"{local}@{ascii_domain}"
    if len(address) > MAX_EMAIL_LENGTH:
        raise InvalidRequest("email is longer than 254 characters", {"field": "email"})
    try:
        validate_email(address, check_deliverability=False, allow_smtputf8=True)
    except EmailNotValidError:
        raise InvalidRequest("email is not a valid address", {"field": "email"}) from None
    return address


def email_hash(normalized: str) -> str:
    """Hex SHA-256 of a normalized address: the only form that appears in key names."""
    return hashlib.sha256(normalized.encode("utf-8")).hexdigest()


def mask_email(address: str) -> str:
    """``jane@example.com`` → ``j***@example.com``; safe for logs."""
    local, at, domain = address.rpartition("@")
    if not at:
        return "***"
    return f"{local[:1]}***@{domain}"

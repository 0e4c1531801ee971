"""The ``resolved config`` log line: every non-secret setting in force (CONTRACT §12, §2).

Operators compare it with the gateways' configuration (Redis address, DB, key prefix,
projection prefix and stream). It is built from the settings model itself, so a setting
added later appears without a change here; a secret never does: fields holding a
``SecretStr`` or named like a password, token or secret are left out entirely (not
masked: not even their length shows), and the user-info part of every URL is removed
(``redis://user:pass@host:6379/0`` becomes ``redis://host:6379/0``).
"""

from __future__ import annotations

import ipaddress
import logging
import re
from datetime import timedelta
from typing import Any
from urllib.parse import urlsplit

from pydantic import SecretStr

from authsession import __version__
from authsession.domain.units import format_duration
from authsession.settings import ListenAddress, Settings

EVENT = "resolved config"
_SECRET_NAME = re.compile(r"PASSWORD|TOKEN|SECRET|CREDENTIAL|PRIVATE", re.IGNORECASE)
# scheme://user:password@host…: everything between "://" and the last "@" before the
# path goes (a password may hold an "@"), the user name too: it is not needed to compare
# addresses, and an address-shaped "user@host" would be masked in the log anyway.
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s]*@")


def strip_userinfo(text: str) -> str:
    """``text`` with the ``user:password@`` part of every URL in it removed."""
    return _USERINFO.sub(lambda m: m.group("scheme"), text)


def _is_secret(name: str, value: Any) -> bool:
    if _SECRET_NAME.search(name):
        return True
    if isinstance(value, SecretStr):
        return True
    return isinstance(value, tuple | list | frozenset | set) and any(
        isinstance(v, SecretStr) for v in value
    )


def _render(value: Any) -> Any:
    """A JSON-friendly form of one setting's value."""
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, timedelta):
        return format_duration(value)
    if isinstance(value, str):
        return strip_userinfo(value)
    if isinstance(value, tuple | list | frozenset | set):
        return [_render(v) for v in value]
    if isinstance(value, ListenAddress | ipaddress.IPv4Network | ipaddress.IPv6Network):
        return str(value)
    return strip_userinfo(str(value))


def resolved_config(settings: Settings) -> dict[str, Any]:
    """``version`` and every non-secret setting, keyed by its variable name in lower case."""
    fields: dict[str, Any] = {"version": __version__}
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        if _is_secret(name, value):
            continue
        fields[name.lower()] = _render(value)
    fields.update(_redis_url_in_force(settings))
    return fields


def _redis_url_in_force(settings: Settings) -> dict[str, Any]:
    # A redis:// URL's own database (its path) and scheme (rediss: TLS) win over the
    # variables, as they do when the client connects.
    addr = settings.REDIS_ADDR.strip()
    if "://" not in addr or settings.memory_store:
        return {}
    parts = urlsplit(addr)
    fields: dict[str, Any] = {}
    db = parts.path.strip("/")
    if db.isdigit():
        fields["redis_db"] = int(db)
    if parts.scheme.lower() == "rediss":
        fields["redis_tls_enabled"] = True
    return fields


def log_resolved_config(settings: Settings, logger: logging.Logger | None = None) -> None:
    """Log the ``resolved config`` line (info)."""
    (logger or logging.getLogger("authsession")).info(EVENT, extra=resolved_config(settings))

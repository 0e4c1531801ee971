"""Names the contract fixes (CONTRACT §5-§7, §9), shared by the test modules.

Written out literally rather than imported from the package, so that a change of a
path, key or field in the code shows up as a failing test.
"""

from __future__ import annotations

import base64
import hashlib

import httpx

SEND = "/api/v1/public/auth/send-email-code"
CONFIRM = "/api/v1/public/auth/confirm"
INTERNAL = "/api/v1/internal"

CHALLENGE_KEY = "authsession:challenge:{}"


def slot_tag(value: str) -> str:
    """The hash tag of a user's keys (§12/§7): 4 URL-safe characters of its SHA-256."""
    return base64.urlsafe_b64encode(hashlib.sha256(value.encode()).digest()[:3]).decode()


def session_key(device_session_id: str, prefix: str = "authsession:") -> str:
    """A session record: tagged with the user's tag, which the session id starts with."""
    return f"{prefix}session:{{{device_session_id[:4]}}}:{device_session_id}"


def index_key(user_id: str, prefix: str = "authsession:") -> str:
    """A user's session index, in the user's slot."""
    return f"{prefix}user_sessions:{{{slot_tag(user_id)}}}:{user_id}"


SNAPSHOT_KEY = "gateway:session:{}"
STREAM = "gateway:session_events"

# The session object of §6, exactly; no token material.
SESSION_FIELDS = frozenset(
    {
        "device_session_id",
        "user_id",
        "status",
        "created_at",
        "expires_at",
        "revoked_at",
        "revoke_reason",
        "device_name",
        "client_ip",
        "user_agent",
        "version",
    }
)


def error_code(response: httpx.Response) -> str:
    """The contract error code of a response, checking the body has only ``error``."""
    body = response.json()
    assert set(body) == {"error"}, body
    code: str = body["error"]["code"]
    return code

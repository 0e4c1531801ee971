"""Names the contract fixes (CONTRACT §5-§7, §9), shared by the test modules.

Written out literally rather than imported from the package, so that a change of a
path, key or field in the code shows up as a failing test.
"""

from __future__ import annotations

import httpx

SEND = "/api/v1/public/auth/send-email-code"
CONFIRM = "/api/v1/public/auth/confirm"
INTERNAL = "/api/v1/internal"

CHALLENGE_KEY = "authsession:challenge:{}"
SESSION_KEY = "authsession:session:{}"
INDEX_KEY = "authsession:user_sessions:{}"
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

"""Pure ASGI middleware that admits only requests carrying a valid session token."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import TYPE_CHECKING

from authsession.gateway.verifier import Principal, Rejection, RejectionReason, TokenVerifier

if TYPE_CHECKING:
    # Types only: the middleware speaks plain ASGI and needs no Starlette at run time.
    from starlette.types import ASGIApp, Receive, Scope, Send

PRINCIPAL_STATE_KEY = "authsession_principal"

MESSAGES: dict[RejectionReason, str] = {
    "missing_token": "A bearer session token is required.",
    "malformed_token": "The bearer token is not a session token.",
    "unknown_session": "The session does not exist or has ended.",
    "revoked": "The session has been revoked.",
    "expired": "The session has expired.",
    "verification_failed": "The session token could not be verified.",
    "internal_error": "Sessions cannot be verified right now; try again later.",
}

# RFC 6750 §3.1: a request without credentials gets a bare challenge, a bad token gets
# error="invalid_token".
_CHALLENGE_MISSING = b"Bearer"
_CHALLENGE_INVALID = b'Bearer error="invalid_token"'
# WebSocket close codes: 1008 policy violation, 1011 server error (RFC 6455 §7.4.1).
_WS_POLICY_VIOLATION = 1008
_WS_INTERNAL_ERROR = 1011


def bearer_token(value: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value, or None if there is none."""
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def normalized_path(scope: Scope) -> str | None:
    """The request path if it is already normalized, else None.

    Normalized means: no percent-encoding at all in the raw path (so no encoded slash,
    dot or backslash that a later hop could decode), no ``.`` or ``..`` segment, no empty
    segment and no backslash. Only such a path may be matched against ``exclude_paths``:
    ``/healthz/../admin``, ``/healthz/%2e%2e/admin`` and ``/healthz%2F..%2Fadmin`` are
    never excluded, whatever the app or a proxy behind it would make of them.
    """
    path = scope.get("path")
    if not isinstance(path, str) or not path.startswith("/"):
        return None
    raw = scope.get("raw_path")
    if raw is not None:
        raw_text = bytes(raw).decode("latin-1").partition("?")[0]
        if "%" in raw_text or raw_text != path:
            return None
    if "\\" in path or "%" in path:
        return None
    segments = path[1:].split("/")
    # A trailing slash leaves one empty last segment; any other empty one is "//".
    inner = segments[:-1] if segments and segments[-1] == "" else segments
    if any(segment in ("", ".", "..") for segment in inner) and path != "/":
        return None
    return path


def excluded(scope: Scope, exclude_paths: Iterable[str]) -> bool:
    """Whether the request's normalized path is one of ``exclude_paths`` or below one.

    ``"/health"`` also covers ``"/health/live"``, but not ``"/healthcheck"``.
    """
    path = scope.get("path")
    # Cheap first: a path that does not even start like an exclusion is not excluded.
    if not isinstance(path, str) or not any(path.startswith(p.rstrip("/")) for p in exclude_paths):
        return False
    path = normalized_path(scope)
    if path is None:
        return False
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in exclude_paths)


class SessionAuthMiddleware:
    """Verifies the bearer token of every HTTP and WebSocket request before the app."""

    def __init__(
        self,
        app: ASGIApp,
        verifier: TokenVerifier,
        *,
        header: str = "authorization",
        exclude_paths: Iterable[str] = (),
        websocket: bool = True,
    ) -> None:
        self._app = app
        self._verifier = verifier
        self._header = header.lower().encode("latin-1")
        self._exclude = tuple(exclude_paths)
        # websocket=False leaves WebSocket scopes to a WebSocketSessionGuard.
        self._types = ("http", "websocket") if websocket else ("http",)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Admit the request with its principal in ``scope["state"]``, or answer 401/503."""
        if scope["type"] not in self._types or self._excluded(scope):
            await self._app(scope, receive, send)
            return
        values = [v for k, v in scope["headers"] if k.lower() == self._header]
        if len(values) > 1:
            # Two credentials are ambiguous and proxies may disagree on which one counts.
            result: Principal | Rejection = Rejection("malformed_token")
        else:
            token = bearer_token(values[0].decode("latin-1")) if values else None
            result = await self._verifier.verify(token)
        if isinstance(result, Principal):
            scope.setdefault("state", {})[PRINCIPAL_STATE_KEY] = result
            await self._app(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._close_websocket(result, receive, send)
        else:
            await self._reject(result, send)

    def _excluded(self, scope: Scope) -> bool:
        return excluded(scope, self._exclude)

    async def _reject(self, rejection: Rejection, send: Send) -> None:
        body = json.dumps(
            {"error": {"code": rejection.reason, "message": MESSAGES[rejection.reason]}},
            separators=(",", ":"),
        ).encode("utf-8")
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode("ascii")),
            (b"cache-control", b"no-store"),
        ]
        if rejection.reason == "internal_error":
            # Not the client's fault: a 503 without an authentication challenge.
            status = 503
            headers.append((b"retry-after", b"1"))
        else:
            status = 401
            challenge = (
                _CHALLENGE_MISSING if rejection.reason == "missing_token" else _CHALLENGE_INVALID
            )
            headers.append((b"www-authenticate", challenge))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _close_websocket(self, rejection: Rejection, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        # Closing before accepting makes the server answer the handshake with 403.
        code = _WS_INTERNAL_ERROR if rejection.reason == "internal_error" else _WS_POLICY_VIOLATION
        await send({"type": "websocket.close", "code": code, "reason": rejection.reason})

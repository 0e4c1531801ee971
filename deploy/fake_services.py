#!/usr/bin/env python3
"""Development stand-ins for the user service and the mail service of authsession.

Standard library only, so it runs on a bare ``python:3.12-slim`` image. One process, two
listeners (contract §8):

user service (``--user-port``, default 9001)
    ``POST /api/v1/users/resolve-by-email``  ``{"email"}`` →
        ``{"outcome": "existing"|"blocked", "user_id"}`` or ``{"outcome": "unknown"}``
    ``POST /api/v1/users/ensure``            ``{"email"}`` →
        ``{"user_id", "outcome": "existing"|"created"|"blocked"}``
    ``POST /api/v1/users/{user_id}/block``   ``{"reason"}`` → ``200``, or ``404`` if unknown
    ``GET /api/v1/users/{user_id}``          → ``{"user_id", "status": "active"|"blocked"}``,
        or ``404`` if unknown

mail service (``--mail-port``, default 9002)
    ``POST /api/v1/mail/login-code``         ``{"email", "code", "challenge_id",
        "expires_at", "locale"}`` with ``Idempotency-Key`` → ``202``; the message is
        printed to stdout (this is the "mailbox"); a repeated key is not printed again.

Users live in memory: an address is unknown until ``ensure`` creates it (authsession does
that at confirm when signup is enabled); ``--users a@example.com,b@example.com`` starts
with some known users. User ids are derived from the address, so they stay the same
across restarts of this process. Not for production: no persistence, no authentication.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import signal
import sys
import threading
from collections import OrderedDict
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

MAX_BODY_BYTES = 64 * 1024
USER_ID = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
BLOCK_PATH = re.compile(r"^/api/v1/users/(?P<user_id>[^/]+)/block$")
USER_PATH = re.compile(r"^/api/v1/users/(?P<user_id>[^/]+)$")
CODE = re.compile(r"^[0-9]{6}$")

Reply = tuple[int, dict[str, Any] | None]


class BadRequest(Exception):
    """The request body does not have the contract's shape."""


def _say(line: str) -> None:
    print(line, flush=True)


def _email_field(body: dict[str, Any]) -> str:
    email = body.get("email")
    if not isinstance(email, str) or "@" not in email or len(email) > 320:
        raise BadRequest("email must be an e-mail address")
    return email.strip().lower()


def user_id_for(email: str) -> str:
    """A stable user id for an address (salted, so it does not look like an e-mail hash)."""
    return "usr_" + hashlib.sha256(b"fake-user-service:" + email.encode("utf-8")).hexdigest()[:24]


class UserService:
    """Users in memory: address → id, and the set of blocked ids."""

    name = "user service"

    def __init__(self, known: list[str] | tuple[str, ...] = ()) -> None:
        self._lock = threading.Lock()
        self._users: dict[str, str] = {}  # user_id → email
        self._blocked: set[str] = set()
        for email in known:
            if email.strip():
                address = email.strip().lower()
                self._users[user_id_for(address)] = address

    def handle(self, method: str, path: str, body: dict[str, Any], headers: Any) -> Reply:
        """Route one request."""
        if path == "/api/v1/users/resolve-by-email":
            return self._resolve(_email_field(body))
        if path == "/api/v1/users/ensure":
            return self._ensure(_email_field(body))
        match = BLOCK_PATH.match(path)
        if match:
            return self._block(unquote(match.group("user_id")), body)
        match = USER_PATH.match(path)
        if match and method == "GET":
            return self._status(unquote(match.group("user_id")))
        return HTTPStatus.NOT_FOUND, {"error": "not_found"}

    def _status(self, user_id: str) -> Reply:
        with self._lock:
            if user_id not in self._users:
                return HTTPStatus.NOT_FOUND, {"error": "user_not_found"}
            status = "blocked" if user_id in self._blocked else "active"
        return HTTPStatus.OK, {"user_id": user_id, "status": status}

    def _resolve(self, email: str) -> Reply:
        user_id = user_id_for(email)
        with self._lock:
            if user_id not in self._users:
                return HTTPStatus.OK, {"outcome": "unknown"}
            outcome = "blocked" if user_id in self._blocked else "existing"
        return HTTPStatus.OK, {"outcome": outcome, "user_id": user_id}

    def _ensure(self, email: str) -> Reply:
        user_id = user_id_for(email)
        with self._lock:
            if user_id not in self._users:
                self._users[user_id] = email
                outcome = "created"
            else:
                outcome = "blocked" if user_id in self._blocked else "existing"
        if outcome == "created":
            _say(f"user service: created {user_id}")
        return HTTPStatus.OK, {"user_id": user_id, "outcome": outcome}

    def _block(self, user_id: str, body: dict[str, Any]) -> Reply:
        reason = body.get("reason")
        if not USER_ID.match(user_id) or not (reason is None or isinstance(reason, str)):
            raise BadRequest("user_id or reason has the wrong form")
        with self._lock:
            if user_id not in self._users:
                return HTTPStatus.NOT_FOUND, {"error": "user_not_found"}
            self._blocked.add(user_id)
        _say(f"user service: blocked {user_id} (reason {reason})")
        return HTTPStatus.OK, {"user_id": user_id, "blocked": True}


class MailService:
    """Prints every login code it is given; repeats of an ``Idempotency-Key`` are dropped."""

    name = "mail service"

    def __init__(self, remember: int = 10_000) -> None:
        self._lock = threading.Lock()
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._remember = remember

    def handle(self, method: str, path: str, body: dict[str, Any], headers: Any) -> Reply:
        """Route one request."""
        if path != "/api/v1/mail/login-code":
            return HTTPStatus.NOT_FOUND, {"error": "not_found"}
        email = _email_field(body)
        code = body.get("code")
        challenge_id = body.get("challenge_id")
        expires_at = body.get("expires_at")
        locale = body.get("locale")
        if not isinstance(code, str) or not CODE.match(code):
            raise BadRequest("code must be 6 digits")
        if not isinstance(challenge_id, str) or not challenge_id:
            raise BadRequest("challenge_id is required")
        if not isinstance(expires_at, str) or not expires_at:
            raise BadRequest("expires_at is required")
        if not (locale is None or isinstance(locale, str)):
            raise BadRequest("locale must be a string or null")
        key = headers.get("Idempotency-Key")
        if not key:
            raise BadRequest("the Idempotency-Key header is required")
        with self._lock:
            duplicate = key in self._seen
            if not duplicate:
                self._seen[key] = None
                while len(self._seen) > self._remember:
                    self._seen.popitem(last=False)
        if duplicate:
            return HTTPStatus.OK, {"accepted": True, "duplicate": True}
        _say(
            f"mail service: login code {code} for {email} "
            f"(challenge_id={challenge_id} expires_at={expires_at} locale={locale})"
        )
        return HTTPStatus.ACCEPTED, {"accepted": True, "duplicate": False}


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], service: UserService | MailService) -> None:
        super().__init__(address, _Handler)
        self.service = service


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"
    # Longer than authsession's keep-alive expiry (30 s), so the client always closes an
    # idle connection first and never reuses one this side is closing.
    timeout = 75
    server_version = "fake-services/1"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:
        return  # the printed outcomes are the log

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        try:
            body = self._read_json()
            status, reply = self.server.service.handle("POST", path, body, self.headers)
        except BadRequest as exc:
            status, reply = HTTPStatus.BAD_REQUEST, {"error": "invalid_request", "detail": str(exc)}
        self._send(status, reply)

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if isinstance(self.server.service, UserService) and USER_PATH.match(path):
            status, reply = self.server.service.handle("GET", path, {}, self.headers)
            self._send(status, reply)
            return
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "method_not_allowed"})

    def do_PUT(self) -> None:
        self._send(HTTPStatus.METHOD_NOT_ALLOWED, {"error": "method_not_allowed"})

    do_PATCH = do_DELETE = do_PUT

    def _read_json(self) -> dict[str, Any]:
        length = self.headers.get("Content-Length", "0")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            self.close_connection = True
            raise BadRequest("a JSON body with a Content-Length of at most 64 KiB is required")
        raw = self.rfile.read(int(length))
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            raise BadRequest("the body is not JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the body must be a JSON object")
        return body

    def _send(self, status: int, reply: dict[str, Any] | None) -> None:
        payload = json.dumps(reply).encode() if reply is not None else b""
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def serve(host: str, ports: dict[str, int], known: list[str]) -> int:
    """Serve both fakes until SIGTERM or SIGINT."""
    services: dict[str, UserService | MailService] = {
        "user": UserService(known),
        "mail": MailService(),
    }
    servers = [_Server((host, ports[kind]), service) for kind, service in services.items()]
    threads = [
        threading.Thread(target=server.serve_forever, name=server.service.name, daemon=True)
        for server in servers
    ]
    for server, thread in zip(servers, threads, strict=True):
        thread.start()
        bound_host, bound_port = server.socket.getsockname()[:2]
        _say(f"{server.service.name} listening on {bound_host}:{bound_port}")

    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    # PID 1 in a container ignores SIGTERM unless a handler is installed.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.wait(0.5):
        pass
    for server in servers:
        server.shutdown()
        server.server_close()
    _say("fake services stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command line: ``fake_services.py [--host H] [--user-port P] [--mail-port P]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=os.environ.get("FAKE_SERVICES_HOST", "127.0.0.1"))
    parser.add_argument("--user-port", type=int, default=9001, help="0 picks a free port")
    parser.add_argument("--mail-port", type=int, default=9002, help="0 picks a free port")
    parser.add_argument(
        "--users",
        default=os.environ.get("FAKE_SERVICES_USERS", ""),
        help="comma-separated addresses that exist from the start",
    )
    args = parser.parse_args(argv)
    return serve(
        args.host,
        {"user": args.user_port, "mail": args.mail_port},
        args.users.split(","),
    )


if __name__ == "__main__":
    sys.exit(main())

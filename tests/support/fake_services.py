"""Local stand-ins for the user service and the mail service (CONTRACT §8).

Each fake is a stdlib ``ThreadingHTTPServer`` on a free ``127.0.0.1`` port, served from a
daemon thread. Every request is recorded (before any fault is applied), and faults can be
injected: a status for the next N requests, a delay, or a dropped connection.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar, Self
from urllib.parse import unquote, urlsplit

from tests.support.lifecycle import Managed
from tests.support.net import LOOPBACK

_NO_BODY = object()


@dataclass(frozen=True)
class RecordedRequest:
    """One request as the fake saw it. ``headers`` names are lower-cased."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any  # parsed JSON, or None if the body was empty or not JSON
    raw_body: bytes = b""

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass(frozen=True)
class Response:
    status: int
    body: Any = None  # JSON-serialisable value, raw bytes, or None for no body
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Fault:
    status: int
    remaining: int | None  # None = forever
    body: Any
    drop: bool = False


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    fake: FakeHTTPService

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that time out and hang up are normal in fault tests; stay quiet.
        return


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    # HTTP/1.0: one request per connection, so no idle keep-alive connection can hold up
    # stop(); the socket timeout bounds a client that connects and never sends.
    protocol_version = "HTTP/1.0"
    timeout = 10

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _serve(self) -> None:
        self.server.fake._handle(self)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _serve


class FakeHTTPService(Managed):
    """Common machinery: lifecycle, recording, fault injection. Subclasses implement
    :meth:`route`."""

    name: ClassVar[str] = "fake"

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._requests: list[RecordedRequest] = []
        self._faults: list[_Fault] = []
        self._delay = 0.0
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError(f"{self.name} is not started")
        port: int = self._server.server_address[1]
        return port

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def start(self) -> Self:
        if self._server is not None:
            raise RuntimeError(f"{self.name} already started")
        self._stopping.clear()
        server = _Server((LOOPBACK, 0), _Handler)
        server.fake = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"{self.name}-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None:
            return
        self._stopping.set()  # wakes handlers sleeping in a delay
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join(timeout=5)
        self._server = self._thread = None

    # ------------------------------------------------------------------ faults
    def fail_with(self, status: int, times: int | None = None, body: Any = _NO_BODY) -> None:
        """Answer ``status`` to the next ``times`` requests (all if None) instead of routing.

        The default body is ``{"error": "injected"}``; pass ``body`` (JSON value, bytes, or
        None for none) e.g. to send a 200 with a malformed body.
        """
        if body is _NO_BODY:
            body = {"error": "injected", "status": status}
        with self._lock:
            self._faults.append(_Fault(status=status, remaining=times, body=body))

    def drop_connection(self, times: int | None = None) -> None:
        """Close the connection without any response (a transport error) for the next
        ``times`` requests (all if None)."""
        with self._lock:
            self._faults.append(_Fault(status=0, remaining=times, body=None, drop=True))

    def delay(self, seconds: float) -> None:
        """Sleep ``seconds`` before answering every request (until :meth:`reset_faults`)."""
        with self._lock:
            self._delay = seconds

    def reset_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            self._delay = 0.0

    # ------------------------------------------------------------------ recording
    @property
    def requests(self) -> list[RecordedRequest]:
        """A snapshot of every request received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    def requests_to(self, path_suffix: str, method: str = "POST") -> list[RecordedRequest]:
        """Recorded requests whose path (without query) ends with ``path_suffix``."""
        return [
            r
            for r in self.requests
            if r.method == method and urlsplit(r.path).path.endswith(path_suffix)
        ]

    def clear_requests(self) -> None:
        with self._lock:
            self._requests.clear()

    # ------------------------------------------------------------------ handling
    def route(self, request: RecordedRequest) -> Response:  # pragma: no cover - abstract
        raise NotImplementedError

    def _next_fault(self) -> _Fault | None:
        with self._lock:
            while self._faults:
                fault = self._faults[0]
                if fault.remaining is None:
                    return fault
                if fault.remaining > 0:
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._faults.pop(0)
                    return fault
                self._faults.pop(0)
            return None

    def _handle(self, handler: _Handler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length > 0 else b""
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = None
        request = RecordedRequest(
            method=handler.command,
            path=handler.path,
            headers={k.lower(): v for k, v in handler.headers.items()},
            body=body,
            raw_body=raw,
        )
        with self._lock:
            self._requests.append(request)
            delay = self._delay
        # The fault is taken on arrival: a delayed handler that wakes after the caller
        # gave up must not consume a fault meant for a later request.
        fault = self._next_fault()
        if delay > 0 and self._stopping.wait(delay):
            handler.close_connection = True
            return
        if fault is not None and fault.drop:
            handler.close_connection = True
            with contextlib.suppress(OSError):
                handler.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault is not None:
            response = Response(fault.status, fault.body)
        else:
            try:
                response = self.route(request)
            except Exception as exc:  # a bug in the fake: make it visible to the client
                response = Response(500, {"error": "fake_crashed", "detail": repr(exc)})
        self._send(handler, response)

    @staticmethod
    def _send(handler: _Handler, response: Response) -> None:
        payload: bytes
        if response.body is None or response.status in (204, 304):
            payload = b""
        elif isinstance(response.body, bytes):
            payload = response.body
        else:
            payload = json.dumps(response.body).encode()
        try:
            reason = HTTPStatus(response.status).phrase
        except ValueError:
            reason = "Injected"
        handler.send_response(response.status, reason)
        if payload:
            handler.send_header("Content-Type", "application/json")
        if response.status not in (204, 304):
            handler.send_header("Content-Length", str(len(payload)))
        for name, value in response.headers.items():
            handler.send_header(name, value)
        handler.end_headers()
        if payload and handler.command != "HEAD":
            handler.wfile.write(payload)


def _bad_request(message: str) -> Response:
    return Response(400, {"error": "bad_request", "message": message})


def _string_field(body: Any, name: str) -> str | None:
    if isinstance(body, dict):
        value = body.get(name)
        if isinstance(value, str):
            return value
    return None


_BLOCK_PATH = re.compile(r"^/api/v1/users/(?P<user_id>[^/]+)/block$")
_USER_PATH = re.compile(r"^/api/v1/users/(?P<user_id>[^/]+)$")


class FakeUserService(FakeHTTPService):
    """The user service of CONTRACT §8.

    State (guarded by the service's lock inside requests; mutate freely between them):
    ``users`` maps e-mail (as sent by authsession, i.e. normalized) to user id,
    ``blocked`` holds blocked user ids, ``block_reasons`` the last reason per user id.
    """

    name = "fake-user-service"

    def __init__(self) -> None:
        super().__init__()
        self.users: dict[str, str] = {}
        self.blocked: set[str] = set()
        self.block_reasons: dict[str, str | None] = {}

    def add_user(self, email: str, user_id: str | None = None) -> str:
        """Register ``email`` (id generated if not given); returns the user id."""
        with self._lock:
            uid = user_id or f"user-{uuid.uuid4().hex}"
            self.users[email] = uid
            return uid

    def block_user(self, user_id: str) -> None:
        with self._lock:
            self.blocked.add(user_id)

    def user_id_for(self, email: str) -> str | None:
        with self._lock:
            return self.users.get(email)

    def route(self, request: RecordedRequest) -> Response:
        path = urlsplit(request.path).path
        if path == "/api/v1/users/resolve-by-email":
            return self._only_post(request) or self._resolve(request)
        if path == "/api/v1/users/ensure":
            return self._only_post(request) or self._ensure(request)
        match = _BLOCK_PATH.match(path)
        if match:
            return self._only_post(request) or self._block(request, unquote(match["user_id"]))
        match = _USER_PATH.match(path)
        if match:
            if request.method != "GET":
                return Response(405, {"error": "method"})
            return self._status(unquote(match["user_id"]))
        return Response(404, {"error": "not_found"})

    def _status(self, user_id: str) -> Response:
        with self._lock:
            if user_id not in self.users.values():
                return Response(404, {"error": "user_not_found"})
            status = "blocked" if user_id in self.blocked else "active"
        return Response(200, {"user_id": user_id, "status": status})

    @staticmethod
    def _only_post(request: RecordedRequest) -> Response | None:
        return None if request.method == "POST" else Response(405, {"error": "method"})

    def _resolve(self, request: RecordedRequest) -> Response:
        email = _string_field(request.body, "email")
        if email is None:
            return _bad_request("body must be {'email': str}")
        with self._lock:
            uid = self.users.get(email)
            if uid is None:
                return Response(200, {"outcome": "unknown"})
            outcome = "blocked" if uid in self.blocked else "existing"
            return Response(200, {"outcome": outcome, "user_id": uid})

    def _ensure(self, request: RecordedRequest) -> Response:
        email = _string_field(request.body, "email")
        if email is None:
            return _bad_request("body must be {'email': str}")
        with self._lock:
            uid = self.users.get(email)
            if uid is None:
                uid = self.add_user(email)
                return Response(200, {"user_id": uid, "outcome": "created"})
            outcome = "blocked" if uid in self.blocked else "existing"
            return Response(200, {"user_id": uid, "outcome": outcome})

    def _block(self, request: RecordedRequest, user_id: str) -> Response:
        reason = request.body.get("reason") if isinstance(request.body, dict) else None
        with self._lock:
            if user_id not in self.users.values():
                return Response(404, {"error": "user_not_found"})
            self.blocked.add(user_id)
            self.block_reasons[user_id] = reason
        return Response(204)


@dataclass(frozen=True)
class MailMessage:
    """One accepted ``login-code`` request."""

    email: str
    code: str
    challenge_id: str
    expires_at: str
    locale: str | None
    idempotency_key: str | None
    headers: dict[str, str]


class FakeMailService(FakeHTTPService):
    """The mail service of CONTRACT §8: ``POST /api/v1/mail/login-code`` → 202."""

    name = "fake-mail-service"
    REQUIRED: ClassVar[tuple[str, ...]] = ("email", "code", "challenge_id", "expires_at")

    def __init__(self) -> None:
        super().__init__()
        self._messages: list[MailMessage] = []

    @property
    def messages(self) -> list[MailMessage]:
        """A snapshot of accepted messages, oldest first."""
        with self._lock:
            return list(self._messages)

    def messages_for(self, email: str) -> list[MailMessage]:
        return [m for m in self.messages if m.email == email]

    def last_code_for(self, email: str) -> str | None:
        found = self.messages_for(email)
        return found[-1].code if found else None

    def last_message_for(self, email: str) -> MailMessage | None:
        found = self.messages_for(email)
        return found[-1] if found else None

    def route(self, request: RecordedRequest) -> Response:
        if urlsplit(request.path).path != "/api/v1/mail/login-code":
            return Response(404, {"error": "not_found"})
        if request.method != "POST":
            return Response(405, {"error": "method"})
        body = request.body
        if not isinstance(body, dict):
            return _bad_request("body must be a JSON object")
        missing = [name for name in self.REQUIRED if not isinstance(body.get(name), str)]
        locale = body.get("locale")
        if missing or not (locale is None or isinstance(locale, str)):
            return _bad_request(f"missing or invalid fields: {missing or ['locale']}")
        message = MailMessage(
            email=body["email"],
            code=body["code"],
            challenge_id=body["challenge_id"],
            expires_at=body["expires_at"],
            locale=locale,
            idempotency_key=request.header("Idempotency-Key"),
            headers=request.headers,
        )
        with self._lock:
            self._messages.append(message)
        return Response(202, {"status": "accepted"})

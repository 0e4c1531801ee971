"""The HTTP server of both listeners against slow and malformed clients (CONTRACT §12 §3, §4).

Raw sockets against the real process: idle, slow-header and slow-body connections are
closed after ``AUTHSESSION_HTTP_HEADER_TIMEOUT``, kept-alive ones after
``AUTHSESSION_HTTP_KEEPALIVE_TIMEOUT``, connections beyond ``AUTHSESSION_HTTP_MAX_CONNECTIONS``
get ``503 service_unavailable``, and the errors the server itself writes (malformed request
line or headers) carry the contract's JSON body. A slowloris of 300 sockets against a
process limited to 256 file descriptors must not stop legitimate requests from being
answered. Short timeouts (a few seconds) keep this quick; the ``soak`` variant runs the
default 10 s header timeout under a 30 s attack (``make soak``).
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.contract import SEND
from tests.support.net import LOOPBACK, free_ports
from tests.support.process import AuthsessionFactory, AuthsessionProcess
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.e2e

HEADER_TIMEOUT = 2.0
KEEPALIVE_TIMEOUT = 1.0
# Generous bounds for "was closed": far above the configured timeouts, far below never.
CLOSE_BOUND = HEADER_TIMEOUT + 6
SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
LIST = "/api/v1/internal/users/user-1/sessions"


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def parse_response(raw: bytes) -> RawResponse:
    head, sep, body = raw.partition(b"\r\n\r\n")
    assert sep, raw
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        assert name.lower() not in headers, f"duplicate header {name}: {raw!r}"
        headers[name.lower()] = value.strip()
    return RawResponse(status, headers, body)


def connect(port: int) -> socket.socket:
    return socket.create_connection((LOOPBACK, port), timeout=10)


def read_all(sock: socket.socket, timeout: float = 10) -> bytes:
    """Everything the server sends until it closes (or ``timeout``)."""
    sock.settimeout(timeout)
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def exchange(port: int, data: bytes) -> bytes:
    with connect(port) as sock:
        sock.sendall(data)
        return read_all(sock)


def read_one_response(sock: socket.socket) -> RawResponse:
    """One response with a Content-Length, leaving the connection open."""
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    response = parse_response(data)
    length = int(response.headers["content-length"])
    body = response.body
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    return RawResponse(response.status, response.headers, body)


def closed_within(sock: socket.socket, seconds: float, trickle: bytes | None = None) -> float:
    """Seconds until the server closed ``sock`` (sending ``trickle`` every 0.25 s meanwhile);
    fails if it is still open after ``seconds``."""
    started = time.monotonic()
    sock.settimeout(0.25)
    while time.monotonic() - started < seconds:
        try:
            if trickle is not None:
                sock.sendall(trickle)
            data = sock.recv(65536)
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - started
        assert data == b"", f"the server answered instead of closing: {data!r}"
        return time.monotonic() - started
    pytest.fail(f"the connection was still open after {seconds}s")


def assert_json_error(response: RawResponse, status: int, code: str) -> None:
    assert response.status == status, response
    assert response.headers["content-type"].startswith("application/json"), response
    assert response.headers["cache-control"] == "no-store", response
    assert SANE_ID.match(response.headers["x-request-id"]), response
    body = response.json()
    assert list(body) == ["error"], body
    assert body["error"]["code"] == code, body
    assert set(body["error"]) <= {"code", "message", "details"}, body
    assert body["error"]["message"], body


def env_for(redis_server: RedisServer, **extra: str) -> dict[str, str]:
    return {
        "AUTHSESSION_REDIS_ADDR": redis_server.addr,
        "AUTHSESSION_REDIS_KEY_PREFIX": f"httpsrv-{secrets.token_hex(4)}:",
        "AUTHSESSION_HTTP_HEADER_TIMEOUT": f"{HEADER_TIMEOUT:g}s",
        "AUTHSESSION_HTTP_KEEPALIVE_TIMEOUT": f"{KEEPALIVE_TIMEOUT:g}s",
        "AUTHSESSION_LOG_FORMAT": "json",
        **extra,
    }


# --------------------------------------------------------------------------- shared process
@pytest.fixture(scope="module")
def service(redis_server: RedisServer) -> Iterator[AuthsessionProcess]:
    public, internal = free_ports(2)
    process = AuthsessionProcess(
        {
            **env_for(redis_server),
            "AUTHSESSION_PUBLIC_HTTP_ADDR": f"{LOOPBACK}:{public}",
            "AUTHSESSION_INTERNAL_HTTP_ADDR": f"{LOOPBACK}:{internal}",
        },
        public_port=public,
        internal_port=internal,
    )
    try:
        process.start()
        process.wait_ready()
        yield process
    finally:
        process.close()


@pytest.fixture(params=["public", "internal"])
def port(request: pytest.FixtureRequest, service: AuthsessionProcess) -> int:
    return service.public_port if request.param == "public" else service.internal_port


# --------------------------------------------------------------------------- HTTP edges
@pytest.mark.parametrize(
    ("listener", "method", "path"),
    [
        ("public", "POST", SEND + "/"),
        ("public", "POST", "/api/v1/public/auth/confirm/"),
        ("internal", "GET", LIST + "/"),
        ("internal", "GET", "/api/v1/internal/sessions/Abcdefghijklmnop_-0123/"),
    ],
)
def test_a_trailing_slash_is_404_not_found_never_a_redirect(
    service: AuthsessionProcess, listener: str, method: str, path: str
) -> None:
    url = service.public_url if listener == "public" else service.internal_url
    with httpx.Client(base_url=url, timeout=10, follow_redirects=False) as client:
        response = client.request(
            method, path, headers={"Host": "evil.example"}, json={"email": "a@b.example"}
        )
    assert response.status_code == 404, response.headers
    assert "location" not in response.headers
    assert response.json()["error"]["code"] == "not_found"
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-request-id"]


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /x HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"GET /x HTTP/9.9\r\nHost: x\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
    ],
    ids=["request-line", "header-line", "version", "content-length", "chunk-size", "nul"],
)
def test_malformed_requests_get_the_json_error_body(port: int, request_bytes: bytes) -> None:
    response = parse_response(exchange(port, request_bytes))
    assert_json_error(response, 400, "invalid_request")
    assert response.headers["connection"] == "close"


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /x HTTP/1.1\r\nX-Request-ID: caller-1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"GET /x HTTP/1.1\r\nX-Request-ID: caller-1\r\nHost: x\r\nBad Header\r\n\r\n",
    ],
    ids=["content-length", "header-line"],
)
def test_a_malformed_request_keeps_the_callers_request_id(
    service: AuthsessionProcess, request_bytes: bytes
) -> None:
    response = parse_response(exchange(service.public_port, request_bytes))
    assert_json_error(response, 400, "invalid_request")
    assert response.headers["x-request-id"] == "caller-1"


def test_request_head_over_64_kib_is_400(port: int) -> None:
    request = b"GET /x HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 70_000 + b"\r\n\r\n"
    response = parse_response(exchange(port, request))
    assert_json_error(response, 400, "invalid_request")
    assert "64 KiB" in response.json()["error"]["message"]


# --------------------------------------------------------------------------- slow clients
def test_an_idle_connection_is_closed_after_the_header_timeout(port: int) -> None:
    with connect(port) as sock:
        elapsed = closed_within(sock, CLOSE_BOUND)
    assert elapsed >= HEADER_TIMEOUT / 2  # not refused outright


def test_slow_headers_are_cut_although_bytes_keep_arriving(service: AuthsessionProcess) -> None:
    with connect(service.public_port) as sock:
        sock.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n")
        closed_within(sock, CLOSE_BOUND, trickle=b"X-Slow: 1\r\n")


def test_a_slow_body_is_cut_without_an_answer(service: AuthsessionProcess) -> None:
    with connect(service.public_port) as sock:
        sock.sendall(
            f"POST {SEND} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Content-Length: 1000\r\n\r\n{".encode()
        )
        closed_within(sock, CLOSE_BOUND, trickle=b" ")


def test_a_request_sent_slowly_but_within_the_deadline_is_served(
    service: AuthsessionProcess,
) -> None:
    parts = [b"GET /nowhere HT", b"TP/1.1\r\nHost: x\r\n", b"Connection: close\r\n\r\n"]
    with connect(service.public_port) as sock:
        for part in parts:
            sock.sendall(part)
            time.sleep(HEADER_TIMEOUT / 6)
        response = parse_response(read_all(sock))
    assert_json_error(response, 404, "not_found")


def test_a_kept_alive_connection_is_closed_after_the_keepalive_timeout(
    service: AuthsessionProcess,
) -> None:
    with connect(service.public_port) as sock:
        sock.sendall(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_one_response(sock).status == 404
        elapsed = closed_within(sock, CLOSE_BOUND)
    # The keep-alive timeout (1 s here), not the default 5 s, nor the header timeout.
    assert elapsed < 4, elapsed


def test_each_request_on_a_kept_alive_connection_gets_its_own_deadline(
    service: AuthsessionProcess,
) -> None:
    with connect(service.public_port) as sock:
        sock.sendall(b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_one_response(sock).status == 404
        # The next request starts at once (before the keep-alive timeout) and crawls.
        sock.sendall(b"GET /nowhere HTTP/1.1\r\n")
        closed_within(sock, CLOSE_BOUND, trickle=b"X-Slow: 1\r\n")


# --------------------------------------------------------------------------- limits
def test_connections_beyond_the_limit_get_503_and_the_listener_recovers(
    authsession_process: AuthsessionFactory, redis_server: RedisServer
) -> None:
    # Every connection busy with a request (send-email-code waits for its 2 s floor):
    # nothing may be replaced, so a new connection is refused.
    process = authsession_process(
        env_for(
            redis_server,
            AUTHSESSION_HTTP_MAX_CONNECTIONS="4",
            AUTHSESSION_SEND_EMAIL_CODE_MIN_DURATION="2s",
        )
    ).wait_ready()
    # wait_ready's probes may still be counted for a moment: let them go first.
    time.sleep(0.3)
    body = b'{"email": "jane@example.com"}'
    request = (
        f"POST {SEND} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    busy = [connect(process.public_port) for _ in range(4)]
    try:
        for sock in busy:
            sock.sendall(request)
        time.sleep(0.3)
        refused = parse_response(
            exchange(process.public_port, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        )
        assert_json_error(refused, 503, "service_unavailable")
        # The limit is per listener: the internal one still serves.
        with httpx.Client(base_url=process.internal_url, timeout=10) as client:
            assert client.get(LIST).status_code == 200
        # The busy requests are answered; then the listener serves new connections again.
        for sock in busy:
            assert read_one_response(sock).status == 200
        time.sleep(0.2)  # kept alive, now idle: a new connection may replace one
        with httpx.Client(base_url=process.public_url, timeout=10) as client:
            assert client.post(SEND, json={}).status_code == 400
    finally:
        for sock in busy:
            sock.close()
    assert any(r["event"].startswith("connection limit reached") for r in process.log_records()), (
        process.output_report()
    )


def test_at_the_limit_a_new_connection_replaces_the_longest_waiting_one(
    authsession_process: AuthsessionFactory, redis_server: RedisServer
) -> None:
    process = authsession_process(
        env_for(redis_server, AUTHSESSION_HTTP_MAX_CONNECTIONS="4")
    ).wait_ready()
    time.sleep(0.3)
    idle = [connect(process.public_port) for _ in range(4)]
    try:
        time.sleep(0.3)  # all four have waited for a request longer than the grace
        with httpx.Client(base_url=process.public_url, timeout=10) as client:
            assert client.post(SEND, json={}).status_code == 400
        # One idle socket made room (the longest waiting); the others are still open.
        time.sleep(0.2)
        still_open = 0
        for sock in idle:
            sock.setblocking(False)
            try:
                still_open += sock.recv(1) != b""
            except BlockingIOError:
                still_open += 1
            except OSError:
                pass
        assert 2 <= still_open <= 3
    finally:
        for sock in idle:
            sock.close()


# --------------------------------------------------------------------------- slowloris
@dataclass
class Slowloris:
    """``count`` attack sockets (idle, slow headers, slow body, in turn) on one port.

    A thread sends the slow ones a few bytes every 0.3 s and notices which ones the server
    closed; with ``reconnect`` each closed socket is replaced at once (a sustained attack).
    """

    port: int
    count: int
    reconnect: bool = False
    sockets: dict[socket.socket, str] = field(default_factory=dict)
    closed_by_server: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    selector: selectors.BaseSelector = field(default_factory=selectors.DefaultSelector)

    KINDS = ("idle", "headers", "body")
    FIRST = {
        "headers": b"GET /x HTTP/1.1\r\nHost: x\r\n",
        "body": f"POST {SEND} HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n".encode(),
    }
    NEXT = {"headers": b"X-Slow: 1\r\n", "body": b"x"}

    def open(self, kind: str) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            sock.connect((LOOPBACK, self.port))
        self.sockets[sock] = kind
        self.selector.register(sock, selectors.EVENT_READ)

    def start(self) -> threading.Thread:
        for i in range(self.count):
            self.open(self.KINDS[i % 3])
        thread = threading.Thread(target=self._run, daemon=True)
        thread.start()
        return thread

    def _run(self) -> None:
        started: set[socket.socket] = set()
        while not self.stop.is_set() and self.sockets:
            for sock, kind in list(self.sockets.items()):
                if kind == "idle":
                    continue
                data = self.NEXT[kind] if sock in started else self.FIRST[kind]
                with contextlib.suppress(OSError):
                    sock.send(data)
                    started.add(sock)
            for key, _ in self.selector.select(timeout=0.3):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if data:
                    continue  # an answer (none is expected); the close follows
                kind = self.sockets.pop(sock)
                self.selector.unregister(sock)
                sock.close()
                self.closed_by_server += 1
                if self.reconnect and not self.stop.is_set():
                    self.open(kind)

    def close(self) -> None:
        self.stop.set()


def answered_within(
    url: str, method: str, path: str, seconds: float, expect: set[int], **kwargs: Any
) -> tuple[float, int]:
    """Seconds until a legitimate request got one of the ``expect`` answers (fresh
    connections, retried), and that status; a 503 must be the contract's JSON."""
    started = time.monotonic()
    last: object = None
    while time.monotonic() - started < seconds:
        try:
            with httpx.Client(base_url=url, timeout=seconds) as client:
                response = client.request(method, path, **kwargs)
            last = (response.status_code, response.text)
            if response.status_code == 503:
                assert response.json()["error"]["code"] == "service_unavailable"
            if response.status_code in expect:
                return time.monotonic() - started, response.status_code
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.2)
    pytest.fail(f"no {sorted(expect)} answer within {seconds}s; last: {last!r}")


LOWERED = "AUTHSESSION_HTTP_MAX_CONNECTIONS lowered to fit the file limit"


@pytest.mark.parametrize(
    ("header_timeout", "attack_seconds"),
    [
        pytest.param(HEADER_TIMEOUT, 0.0, id="short-timeouts"),
        pytest.param(10.0, 30.0, id="default-timeout-30s-attack", marks=pytest.mark.soak),
    ],
)
def test_a_slowloris_of_300_sockets_does_not_starve_legitimate_requests(
    authsession_process: AuthsessionFactory,
    redis_server: RedisServer,
    header_timeout: float,
    attack_seconds: float,
) -> None:
    process = authsession_process(
        env_for(redis_server, AUTHSESSION_HTTP_HEADER_TIMEOUT=f"{header_timeout:g}s"),
        max_open_files=256,
    ).wait_ready()
    # 2 x 1000 connections cannot fit under 256 descriptors: the limit was lowered.
    lowered = [r for r in process.log_records() if r["event"] == LOWERED]
    assert lowered, process.output_report()
    assert lowered[0]["configured"] == 1000
    assert 2 * lowered[0]["effective"] < 256
    # Redis connections opened before the attack; a legitimate list request needs one.
    with httpx.Client(base_url=process.internal_url, timeout=10) as client:
        assert client.get(LIST).status_code == 200
    attack = Slowloris(process.public_port, 300, reconnect=attack_seconds > 0)
    thread = attack.start()
    try:
        time.sleep(0.5)  # every attack socket is connected
        fd_dir = Path(f"/proc/{process.pid}/fd")
        if fd_dir.is_dir():
            assert len(list(fd_dir.iterdir())) < 256  # never out of descriptors
        bound = 2 * header_timeout + 10
        public: list[tuple[float, int]] = []
        internal: list[tuple[float, int]] = []
        deadline = time.monotonic() + attack_seconds
        while True:
            # The public listener serves legitimate requests: a new connection takes the
            # place of an attack socket that has waited longest for its request. The
            # internal one is not touched at all. Served well before the header timeout
            # could have freed a slot.
            served_within = min(5.0, header_timeout / 2)
            public.append(
                answered_within(process.public_url, "POST", SEND, served_within, {400}, json={})
            )
            internal.append(answered_within(process.internal_url, "GET", LIST, bound, {200}))
            if time.monotonic() >= deadline:
                break
        if not attack.reconnect:
            # Every attack socket is cut by the server (timeouts or 503), none left
            # hanging, and the public listener serves again.
            end = time.monotonic() + bound
            while attack.sockets and time.monotonic() < end:
                time.sleep(0.2)
            assert not attack.sockets, f"{len(attack.sockets)} attack sockets still open"
            public.append(answered_within(process.public_url, "POST", SEND, bound, {400}, json={}))
        print(f"public answers (s, status): {[(round(t, 2), st) for t, st in public]}")
        print(f"internal answers (s, status): {[(round(t, 2), st) for t, st in internal]}")
        print(f"attack sockets closed by the server: {attack.closed_by_server}")
    finally:
        attack.close()
        thread.join(5)
        for sock in list(attack.sockets):
            sock.close()
    assert process.is_running(), process.output_report()

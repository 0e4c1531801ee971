"""End to end: what a Redis pause or crash does to throttles and to the projection.

- A send-email-code answered 503 while Redis was paused leaves no cooldown behind once
  Redis resumes: the user's retry is not throttled (CONTRACT §12/§9 "commands that timed
  out during a Redis pause must not change the answer of the user's retry").
- Redis started with the shipped ``deploy/redis.conf`` and ``deploy/users.acl`` (AOF on,
  ACL users), killed with SIGKILL and restarted with the same files, gives back every
  acknowledged session record, index and snapshot, consistent with each other.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.contract import CONFIRM, INTERNAL, SEND, index_key, session_key
from tests.support.net import LOOPBACK, free_port
from tests.support.process import AuthsessionFactory, AuthsessionProcess
from tests.support.redis_server import RedisServer, find_redis_server

pytestmark = [pytest.mark.e2e]

ROOT = Path(__file__).resolve().parents[2]
OPERATION_TIMEOUT_MS = 300


def code_for(process: AuthsessionProcess, challenge_id: str) -> str:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        for record in process.log_records():
            if record.get("challenge_id") == challenge_id and "code" in record:
                return str(record["code"])
        time.sleep(0.02)
    raise AssertionError(f"no code logged for {challenge_id}")


def challenge_status(client: redis.Redis, challenge_id: str) -> str | None:
    for key in client.scan_iter(match=f"authsession:challenge:*{challenge_id}"):
        return str(client.hget(key, "status"))
    return None


# ------------------------------------------------------------------ a paused Redis
@pytest.fixture
def paused_service(
    authsession_process: AuthsessionFactory, dedicated_redis: RedisServer
) -> Iterator[tuple[AuthsessionProcess, RedisServer]]:
    process = authsession_process(
        {
            "AUTHSESSION_REDIS_ADDR": dedicated_redis.addr,
            "AUTHSESSION_REDIS_OPERATION_TIMEOUT": f"{OPERATION_TIMEOUT_MS}ms",
            "AUTHSESSION_SEND_EMAIL_CODE_MIN_DURATION": "0",
        }
    )
    process.wait_ready()
    yield process, dedicated_redis
    if dedicated_redis.paused:
        dedicated_redis.resume()


def test_a_send_that_timed_out_during_a_pause_leaves_no_cooldown(
    paused_service: tuple[AuthsessionProcess, RedisServer],
) -> None:
    process, server = paused_service
    emails = [f"paused{n}@example.com" for n in range(5)]
    # Each connection of the pool is used once before the pause, so the paused requests
    # are sent on open connections (their bytes reach the stopped server and wait there).
    for email in emails:
        warm = httpx.post(process.public_url + SEND, json={"email": f"warm-{email}"}, timeout=10)
        assert warm.status_code == 200
    server.pause()
    try:
        answers: list[httpx.Response] = []
        threads = [
            threading.Thread(
                target=lambda e=email: answers.append(
                    httpx.post(process.public_url + SEND, json={"email": e}, timeout=10)
                )
            )
            for email in emails
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [a.status_code for a in answers] == [503] * 5
        time.sleep(1.0)  # well past the operation timeout and the deadline
    finally:
        server.resume()
    time.sleep(0.2)  # the queued commands run now, late

    with server.client() as client:
        for email in emails:
            retry = httpx.post(process.public_url + SEND, json={"email": email}, timeout=10)
            assert retry.status_code == 200, retry.text
            challenge_id = retry.json()["challenge_id"]
            # Not throttled: a code was mailed for the retry.
            assert challenge_status(client, challenge_id) == "sent", email
            assert code_for(process, challenge_id)


# ------------------------------------------------------------------ the shipped config
class ShippedRedis:
    """redis-server run with copies of deploy/redis.conf and deploy/users.acl.

    Only what cannot work on a test machine is changed: the data directory, the ACL
    file's path, the port and the bind address. Persistence and ACLs stay as shipped.
    """

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.port = free_port()
        shutil.copy(ROOT / "deploy" / "users.acl", workdir / "users.acl")
        conf = (ROOT / "deploy" / "redis.conf").read_text(encoding="utf-8")
        lines = []
        for line in conf.splitlines():
            word = line.split(" ", 1)[0]
            replaced = {
                "dir": f"dir {workdir}",
                "aclfile": f"aclfile {workdir / 'users.acl'}",
                "port": f"port {self.port}",
                "bind": f"bind {LOOPBACK}",
            }
            lines.append(replaced.get(word, line))
        (workdir / "redis.conf").write_text("\n".join(lines) + "\n", encoding="utf-8")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with (self.dir / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [find_redis_server(), str(self.dir / "redis.conf")],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.dir,
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with self.client() as c:
                    if c.ping():
                        return
            except redis.exceptions.BusyLoadingError:
                pass
            except redis.exceptions.ConnectionError:
                pass
            time.sleep(0.05)
        raise AssertionError("shipped redis did not start:\n" + self.log())

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.kill()

    def client(self, user: str = "ops") -> redis.Redis:
        return redis.Redis(
            host=LOOPBACK,
            port=self.port,
            username=user,
            password=f"dev-only-placeholder-{user}-password",
            decode_responses=True,
            socket_timeout=5,
        )

    def log(self) -> str:
        return (self.dir / "redis.log").read_text(encoding="utf-8", errors="replace")


@pytest.fixture
def shipped_redis(tmp_path: Path) -> Iterator[ShippedRedis]:
    server = ShippedRedis(tmp_path)
    server.start()
    yield server
    server.stop()


def test_the_shipped_redis_config_keeps_every_acknowledged_write_across_a_crash(
    shipped_redis: ShippedRedis, authsession_process: AuthsessionFactory
) -> None:
    process = authsession_process(
        {
            "AUTHSESSION_REDIS_ADDR": f"{LOOPBACK}:{shipped_redis.port}",
            "AUTHSESSION_REDIS_USERNAME": "authsession",
            "AUTHSESSION_REDIS_PASSWORD": "dev-only-placeholder-authsession-password",
            "AUTHSESSION_RESEND_COOLDOWN": "1ms",
            "AUTHSESSION_SEND_EMAIL_CODE_MIN_DURATION": "0",
        }
    )
    process.wait_ready()

    def login(email: str) -> dict[str, Any]:
        sent = httpx.post(process.public_url + SEND, json={"email": email}, timeout=10)
        assert sent.status_code == 200, sent.text
        challenge_id = sent.json()["challenge_id"]
        confirmed = httpx.post(
            process.public_url + CONFIRM,
            json={"challenge_id": challenge_id, "code": code_for(process, challenge_id)},
            timeout=10,
        )
        assert confirmed.status_code == 200, confirmed.text
        body: dict[str, Any] = confirmed.json()
        return body

    internal = process.internal_url + INTERNAL
    kept, revoked, extended = (login("keep@example.com") for _ in range(3))
    blocked = [login("blocked@example.com") for _ in range(2)]
    assert httpx.post(f"{internal}/sessions/{revoked['device_session_id']}/revoke").is_success
    assert httpx.post(
        f"{internal}/sessions/{extended['device_session_id']}/extend", json={"ttl": "1h"}
    ).is_success
    block = httpx.post(f"{internal}/users/{blocked[0]['user_id']}/block", json={})
    assert block.status_code == 200, block.text
    sessions = [kept, revoked, extended, *blocked]

    def state() -> dict[str, Any]:
        with shipped_redis.client() as c:
            out: dict[str, Any] = {}
            for body in sessions:
                sid = body["device_session_id"]
                out[sid] = (
                    c.hgetall(session_key(sid)),
                    json.loads(c.get(f"gateway:session:{sid}") or "null"),
                    sorted(c.zrange(index_key(body["user_id"]), 0, -1)),
                )
            return out

    before = state()
    # appendfsync everysec: what was acknowledged more than a second ago is on disk.
    time.sleep(1.5)
    shipped_redis.kill()
    shipped_redis.start()
    after = state()

    assert "NOPERM" not in shipped_redis.log()
    assert after == before
    for record, snapshot, index in after.values():
        assert record, "a session record was lost"
        assert snapshot is not None, "a snapshot was lost"
        assert (snapshot["status"], snapshot["version"]) == (
            record["status"],
            int(record["version"]),
        )
        assert record["device_session_id"] in index
    # The service works on the restarted Redis, and finds no drift to repair.
    listed = httpx.get(f"{internal}/users/{kept['user_id']}/sessions", timeout=10)
    assert listed.status_code == 200, listed.text
    statuses = {s["device_session_id"]: s["status"] for s in listed.json()["sessions"]}
    assert statuses[revoked["device_session_id"]] == "revoked"
    assert statuses[kept["device_session_id"]] == "active"
    checked = subprocess.run(
        [process.argv[0], "projection", "check"],
        env=process.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr

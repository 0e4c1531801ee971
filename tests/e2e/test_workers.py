"""``AUTHSESSION_WORKERS`` > 1 (CONTRACT §12, §2): several server processes sharing both
listening sockets under a supervising parent, run as the real ``authsession`` script over a
real redis-server."""

from __future__ import annotations

import os
import re
import secrets
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from authsession.supervisor import MAX_CONSECUTIVE_CRASHES, RESTART_DELAYS, RestartPolicy
from tests.contract import CONFIRM, INTERNAL, SEND
from tests.support.fake_services import FakeMailService, FakeUserService
from tests.support.lifecycle import wait_until
from tests.support.net import free_port, port_accepts
from tests.support.process import AuthsessionFactory, AuthsessionProcess
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.e2e

P = "AUTHSESSION_"
STUB_MAIL_EVENT = "stub mail: login code"
Record = dict[str, Any]


# --------------------------------------------------------------------------- helpers


def serving(process: AuthsessionProcess, workers: int = 2) -> dict[int, int]:
    """Wait for the parent's ``listener opened`` lines; the pid of each worker slot."""
    for name in ("public", "internal"):
        wait_until(
            lambda n=name: process.records("listener opened", listener=n, workers=workers),
            30,
            f"the parent's listener opened line for {name}\n{process.output_report()}",
        )
    ready = {r["worker"]: r["pid"] for r in process.records("worker ready")}
    assert sorted(ready) == list(range(1, workers + 1)), process.output_report()
    assert process.pid not in ready.values()
    return ready


def worker_env(redis_server: RedisServer, tag: str, **extra: str) -> dict[str, str]:
    return {
        P + "WORKERS": "2",
        P + "REDIS_ADDR": redis_server.addr,
        P + "REDIS_KEY_PREFIX": f"e2e-workers-{tag}:",
        P + "GATEWAY_SESSION_KEY_PREFIX": f"gw-{tag}:session:",
        P + "GATEWAY_SESSION_EVENTS_STREAM": f"gw-{tag}:session_events",
        **{P + k: v for k, v in extra.items()},
    }


def code_for(process: AuthsessionProcess, challenge_id: str) -> str:
    found = wait_until(
        lambda: process.records(STUB_MAIL_EVENT, challenge_id=challenge_id),
        10,
        f"the stub mail line of {challenge_id}",
    )
    code = found[0]["code"]
    assert isinstance(code, str)
    return code


def login(process: AuthsessionProcess, email: str) -> dict[str, Any]:
    """The whole flow on fresh connections: send a code, confirm it, read the session."""
    with httpx.Client(base_url=process.public_url, timeout=10) as public:
        sent = public.post(SEND, json={"email": email})
        assert sent.status_code == 200, sent.text
        challenge_id = sent.json()["challenge_id"]
        confirmed = public.post(
            CONFIRM, json={"challenge_id": challenge_id, "code": code_for(process, challenge_id)}
        )
    assert confirmed.status_code == 200, confirmed.text
    session_id = confirmed.json()["device_session_id"]
    with httpx.Client(base_url=process.internal_url, timeout=10) as internal:
        read = internal.get(f"{INTERNAL}/sessions/{session_id}")
    assert read.status_code == 200, read.text
    assert read.json()["status"] == "active"
    body: dict[str, Any] = read.json()
    return body


def pids_of_requests(process: AuthsessionProcess, listener: str) -> set[int]:
    return {r["pid"] for r in process.records("request", listener=listener)}


def local_ports(pid: int) -> set[int]:
    """The local TCP ports of the sockets process ``pid`` holds (Linux ``/proc``)."""
    inodes: set[str] = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    ports: set[int] = set()
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) > 9 and fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


# --------------------------------------------------------------------------- serving


def test_two_workers_serve_both_ports_and_run_a_leased_job_one_at_a_time(
    authsession_process: AuthsessionFactory, redis_server: RedisServer
) -> None:
    tag = secrets.token_hex(4)
    process = authsession_process(
        worker_env(redis_server, tag, PROJECTION_RECONCILE_INTERVAL="100ms")
    )
    workers = serving(process)
    resolved = process.records("resolved config")
    assert len(resolved) == 1, "the parent logs the resolved config once"
    assert resolved[0]["workers"] == 2
    assert "worker" not in resolved[0]

    # The whole flow through both ports, on fresh connections from several threads,
    # until both workers have served each listener (bounded: 20 s, at least one batch).
    deadline = time.monotonic() + 20
    with ThreadPoolExecutor(4) as pool:
        for batch in range(1000):
            emails = [f"w{tag}-{batch}-{n}@example.com" for n in range(8)]
            list(pool.map(lambda email: login(process, email), emails))
            if time.monotonic() > deadline or all(
                pids_of_requests(process, name) == set(workers.values())
                for name in ("public", "internal")
            ):
                break
    for name in ("public", "internal"):
        assert pids_of_requests(process, name) == set(workers.values()), (
            f"the {name} requests were not spread over both workers\n{process.output_report()}"
        )

    # The reconciler (every 100 ms, under a Redis lease): both workers try the lease, one
    # scans. MONITOR names the client connection of each command; /proc maps it to a pid.
    lease_key = f"e2e-workers-{tag}:lease:projection_reconcile"
    scans: set[int] = set()
    holders: set[str] = set()
    client = redis_server.client()
    try:
        with client.monitor() as monitor:
            deadline = time.monotonic() + 2.0
            while time.monotonic() < deadline:
                command = monitor.next_command()
                text = str(command["command"])
                if text.startswith("SCAN") and tag in text:
                    scans.add(int(command["client_port"]))
                elif text.startswith("EVALSHA") and lease_key in text:
                    holders.add(text.split()[4])  # EVALSHA sha 1 key holder ttl
    finally:
        client.close()
    ports = {slot: local_ports(pid) for slot, pid in workers.items()}
    scanning = {slot for slot, owned in ports.items() if scans & owned}
    assert len(holders) == 2, f"both workers run the job's loop: {holders}"
    assert scans, "the reconciler ran"
    assert len(scanning) == 1, f"the reconciler ran in workers {scanning} at once"
    assert scans <= ports[next(iter(scanning))], "every scan came from the lease holder"

    process.terminate()
    assert process.wait_exit() == 0, process.output_report()


def test_a_killed_worker_is_restarted_and_a_killed_parent_stops_the_workers(
    authsession_process: AuthsessionFactory, redis_server: RedisServer
) -> None:
    tag = secrets.token_hex(4)
    process = authsession_process(worker_env(redis_server, tag))
    workers = serving(process)

    os.kill(workers[1], signal.SIGKILL)
    # Every request from now on is answered, by the surviving worker until the new one
    # is up, then by either.
    answered: list[int] = []
    deadline = time.monotonic() + 30
    while not process.records("worker ready", worker=1)[1:]:
        assert time.monotonic() < deadline, process.output_report()
        answered.append(login(process, f"k{tag}-{len(answered)}@example.com")["version"])
    assert answered, "requests were served while the worker was being restarted"

    died = process.records("worker died; restarting it", worker=1)
    assert len(died) == 1, process.output_report()
    assert died[0]["pid"] == workers[1]
    assert died[0]["status"] == "killed by SIGKILL"
    assert died[0]["restart_in"] == 0
    restarted = process.records("worker ready", worker=1)[1]["pid"]
    assert restarted not in workers.values()
    assert process.is_running()
    login(process, f"k{tag}-after@example.com")

    # A parent that dies, even by SIGKILL, takes its workers with it: they drain and exit
    # instead of serving unsupervised.
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait_exit() == -signal.SIGKILL
    alive = {restarted, workers[2]}
    wait_until(
        lambda: all(not Path(f"/proc/{pid}").exists() or _is_zombie(pid) for pid in alive),
        20,
        f"the workers to exit\n{process.output_report()}",
    )
    gone = process.records("the supervising parent is gone; shutting down")
    assert {r["pid"] for r in gone} == alive
    assert not port_accepts(process.public_port)
    assert not port_accepts(process.internal_port)


def test_sigterm_drains_the_in_flight_requests_of_every_worker(
    authsession_process: AuthsessionFactory,
    redis_server: RedisServer,
    fake_user_service: FakeUserService,
    fake_mail_service: FakeMailService,
) -> None:
    slow = 2.0
    tag = secrets.token_hex(4)
    process = authsession_process(
        worker_env(
            redis_server,
            tag,
            USER_SERVICE_MODE="rest",
            USER_SERVICE_BASE_URL=fake_user_service.base_url,
            USER_SERVICE_REQUEST_TIMEOUT="10s",
            MAIL_SERVICE_MODE="rest",
            MAIL_SERVICE_BASE_URL=fake_mail_service.base_url,
            MAIL_SERVICE_REQUEST_TIMEOUT="10s",
        )
    )
    workers = serving(process)
    fake_mail_service.delay(slow)
    emails = [f"d{tag}-{n}@example.com" for n in range(4)]

    def send(email: str) -> httpx.Response:
        with httpx.Client(base_url=process.public_url, timeout=30) as client:
            return client.post(SEND, json={"email": email})

    with ThreadPoolExecutor(len(emails)) as pool:
        futures = [pool.submit(send, email) for email in emails]
        wait_until(
            lambda: len(fake_mail_service.requests_to("/login-code")) == len(emails),
            10,
            "every request to reach the mail service",
        )
        process.terminate()
        wait_until(
            lambda: (
                not port_accepts(process.public_port) and not port_accepts(process.internal_port)
            ),
            slow,
            "both listeners to refuse new connections",
        )
        assert not any(f.done() for f in futures), "the listeners closed before the drain"
        responses = [f.result(timeout=30) for f in futures]

    assert [r.status_code for r in responses] == [200] * len(emails)
    assert {m.email for m in fake_mail_service.messages} == set(emails)
    assert process.wait_exit() == 0, process.output_report()
    for pid in workers.values():
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid)
    exited = {r["pid"]: r["status"] for r in process.records("worker exited")}
    assert exited == {pid: "exit 0" for pid in workers.values()}
    served = {r["pid"] for r in process.records("request", route=SEND)}
    assert served <= set(workers.values())
    for name in ("public", "internal"):
        assert process.records("listener stopped", listener=name, workers=2)
        stopped = {
            r["pid"] for r in process.records("listener stopped", listener=name) if "worker" in r
        }
        assert set(workers.values()) <= stopped


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


# --------------------------------------------------------------------------- startup


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        pytest.param({P + "WORKERS": "2", P + "CHALLENGE_TTL": "10x"}, "CHALLENGE_TTL", id="other"),
        pytest.param({P + "WORKERS": "0"}, "WORKERS", id="zero"),
        pytest.param({P + "WORKERS": "two"}, "WORKERS", id="not-a-number"),
        pytest.param({P + "WORKERS": "2", P + "REDIS_ADDR": "memory://"}, "WORKERS", id="memory"),
    ],
)
def test_a_configuration_error_exits_2_before_any_worker(
    authsession_process: AuthsessionFactory, env: dict[str, str], variable: str
) -> None:
    process = authsession_process(env)
    assert process.wait_exit() == 2, process.output_report()
    lines = process.stderr_text().strip().splitlines()
    assert len(lines) == 1, lines
    assert re.search(rf"\b{P}{variable}: ", lines[0]), lines
    assert process.stdout_text() == ""


def test_a_failed_startup_check_exits_1_with_no_listener_and_no_worker(
    authsession_process: AuthsessionFactory,
) -> None:
    process = authsession_process(
        {P + "WORKERS": "2", P + "REDIS_ADDR": f"127.0.0.1:{free_port()}"}
    )
    assert process.wait_exit() == 1, process.output_report()
    failed = process.records("startup check failed")
    assert failed, process.output_report()
    assert failed[0]["component"] == "challenge_store"
    assert not process.records("worker started")
    assert not process.records("listener opened")
    assert not port_accepts(process.public_port)


def test_a_worker_failing_at_startup_stops_the_service_with_1(
    authsession_process: AuthsessionFactory, dedicated_redis: RedisServer
) -> None:
    # The parent's checks pass; Redis then stops answering before the workers check.
    process = authsession_process(
        {
            **worker_env(dedicated_redis, secrets.token_hex(4)),
            P + "STARTUP_CHECK_TIMEOUT": "1s",
            P + "REDIS_OPERATION_TIMEOUT": "500ms",
        }
    )
    wait_until(lambda: process.records("worker started"), 20, "the first worker to start")
    dedicated_redis.pause()
    try:
        assert process.wait_exit(timeout=30) == 1, process.output_report()
    finally:
        dedicated_redis.resume()
    assert process.records("startup check failed"), process.output_report()
    assert all("worker" in r for r in process.records("startup check failed"))
    assert process.records("worker failed at startup; stopping the service")
    assert not process.records("listener opened", workers=2)
    assert not process.records("worker died; restarting it")
    assert not port_accepts(process.public_port)
    assert not port_accepts(process.internal_port)


# --------------------------------------------------------------------------- policy


def test_restart_policy_backs_off_then_gives_up_and_a_stable_worker_starts_over() -> None:
    policy = RestartPolicy()
    delays = [policy.after_crash(served_for=1.0) for _ in range(MAX_CONSECUTIVE_CRASHES)]
    assert delays == [*RESTART_DELAYS, None]
    assert delays[0] == 0

    policy = RestartPolicy()
    for _ in range(MAX_CONSECUTIVE_CRASHES - 1):
        policy.after_crash(served_for=None)  # never became ready: counts
    assert policy.after_crash(served_for=policy.stable_after) == 0  # served long enough

"""Workers benchmark: requests/s with ``AUTHSESSION_WORKERS=1`` and ``=2``, and how the
CPU was shared.

Two scenarios, each on the real process over a real redis-server: an internal session
read (``GET /api/v1/internal/sessions/{id}``) and send-email-code (stub mail,
``AUTHSESSION_SEND_EMAIL_CODE_MIN_DURATION=0``, a new address every request). The
figure of merit is ``rate(2) / (2 x rate(1))`` (goal >= 0.8 when two cores are free for
the server).

The load generator (bench/loadgen.py via bench/run.py's ``drive``, in BENCH_CLIENTS
processes so that one client core is not the limit) and Redis run on the same machine,
so they take CPU from the server. The CPU time of every process is measured over each
run: the server's (parent and workers) and Redis's from ``/proc/<pid>/stat``, the load
generator's from ``resource.getrusage`` in each client process, and what the rest of the
machine used from ``/proc/stat``. The ratio is therefore
also given normalised by the CPU the server processes got: ``(rate(2) / cpu(2)) /
(rate(1) / cpu(1))``, the throughput per server core with two workers relative to one
(1.0 = two workers do twice the work when they get twice the CPU). On a shared machine
the figures are indicative only.

    make bench                                  # 5 s per run
    BENCH_SECONDS=2 .venv/bin/python bench/workers.py
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bench.loadgen import Connection, Reply  # noqa: E402
from bench.run import CONCURRENCY, SECONDS, drive  # noqa: E402
from tests.support.process import AuthsessionProcess  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402

CLIENTS = int(os.environ.get("BENCH_CLIENTS", "2"))
SESSIONS = 64
TICKS = os.sysconf("SC_CLK_TCK")

MakeRequest = Callable[[Connection, int], Any]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (Linux ``/proc``)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def machine_busy_seconds() -> float:
    """CPU time every process on the machine has used so far (``/proc/stat``)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / TICKS


def _client(port: int, make: Callable[[int], MakeRequest], index: int, out: Pipe) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF)
    result = asyncio.run(drive(f"client {index}", port, make(index)))
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    out.send({"requests": result.requests, "errors": result.errors, "cpu": cpu})
    out.close()


@dataclass
class Run:
    workers: int
    scenario: str
    rate: float
    elapsed: float
    server_cpu: float
    loadgen_cpu: float
    redis_cpu: float
    other_cpu: float
    errors: int
    spread: dict[int, int]

    def cores(self, cpu: float) -> float:
        return cpu / self.elapsed


def load(
    port: int, make: Callable[[int], MakeRequest], server_pids: list[int], redis_pid: int
) -> tuple[float, float, float, float, float, float, int]:
    """CLIENTS load processes for SECONDS; rate, elapsed and the CPU of each party."""
    context = multiprocessing.get_context("fork")
    busy_before = machine_busy_seconds()
    server_before = sum(cpu_seconds(pid) for pid in server_pids)
    redis_before = cpu_seconds(redis_pid)
    started = time.perf_counter()
    pipes = []
    procs = []
    for index in range(CLIENTS):
        receive, send = context.Pipe(duplex=False)
        proc = context.Process(target=_client, args=(port, make, index, send))
        proc.start()
        send.close()
        pipes.append(receive)
        procs.append(proc)
    results = [pipe.recv() for pipe in pipes]
    for proc in procs:
        proc.join(30)
    elapsed = time.perf_counter() - started
    server = sum(cpu_seconds(pid) for pid in server_pids) - server_before
    redis_cpu = cpu_seconds(redis_pid) - redis_before
    loadgen = sum(r["cpu"] for r in results)
    other = max(0.0, machine_busy_seconds() - busy_before - server - redis_cpu - loadgen)
    requests = sum(r["requests"] for r in results)
    return (
        requests / elapsed,
        elapsed,
        server,
        loadgen,
        redis_cpu,
        other,
        sum(r["errors"] for r in results),
    )


def wait_serving(proc: AuthsessionProcess, workers: int) -> list[int]:
    """The pids of the server processes once they serve (the parent's first)."""
    deadline = time.monotonic() + 60
    while True:
        records = proc.log_records()
        if workers == 1:
            opened = [r for r in records if r.get("event") == "listener opened"]
        else:
            opened = [r for r in records if r.get("event") == "listener opened" and "workers" in r]
        if len(opened) >= 2:
            ready = [r["pid"] for r in records if r.get("event") == "worker ready"]
            return [proc.pid, *ready]
        if time.monotonic() > deadline or not proc.is_running():
            raise RuntimeError(f"the service did not start\n{proc.output_report()}")
        time.sleep(0.1)


def make_sessions(proc: AuthsessionProcess, run_id: str) -> list[str]:
    sessions = []
    with httpx.Client(base_url=proc.public_url, timeout=10) as client:
        challenges = []
        for n in range(SESSIONS):
            sent = client.post(
                "/api/v1/public/auth/send-email-code", json={"email": f"s{run_id}-{n}@example.com"}
            )
            challenges.append(sent.json()["challenge_id"])
        time.sleep(0.5)
        codes = {
            r["challenge_id"]: r["code"]
            for r in proc.log_records()
            if r.get("event") == "stub mail: login code"
        }
        for challenge_id in challenges:
            confirmed = client.post(
                "/api/v1/public/auth/confirm",
                json={"challenge_id": challenge_id, "code": codes[challenge_id]},
            )
            sessions.append(confirmed.json()["device_session_id"])
    return sessions


def spread(proc: AuthsessionProcess, route: str, since: int) -> dict[int, int]:
    counts: Counter[int] = Counter()
    for record in proc.log_records()[since:]:
        if record.get("event") == "request" and record.get("route") == route:
            counts[int(record.get("pid", proc.pid))] += 1
    return dict(counts)


def bench(workers: int, redis_server: RedisServer) -> list[Run]:
    run_id = f"{os.getpid()}-{workers}"
    env = {
        "AUTHSESSION_WORKERS": str(workers),
        "AUTHSESSION_REDIS_ADDR": redis_server.addr,
        "AUTHSESSION_REDIS_KEY_PREFIX": f"bench-{run_id}:",
        "AUTHSESSION_LOG_FORMAT": "json",
        "AUTHSESSION_SEND_EMAIL_CODE_MIN_DURATION": "0",
        "AUTHSESSION_MAIL_SERVICE_MODE": "stub",
        "AUTHSESSION_USER_SERVICE_MODE": "stub",
    }
    redis_pid = redis_server.pid
    assert redis_pid is not None
    runs = []
    with AuthsessionProcess.on_free_ports(env) as proc:
        pids = wait_serving(proc, workers)
        sessions = make_sessions(proc, run_id)

        def read(index: int) -> MakeRequest:
            async def request(client: Connection, n: int) -> Reply:
                session = sessions[(n * CLIENTS + index) % len(sessions)]
                return await client.request("GET", f"/api/v1/internal/sessions/{session}")

            return request

        def send(index: int) -> MakeRequest:
            async def request(client: Connection, n: int) -> Reply:
                return await client.request(
                    "POST",
                    "/api/v1/public/auth/send-email-code",
                    {"email": f"b{run_id}-{index}-{n}@example.com"},
                )

            return request

        for scenario, port, make, route in (
            (
                "internal get session",
                proc.internal_port,
                read,
                "/api/v1/internal/sessions/{device_session_id}",
            ),
            (
                "public send-email-code",
                proc.public_port,
                send,
                "/api/v1/public/auth/send-email-code",
            ),
        ):
            since = len(proc.log_records())
            rate, elapsed, server, loadgen, redis_cpu, other, errors = load(
                port, make, pids, redis_pid
            )
            runs.append(
                Run(
                    workers,
                    scenario,
                    rate,
                    elapsed,
                    server,
                    loadgen,
                    redis_cpu,
                    other,
                    errors,
                    spread(proc, route, since),
                )
            )
            print_run(runs[-1])
    return runs


def print_run(run: Run) -> None:
    shares = "/".join(str(n) for n in sorted(run.spread.values(), reverse=True))
    print(
        f"workers={run.workers}  {run.scenario:<24} {run.rate:>8.0f} req/s   CPU cores used: "
        f"server {run.cores(run.server_cpu):.2f}, load generator {run.cores(run.loadgen_cpu):.2f}, "
        f"redis {run.cores(run.redis_cpu):.2f}, other processes {run.cores(run.other_cpu):.2f}"
        f"   requests per worker {shares}"
        f"   unexpected={run.errors}",
        flush=True,
    )


def main() -> int:
    print(
        f"{SECONDS:g} s per run, {CLIENTS} load processes x {CONCURRENCY} keep-alive "
        f"connections, {os.cpu_count()} cores shared by server, load generator, Redis "
        "and other processes (figures indicative)"
    )
    summary: dict[str, Any] = {"seconds": SECONDS, "clients": CLIENTS, "concurrency": CONCURRENCY}
    with RedisServer() as redis_server:
        one = bench(1, redis_server)
        two = bench(2, redis_server)
    for a, b in zip(one, two, strict=True):
        ratio = b.rate / (2 * a.rate)
        per_core_1 = a.rate / a.cores(a.server_cpu)
        per_core_2 = b.rate / b.cores(b.server_cpu)
        normalised = per_core_2 / per_core_1
        print(
            f"{a.scenario:<24} rate(2)/(2*rate(1)) = {ratio:.2f}   normalised by server CPU "
            f"= {normalised:.2f}  ({per_core_1:.0f} vs {per_core_2:.0f} req per server CPU-second)",
            flush=True,
        )
        summary[a.scenario] = {
            "rate_1": round(a.rate),
            "rate_2": round(b.rate),
            "ratio": round(ratio, 3),
            "ratio_normalised_by_server_cpu": round(normalised, 3),
            "server_cores_1": round(a.cores(a.server_cpu), 2),
            "server_cores_2": round(b.cores(b.server_cpu), 2),
            "loadgen_cores_2": round(b.cores(b.loadgen_cpu), 2),
            "redis_cores_2": round(b.cores(b.redis_cpu), 2),
            "other_cores_2": round(b.cores(b.other_cpu), 2),
        }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

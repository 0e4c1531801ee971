"""Load benchmark: the real process over a real redis-server, against the floor app.

The floor (``bench/floor_app.py``) is a bare FastAPI app doing one Redis ``SET`` per
request, served the same way; it is measured between the scenarios and every figure is
given as a ratio to the median floor of the same run, so a noisy machine moves both. The
load comes from this one process (raw asyncio keep-alive connections, bench/loadgen.py);
its own CPU per request is printed for the floor and for each scenario, which shows
whether it, rather than the server, was the limit (it is when its share is as high for
the service as for the floor). One table: scenario, requests/s, p50, p99, ratio to the
floor, Redis commands per request (those inside scripts included), round trips to Redis
per request (``total_reads_processed``), client and server CPU per request; then the Redis
memory an active session keeps (``MEMORY USAGE`` of its keys).

    make bench                      # 5 s per scenario, 32 connections
    BENCH_SECONDS=10 BENCH_CONCURRENCY=64 python bench/run.py
"""

from __future__ import annotations

import asyncio
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402

from bench.loadgen import Connection, Reply  # noqa: E402
from tests.contract import index_key, session_key  # noqa: E402
from tests.support.net import free_port, wait_port  # noqa: E402
from tests.support.process import AuthsessionProcess  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402

SECONDS = float(os.environ.get("BENCH_SECONDS", "5"))
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "32"))
CLOCK_TICK = os.sysconf("SC_CLK_TCK")

Request = Callable[[Connection, int], Awaitable[Reply]]


@dataclass
class Result:
    """One scenario's figures."""

    name: str
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    redis_calls: float = 0.0
    round_trips: float = 0.0
    client_us: float = 0.0
    server_us: float = 0.0


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) a process used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


def redis_calls(client: redis.Redis) -> int:
    stats: dict[str, Any] = client.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info")


def redis_reads(client: redis.Redis) -> int:
    """Read events Redis processed: one per round trip a client makes (a pipeline is one)."""
    stats: dict[str, Any] = client.info("stats")
    return int(stats.get("total_reads_processed", 0))


async def drive(
    name: str,
    port: int,
    make_request: Request,
    *,
    expect: int = 200,
    server_pid: int | None = None,
    redis_client: redis.Redis | None = None,
    limit: int | None = None,
) -> Result:
    """Run ``make_request`` on CONCURRENCY keep-alive connections for SECONDS."""
    latencies: list[float] = []
    errors = 0
    counter = 0
    deadline = time.perf_counter() + SECONDS
    connections = [await Connection.open("127.0.0.1", port) for _ in range(CONCURRENCY)]

    async def worker(connection: Connection) -> None:
        nonlocal errors, counter
        while time.perf_counter() < deadline and (limit is None or counter < limit):
            n = counter
            counter += 1
            started = time.perf_counter()
            reply = await make_request(connection, n)
            latencies.append((time.perf_counter() - started) * 1000)
            if reply.status != expect:
                errors += 1

    calls_before = redis_calls(redis_client) if redis_client is not None else 0
    reads_before = redis_reads(redis_client) if redis_client is not None else 0
    client_before = resource.getrusage(resource.RUSAGE_SELF)
    server_before = process_cpu(server_pid) if server_pid else 0.0
    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in connections))
    elapsed = time.perf_counter() - started
    client_after = resource.getrusage(resource.RUSAGE_SELF)
    server_after = process_cpu(server_pid) if server_pid else 0.0
    calls = redis_calls(redis_client) - calls_before if redis_client is not None else 0
    # Less the measurement's own INFO calls (the one above and this one's).
    reads = redis_reads(redis_client) - reads_before - 2 if redis_client is not None else 0
    for connection in connections:
        await connection.close()
    latencies.sort()
    n = max(1, len(latencies))
    client_cpu = (client_after.ru_utime + client_after.ru_stime) - (
        client_before.ru_utime + client_before.ru_stime
    )
    return Result(
        name=name,
        requests=len(latencies),
        rps=len(latencies) / elapsed,
        p50_ms=statistics.median(latencies) if latencies else 0.0,
        p99_ms=latencies[max(0, int(len(latencies) * 0.99) - 1)] if latencies else 0.0,
        errors=errors,
        redis_calls=calls / n,
        round_trips=max(0, reads) / n,
        client_us=client_cpu / n * 1e6,
        server_us=(server_after - server_before) / n * 1e6,
    )


def codes_from(proc: AuthsessionProcess) -> dict[str, str]:
    return {
        r["challenge_id"]: r["code"]
        for r in proc.log_records()
        if r.get("event") == "stub mail: login code"
    }


class Bench:
    """The service, the floor and Redis of one run."""

    def __init__(self, proc: AuthsessionProcess, floor_port: int, floor_pid: int, sync: Any):
        self.proc = proc
        self.floor_port = floor_port
        self.floor_pid = floor_pid
        self.redis = sync
        self.results: list[Result] = []
        self.floors: list[Result] = []
        self.run_id = os.getpid()

    async def floor(self) -> None:
        async def post(client: Connection, n: int) -> Reply:
            return await client.request("POST", "/redis1", {"email": f"x{n}@example.com"})

        self.floors.append(
            await drive(
                "floor (FastAPI + one SET)",
                self.floor_port,
                post,
                server_pid=self.floor_pid,
                redis_client=self.redis,
            )
        )

    async def service(self, name: str, port: int, request: Request, **kw: Any) -> Result:
        result = await drive(
            name, port, request, server_pid=self.proc.pid, redis_client=self.redis, **kw
        )
        self.results.append(result)
        return result

    async def run(self) -> list[str]:
        public, internal = self.proc.public_port, self.proc.internal_port
        await self.floor()

        async def send(client: Connection, n: int) -> Reply:
            return await client.request(
                "POST",
                "/api/v1/public/auth/send-email-code",
                {"email": f"b{self.run_id}-{n}@example.com"},
            )

        await self.service("send-email-code (sent)", public, send)
        await self.floor()
        pending = list(codes_from(self.proc).items())
        sessions: list[str] = []

        async def first(client: Connection, n: int) -> Reply:
            challenge_id, code = pending[n]
            reply = await client.request(
                "POST", "/api/v1/public/auth/confirm", {"challenge_id": challenge_id, "code": code}
            )
            if reply.status == 200:
                sessions.append(reply.json()["device_session_id"])
            return reply

        await self.service("confirm (first)", public, first, limit=len(pending))

        async def replay(client: Connection, n: int) -> Reply:
            challenge_id, code = pending[n % len(sessions)]
            return await client.request(
                "POST", "/api/v1/public/auth/confirm", {"challenge_id": challenge_id, "code": code}
            )

        await self.service("confirm (replay)", public, replay)
        await self.floor()

        async def get(client: Connection, n: int) -> Reply:
            sid = sessions[n % len(sessions)]
            return await client.request("GET", f"/api/v1/internal/sessions/{sid}")

        await self.service("internal get session", internal, get)
        users = sorted({str(self.redis.hget(session_key(s), "user_id")) for s in sessions[:200]})

        async def listing(client: Connection, n: int) -> Reply:
            user = users[n % len(users)]
            return await client.request("GET", f"/api/v1/internal/users/{user}/sessions")

        await self.service("internal list sessions", internal, listing)
        memory = self.memory(sessions)

        async def revoke(client: Connection, n: int) -> Reply:
            sid = sessions[n % len(sessions)]
            return await client.request("POST", f"/api/v1/internal/sessions/{sid}/revoke", {})

        await self.service("internal revoke", internal, revoke, limit=len(sessions))
        await self.floor()
        return memory

    def memory(self, sessions: list[str]) -> list[str]:
        """``MEMORY USAGE`` of the keys an active session keeps, averaged over a sample."""
        sample = sessions[:200]
        record = [self.redis.memory_usage(session_key(s)) or 0 for s in sample]
        snapshot = [self.redis.memory_usage(f"gateway:session:{s}") or 0 for s in sample]
        users: dict[str, int] = {}
        for s in sample:
            users[str(self.redis.hget(session_key(s), "user_id"))] = 0
        index_total = 0
        indexed = 0
        for user in users:
            index_total += self.redis.memory_usage(index_key(user)) or 0
            indexed += int(self.redis.zcard(index_key(user)))
        stream = self.redis.memory_usage("gateway:session_events") or 0
        entries = max(1, int(self.redis.xlen("gateway:session_events")))
        per_record = statistics.mean(record)
        per_snapshot = statistics.mean(snapshot)
        per_index = index_total / max(1, indexed)
        steady = per_record + per_snapshot + per_index
        return [
            f"Redis memory per active session (MEMORY USAGE, mean of {len(sample)}): "
            f"record {per_record:.0f} B + snapshot {per_snapshot:.0f} B + index share "
            f"{per_index:.0f} B = {steady:.0f} B ({steady / 1024:.2f} KiB) steady; "
            f"plus about {stream / entries:.0f} B per stream entry until it is trimmed",
        ]


def table(bench: Bench, memory: list[str]) -> None:
    floor_rps = statistics.median(f.rps for f in bench.floors)
    floor_p99 = statistics.median(f.p99_ms for f in bench.floors)
    floor = bench.floors[0]
    print(
        f"{SECONDS:g} s per scenario, {CONCURRENCY} connections, one client process; "
        f"floor = median of {len(bench.floors)} runs"
    )
    header = (
        f"{'scenario':<28} {'req/s':>7} {'p50 ms':>7} {'p99 ms':>7} {'x floor':>7} "
        f"{'p99/floor':>9} {'redis/req':>9} {'trips/req':>9} {'client us':>9} "
        f"{'server us':>9}  errors"
    )
    print(header)
    print("-" * len(header))
    for f in bench.floors:
        print(
            f"{f.name:<28} {f.rps:>7.0f} {f.p50_ms:>7.2f} {f.p99_ms:>7.2f} "
            f"{f.rps / floor_rps:>7.2f} {f.p99_ms / floor_p99:>9.2f} "
            f"{f.redis_calls:>9.2f} {f.round_trips:>9.2f} "
            f"{f.client_us:>9.0f} {f.server_us:>9.0f}  {f.errors}"
        )
    for r in bench.results:
        print(
            f"{r.name:<28} {r.rps:>7.0f} {r.p50_ms:>7.2f} {r.p99_ms:>7.2f} "
            f"{r.rps / floor_rps:>7.2f} {r.p99_ms / floor_p99:>9.2f} "
            f"{r.redis_calls:>9.2f} {r.round_trips:>9.2f} "
            f"{r.client_us:>9.0f} {r.server_us:>9.0f}  {r.errors}"
        )
    print(
        f"client us = the load generator's CPU per request (floor: {floor.client_us:.0f}); "
        "where it is no higher for a scenario than for the floor, the floor saturated the "
        "client at least as much, so the client did not hold the service back"
    )
    for line in memory:
        print(line)


def main() -> int:
    with RedisServer() as redis_server:
        sync = redis_server.client()
        env = {
            "AUTHSESSION_REDIS_ADDR": redis_server.addr,
            "AUTHSESSION_LOG_FORMAT": "json",
            "AUTHSESSION_SEND_EMAIL_CODE_MIN_DURATION": "0",
            "AUTHSESSION_MAX_FAILED_CONFIRMS_PER_EMAIL": "1000000",
            "AUTHSESSION_PROJECTION_RECONCILE_INTERVAL": "0",
        }
        floor_port = free_port()
        floor = subprocess.Popen(
            [
                sys.executable,
                str(Path(__file__).with_name("floor_app.py")),
                str(floor_port),
                redis_server.addr,
            ]
        )
        try:
            wait_port(floor_port)
            with AuthsessionProcess.on_free_ports(env) as proc:
                proc.wait_ready()
                bench = Bench(proc, floor_port, floor.pid, sync)
                memory = asyncio.run(bench.run())
        finally:
            floor.terminate()
            floor.wait(10)
        table(bench, memory)
        sync.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

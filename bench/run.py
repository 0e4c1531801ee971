"""Load benchmark: the real process over a real redis-server, and the floor app.

Prints requests per second and latency percentiles for each scenario. The load comes
from this one Python process (raw asyncio keep-alive connections, bench/loadgen.py) on
the same machine, so the figures are
comparable between runs on one machine, not absolute capacity.

    make bench                      # default: 5 s per scenario, 32 connections
    BENCH_SECONDS=10 BENCH_CONCURRENCY=64 make bench
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.loadgen import Connection, Reply  # noqa: E402
from tests.support.net import free_port, wait_port  # noqa: E402
from tests.support.process import AuthsessionProcess  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402

SECONDS = float(os.environ.get("BENCH_SECONDS", "5"))
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "32"))

Request = Callable[[Connection, int], Awaitable[Reply]]


async def drive(port: int, make_request: Request, expect: int = 200) -> dict[str, float]:
    """Run ``make_request`` on CONCURRENCY keep-alive connections for SECONDS."""
    latencies: list[float] = []
    errors = 0
    counter = 0
    deadline = time.perf_counter() + SECONDS
    connections = [await Connection.open("127.0.0.1", port) for _ in range(CONCURRENCY)]

    async def worker(connection: Connection) -> None:
        nonlocal errors, counter
        while time.perf_counter() < deadline:
            counter += 1
            started = time.perf_counter()
            reply = await make_request(connection, counter)
            latencies.append((time.perf_counter() - started) * 1000)
            if reply.status != expect:
                errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in connections))
    elapsed = time.perf_counter() - started
    for connection in connections:
        await connection.close()
    latencies.sort()
    return {
        "requests": len(latencies),
        "rps": len(latencies) / elapsed,
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1],
        "errors": errors,
    }


def report(name: str, stats: dict[str, float]) -> None:
    print(
        f"{name:<34} {stats['rps']:>9.0f} req/s   p50 {stats['p50_ms']:>7.2f} ms"
        f"   p99 {stats['p99_ms']:>7.2f} ms   n={int(stats['requests'])}"
        f"   unexpected={int(stats['errors'])}",
        flush=True,
    )


def codes_from(proc: AuthsessionProcess) -> dict[str, str]:
    return {
        r["challenge_id"]: r["code"]
        for r in proc.log_records()
        if r.get("event") == "stub mail: login code"
    }


async def scenarios(proc: AuthsessionProcess) -> None:
    run_id = os.getpid()

    async def send_code(client: Connection, n: int) -> Reply:
        return await client.request(
            "POST", "/api/v1/public/auth/send-email-code", {"email": f"b{run_id}-{n}@example.com"}
        )

    report("public send-email-code (sent)", await drive(proc.public_port, send_code))

    async def throttled(client: Connection, n: int) -> Reply:
        return await client.request(
            "POST", "/api/v1/public/auth/send-email-code", {"email": f"hot{run_id}@example.com"}
        )

    report("public send-email-code (throttled)", await drive(proc.public_port, throttled))

    pending = list(codes_from(proc).items())
    sessions: list[str] = []

    async def confirm(client: Connection, n: int) -> Reply:
        challenge_id, code = pending[n % len(pending)]
        response = await client.request(
            "POST", "/api/v1/public/auth/confirm", {"challenge_id": challenge_id, "code": code}
        )
        if response.status == 200 and response.json()["created"]:
            sessions.append(response.json()["device_session_id"])
        return response

    report("public confirm (create + replays)", await drive(proc.public_port, confirm))

    async def wrong(client: Connection, n: int) -> Reply:
        return await client.request(
            "POST", "/api/v1/public/auth/confirm", {"challenge_id": "A" * 32, "code": "000000"}
        )

    report("public confirm (unknown, 404)", await drive(proc.public_port, wrong, expect=404))

    async def read(client: Connection, n: int) -> Reply:
        return await client.request(
            "GET", f"/api/v1/internal/sessions/{sessions[n % len(sessions)]}"
        )

    report("internal get session", await drive(proc.internal_port, read))

    async def revoke(client: Connection, n: int) -> Reply:
        return await client.request(
            "POST", f"/api/v1/internal/sessions/{sessions[n % len(sessions)]}/revoke", {}
        )

    report("internal revoke (idempotent)", await drive(proc.internal_port, revoke))


async def floor_scenario(port: int) -> None:
    async def post(client: Connection, n: int) -> Reply:
        return await client.request("POST", "/floor", {"email": "x@example.com"})

    report("floor: bare FastAPI POST", await drive(port, post))


def main() -> int:
    print(f"{SECONDS:g} s per scenario, {CONCURRENCY} concurrent connections, one client process")
    with RedisServer() as redis_server:
        public, internal = free_port(), free_port()
        env = {
            "AUTHSESSION_REDIS_ADDR": redis_server.addr,
            "AUTHSESSION_PUBLIC_HTTP_ADDR": f"127.0.0.1:{public}",
            "AUTHSESSION_INTERNAL_HTTP_ADDR": f"127.0.0.1:{internal}",
            "AUTHSESSION_LOG_FORMAT": "json",
            "AUTHSESSION_MAX_FAILED_CONFIRMS_PER_EMAIL": "1000000",
        }
        with AuthsessionProcess(env, public_port=public, internal_port=internal) as proc:
            proc.wait_ready()
            asyncio.run(scenarios(proc))
    floor_port = free_port()
    floor = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("floor_app.py")), str(floor_port)]
    )
    try:
        wait_port(floor_port)
        asyncio.run(floor_scenario(floor_port))
    finally:
        floor.terminate()
        floor.wait(10)
    print(json.dumps({"seconds": SECONDS, "concurrency": CONCURRENCY}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

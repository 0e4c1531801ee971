"""Gateway benchmark: revocation-to-close latency over many live connections, and the
cost of the session middleware on an HTTP endpoint.

1. CLIENTS sessions log in through the real ``authsession`` process (stub mail, codes
   from its log) and connect to one example gateway process (``websocket`` or
   ``socketio``) from CLIENT_PROCS client processes. Then REVOCATIONS of them are
   revoked one at a time through the internal API; the latency is from the revoke call
   returning (in this process) to the client process receiving the close (WebSocket) or
   ``session_expired`` (Socket.IO), both stamped with CLOCK_MONOTONIC, which every
   process of the machine shares. Target: p99 <= 5 ms.
2. Requests per second of one handler behind ``SessionAuthMiddleware`` (follower as
   cache) and of the same handler without it, in the same gateway process, in
   alternating rounds (median of the rounds' ratios); target ratio >= 0.9. The load
   generator writes pre-encoded requests on raw keep-alive connections (uvloop if
   installed) and prints its own CPU share, so a saturated load generator shows.

    python bench/gateway_bench.py                       # 10 000 clients, 500 revocations
    BENCH_GATEWAY_CLIENTS=1000 BENCH_GATEWAY_REVOCATIONS=100 BENCH_SECONDS=2 \\
        python bench/gateway_bench.py                   # a quick check
    BENCH_GATEWAY_TRANSPORT=socketio python bench/gateway_bench.py
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.loadgen import Connection  # noqa: E402
from tests.support.net import free_port, wait_port  # noqa: E402
from tests.support.process import AuthsessionProcess, base_env  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402

CLIENTS = int(os.environ.get("BENCH_GATEWAY_CLIENTS", "10000"))
REVOCATIONS = int(os.environ.get("BENCH_GATEWAY_REVOCATIONS", "500"))
TRANSPORT = os.environ.get("BENCH_GATEWAY_TRANSPORT", "websocket")
CLIENT_PROCS = int(os.environ.get("BENCH_GATEWAY_CLIENT_PROCS", "4"))
SECONDS = float(os.environ.get("BENCH_SECONDS", "5"))
CONCURRENCY = int(os.environ.get("BENCH_CONCURRENCY", "32"))
# The HTTP comparison alternates this many short rounds per side (SECONDS in all per side).
ROUNDS = int(os.environ.get("BENCH_GATEWAY_ROUNDS", "10"))
# New connections per second, all client processes together.
CONNECT_RATE = float(os.environ.get("BENCH_GATEWAY_CONNECT_RATE", "1000"))
PREFIX, STREAM = "gateway:session:", "gateway:session_events"


def raise_file_limit() -> None:
    # Children inherit it: the gateway and the client processes each hold CLIENTS sockets.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < CLIENTS + 1000:
        print(f"warning: RLIMIT_NOFILE hard limit {hard} is below {CLIENTS + 1000}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


# --------------------------------------------------------------------------- logins
async def login_many(proc: AuthsessionProcess, count: int) -> list[dict[str, Any]]:
    run = os.getpid()
    pending = list(range(count))
    challenges: list[str] = []

    async def sender(connection: Connection) -> None:
        while pending:
            n = pending.pop()
            reply = await connection.request(
                "POST", "/api/v1/public/auth/send-email-code", {"email": f"g{run}-{n}@example.com"}
            )
            assert reply.status == 200, reply.body
            challenges.append(reply.json()["challenge_id"])

    connections = [await Connection.open("127.0.0.1", proc.public_port) for _ in range(32)]
    await asyncio.gather(*(sender(c) for c in connections))
    codes = {
        r["challenge_id"]: r["code"]
        for r in proc.log_records()
        if r.get("event") == "stub mail: login code"
    }
    sessions: list[dict[str, Any]] = []

    async def confirmer(connection: Connection) -> None:
        while challenges:
            challenge_id = challenges.pop()
            reply = await connection.request(
                "POST",
                "/api/v1/public/auth/confirm",
                {"challenge_id": challenge_id, "code": codes[challenge_id]},
            )
            assert reply.status == 200, reply.body
            sessions.append(reply.json())

    await asyncio.gather(*(confirmer(c) for c in connections))
    for connection in connections:
        await connection.close()
    return sessions


# --------------------------------------------------------------------------- gateway
def start_uvicorn(
    module: str, app_dir: Path, env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            f"{module}:app",
            "--app-dir",
            str(app_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
            "--backlog",
            "4096",
        ],
        env={**base_env(), **env},
    )
    wait_port(port, timeout=30)
    return proc, port


async def revocation_latency(
    proc: AuthsessionProcess, gateway_port: int, sessions: list[dict[str, Any]]
) -> dict[str, float]:
    url = f"http://127.0.0.1:{gateway_port}"
    if TRANSPORT == "websocket":
        url = url.replace("http://", "ws://")
    closes: dict[str, asyncio.Future[float]] = {}
    loop = asyncio.get_running_loop()
    ready = 0
    failures: list[str] = []
    retried: list[str] = []
    all_ready = asyncio.Event()
    chunks = [sessions[i::CLIENT_PROCS] for i in range(CLIENT_PROCS)]
    clients = []
    for chunk in chunks:
        client = await asyncio.create_subprocess_exec(
            sys.executable,
            str(Path(__file__).with_name("gateway_clients.py")),
            TRANSPORT,
            url,
            str(CONNECT_RATE / CLIENT_PROCS),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert client.stdin is not None
        client.stdin.write(
            json.dumps(
                [{k: s[k] for k in ("device_session_id", "session_token")} for s in chunk]
            ).encode()
        )
        await client.stdin.drain()
        client.stdin.close()
        clients.append(client)

    async def read_reports(client: asyncio.subprocess.Process) -> None:
        nonlocal ready
        assert client.stdout is not None
        async for raw in client.stdout:
            kind, *rest = raw.decode().split()
            if kind == "ready":
                ready += int(rest[0])
                if ready == len(sessions):
                    all_ready.set()
            elif kind == "retried":
                retried.append(rest[0])
            elif kind == "failed":
                failures.append(" ".join(rest))
                if len(failures) <= 3:
                    print("client failed:", " ".join(rest), flush=True)
            elif kind == "closed":
                closes.setdefault(rest[0], loop.create_future())
                if not closes[rest[0]].done():
                    closes[rest[0]].set_result(float(rest[1]))

    readers = [asyncio.create_task(read_reports(c)) for c in clients]
    started = time.monotonic()
    await asyncio.wait_for(all_ready.wait(), timeout=600)
    if failures:
        raise SystemExit(f"{len(failures)} clients could not connect")
    print(
        f"{len(sessions)} {TRANSPORT} clients connected in {time.monotonic() - started:.1f} s "
        f"({len(retried)} handshakes needed another try)"
    )
    await asyncio.sleep(1.0)

    internal = await Connection.open("127.0.0.1", proc.internal_port)
    after_return: list[float] = []
    after_send: list[float] = []
    for session in random.sample(sessions, REVOCATIONS):
        device_session_id = session["device_session_id"]
        closed = closes.setdefault(device_session_id, loop.create_future())
        sent = time.monotonic()
        reply = await internal.request(
            "POST", f"/api/v1/internal/sessions/{device_session_id}/revoke", {}
        )
        returned = time.monotonic()
        assert reply.status == 200, reply.body
        at = await asyncio.wait_for(closed, timeout=10)
        after_return.append((at - returned) * 1000)
        after_send.append((at - sent) * 1000)
        await asyncio.sleep(0.002)
    await internal.close()
    for client in clients:
        client.terminate()
    for client in clients:
        await client.wait()
    for reader in readers:
        reader.cancel()
    return {
        "revocations": len(after_return),
        "p50_ms": statistics.median(after_return),
        "p99_ms": percentile(after_return, 0.99),
        "max_ms": max(after_return),
        "closed_before_return": sum(1 for v in after_return if v < 0),
        "from_send_p50_ms": statistics.median(after_send),
        "from_send_p99_ms": percentile(after_send, 0.99),
    }


# --------------------------------------------------------------------------- HTTP ratio
async def http_rate(port: int, request: bytes, seconds: float) -> tuple[float, float]:
    """Requests per second on CONCURRENCY keep-alive connections, and our CPU share."""
    deadline = time.perf_counter() + seconds
    count = 0

    async def worker() -> None:
        nonlocal count
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while time.perf_counter() < deadline:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            count += 1
        writer.close()

    cpu, wall = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    wall = time.perf_counter() - wall
    return count / wall, (time.process_time() - cpu) / wall


async def http_ratio(port: int, token: str) -> dict[str, Any]:
    def request(path: str) -> bytes:
        # The same headers both ways, so that only the middleware's work differs.
        return (
            f"GET {path} HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {token}\r\n\r\n"
        ).encode()

    protected, unprotected = request("/protected/ping"), request("/open/ping")
    await http_rate(port, protected, 0.5)  # warm-up: the token's snapshot enters the cache
    rates: dict[str, list[float]] = {"protected": [], "unprotected": []}
    cpu_share = 0.0
    # Alternating rounds, so that a neighbour's load on a shared machine hits both; the
    # ratio is the median of the rounds' ratios.
    for _ in range(ROUNDS):
        for name, raw in (("unprotected", unprotected), ("protected", protected)):
            rps, share = await http_rate(port, raw, SECONDS / ROUNDS)
            rates[name].append(rps)
            cpu_share = max(cpu_share, share)
    ratios = [p / u for p, u in zip(rates["protected"], rates["unprotected"], strict=True)]
    return {
        "protected_rps": statistics.median(rates["protected"]),
        "unprotected_rps": statistics.median(rates["unprotected"]),
        "ratio": statistics.median(ratios),
        "round_ratios": [round(r, 3) for r in ratios],
        "loadgen_cpu": cpu_share,
    }


def main() -> int:
    raise_file_limit()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(
        f"gateway bench: {CLIENTS} {TRANSPORT} clients in {CLIENT_PROCS} processes, "
        f"{REVOCATIONS} revocations; HTTP {SECONDS:g} s per side in {ROUNDS} rounds, "
        f"{CONCURRENCY} connections"
    )
    with RedisServer() as redis_server:
        env = {
            "AUTHSESSION_REDIS_ADDR": redis_server.addr,
            "AUTHSESSION_LOG_FORMAT": "json",
            "AUTHSESSION_RESEND_COOLDOWN": "1ms",
        }
        gateway_env = {
            "REDIS_URL": redis_server.url,
            "GATEWAY_SESSION_KEY_PREFIX": PREFIX,
            "GATEWAY_SESSION_EVENTS_STREAM": STREAM,
        }
        with AuthsessionProcess.on_free_ports(env) as proc:
            proc.wait_ready()
            started = time.monotonic()
            sessions = asyncio.run(login_many(proc, CLIENTS + 1))
            print(f"{len(sessions)} logins in {time.monotonic() - started:.1f} s")
            spare = sessions.pop()

            module = f"{TRANSPORT}_gateway"
            gateway, port = start_uvicorn(module, ROOT / "examples", gateway_env)
            try:
                latency = asyncio.run(revocation_latency(proc, port, sessions))
            finally:
                gateway.terminate()
                gateway.wait(30)
            print(
                f"revoke -> close ({TRANSPORT}, {CLIENTS} clients): "
                f"p50 {latency['p50_ms']:.2f} ms  p99 {latency['p99_ms']:.2f} ms  "
                f"max {latency['max_ms']:.2f} ms  over {latency['revocations']} revocations "
                f"({latency['closed_before_return']} closes arrived before the call returned; "
                f"from the call's start: p50 {latency['from_send_p50_ms']:.2f} ms, "
                f"p99 {latency['from_send_p99_ms']:.2f} ms)   target p99 <= 5 ms",
                flush=True,
            )

            http_app, http_port = start_uvicorn("gateway_http_app", ROOT / "bench", gateway_env)
            try:
                ratio = asyncio.run(http_ratio(http_port, spare["session_token"]))
            finally:
                http_app.terminate()
                http_app.wait(30)
            print(
                f"HTTP behind the middleware (follower cache): {ratio['protected_rps']:.0f} req/s"
                f" vs {ratio['unprotected_rps']:.0f} req/s unprotected: ratio "
                f"{ratio['ratio']:.3f} (rounds {ratio['round_ratios']})   target >= 0.9   "
                f"(load generator CPU "
                f"{ratio['loadgen_cpu']:.0%} of a core)",
                flush=True,
            )
    print(json.dumps({"transport": TRANSPORT, "clients": CLIENTS, **latency, **ratio}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

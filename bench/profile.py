"""Where the service's CPU goes, per endpoint: py-spy samples of the real process.

For each scenario the process is loaded as in ``bench/run.py`` while ``py-spy record``
samples it; the stacks are then folded into categories (HTTP server, framework,
validation, our middleware, domain, Redis adapters, redis-py, telemetry, logging) and
printed as the share of samples. Needs ``py-spy`` on PATH (``pip install py-spy``).

    python bench/profile.py               # BENCH_SECONDS=6 per scenario
"""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.loadgen import Connection, Reply  # noqa: E402
from bench.run import codes_from, drive  # noqa: E402
from tests.support.process import AuthsessionProcess  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402

SECONDS = float(os.environ.get("BENCH_SECONDS", "6"))
# First match wins: the frame nearest the leaf that names a category.
CATEGORIES: list[tuple[str, Callable[[str], bool]]] = [
    ("logging", lambda f: "(logging/" in f or ("telemetry.py" in f and "format" in f)),
    ("telemetry (OTel)", lambda f: "(opentelemetry/" in f),
    ("redis-py client", lambda f: "(redis/" in f),
    ("redis adapters", lambda f: "(authsession/redis/" in f),
    ("domain", lambda f: "(authsession/domain/" in f),
    ("e-mail checks", lambda f: "(email_validator/" in f or "(idna/" in f),
    ("our middleware", lambda f: "(authsession/http/middleware.py" in f),
    ("response + validation", lambda f: "(pydantic" in f or "fastapi/encoders" in f),
    ("routing + framework", lambda f: "(fastapi/" in f or "(starlette/" in f),
    ("HTTP server + loop", lambda f: "(uvicorn/" in f or "(asyncio/" in f or "(uvloop/" in f),
]


def categorize(stack: str) -> str:
    """The category of the frame nearest the leaf that belongs to one; the event loop and
    the HTTP server only when nothing else is on the stack (the loop's own frames sit
    under every coroutine, the leaf of a Redis call is a socket write of asyncio)."""
    frames = stack.split(";")
    for frame in reversed(frames):
        for name, test in CATEGORIES[:-1]:
            if test(frame):
                return name
    return CATEGORIES[-1][0] if any(CATEGORIES[-1][1](f) for f in frames) else "other"


async def scenarios(proc: AuthsessionProcess, profile: Callable[[str], object]) -> None:
    run_id = os.getpid()

    async def send(client: Connection, n: int) -> Reply:
        return await client.request(
            "POST", "/api/v1/public/auth/send-email-code", {"email": f"p{run_id}-{n}@example.com"}
        )

    async def run(name: str, port: int, request: Callable[[Connection, int], object]) -> None:
        task = asyncio.create_task(drive(name, port, request))  # type: ignore[arg-type]
        await asyncio.sleep(0.5)
        await asyncio.to_thread(profile, name)
        await task

    await run("send-email-code", proc.public_port, send)
    pending = list(codes_from(proc).items())
    sessions: list[str] = []

    async def first(client: Connection, n: int) -> Reply:
        challenge_id, code = pending[n % len(pending)]
        reply = await client.request(
            "POST", "/api/v1/public/auth/confirm", {"challenge_id": challenge_id, "code": code}
        )
        if reply.status == 200 and reply.json()["created"]:
            sessions.append(reply.json()["device_session_id"])
        return reply

    await run("confirm", proc.public_port, first)

    async def get(client: Connection, n: int) -> Reply:
        sid = sessions[n % len(sessions)]
        return await client.request("GET", f"/api/v1/internal/sessions/{sid}")

    await run("internal get", proc.internal_port, get)

    async def revoke(client: Connection, n: int) -> Reply:
        sid = sessions[n % len(sessions)]
        return await client.request("POST", f"/api/v1/internal/sessions/{sid}/revoke", {})

    await run("internal revoke", proc.internal_port, revoke)


def main() -> int:
    if shutil.which("py-spy") is None:
        print("py-spy is not on PATH (pip install py-spy)")
        return 1
    out = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    tables: dict[str, collections.Counter[str]] = {}
    with RedisServer() as redis_server:
        env = {
            "AUTHSESSION_REDIS_ADDR": redis_server.addr,
            "AUTHSESSION_SEND_EMAIL_CODE_MIN_DURATION": "0",
            "AUTHSESSION_MAX_FAILED_CONFIRMS_PER_EMAIL": "1000000",
            "AUTHSESSION_PROJECTION_RECONCILE_INTERVAL": "0",
        }
        with AuthsessionProcess.on_free_ports(env) as proc:
            proc.wait_ready()

            def profile(name: str) -> None:
                path = out / f"{name.replace(' ', '_')}.txt"
                subprocess.run(
                    [
                        "py-spy",
                        "record",
                        "--pid",
                        str(proc.pid),
                        "--duration",
                        str(max(1, int(SECONDS - 1))),
                        "--rate",
                        "250",
                        "--format",
                        "raw",
                        "--output",
                        str(path),
                        "--nonblocking",
                    ],
                    check=True,
                    capture_output=True,
                )
                counter: collections.Counter[str] = collections.Counter()
                for line in path.read_text().splitlines():
                    stack, _, count = line.rpartition(" ")
                    if count.isdigit():
                        counter[categorize(stack)] += int(count)
                tables[name] = counter

            asyncio.run(scenarios(proc, profile))
    names = [name for name, _ in CATEGORIES] + ["other"]
    print(f"{'category (% of samples)':<26}" + "".join(f"{n:>17}" for n in tables))
    for category in names:
        row = "".join(
            f"{100 * c[category] / max(1, sum(c.values())):>17.1f}" for c in tables.values()
        )
        print(f"{category:<26}{row}")
    print("samples" + " " * 19 + "".join(f"{sum(c.values()):>17}" for c in tables.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

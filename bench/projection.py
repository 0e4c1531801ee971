"""Projection benchmarks: the reconciler on a large store, and the price of durability.

1. The reconciler: N sessions (default 100,000) written straight into a private
   redis-server (records, indexes, snapshots, as the service writes them), then one
   ``check`` pass and one ``repair`` pass after damaging 1 % of them. Prints the time,
   the Redis CPU it used and the Redis commands it sent per session.
2. Durability: the revoke script's write path (HSET + HINCRBY in one script, then the
   snapshot SET) with ``appendonly yes`` and ``appendfsync everysec`` against
   ``appendfsync always``, 32 concurrent clients: writes per second and p50/p99.

    python bench/projection.py            # BENCH_SESSIONS=100000 by default
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
import redis.asyncio  # noqa: E402

from authsession.domain import codes  # noqa: E402
from authsession.domain.model import Session  # noqa: E402
from authsession.domain.units import to_epoch_ms  # noqa: E402
from authsession.redis.base import Keys  # noqa: E402
from authsession.redis.projection import RedisProjectionPublisher  # noqa: E402
from authsession.redis.reconciler import ProjectionReconciler  # noqa: E402
from authsession.redis.sessions import session_fields  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402

SESSIONS = int(os.environ.get("BENCH_SESSIONS", "100000"))
KEYS = Keys("authsession:")
SNAPSHOT_PREFIX = "gateway:session:"


class Clock:
    def now(self) -> datetime:
        return datetime.now(UTC)


def populate(client: redis.Redis, count: int) -> list[Session]:
    now = datetime.now(UTC)
    sessions = []
    pipe = client.pipeline(transaction=False)
    for n in range(count):
        user_id = f"usr-{n // 3}"
        device_session_id = codes.new_session_id(user_id)
        session = Session(
            device_session_id=device_session_id,
            user_id=user_id,
            token_sha256="0" * 64,
            created_at=now,
            expires_at=now + timedelta(days=30),
            client_ip="203.0.113.7",
            user_agent="bench/1",
        )
        sessions.append(session)
        key = KEYS.session(device_session_id)
        pipe.hset(key, mapping=dict(session_fields(session)))
        pipe.zadd(KEYS.user_sessions(user_id), {device_session_id: to_epoch_ms(now)})
        pipe.set(
            SNAPSHOT_PREFIX + device_session_id,
            session.snapshot(now).to_json(),
            px=30 * 86_400_000,
        )
        if n % 2000 == 1999:
            pipe.execute()
    pipe.execute()
    return sessions


def redis_cpu(client: redis.Redis) -> float:
    info: dict[str, Any] = client.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def redis_calls(client: redis.Redis) -> int:
    stats: dict[str, Any] = client.info("commandstats")
    return sum(int(v["calls"]) for v in stats.values())


async def reconciler_figures() -> None:
    with RedisServer() as server:
        sync = server.client()
        started = time.perf_counter()
        sessions = populate(sync, SESSIONS)
        print(f"populated {SESSIONS} sessions in {time.perf_counter() - started:.1f}s")
        client = redis.asyncio.Redis(host=server.host, port=server.port, decode_responses=True)
        publisher = RedisProjectionPublisher(
            client, SNAPSHOT_PREFIX, "gateway:session_events", 100_000, keys=KEYS
        )

        async def publish(session: Session) -> None:
            await publisher.publish(session, datetime.now(UTC))

        reconciler = ProjectionReconciler(client, KEYS, publisher, publish, Clock())
        for label, repair in (("check (no drift)", False), ("repair (1% damaged)", True)):
            if repair:
                for session in sessions[::100]:
                    sync.delete(SNAPSHOT_PREFIX + session.device_session_id)
            sync.config_resetstat()
            cpu = redis_cpu(sync)
            started = time.perf_counter()
            report = await reconciler.run(repair=repair)
            elapsed = time.perf_counter() - started
            cpu_used = redis_cpu(sync) - cpu
            calls = redis_calls(sync)
            print(
                f"reconciler {label}: {elapsed:.2f}s for {report.sessions} records and "
                f"{report.snapshots} snapshots; Redis CPU {cpu_used:.2f}s "
                f"({100 * cpu_used / elapsed:.0f}% of one core while it ran); "
                f"{calls / max(1, report.sessions):.2f} Redis commands per session; "
                f"drift {report.drift}, repaired {report.repaired}"
            )
        await client.aclose()
        sync.close()


async def write_load(server: RedisServer, seconds: float = 3.0) -> tuple[float, float, float]:
    client = redis.asyncio.Redis(host=server.host, port=server.port, decode_responses=True)
    script = client.register_script(
        "redis.call('HSET', KEYS[1], 'status', 'revoked', 'revoked_at', ARGV[1]);"
        "redis.call('HINCRBY', KEYS[1], 'version', 1); return 1"
    )
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker(n: int) -> None:
        i = 0
        while time.perf_counter() < deadline:
            i += 1
            t0 = time.perf_counter()
            await script(keys=[f"authsession:session:{{t{n}}}:{i}"], args=["2030-01-01"])
            await client.set(f"gateway:session:{n}:{i}", "{}", px=60_000)
            latencies.append((time.perf_counter() - t0) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(worker(n) for n in range(32)))
    elapsed = time.perf_counter() - started
    await client.aclose()
    latencies.sort()
    return (
        len(latencies) / elapsed,
        statistics.median(latencies),
        latencies[int(len(latencies) * 0.99)],
    )


async def durability_figures() -> None:
    for policy in ("everysec", "always"):
        with RedisServer(["--appendonly", "yes", "--appendfsync", policy]) as server:
            rate, p50, p99 = await write_load(server)
            print(
                f"revoke writes, appendfsync {policy}: {rate:.0f}/s, "
                f"p50 {p50:.2f} ms, p99 {p99:.2f} ms"
            )


def main() -> None:
    asyncio.run(reconciler_figures())
    asyncio.run(durability_figures())


if __name__ == "__main__":
    main()

"""The reference floor: a bare FastAPI app doing one Redis ``SET`` per request.

Served like authsession (uvicorn, uvloop, httptools, one process, redis-py asyncio with
hiredis). Its throughput on the same machine, client and Redis is what the service is
compared with: the gap is the cost of our middleware, validation, Redis round trips,
telemetry and logging.

    python bench/floor_app.py PORT [REDIS_HOST:PORT]
"""

from __future__ import annotations

import sys

import redis.asyncio
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
host, _, port = (sys.argv[2] if len(sys.argv) > 2 else "127.0.0.1:6379").rpartition(":")
client = redis.asyncio.Redis(host=host, port=int(port), decode_responses=True)


class Body(BaseModel):
    """A request body of the same size class as send-email-code."""

    email: str


@app.post("/floor")
async def floor(body: Body) -> dict[str, str]:
    """Echo a constant (no Redis)."""
    return {"challenge_id": "x" * 32, "expires_at": "2026-01-01T00:00:00.000Z"}


@app.post("/redis1")
async def redis1(body: Body) -> dict[str, str]:
    """One Redis SET, then a constant."""
    await client.set(f"floor:{body.email}", "1", px=60_000)
    return {"challenge_id": "x" * 32, "expires_at": "2026-01-01T00:00:00.000Z"}


if __name__ == "__main__":
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=int(sys.argv[1]),
        http="httptools",
        loop="uvloop",
        log_level="warning",
        access_log=False,
    )

"""The reference floor: a bare FastAPI app with one JSON route, served like authsession.

Its throughput on the same machine and client is the ceiling the real service can
approach; the gap is the cost of our middleware, validation, Redis and logging.
"""

from __future__ import annotations

import sys

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)


class Body(BaseModel):
    """A request body of the same size class as send-email-code."""

    email: str


@app.post("/floor")
async def floor(body: Body) -> dict[str, str]:
    """Echo a constant."""
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

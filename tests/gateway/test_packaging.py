"""A gateway installs the library without the server's dependencies (CONTRACT §12, §10).

The package is installed from a copy of this repository into a fresh virtualenv with
only the ``gateway`` and ``socketio`` extras; there it must import, leave the server's
libraries out, and verify a token against a real redis-server.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import redis

from authsession.redis.projection import RedisProjectionPublisher
from tests.gateway.conftest import PREFIX, STREAM, async_client, issue
from tests.support.redis_server import RedisServer

REPO = Path(__file__).resolve().parents[2]
SERVER_ONLY = [
    "fastapi",
    "pydantic",
    "pydantic_settings",
    "httpx",
    "uvicorn",
    "fakeredis",
    "starlette",
    "opentelemetry",
]

SCRIPT = textwrap.dedent(
    """
    import asyncio, importlib.util, json, sys
    import redis.asyncio
    from authsession.gateway import EventFollower, SessionVerifier, SocketMetrics
    from authsession.gateway.socketio_adapter import SocketIOSessionGuard

    # Without opentelemetry-api the socket metrics are a no-op, not an ImportError.
    metrics = SocketMetrics("socketio")
    metrics.accepted(); metrics.rejected("revoked"); metrics.disconnected("client")

    async def main(port, tokens, server_only):
        client = redis.asyncio.Redis(port=port, decode_responses=True)
        follower = EventFollower(client)
        verifier = SessionVerifier(client, cache=follower)
        results = []
        for token in tokens:
            result = await verifier.verify(token)
            results.append(getattr(result, "user_id", None) or result.reason)
        await client.aclose()
        missing = [m for m in server_only if importlib.util.find_spec(m) is None]
        print(json.dumps({"results": results, "missing": missing}))

    asyncio.run(main(int(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])))
    """
)


def copy_sources(into: Path) -> Path:
    source = into / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(
        REPO / "authsession", source / "authsession", ignore=shutil.ignore_patterns("__pycache__")
    )
    return source


async def test_gateway_extra_installs_and_verifies_without_the_server(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path
) -> None:
    active, revoked = issue(), issue()
    client = async_client(redis_server)
    publisher = RedisProjectionPublisher(client, PREFIX, STREAM, 1000)
    await publisher.publish(active.session, datetime.now(UTC))
    await publisher.publish(revoked.session, datetime.now(UTC))
    await publisher.publish(revoked.revoked().session, datetime.now(UTC))
    await client.aclose()

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    source = copy_sources(tmp_path)
    # The running environment's pip installs into the fresh one (--python), from PyPI.
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--quiet",
            "--disable-pip-version-check",
            f"{source}[gateway,socketio]",
        ],
        capture_output=True,
        text=True,
        timeout=110,
    )
    assert install.returncode == 0, install.stdout + install.stderr

    run = subprocess.run(
        [
            str(python),
            "-c",
            SCRIPT,
            str(redis_server.port),
            json.dumps([active.token, revoked.token, "no.token"]),
            json.dumps(SERVER_ONLY),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout)
    assert report["results"] == [active.session.user_id, "revoked", "malformed_token"]
    assert report["missing"] == SERVER_ONLY

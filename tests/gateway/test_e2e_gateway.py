"""End to end: the real authsession process, a real redis-server, the example gateways
run by uvicorn, and real python-socketio and websocket clients.

Revocations, blocks and extensions go through the internal HTTP API of the process;
logins through send-email-code + confirm with the code from the stub mail log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import socketio
import websockets
from websockets.asyncio.client import ClientConnection

from tests.gateway.processes import GatewayProcess, Service, email, start_service
from tests.support.process import AuthsessionFactory
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.e2e

SETTLE = 0.3  # seconds given to anything that must NOT happen


def parse_ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


class SioClient:
    """A python-socketio client that records ``session_expired`` and its disconnect."""

    def __init__(self) -> None:
        self.client = socketio.AsyncClient(reconnection=False)
        self.expired: list[dict[str, Any]] = []
        self.expired_at: datetime | None = None
        self.refused: list[Any] = []
        self.gone = asyncio.Event()
        self.client.on("session_expired", self._expired)
        self.client.on("disconnect", self._disconnect)
        self.client.on("connect_error", self._refused)

    async def _expired(self, data: dict[str, Any]) -> None:
        self.expired.append(data)
        self.expired_at = datetime.now(UTC)

    async def _disconnect(self, *_: Any) -> None:
        self.gone.set()

    async def _refused(self, data: Any) -> None:
        self.refused.append(data)

    async def connect(self, gateway: GatewayProcess, token: str | None) -> None:
        await self.client.connect(
            gateway.url,
            auth={"token": token} if token is not None else None,
            transports=["websocket"],
            wait_timeout=5,
        )

    async def close(self) -> None:
        await self.client.shutdown()
        http = self.client.eio.http
        if http is not None and not http.closed:
            await http.close()

    async def refusal(self, gateway: GatewayProcess, token: str | None) -> str:
        try:
            with pytest.raises(socketio.exceptions.ConnectionError):
                await self.connect(gateway, token)
        finally:
            await self.close()
        assert len(self.refused) == 1
        message: str = self.refused[0]["message"]
        return message

    async def ended(self, timeout: float = 5.0) -> str:
        """The ``session_expired`` reason, once the client was also disconnected."""
        await asyncio.wait_for(self.gone.wait(), timeout)
        assert len(self.expired) == 1, self.expired
        reason: str = self.expired[0]["reason"]
        return reason

    async def still_connected(self) -> bool:
        if self.gone.is_set():
            return False
        answer = await self.client.call("whoami", timeout=5)
        return isinstance(answer, dict) and "user_id" in answer


async def ws_connect(gateway: GatewayProcess, token: str | None) -> ClientConnection:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    url = gateway.url.replace("http://", "ws://") + "/ws"
    return await websockets.connect(url, additional_headers=headers, open_timeout=5)


async def ws_closed(connection: ClientConnection, timeout: float = 5.0) -> tuple[int, str]:
    """Read until the gateway closes the socket: its close code and reason."""

    async def drain() -> None:
        while True:
            await connection.recv()

    with pytest.raises(websockets.ConnectionClosed):
        await asyncio.wait_for(drain(), timeout)
    assert connection.close_code is not None
    return connection.close_code, connection.close_reason or ""


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[Any]:
    started: list[GatewayProcess] = []

    def start(module: str, service: Service) -> GatewayProcess:
        gateway = GatewayProcess(module, service.gateway_env(), tmp_path / "gateways")
        started.append(gateway)
        if service not in services:
            services.append(service)
        return gateway.wait_ready()

    services: list[Service] = []
    yield start
    for service in services:
        service.close()
    for gateway in started:
        gateway.close()
        print(f"===== {gateway.module}:{gateway.port} =====\n{gateway.output()}")


@contextlib.asynccontextmanager
async def clients() -> AsyncIterator[list[Any]]:
    opened: list[Any] = []
    try:
        yield opened
    finally:
        for client in opened:
            with contextlib.suppress(Exception):
                if isinstance(client, SioClient):
                    await client.close()
                else:
                    await client.close()


async def test_revoke_and_block_reach_exactly_the_right_sockets_on_every_replica(
    authsession_process: AuthsessionFactory, redis_server: RedisServer, gateways: Any
) -> None:
    service = start_service(authsession_process, redis_server.addr)
    replica_a = gateways("socketio_gateway", service)
    replica_b = gateways("socketio_gateway", service)
    plain = gateways("websocket_gateway", service)
    jane, other = email("jane"), email("other")
    s1, s2, s3 = [await asyncio.to_thread(service.login, jane) for _ in range(3)]
    s4 = await asyncio.to_thread(service.login, other)
    assert len({s["user_id"] for s in (s1, s2, s3)}) == 1

    async with clients() as opened:
        s1_on_a, s1_on_b, s2_on_a, s4_on_b = SioClient(), SioClient(), SioClient(), SioClient()
        opened += [s1_on_a, s1_on_b, s2_on_a, s4_on_b]
        await s1_on_a.connect(replica_a, s1["session_token"])
        await s1_on_b.connect(replica_b, s1["session_token"])
        await s2_on_a.connect(replica_a, s2["session_token"])
        await s4_on_b.connect(replica_b, s4["session_token"])
        s3_socket = await ws_connect(plain, s3["session_token"])
        opened.append(s3_socket)
        hello = await s3_socket.recv()
        assert s3["device_session_id"] in str(hello)

        # Revoke one session: its clients on both replicas get session_expired and are
        # disconnected; the user's other sessions and the other user's stay.
        await asyncio.to_thread(
            service.internal_post, f"/sessions/{s1['device_session_id']}/revoke"
        )
        assert await s1_on_a.ended() == "revoked"
        assert await s1_on_b.ended() == "revoked"
        await asyncio.sleep(SETTLE)
        assert await s2_on_a.still_connected()
        assert await s4_on_b.still_connected()
        await s3_socket.send("ping")
        assert await s3_socket.recv() == "ping"

        # The revoked token is refused at the next handshake, with the reason.
        assert await SioClient().refusal(replica_b, s1["session_token"]) == "revoked"

        # Block the user: every socket of theirs closes, on Socket.IO and plain WebSocket.
        await asyncio.to_thread(service.internal_post, f"/users/{s1['user_id']}/block")
        assert await s2_on_a.ended() == "revoked"
        assert await ws_closed(s3_socket) == (4001, "revoked")
        await asyncio.sleep(SETTLE)
        assert await s4_on_b.still_connected()

    # Handshake rejections carry the contract's reasons.
    assert await SioClient().refusal(replica_a, None) == "missing_token"
    assert await SioClient().refusal(replica_a, "not-a-token") == "malformed_token"
    forged = s4["session_token"][:-4] + "AAAA"
    assert await SioClient().refusal(replica_a, forged) == "verification_failed"
    assert await ws_closed(await ws_connect(plain, None)) == (4001, "missing_token")


async def test_expiry_disconnects_at_expires_at_and_extend_moves_it(
    authsession_process: AuthsessionFactory, redis_server: RedisServer, gateways: Any
) -> None:
    service = start_service(authsession_process, redis_server.addr, SESSION_TTL="3s")
    gateway = gateways("socketio_gateway", service)
    plain = gateways("websocket_gateway", service)
    expiring, extended, on_ws = [
        await asyncio.to_thread(service.login, email(name)) for name in ("a", "b", "c")
    ]
    async with clients() as opened:
        expiring_client, extended_client = SioClient(), SioClient()
        opened += [expiring_client, extended_client]
        await expiring_client.connect(gateway, expiring["session_token"])
        await extended_client.connect(gateway, extended["session_token"])
        socket = await ws_connect(plain, on_ws["session_token"])
        opened.append(socket)
        await socket.recv()

        await asyncio.sleep(1.0)
        body = await asyncio.to_thread(
            service.internal_post,
            f"/sessions/{extended['device_session_id']}/extend",
            {"ttl": "3s"},
        )
        new_expiry = parse_ts(body["expires_at"])
        assert new_expiry > parse_ts(extended["expires_at"]) + timedelta(milliseconds=800)

        assert await expiring_client.ended() == "expired"
        assert expiring_client.expired_at is not None
        expires_at = parse_ts(expiring["expires_at"])
        assert expires_at <= expiring_client.expired_at < expires_at + timedelta(seconds=1)
        assert await ws_closed(socket) == (4001, "expired")
        # Not at its first expires_at: the extension moved the timer.
        assert not extended_client.gone.is_set()
        assert await extended_client.ended() == "expired"
        assert extended_client.expired_at is not None
        assert new_expiry <= extended_client.expired_at < new_expiry + timedelta(seconds=1)

    assert await SioClient().refusal(gateway, extended["session_token"]) in {
        "expired",
        "unknown_session",
    }


async def test_redis_restart_resyncs_and_accepts_nothing_revoked_meanwhile(
    authsession_process: AuthsessionFactory, gateways: Any
) -> None:
    # Redis with an fsync'd append-only file: a crash and restart keeps the data.
    with RedisServer(["--appendonly", "yes", "--appendfsync", "always"]) as redis_server:
        service = start_service(
            authsession_process, redis_server.addr, REDIS_OPERATION_TIMEOUT="300ms"
        )
        gateway = gateways("socketio_gateway", service)
        revoked, kept = [await asyncio.to_thread(service.login, email(n)) for n in ("r", "k")]
        async with clients() as opened:
            revoked_client, kept_client = SioClient(), SioClient()
            opened += [revoked_client, kept_client]
            await revoked_client.connect(gateway, revoked["session_token"])
            await kept_client.connect(gateway, kept["session_token"])

            redis_server.kill()
            await asyncio.sleep(0.5)
            redis_server.restart()
            # Revoked while the gateway is still reconnecting.
            await asyncio.to_thread(
                service.internal_post,
                f"/sessions/{revoked['device_session_id']}/revoke",
                until_ok=10,
            )
            assert await revoked_client.ended(timeout=10) == "revoked"
            assert await kept_client.still_connected()
            assert await SioClient().refusal(gateway, revoked["session_token"]) == "revoked"

            # Restarted empty (the data lost): the session is gone, its socket closes
            # and its token is refused.
            with redis_server.client() as admin:
                directory = Path(admin.config_get("dir")["dir"])
            redis_server.kill()
            for entry in directory.iterdir():
                if entry.name != "redis.log":
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            redis_server.restart()
            assert await kept_client.ended(timeout=10) == "unknown_session"
            assert await SioClient().refusal(gateway, kept["session_token"]) == "unknown_session"

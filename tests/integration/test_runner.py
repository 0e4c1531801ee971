"""The runner's own rules, in process: a listener that dies takes the process down."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from authsession import runner
from authsession.settings import MEMORY_STORE, Settings
from authsession.wiring import build_core
from tests.support.net import free_port


async def test_a_listener_ending_without_a_signal_stops_the_other_and_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = Settings(  # type: ignore[call-arg]
        REDIS_ADDR=MEMORY_STORE,
        PUBLIC_HTTP_ADDR=f"127.0.0.1:{free_port()}",
        INTERNAL_HTTP_ADDR=f"127.0.0.1:{free_port()}",
    )
    core = build_core(settings)
    original = runner._Server.serve

    async def serve(self: runner._Server, sockets: list[socket.socket] | None = None) -> Any:
        if self.config.app is not None and getattr(self.config.app, "title", "").startswith(
            "authsession internal"
        ):
            await asyncio.sleep(0.2)
            raise RuntimeError("listener crashed")
        return await original(self, sockets=sockets)

    monkeypatch.setattr(runner._Server, "serve", serve)
    signals = runner._Signals()
    try:
        status = await asyncio.wait_for(runner._serve(core, signals), timeout=10)
    finally:
        await core.aclose()
    assert status == 1
    assert all(server.should_exit for server in signals.servers)

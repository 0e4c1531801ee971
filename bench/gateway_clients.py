"""Client process of bench/gateway_bench.py: holds WebSocket or Socket.IO connections.

Reads ``[{"device_session_id", "session_token"}, ...]`` as JSON on stdin, opens one
connection per session to the gateway at ``argv[2]`` (``websocket`` or ``socketio`` in
``argv[1]``) at ``argv[3]`` connections per second, prints ``ready <n>`` once all are
open, then one line
``closed <device_session_id> <CLOCK_MONOTONIC seconds>`` per connection the gateway
closes (CLOCK_MONOTONIC is one clock for every process of the machine).
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from typing import Any

_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def report(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def websocket_client(url: str, session: dict[str, str], opened: asyncio.Queue[Any]) -> None:
    import websockets

    headers = {"Authorization": f"Bearer {session['session_token']}"}
    async with websockets.connect(
        url + "/ws", additional_headers=headers, open_timeout=60, ping_interval=None
    ) as connection:
        await connection.recv()  # the greeting: admitted
        await opened.put(None)
        try:
            while True:
                await connection.recv()
        except websockets.ConnectionClosed:
            report(f"closed {session['device_session_id']} {time.monotonic():.6f}")


async def socketio_client(url: str, session: dict[str, str], opened: asyncio.Queue[Any]) -> None:
    import socketio

    client = socketio.AsyncClient(reconnection=False)
    done = asyncio.Event()

    async def expired(_data: Any) -> None:
        report(f"closed {session['device_session_id']} {time.monotonic():.6f}")
        done.set()

    client.on("session_expired", expired)
    await client.connect(
        url, auth={"token": session["session_token"]}, transports=["websocket"], wait_timeout=60
    )
    await opened.put(None)
    await done.wait()
    await client.disconnect()


async def main() -> None:
    kind, url = sys.argv[1], sys.argv[2]
    sessions: list[dict[str, str]] = json.loads(sys.stdin.read())
    opened: asyncio.Queue[Any] = asyncio.Queue()
    client = websocket_client if kind == "websocket" else socketio_client

    async def guarded(session: dict[str, str]) -> None:
        # A refused handshake is tried again, as a real client reconnects (a gateway on
        # a loaded machine may answer internal_error when Redis is slow to read); the
        # bench counts those retries.
        for attempt in range(1, 4):
            try:
                await client(url, session, opened)
                return
            except Exception as exc:
                if attempt < 3:
                    report(f"retried {session['device_session_id']}")
                    await asyncio.sleep(0.2 * attempt)
                    continue
                report(f"failed {session['device_session_id']} {type(exc).__name__}:{exc!s:.200}")
                await opened.put(None)

    # Paced like clients arriving over time (argv[3] connections per second): a burst of
    # thousands at once would only measure the handshake queue.
    rate = float(sys.argv[3])
    tasks = []
    started = time.monotonic()
    for index, session in enumerate(sessions):
        tasks.append(asyncio.create_task(guarded(session)))
        delay = started + (index + 1) / rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
    for _ in sessions:
        await opened.get()
    report(f"ready {len(sessions)}")
    await asyncio.gather(*tasks, return_exceptions=True)


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(main())

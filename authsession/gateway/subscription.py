"""A live connection's interest in one device session, and how that session ended."""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable, Generator
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

from authsession.projection_codec import SessionSnapshot

log = logging.getLogger("authsession.gateway")

EndReason: TypeAlias = Literal[
    "revoked",
    "expired",
    "unknown_session",
    "verification_failed",
    "internal_error",
]
"""Why a subscribed session ended; the rejection reasons a new handshake would get."""

OnEnd: TypeAlias = Callable[["SessionEnd"], "Awaitable[Any] | None"]


@dataclass(frozen=True, slots=True)
class SessionEnd:
    """How a subscribed session ended.

    ``reason`` is what a client is told (``revoked``, ``expired``, ``unknown_session`` when
    the snapshot disappeared, ``verification_failed`` when it no longer matches the
    registration, ``internal_error`` when the follower lost Redis for longer than its
    grace); ``revoke_reason`` is the snapshot's own (``user_blocked``, ``logout``,
    ``source_lost``, ...), for logs and metrics.
    """

    reason: EndReason
    revoke_reason: str | None = None
    snapshot: SessionSnapshot | None = None


class Subscription:
    """Handle returned by :meth:`EventFollower.register`: await it, or give a callback.

    ``await subscription`` (or :meth:`wait`) returns the :class:`SessionEnd` once the
    session is revoked, expires or disappears. :meth:`cancel` ends the interest (call it
    when the connection closes for any other reason); a cancelled subscription never fires.
    """

    __slots__ = ("_callback", "_cancel", "_future", "_tasks", "device_session_id", "user_id")

    def __init__(
        self,
        device_session_id: str,
        user_id: str,
        callback: OnEnd | None,
        cancel: Callable[[Subscription], None],
    ) -> None:
        self.device_session_id = device_session_id
        self.user_id = user_id
        self._callback = callback
        self._cancel = cancel
        self._future: asyncio.Future[SessionEnd] = asyncio.get_running_loop().create_future()
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def done(self) -> bool:
        """Whether the session ended (or the subscription was cancelled)."""
        return self._future.done()

    @property
    def end(self) -> SessionEnd | None:
        """How the session ended, once it has."""
        if self._future.done() and not self._future.cancelled():
            return self._future.result()
        return None

    async def wait(self) -> SessionEnd:
        """Wait until the session ends."""
        return await asyncio.shield(self._future)

    def __await__(self) -> Generator[Any, None, SessionEnd]:
        return self.wait().__await__()

    def set_callback(self, callback: OnEnd) -> None:
        """Call ``callback`` when the session ends (at once if it already has)."""
        self._callback = callback
        end = self.end
        if end is not None:
            self._call(end)

    def cancel(self) -> None:
        """Stop watching the session; nothing fires afterwards."""
        if not self._future.done():
            self._future.cancel()
        self._cancel(self)

    def _fire(self, end: SessionEnd) -> bool:
        if self._future.done():
            return False
        self._future.set_result(end)
        self._call(end)
        return True

    def _call(self, end: SessionEnd) -> None:
        if self._callback is None:
            return
        try:
            result = self._callback(end)
        except Exception:
            log.exception("gateway subscription callback failed")
            return
        if inspect.isawaitable(result):
            task = asyncio.ensure_future(result)
            self._tasks.add(task)
            task.add_done_callback(self._callback_done)

    def _callback_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("gateway subscription callback failed", exc_info=task.exception())

    def __repr__(self) -> str:
        return f"<Subscription {self.device_session_id} done={self.done}>"

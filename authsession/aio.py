"""Cancellation that always arrives.

On Python 3.11, ``asyncio.wait_for`` drops a cancellation that arrives in the same loop
iteration as the operation it guards completes (CPython gh-86296, fixed in 3.12).
redis-py sends every command through ``wait_for``, so a single ``Task.cancel()`` of a
task talking to Redis is now and then lost, and the task goes on as if nothing happened:
a follower that does not stop, a startup check that outlives its signal. Stopping here
therefore never relies on one ``cancel()``: it repeats it until the task has ended.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

# How long a cancelled task gets before it is cancelled again.
RECANCEL_EVERY = 0.05


class Stopped(Exception):
    """The stop event was set before the operation completed; the operation was cancelled."""


async def cancel_and_wait(task: asyncio.Future[Any], *, every: float = RECANCEL_EVERY) -> None:
    """Cancel ``task`` and return once it has ended, cancelling again while it runs on.

    The task's own outcome (result, exception, cancellation) is left on it, retrieved so
    that asyncio does not report it as never retrieved.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=every)
    if not task.cancelled():
        task.exception()


async def unless_stopped(operation: Coroutine[Any, Any, T], stopped: asyncio.Event) -> T:
    """The result of ``operation``; :class:`Stopped` if ``stopped`` is set before it ends.

    Setting the event (from a signal handler, say) stops the operation at once, whatever
    it awaits; the caller's own task is never cancelled for it. A stop that comes with
    the operation's completion still counts as a stop.
    """
    task = asyncio.ensure_future(operation)
    waiter = asyncio.ensure_future(stopped.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if stopped.is_set() or not task.done():
            await cancel_and_wait(task)
    if stopped.is_set():
        raise Stopped
    return task.result()

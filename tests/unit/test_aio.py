"""Stopping a task whose first cancellation gets lost (Python 3.11's wait_for race)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from authsession.aio import Stopped, cancel_and_wait, unless_stopped


async def _swallows_first_cancel(cleaned: list[str]) -> str:
    """What redis-py's ``wait_for`` does now and then: the first cancel() is dropped."""
    with contextlib.suppress(asyncio.CancelledError):  # lost, as in the race
        await asyncio.sleep(30)
    try:
        await asyncio.sleep(30)
    finally:
        cleaned.append("done")
    return "never"


async def test_a_lost_cancellation_is_repeated_until_the_task_ends() -> None:
    cleaned: list[str] = []
    task = asyncio.create_task(_swallows_first_cancel(cleaned))
    await asyncio.sleep(0)

    await asyncio.wait_for(cancel_and_wait(task, every=0.01), timeout=2)

    assert task.cancelled()
    assert cleaned == ["done"]


async def test_one_cancel_alone_would_have_left_it_running() -> None:
    # The premise of the helper: without it the task runs on.
    task = asyncio.create_task(_swallows_first_cancel([]))
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.sleep(0.05)
    assert not task.done()
    await cancel_and_wait(task, every=0.01)


async def test_the_outcome_of_a_task_that_ends_on_its_own_is_retrieved() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0)
    await cancel_and_wait(task)
    assert isinstance(task.exception(), RuntimeError)


async def test_unless_stopped_returns_the_result_without_a_stop() -> None:
    async def answer() -> int:
        await asyncio.sleep(0.01)
        return 42

    assert await unless_stopped(answer(), asyncio.Event()) == 42


async def test_unless_stopped_raises_the_operations_own_error() -> None:
    async def fails() -> None:
        raise LookupError("no")

    with pytest.raises(LookupError):
        await unless_stopped(fails(), asyncio.Event())


async def test_a_stop_ends_even_an_operation_that_drops_the_first_cancel() -> None:
    stopped = asyncio.Event()
    cleaned: list[str] = []
    asyncio.get_running_loop().call_later(0.02, stopped.set)

    with pytest.raises(Stopped):
        await asyncio.wait_for(unless_stopped(_swallows_first_cancel(cleaned), stopped), 2)

    assert cleaned == ["done"]
    assert asyncio.current_task() is not None
    assert not asyncio.current_task().cancelling()  # type: ignore[union-attr]


async def test_a_stop_already_set_wins_over_a_finished_operation() -> None:
    stopped = asyncio.Event()
    stopped.set()

    async def instant() -> int:
        return 1

    with pytest.raises(Stopped):
        await unless_stopped(instant(), stopped)

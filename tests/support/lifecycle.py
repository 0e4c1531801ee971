"""What every started test resource shares: ``with`` support and cleanup at exit."""

from __future__ import annotations

import atexit
import contextlib
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

T = TypeVar("T")


class Managed:
    """A resource used as ``with thing.start()`` or ``with thing``: stopped on the way out."""

    def start(self) -> Self:
        """Start the resource and return it."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop the resource (idempotent)."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class ExitCleanup(Generic[T]):
    """The resources still running, stopped when the interpreter exits.

    A test that crashes or is interrupted then leaves no stray processes behind.
    """

    def __init__(self, stop: Callable[[T], None]) -> None:
        self._stop = stop
        self._live: dict[int, T] = {}  # by identity
        self._lock = threading.Lock()
        atexit.register(self.stop_all)

    def add(self, resource: T) -> None:
        """Remember a started resource."""
        with self._lock:
            self._live[id(resource)] = resource

    def discard(self, resource: T) -> None:
        """Forget a stopped resource."""
        with self._lock:
            self._live.pop(id(resource), None)

    def stop_all(self) -> None:
        """Stop whatever is still remembered, ignoring failures."""
        with self._lock:
            live = list(self._live.values())
        for resource in live:
            with contextlib.suppress(Exception):
                self._stop(resource)


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``condition`` until it returns something true and return that (fail at ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)

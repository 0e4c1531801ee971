"""The HTTP/1.1 server protocol of both listeners: uvicorn's httptools protocol, hardened.

uvicorn closes idle keep-alive connections, but nothing bounds a connection that never
finishes its request: an idle socket, headers sent a byte at a time, or a body that was
announced and never arrives each hold a file descriptor for as long as the client likes.
This subclass adds, per connection:

- a **request deadline** (``AUTHSESSION_HTTP_HEADER_TIMEOUT``): from the moment a
  connection opens, or the first byte of a following request on a kept-alive one, the
  request line, the headers and the body they announce must arrive within it, or the
  connection is closed;
- a **connection limit** (``AUTHSESSION_HTTP_MAX_CONNECTIONS`` per listener): when the
  listener is full, a new connection takes the place of the one that has waited longest
  (at least :data:`EVICTABLE_AFTER_SECONDS`) for its client to send a request, so slow
  or idle clients cannot keep legitimate ones out; when every connection is busy with a
  request or younger than that, the new one is answered ``503 service_unavailable`` at
  once and closed. Those
  answers hold a descriptor for a moment too, so at most :func:`refusal_slots` of them
  are in flight; beyond that a new connection is reset at once. A listener therefore
  never holds more than :func:`descriptors_per_listener` sockets;
- a **head limit**: a request line and headers over 64 KiB are ``400 invalid_request``;
- the contract's JSON error body, ``Cache-Control: no-store`` and ``X-Request-ID`` on the
  errors the server itself writes (a malformed request), instead of uvicorn's plain text.

uvicorn's keep-alive timer stays as it is (``AUTHSESSION_HTTP_KEEPALIVE_TIMEOUT``).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from authsession.domain import errors as e
from authsession.http.errors import Overloaded, wire_response
from authsession.http.middleware import SANE_REQUEST_ID

log = logging.getLogger("authsession.http.server")

MAX_HEAD_BYTES = 64 * 1024
# How long a refused connection may stay open to read what its client still sends, so
# that closing it does not reset the connection before the client has read the 503.
REFUSAL_LINGER_SECONDS = 1.0
REFUSAL_LOG_INTERVAL_SECONDS = 10.0
# A connection that has waited this long for its client's request (an idle socket, slow
# headers or body, an idle kept-alive one) may be closed to make room for a new one; the
# oldest goes first. A legitimate client sends its request within half a round trip of
# connecting and is then busy, so an attacker would have to replace the whole listener's
# connections within that time (max_connections / 50 ms, 20,000 a second at the default)
# to push it out, while slow and idle sockets are always the oldest.
EVICTABLE_AFTER_SECONDS = 0.05


def refusal_slots(max_connections: int) -> int:
    """How many 503 answers to refused connections may be in flight at once."""
    return max(1, max_connections // 8)


def descriptors_per_listener(max_connections: int) -> int:
    """The most client sockets one listener holds: served ones plus refusals in flight."""
    return max_connections + refusal_slots(max_connections)


class _HeadTooLarge(Exception):
    """Raised from a parser callback: httptools turns it into a parser error."""


@dataclass
class ConnectionLimits:
    """The limits of one listener, shared by all its connections."""

    listener: str
    header_timeout: float
    max_connections: int
    refused: int = 0
    refusing: int = 0
    evicted: int = 0
    _last_refusal_log: float = field(default=0.0, repr=False)

    @property
    def can_answer_refusal(self) -> bool:
        """Whether one more refused connection may get its 503 (else it is reset)."""
        return self.refusing < refusal_slots(self.max_connections)

    def note_refusal(self) -> None:
        """Count a refused connection; log at most one line per interval."""
        self.refused += 1
        now = time.monotonic()
        if now - self._last_refusal_log >= REFUSAL_LOG_INTERVAL_SECONDS:
            self._last_refusal_log = now
            log.warning(
                "connection limit reached; new connections answered 503",
                extra={
                    "listener": self.listener,
                    "max_connections": self.max_connections,
                    "refused_total": self.refused,
                },
            )


class ContractHttpProtocol(HttpToolsProtocol):
    """One HTTP/1.1 connection with the deadlines and error bodies described above.

    uvicorn instantiates the class it is given, so each listener gets a subclass that
    carries its limits (:meth:`for_listener`).
    """

    limits: ConnectionLimits

    @classmethod
    def for_listener(cls, limits: ConnectionLimits) -> type[ContractHttpProtocol]:
        """The protocol class of one listener."""
        return type(f"{cls.__name__}_{limits.listener}", (cls,), {"limits": limits})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._receiving = False
        self._head_bytes = 0
        self._refused = False
        self._answering_refusal = False
        self._waiting_since = self.loop.time()

    # ------------------------------------------------------------------ connection
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Accept the connection, or answer 503 when the listener is full."""
        if len(self.connections) >= self.limits.max_connections and not self._evict_one():
            self._refuse(transport)
            return
        super().connection_made(transport)
        self._arm_deadline()

    def _evict_one(self) -> bool:
        """Close the connection that has waited longest for its request, if any may go."""
        now = self.loop.time()
        oldest: ContractHttpProtocol | None = None
        for connection in self.connections:
            if (
                isinstance(connection, ContractHttpProtocol)
                and connection._evictable(now)
                and (oldest is None or connection._waiting_since < oldest._waiting_since)
            ):
                oldest = connection
        if oldest is None:
            return False
        self.limits.evicted += 1
        log.debug(
            "closing a connection that waited longest for its request, to admit a new one",
            extra={"listener": self.limits.listener, "evicted_total": self.limits.evicted},
        )
        oldest._cancel_deadline()
        oldest.transport.close()
        return True

    def _evictable(self, now: float) -> bool:
        if self._refused or self.transport is None or self.transport.is_closing():
            return False
        if now - self._waiting_since < EVICTABLE_AFTER_SECONDS:
            return False
        # Owes us (part of) a request, or idles kept-alive between requests.
        return self._deadline is not None or (self._idle() and not self.pipeline)

    def _refuse(self, transport: asyncio.Transport) -> None:
        self._refused = True
        self.transport = transport
        self.limits.note_refusal()
        if not self.limits.can_answer_refusal:
            transport.abort()  # the descriptor is freed at once
            return
        self.limits.refusing += 1
        self._answering_refusal = True
        transport.write(wire_response(Overloaded(), secrets.token_hex(16)))
        if transport.can_write_eof():
            transport.write_eof()
        self._deadline = self.loop.call_later(REFUSAL_LINGER_SECONDS, transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        """Drop the deadline with the connection."""
        self._cancel_deadline()
        if self._refused:
            if self._answering_refusal:
                self._answering_refusal = False
                self.limits.refusing -= 1
            return
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Feed the parser; the first byte of a new request starts its deadline."""
        if self._refused:
            return  # read and dropped, see REFUSAL_LINGER_SECONDS
        if self._deadline is None and not self._receiving and self._idle():
            self._arm_deadline()
        super().data_received(data)

    def shutdown(self) -> None:
        """Graceful stop (uvicorn's), which also closes refused connections."""
        if self._refused:
            self.transport.close()
            return
        super().shutdown()

    def pause_writing(self) -> None:
        """Flow control (a refused connection has none: its one write is small)."""
        if not self._refused:
            super().pause_writing()

    def resume_writing(self) -> None:
        """Flow control (a refused connection has none: its one write is small)."""
        if not self._refused:
            super().resume_writing()

    # ------------------------------------------------------------------ parser callbacks
    def on_message_begin(self) -> None:
        """A request starts: its deadline runs (already, if the connection just opened)."""
        super().on_message_begin()
        self._receiving = True
        self._head_bytes = 0
        if self._deadline is None:
            self._arm_deadline()

    def on_url(self, url: bytes) -> None:
        """Count the request line toward the head limit."""
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        """Count each header toward the head limit."""
        self._count_head(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_response_complete(self) -> None:
        """The answer went out: an idle kept-alive connection waits from now."""
        super().on_response_complete()
        self._waiting_since = self.loop.time()

    def on_message_complete(self) -> None:
        """The whole request (headers and body) arrived in time."""
        super().on_message_complete()
        self._receiving = False
        self._cancel_deadline()

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > MAX_HEAD_BYTES:
            raise _HeadTooLarge

    # ------------------------------------------------------------------ errors
    def send_400_response(self, msg: str) -> None:
        """A malformed request: the contract's 400 body instead of uvicorn's plain text."""
        self._cancel_deadline()
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started:
                # A response is already on the wire: no room for another one.
                self.transport.close()
                return
            # A malformed body under a running request: the app sees the client gone
            # (its writes are dropped) and the 400 below is the answer.
            cycle.disconnected = True
            cycle.message_event.set()
        message = (
            "the request line and headers exceed 64 KiB"
            if self._head_bytes > MAX_HEAD_BYTES
            else "malformed HTTP request"
        )
        response = wire_response(e.InvalidRequest(message), self._request_id())
        self.transport.write(response)
        self.transport.close()

    def _request_id(self) -> str:
        for name, value in self.headers or ():
            if name == b"x-request-id":
                text = value.decode("latin-1")
                if SANE_REQUEST_ID.fullmatch(text):
                    return text
        return secrets.token_hex(16)

    def _unsupported_upgrade_warning(self) -> None:
        # Neither listener speaks WebSocket; an Upgrade header is served as plain HTTP.
        log.debug("upgrade request served as plain HTTP")

    # ------------------------------------------------------------------ deadline
    def _idle(self) -> bool:
        return self.cycle is None or bool(self.cycle.response_complete)

    def _arm_deadline(self) -> None:
        self._cancel_deadline()
        self._waiting_since = self.loop.time()
        self._deadline = self.loop.call_later(self.limits.header_timeout, self._deadline_passed)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _deadline_passed(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self.pipeline:
            # The request is complete on our side but queued behind a slow response:
            # the wait is the server's, not the client's.
            self._arm_deadline()
            return
        log.debug(
            "closing a connection that did not send its request in time",
            extra={"listener": self.limits.listener},
        )
        self.transport.close()

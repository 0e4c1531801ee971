"""Follows the gateway event stream into a local, version-ordered view (CONTRACT §9, §10).

The follower reads ``GATEWAY_SESSION_EVENTS_STREAM`` with ``XREAD`` from a position and
keeps the newest snapshot it has seen per device session: an event is applied only if its
version is higher than the one held, because publications from several replicas can
reach the stream out of order. The stream is capped (``XADD MAXLEN ~``); when trimming
has removed entries the follower had not read, it rebuilds its view from the snapshot
keys (``SCAN`` + ``GET``, same version rule) and continues from the stream's end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, TypeAlias

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from authsession.gateway.snapshot import SessionSnapshot, SnapshotError

log = logging.getLogger("authsession.gateway")

StreamId: TypeAlias = tuple[int, int]

_STREAM_ID = re.compile(r"^([0-9]+)(?:-([0-9]+))?$")
_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")
_ERRORS = (RedisError, OSError, TimeoutError)


def parse_stream_id(text: str | bytes) -> StreamId:
    """``"<ms>-<seq>"`` (or ``"<ms>"``) as a comparable pair."""
    value = text.decode("ascii") if isinstance(text, bytes) else text
    match = _STREAM_ID.fullmatch(value)
    if match is None:
        raise ValueError(f"not a stream id: {value!r}")
    return int(match.group(1)), int(match.group(2) or 0)


def format_stream_id(stream_id: StreamId) -> str:
    """The ``"<ms>-<seq>"`` form Redis takes."""
    return f"{stream_id[0]}-{stream_id[1]}"


def trimmed_past(info: Mapping[str, Any], position: StreamId) -> bool:
    """Whether entries after ``position`` may be gone, judged from an ``XINFO STREAM`` reply.

    Trimming removes the oldest entries, so if the first entry left is newer than the
    position, entries between the two may have been cut: assume they were (a needless
    resync costs time, a missed revocation is wrong). ``XDEL`` can also remove entries in
    the middle; Redis 7 reports the highest id it deleted (trimming does not move it).
    """
    added, length = info.get("entries-added"), info.get("length")
    if added is not None and length is not None and int(added) == int(length):
        return False  # Redis >= 7 counts appends: nothing was ever removed
    deleted = info.get("max-deleted-entry-id")
    if deleted is not None and parse_stream_id(deleted) > position:
        return True
    first = info.get("first-entry")
    if first and first[0] is not None:
        return parse_stream_id(first[0]) > position
    # An empty stream: anything generated after the position has been removed.
    return parse_stream_id(info["last-generated-id"]) > position


class EventFollower:
    """Tails the session event stream and holds the newest snapshot per device session."""

    def __init__(
        self,
        redis: Redis,
        *,
        stream: str = "gateway:session_events",
        key_prefix: str = "gateway:session:",
        start_id: str = "$",
        block_ms: int = 2000,
        count: int = 500,
        max_lag: float = 1.0,
        clock: Callable[[], datetime] | None = None,
        prune_interval: float = 60.0,
        retry_delays: tuple[float, float] = (0.1, 2.0),
    ) -> None:
        # BLOCK 0 waits forever: stop() and the freshness bound both need reads to end.
        if block_ms <= 0:
            raise ValueError("block_ms must be positive")
        if count <= 0:
            raise ValueError("count must be positive")
        self._redis = redis
        self._stream = stream
        self._key_prefix = key_prefix
        self._position: StreamId | None = None if start_id == "$" else parse_stream_id(start_id)
        self._block_ms = block_ms
        self._count = count
        self._max_lag = max_lag
        self._clock = clock or _utc_now
        self._prune_interval = prune_interval
        self._retry_delays = retry_delays
        self._sessions: dict[str, SessionSnapshot] = {}
        self._stopping = asyncio.Event()
        self._read_started: float | None = None
        self._healthy = False
        self._last_prune = time.monotonic()
        self.resyncs = 0
        """Times the view was rebuilt from the snapshot keys."""
        self.applied = 0
        """Snapshots that replaced (or created) an entry of the view."""
        self.ignored = 0
        """Events or snapshots left out: not newer than the one held, or unreadable."""

    # ------------------------------------------------------------------ the local view
    @property
    def position(self) -> str | None:
        """Id of the last stream entry taken into account (None until ``$`` is resolved)."""
        return format_stream_id(self._position) if self._position is not None else None

    def snapshot(self, device_session_id: str) -> SessionSnapshot | None:
        """The newest snapshot seen for a session, however old the view is."""
        return self._sessions.get(device_session_id)

    def snapshots(self) -> dict[str, SessionSnapshot]:
        """A copy of the whole view."""
        return dict(self._sessions)

    @property
    def fresh(self) -> bool:
        """Whether the view lags the stream by at most about ``max_lag`` seconds."""
        started = self._read_started
        if not self._healthy or started is None:
            return False
        # A blocked XREAD returns as soon as an entry arrives, so while a read is pending
        # for less than its block time plus the allowed lag, nothing is being missed.
        return time.monotonic() - started <= self._block_ms / 1000 + self._max_lag

    def cached(self, device_session_id: str) -> SessionSnapshot | None:
        """The view's snapshot when a verifier may trust it without reading Redis."""
        snapshot = self._sessions.get(device_session_id)
        if snapshot is None:
            return None
        # A revocation is permanent (CONTRACT §6), so a revoked snapshot stays true
        # however stale the view is; an active one only while the view keeps up.
        if not snapshot.active or self.fresh:
            return snapshot
        return None

    # ------------------------------------------------------------------ reading
    async def poll(self) -> list[SessionSnapshot]:
        """One read of the stream (blocking up to ``block_ms``); the snapshots it applied."""
        if self._position is None:
            self._position = await self._stream_end()
        position = self._position
        self._read_started = time.monotonic()
        try:
            reply = await self._redis.xread(
                {self._stream: format_stream_id(position)},
                count=self._count,
                # The first read (and the first after a failure) does not block, so the
                # view is known to be fresh at once rather than after a whole BLOCK.
                block=self._block_ms if self._healthy else None,
            )
            entries = _stream_entries(reply)
            # Checked after the read: trimming only advances, so if nothing after the
            # position is gone now, nothing was gone when the read was served.
            if entries and await self._trimmed_past(position):
                changed = await self.resync()
            else:
                changed = self._apply_entries(entries)
        except BaseException:
            self._healthy = False
            raise
        self._healthy = True
        self._prune_if_due()
        return changed

    async def resync(self) -> list[SessionSnapshot]:
        """Rebuild the view from the snapshot keys; continue from the stream's end."""
        # The end is taken first: whatever is published during the scan is read again
        # from the stream afterwards, and the version rule makes the overlap harmless.
        end = await self._stream_end()
        seen: set[str] = set()
        changed: list[SessionSnapshot] = []
        batch: list[str] = []
        pattern = _GLOB_SPECIAL.sub(r"\\\1", self._key_prefix) + "*"
        async for key in self._redis.scan_iter(match=pattern, count=500, _type="STRING"):
            batch.append(_text(key))
            if len(batch) >= 500:
                changed += await self._load(batch, seen)
                batch = []
        if batch:
            changed += await self._load(batch, seen)
        # A session whose key is gone has expired (keys live until expires_at).
        for device_session_id in self._sessions.keys() - seen:
            del self._sessions[device_session_id]
        self._position = end
        self.resyncs += 1
        log.info(
            "gateway follower resynced from snapshot keys",
            extra={"sessions": len(self._sessions), "position": format_stream_id(end)},
        )
        return changed

    async def _load(self, keys: list[str], seen: set[str]) -> list[SessionSnapshot]:
        # One pipeline of GETs rather than MGET: the keys may live in different slots.
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.get(key)
            documents = await pipe.execute(raise_on_error=False)
        changed: list[SessionSnapshot] = []
        for key, document in zip(keys, documents, strict=True):
            if document is None or isinstance(document, Exception):
                continue  # expired since the SCAN, or not a snapshot
            try:
                snapshot = SessionSnapshot.from_json(document)
            except SnapshotError:
                self.ignored += 1
                continue
            if snapshot.device_session_id != key[len(self._key_prefix) :]:
                self.ignored += 1
                continue
            seen.add(snapshot.device_session_id)
            if self._apply(snapshot):
                changed.append(snapshot)
        return changed

    def _apply_entries(self, entries: list[tuple[str, dict[str, str]]]) -> list[SessionSnapshot]:
        changed: list[SessionSnapshot] = []
        for entry_id, fields in entries:
            snapshot = self._event_snapshot(entry_id, fields)
            if snapshot is not None and self._apply(snapshot):
                changed.append(snapshot)
            self._position = parse_stream_id(entry_id)
        return changed

    def _event_snapshot(self, entry_id: str, fields: dict[str, str]) -> SessionSnapshot | None:
        # Other event kinds may be added to the stream later; skip, don't fail.
        if fields.get("event") != "session_snapshot":
            self.ignored += 1
            return None
        try:
            return SessionSnapshot.from_json(fields["snapshot"])
        except (KeyError, SnapshotError) as exc:
            log.warning("gateway follower skipped event %s: %s", entry_id, exc)
            self.ignored += 1
            return None

    def _apply(self, snapshot: SessionSnapshot) -> bool:
        held = self._sessions.get(snapshot.device_session_id)
        if held is not None and held.version >= snapshot.version:
            self.ignored += 1
            return False
        self._sessions[snapshot.device_session_id] = snapshot
        self.applied += 1
        return True

    def _prune_if_due(self) -> None:
        # Snapshot keys expire at expires_at; the view forgets them too so it stays bounded.
        if time.monotonic() - self._last_prune < self._prune_interval:
            return
        self._last_prune = time.monotonic()
        now = self._clock()
        for device_session_id, snapshot in list(self._sessions.items()):
            if snapshot.expires_at <= now:
                del self._sessions[device_session_id]

    async def _info(self) -> dict[str, Any] | None:
        try:
            return await self._redis.xinfo_stream(self._stream)
        except ResponseError as exc:
            if "no such key" in str(exc).lower():
                return None
            raise

    async def _stream_end(self) -> StreamId:
        info = await self._info()
        if info is None:
            # No stream yet: every entry it will ever hold is after 0-0.
            return (0, 0)
        return parse_stream_id(info["last-generated-id"])

    async def _trimmed_past(self, position: StreamId) -> bool:
        info = await self._info()
        # A stream deleted since the read has nothing left to compare with; the next
        # entries will be after the position anyway (ids grow with time).
        return info is not None and trimmed_past(info, position)

    # ------------------------------------------------------------------ the loop
    async def changes(self) -> AsyncIterator[SessionSnapshot]:
        """Yield every snapshot the view takes in, until :meth:`stop`; survives outages."""
        delay = self._retry_delays[0]
        stop_waiter = asyncio.ensure_future(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                poll = asyncio.ensure_future(self.poll())
                # Race the read against stop() so that stopping does not wait out BLOCK.
                await asyncio.wait({poll, stop_waiter}, return_when=asyncio.FIRST_COMPLETED)
                if not poll.done():
                    poll.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await poll
                    return
                try:
                    changed = poll.result()
                except _ERRORS as exc:
                    log.warning(
                        "gateway follower read failed, retrying in %.1fs: %s: %s",
                        delay,
                        type(exc).__name__,
                        exc,
                    )
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(delay):
                            await self._stopping.wait()
                    delay = min(delay * 2, self._retry_delays[1])
                    continue
                delay = self._retry_delays[0]
                for snapshot in changed:
                    yield snapshot
        finally:
            stop_waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stop_waiter

    def __aiter__(self) -> AsyncIterator[SessionSnapshot]:
        return self.changes()

    async def run(self) -> None:
        """Follow the stream until :meth:`stop` (run it as a background task)."""
        async for _ in self.changes():
            pass

    def stop(self) -> None:
        """Make :meth:`run` and :meth:`changes` return; a stopped follower stays stopped."""
        self._stopping.set()


def _text(value: str | bytes) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def _stream_entries(reply: Any) -> list[tuple[str, dict[str, str]]]:
    """The entries of a one-stream XREAD reply, whatever shape the client gives it."""
    if not reply:
        return []
    if isinstance(reply, dict):
        entries: Any = next(iter(reply.values()))
        # RESP3 wraps the entry list in a list; redis-py's unified form does not.
        if entries and isinstance(entries[0], list):
            entries = entries[0]
    else:
        entries = reply[0][1]
    out: list[tuple[str, dict[str, str]]] = []
    for entry_id, fields in entries or ():
        if entry_id is None or fields is None:
            continue
        out.append((_text(entry_id), {_text(k): _text(v) for k, v in fields.items()}))
    return out


def _utc_now() -> datetime:
    return datetime.now(UTC)

"""Follows the gateway event stream for the sessions a gateway holds (CONTRACT §9, §10, §12).

The follower reads ``GATEWAY_SESSION_EVENTS_STREAM`` with ``XREAD`` from a position and
keeps the newest snapshot it has seen of the sessions the gateway asked about: an event
is applied only if its version is higher than the one held, because publications from
several replicas can reach the stream out of order. The stream is capped
(``XADD MAXLEN ~``); when trimming has removed entries the follower had not read, it
reloads the sessions it holds from their snapshot keys (``GET``, same version rule) and
continues from the stream's end. It does the same after a *reset*: the stream is gone,
its ``entries-added`` went down, its last id is below the follower's position, or the
Redis run id changed (a restart, empty or from an older RDB); then a held session whose
key is gone is dropped, and one whose key went back to an older active version takes
that version (a revocation once seen is kept).

Live connections :meth:`EventFollower.register` their session and are told when it is
revoked, expires (a timer at ``expires_at``, moved by extend) or disappears.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeAlias

from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from authsession.aio import cancel_and_wait
from authsession.clock import utc_now
from authsession.gateway.subscription import OnEnd, SessionEnd, Subscription
from authsession.projection_codec import (
    DEFAULT_EVENTS_STREAM,
    DEFAULT_KEY_PREFIX,
    EVENT_KIND,
    SessionSnapshot,
    SnapshotError,
)

log = logging.getLogger("authsession.gateway")

StreamId: TypeAlias = tuple[int, int]

_STREAM_ID = re.compile(r"^([0-9]+)(?:-([0-9]+))?$")
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


class FollowerOverflow(RuntimeError):
    """A consumer of :meth:`EventFollower.changes` fell ``consumer_buffer`` changes behind."""


@dataclass(frozen=True, slots=True)
class Watermark:
    """Where the follower stood when a verifier started reading a snapshot key."""

    epoch: int
    position: StreamId | None


@dataclass(slots=True, eq=False)
class _Consumer:
    queue: asyncio.Queue[object] = field(default_factory=asyncio.Queue)
    closed: bool = False


_END = object()


class EventFollower:
    """Tails the session event stream for the sessions a gateway cares about.

    What it holds, and the bound on it (about 1 KB per snapshot):

    * every session with a live :meth:`register` subscription (as many as the gateway
      has connections; these are never evicted);
    * up to ``max_cached`` further sessions that a verifier read from Redis through this
      follower (:meth:`remember`), least recently used evicted first;
    * the snapshots of the last ``recent_events`` events of the stream, whatever their
      session, so that a verification racing with a publication cannot cache a version
      older than one already gone by.

    Nothing else of the stream's history is kept. One reader (:meth:`start`, or
    :meth:`run`) reads the stream; any number of consumers of :meth:`changes` each get
    every change it takes in (fan-out), and subscriptions fire from the same reader.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        stream: str = DEFAULT_EVENTS_STREAM,
        key_prefix: str = DEFAULT_KEY_PREFIX,
        start_id: str = "$",
        block_ms: int = 2000,
        count: int = 500,
        max_lag: float = 1.0,
        clock: Callable[[], datetime] | None = None,
        prune_interval: float = 60.0,
        retry_delays: tuple[float, float] = (0.1, 2.0),
        max_cached: int = 100_000,
        recent_events: int = 10_000,
        consumer_buffer: int = 10_000,
        reset_check_interval: float = 1.0,
        outage_grace: float | None = 30.0,
        read_timeout: float = 1.0,
    ) -> None:
        # BLOCK 0 waits forever: stop() and the freshness bound both need reads to end.
        if block_ms <= 0:
            raise ValueError("block_ms must be positive")
        if count <= 0:
            raise ValueError("count must be positive")
        if max_cached < 0 or recent_events < count or consumer_buffer <= 0:
            raise ValueError("max_cached >= 0, recent_events >= count, consumer_buffer > 0")
        self._redis = redis
        self._stream = stream
        self._key_prefix = key_prefix
        self._position: StreamId | None = None if start_id == "$" else parse_stream_id(start_id)
        self._block_ms = block_ms
        self._count = count
        self._max_lag = max_lag
        self._clock = clock or utc_now
        self._prune_interval = prune_interval
        self._retry_delays = retry_delays
        self._max_cached = max_cached
        self._consumer_buffer = consumer_buffer
        self._reset_check_interval = reset_check_interval
        self._outage_grace = outage_grace
        self._read_timeout = read_timeout
        # A poll that takes longer than this is a hung Redis: treated as a failure.
        self._poll_timeout = block_ms / 1000 + max(5.0, 5 * read_timeout)

        self._sessions: dict[str, SessionSnapshot] = {}
        self._lru: OrderedDict[str, None] = OrderedDict()
        self._subs: dict[str, set[Subscription]] = {}
        self._pending_track: set[str] = set()
        self._timers: dict[str, tuple[datetime, asyncio.TimerHandle]] = {}
        self._recent: deque[tuple[StreamId, SessionSnapshot]] = deque()
        self._recent_max = recent_events
        self._recent_index: dict[str, SessionSnapshot] = {}
        self._recent_evicted: StreamId = (0, 0)
        self._epoch = 0
        self._resyncing = False

        self._consumers: set[_Consumer] = set()
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        # Set once the stream position is known: a registration's re-check must come
        # after it, or an event between the two could fall before the position.
        self._positioned = asyncio.Event()
        if self._position is not None:
            self._positioned.set()
        self._read_started: float | None = None
        self._healthy = False
        self._unhealthy_since: float | None = None
        self._last_prune = time.monotonic()

        # What the last reset check saw (CONTRACT §12, §10).
        self._last_reset_check: float | None = None
        self._run_id: str | None = None
        self._run_id_denied = False
        self._stream_seen = False
        self._entries_added: int | None = None

        self.resyncs = 0
        """Times the view was rebuilt from the snapshot keys (trimming or a reset)."""
        self.resets = 0
        """Times a reset of the stream or of Redis was detected (each caused a resync)."""
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
        """The newest snapshot held for a session, however old the view is."""
        held = self._sessions.get(device_session_id)
        return held if held is not None else self._recent_index.get(device_session_id)

    def snapshots(self) -> dict[str, SessionSnapshot]:
        """A copy of everything held: cached and subscribed sessions, recent events."""
        return {**self._recent_index, **self._sessions}

    @property
    def cached_sessions(self) -> int:
        """How many sessions the follower holds besides the recent events."""
        return len(self._sessions)

    @property
    def subscriptions(self) -> int:
        """How many live subscriptions are registered."""
        return sum(len(subs) for subs in self._subs.values())

    @property
    def fresh(self) -> bool:
        """Whether the view lags the stream by at most about ``max_lag`` seconds."""
        started, checked = self._read_started, self._last_reset_check
        if not self._healthy or self._resyncing or started is None or checked is None:
            return False
        now = time.monotonic()
        bound = self._block_ms / 1000 + self._max_lag
        # A blocked XREAD returns as soon as an entry arrives, so while a read is pending
        # for less than its block time plus the allowed lag, nothing is being missed; and
        # a reset of Redis is noticed within the reset check interval.
        return now - started <= bound and now - checked <= bound + self._reset_check_interval

    def cached(self, device_session_id: str) -> SessionSnapshot | None:
        """The view's snapshot when a verifier may trust it without reading Redis."""
        snapshot = self._sessions.get(device_session_id)
        if snapshot is not None:
            if device_session_id in self._lru:
                self._lru.move_to_end(device_session_id)
        else:
            snapshot = self._recent_index.get(device_session_id)
            if snapshot is None:
                return None
            # Asked about: keep it beyond the recent events.
            self._sessions[device_session_id] = snapshot
            self._touch(device_session_id)
        # A revocation is permanent (CONTRACT §6), so a revoked snapshot stays true
        # however stale the view is; an active one only while the view keeps up.
        if not snapshot.active or self.fresh:
            return snapshot
        return None

    def watermark(self) -> Watermark:
        """Take before reading a snapshot key; give to :meth:`remember` with what was read."""
        return Watermark(self._epoch, None if self._resyncing else self._position)

    def remember(self, snapshot: SessionSnapshot, watermark: Watermark) -> bool:
        """Cache a snapshot read from its key after ``watermark``; whether it was cached.

        Every event after the watermark's position is either still among the recent
        events (and a newer version there wins) or not read yet (and will be applied
        to the cached entry). If a resync happened in between, or the recent events no
        longer reach back to the position, nothing is cached.
        """
        position = watermark.position
        if (
            position is None
            or watermark.epoch != self._epoch
            or self._resyncing
            or self._recent_evicted > position
        ):
            return False
        device_session_id = snapshot.device_session_id
        known = self.snapshot(device_session_id)
        if known is not None and known.version >= snapshot.version:
            snapshot = known
        if device_session_id not in self._subs and self._max_cached == 0:
            return False
        self._sessions[device_session_id] = snapshot
        self._touch(device_session_id)
        return True

    def track(self, device_session_id: str) -> None:
        """Keep the session's snapshot from now on (it is filled by the next resync or
        event; :meth:`register` and :meth:`remember` are the usual ways in)."""
        if device_session_id not in self._sessions:
            held = self._recent_index.get(device_session_id)
            if held is None:
                if len(self._pending_track) < max(self._max_cached, 1):
                    self._pending_track.add(device_session_id)
                return
            self._sessions[device_session_id] = held
        self._touch(device_session_id)

    # ------------------------------------------------------------------ subscriptions
    async def register(
        self,
        device_session_id: str,
        user_id: str,
        callback: OnEnd | None = None,
    ) -> Subscription:
        """Watch a live connection's session: the subscription fires once, when it ends.

        ``callback`` (a function or coroutine function taking the :class:`SessionEnd`)
        is called then; the returned :class:`Subscription` can also be awaited. Unless
        the follower already holds the session (and is fresh), the snapshot key is read
        again after the subscription is in place, so a revocation published between the
        verification and this call is never missed (the subscription then fires at
        once: check ``subscription.done``). If Redis cannot
        be read and the follower holds no snapshot it may trust, it fires
        ``internal_error``. Starts the reader if it is not running.
        """
        self.start()
        subscription = Subscription(device_session_id, user_id, callback, self._unregister)
        self._subs.setdefault(device_session_id, set()).add(subscription)
        self._lru.pop(device_session_id, None)
        if device_session_id in self._sessions and self.fresh:
            # Already held (the verifier read it through this follower, or an event
            # brought it): everything up to the position is in the held snapshot and
            # every later event is applied to it, so no second read is needed.
            self._evaluate(device_session_id)
            return subscription
        try:
            async with asyncio.timeout(self._read_timeout):
                await self._positioned.wait()
                document = await self._redis.get(self._key_prefix + device_session_id)
        except Exception as exc:
            if not subscription.done and self.cached(device_session_id) is None:
                log.warning("gateway subscription re-check failed: %s", type(exc).__name__)
                self._end_one(subscription, SessionEnd("internal_error"))
                return subscription
        else:
            if subscription.done:
                return subscription
            if document is None:
                held = self._sessions.get(device_session_id)
                if held is None or held.active:
                    self._end_one(subscription, SessionEnd("unknown_session"))
                    return subscription
            else:
                try:
                    snapshot = SessionSnapshot.from_json(document)
                except SnapshotError:
                    snapshot = None
                if snapshot is None or snapshot.device_session_id != device_session_id:
                    self._end_one(subscription, SessionEnd("verification_failed"))
                    return subscription
                held = self._sessions.get(device_session_id)
                if held is None or held.version < snapshot.version:
                    self._sessions[device_session_id] = snapshot
        self._evaluate(device_session_id)
        return subscription

    def _unregister(self, subscription: Subscription) -> None:
        device_session_id = subscription.device_session_id
        subs = self._subs.get(device_session_id)
        if subs is None:
            return
        subs.discard(subscription)
        if not subs:
            del self._subs[device_session_id]
            self._disarm(device_session_id)
            if device_session_id in self._sessions:
                self._touch(device_session_id)

    def _end_one(self, subscription: Subscription, end: SessionEnd) -> None:
        self._unregister(subscription)
        subscription._fire(end)

    def _end_all(self, device_session_id: str, end: SessionEnd) -> None:
        for subscription in list(self._subs.get(device_session_id, ())):
            self._end_one(subscription, end)

    def _evaluate(self, device_session_id: str) -> None:
        """Fire the session's subscriptions if it ended; otherwise time its expiry."""
        if device_session_id not in self._subs:
            return
        snapshot = self._sessions.get(device_session_id)
        if snapshot is None:
            return
        if not snapshot.active:
            self._end_all(
                device_session_id, SessionEnd("revoked", snapshot.revoke_reason, snapshot)
            )
            return
        for subscription in list(self._subs[device_session_id]):
            if subscription.user_id != snapshot.user_id:
                self._end_one(subscription, SessionEnd("verification_failed", None, snapshot))
        if device_session_id not in self._subs:
            return
        delay = (snapshot.expires_at - self._clock()).total_seconds()
        if delay <= 0:
            self._end_all(device_session_id, SessionEnd("expired", None, snapshot))
            return
        armed = self._timers.get(device_session_id)
        if armed is not None:
            if armed[0] == snapshot.expires_at:
                return
            armed[1].cancel()
        handle = asyncio.get_running_loop().call_later(delay, self._on_timer, device_session_id)
        self._timers[device_session_id] = (snapshot.expires_at, handle)

    def _on_timer(self, device_session_id: str) -> None:
        self._timers.pop(device_session_id, None)
        self._evaluate(device_session_id)

    def _disarm(self, device_session_id: str) -> None:
        armed = self._timers.pop(device_session_id, None)
        if armed is not None:
            armed[1].cancel()

    def _touch(self, device_session_id: str) -> None:
        if device_session_id in self._subs:
            return  # pinned while subscribed
        self._lru[device_session_id] = None
        self._lru.move_to_end(device_session_id)
        while len(self._lru) > self._max_cached:
            evicted, _ = self._lru.popitem(last=False)
            self._sessions.pop(evicted, None)

    # ------------------------------------------------------------------ reading
    async def poll(self) -> list[SessionSnapshot]:
        """One read of the stream (blocking up to ``block_ms``); the snapshots it applied.

        Before reading, at most every ``reset_check_interval`` (and after any failure),
        it checks for a reset of the stream or of Redis, and resyncs if there was one.
        """
        try:
            if self._position is None:
                await self._check_reset()
                self._position = await self._stream_end()
                self._positioned.set()
            elif self._reset_check_due() and await self._check_reset():
                changed = await self._resync(reset=True)
                self._mark_healthy()
                return changed
            position = self._position
            self._read_started = time.monotonic()
            reply = await self._redis.xread(
                {self._stream: format_stream_id(position)},
                count=self._count,
                # The first read (and the first after a failure) does not block, so the
                # view is known to be fresh at once rather than after a whole BLOCK.
                block=self._block_ms if self._healthy else None,
            )
            entries = _stream_entries(reply)
            if entries:
                # The stream exists (if it disappears before the next check, that is a
                # reset too).
                self._stream_seen = True
            # Checked after the read: trimming only advances, so if nothing after the
            # position is gone now, nothing was gone when the read was served.
            if entries and await self._trimmed_past(position):
                changed = await self._resync(reset=False)
            else:
                changed = self._apply_entries(entries)
        except BaseException:
            self._mark_unhealthy()
            raise
        self._mark_healthy()
        self._prune_if_due()
        return changed

    async def resync(self) -> list[SessionSnapshot]:
        """Reload every held session from its snapshot key; continue from the stream's end."""
        return await self._resync(reset=False)

    async def _resync(self, *, reset: bool) -> list[SessionSnapshot]:
        # The end is taken first: whatever is published during the reads is read again
        # from the stream afterwards, and the version rule makes the overlap harmless.
        self._resyncing = True
        try:
            info = await self._info()
            end = parse_stream_id(info["last-generated-id"]) if info is not None else (0, 0)
            wanted = list(self._sessions.keys() | self._subs.keys() | self._pending_track)
            documents = await self._get_many(wanted)
        finally:
            self._resyncing = False
            self._epoch += 1
        self._pending_track.clear()
        now = self._clock()
        changed: list[SessionSnapshot] = []
        gone: list[tuple[str, SessionSnapshot | None]] = []
        for device_session_id, document in zip(wanted, documents, strict=True):
            held = self._sessions.get(device_session_id)
            snapshot = self._parse_key(device_session_id, document)
            if snapshot is None:
                # The key is gone (expired, deleted, or lost with a reset): drop the entry.
                if held is not None or device_session_id in self._subs:
                    self._sessions.pop(device_session_id, None)
                    self._lru.pop(device_session_id, None)
                    gone.append((device_session_id, held))
                continue
            newer = held is None or snapshot.version > held.version
            # After a reset the store may hold an older version than the one seen: trust
            # what it says now (as a plain verifier would), except that a revocation seen
            # is never undone.
            went_back = (
                reset and held is not None and held.active and snapshot.version < held.version
            )
            if newer or went_back:
                self._sessions[device_session_id] = snapshot
                self._touch(device_session_id)
                self.applied += 1
                changed.append(snapshot)
        self._recent.clear()
        self._recent_index.clear()
        self._recent_evicted = end
        self._position = end
        self._stream_seen = info is not None
        added = info.get("entries-added") if info is not None else None
        self._entries_added = int(added) if added is not None else None
        self.resyncs += 1
        log.info(
            "gateway follower resynced from snapshot keys",
            extra={
                "sessions": len(self._sessions),
                "gone": len(gone),
                "position": format_stream_id(end),
                "reset": reset,
            },
        )
        for device_session_id, held in gone:
            if held is not None and not held.active:
                end_ = SessionEnd("revoked", held.revoke_reason, held)
            elif held is not None and held.expires_at <= now:
                end_ = SessionEnd("expired", None, held)
            else:
                end_ = SessionEnd("unknown_session", None, held)
            self._end_all(device_session_id, end_)
        for snapshot in changed:
            self._broadcast(snapshot)
            self._evaluate(snapshot.device_session_id)
        return changed

    def _parse_key(self, device_session_id: str, document: Any) -> SessionSnapshot | None:
        if document is None or isinstance(document, Exception):
            return None
        try:
            snapshot = SessionSnapshot.from_json(document)
        except SnapshotError:
            self.ignored += 1
            return None
        if snapshot.device_session_id != device_session_id:
            self.ignored += 1
            return None
        return snapshot

    async def _get_many(self, device_session_ids: list[str]) -> list[Any]:
        documents: list[Any] = []
        for start in range(0, len(device_session_ids), 500):
            # One pipeline of GETs rather than MGET: the keys may live in different slots.
            async with self._redis.pipeline(transaction=False) as pipe:
                for device_session_id in device_session_ids[start : start + 500]:
                    pipe.get(self._key_prefix + device_session_id)
                documents += await pipe.execute(raise_on_error=False)
        return documents

    def _apply_entries(self, entries: list[tuple[str, dict[str, str]]]) -> list[SessionSnapshot]:
        changed: list[SessionSnapshot] = []
        for entry_id, fields in entries:
            position = parse_stream_id(entry_id)
            snapshot = self._event_snapshot(entry_id, fields)
            if snapshot is not None and self._apply(position, snapshot):
                changed.append(snapshot)
            self._position = position
        for snapshot in changed:
            self._broadcast(snapshot)
            self._evaluate(snapshot.device_session_id)
        return changed

    def _event_snapshot(self, entry_id: str, fields: dict[str, str]) -> SessionSnapshot | None:
        # Other event kinds may be added to the stream later; skip, don't fail.
        if fields.get("event") != EVENT_KIND:
            self.ignored += 1
            return None
        try:
            return SessionSnapshot.from_json(fields["snapshot"])
        except (KeyError, SnapshotError) as exc:
            log.warning("gateway follower skipped event %s: %s", entry_id, exc)
            self.ignored += 1
            return None

    def _apply(self, position: StreamId, snapshot: SessionSnapshot) -> bool:
        device_session_id = snapshot.device_session_id
        tracked = device_session_id in self._sessions or device_session_id in self._subs
        if device_session_id in self._pending_track:
            self._pending_track.discard(device_session_id)
            tracked = True
        held = self._sessions.get(device_session_id) if tracked else None
        if held is None:
            held = self._recent_index.get(device_session_id)
        if held is not None and held.version >= snapshot.version:
            self.ignored += 1
            return False
        self._recent.append((position, snapshot))
        self._recent_index[device_session_id] = snapshot
        while len(self._recent) > self._recent_max:
            evicted_at, evicted = self._recent.popleft()
            self._recent_evicted = evicted_at
            if self._recent_index.get(evicted.device_session_id) is evicted:
                del self._recent_index[evicted.device_session_id]
        if tracked:
            self._sessions[device_session_id] = snapshot
            self._touch(device_session_id)
        self.applied += 1
        return True

    def _prune_if_due(self) -> None:
        # Snapshot keys expire at expires_at; the view forgets them too so it stays bounded.
        if time.monotonic() - self._last_prune < self._prune_interval:
            return
        self._last_prune = time.monotonic()
        now = self._clock()
        for device_session_id, snapshot in list(self._sessions.items()):
            if snapshot.expires_at <= now and device_session_id not in self._subs:
                del self._sessions[device_session_id]
                self._lru.pop(device_session_id, None)

    def _mark_healthy(self) -> None:
        self._healthy = True
        self._unhealthy_since = None

    def _mark_unhealthy(self) -> None:
        self._healthy = False
        if self._unhealthy_since is None:
            self._unhealthy_since = time.monotonic()

    # ------------------------------------------------------------------ reset detection
    def _reset_check_due(self) -> bool:
        checked = self._last_reset_check
        return (
            not self._healthy
            or checked is None
            or time.monotonic() - checked >= self._reset_check_interval
        )

    async def _check_reset(self) -> bool:
        """Whether the stream or Redis was reset since the last check (and remember now)."""
        run_id = await self._server_run_id()
        info = await self._info()
        self._last_reset_check = time.monotonic()
        reasons: list[str] = []
        if run_id is not None and self._run_id is not None and run_id != self._run_id:
            reasons.append("the Redis run id changed")
        added: int | None = None
        if info is None:
            if self._stream_seen:
                reasons.append("the stream is gone")
        else:
            raw_added = info.get("entries-added")
            added = int(raw_added) if raw_added is not None else None
            if (
                added is not None
                and self._entries_added is not None
                and added < self._entries_added
            ):
                reasons.append("the stream's entries-added went down")
            last = parse_stream_id(info["last-generated-id"])
            if self._position is not None and last < self._position:
                reasons.append("the stream's last id is below the follower's position")
        if run_id is not None:
            self._run_id = run_id
        self._stream_seen = info is not None
        self._entries_added = added
        if reasons:
            self.resets += 1
            log.warning("gateway follower detected a reset: %s; resyncing", ", ".join(reasons))
            return True
        return False

    async def _server_run_id(self) -> str | None:
        if self._run_id_denied:
            return None
        try:
            info = await self._redis.info("server")
        except ResponseError as exc:
            # An ACL without INFO: the stream's own signs of a reset still apply.
            log.warning("gateway follower cannot read INFO server (%s); run id not checked", exc)
            self._run_id_denied = True
            return None
        run_id = info.get("run_id") if isinstance(info, dict) else None
        return _text(run_id) if isinstance(run_id, str | bytes) else None

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
        # A stream deleted since the read has nothing left to compare with; the reset
        # check notices it.
        return info is not None and trimmed_past(info, position)

    # ------------------------------------------------------------------ the reader
    def start(self) -> asyncio.Task[None]:
        """Start the reader as a background task (once; later calls return the same task)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._read_loop())
        return self._task

    async def run(self) -> None:
        """Follow the stream until :meth:`stop` (start it as a background task)."""
        await self.start()

    async def aclose(self) -> None:
        """Stop the reader and wait for it."""
        self.stop()
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def stop(self) -> None:
        """Make :meth:`run` and :meth:`changes` return; a stopped follower stays stopped."""
        self._stopping.set()

    async def changes(self) -> AsyncIterator[SessionSnapshot]:
        """Yield every snapshot the follower takes in, until :meth:`stop`.

        Each call is a consumer of its own: any number of them (and :meth:`run`) share
        the one reader and each sees every change. A consumer that falls
        ``consumer_buffer`` changes behind gets :class:`FollowerOverflow`.
        """
        if self._stopping.is_set():
            return
        consumer = _Consumer()
        self._consumers.add(consumer)
        task = self.start()
        try:
            while True:
                item = await consumer.queue.get()
                if item is _END:
                    if task.done() and not task.cancelled() and task.exception() is not None:
                        raise task.exception()  # type: ignore[misc]
                    return
                if isinstance(item, FollowerOverflow):
                    raise item
                assert isinstance(item, SessionSnapshot)
                yield item
        finally:
            self._consumers.discard(consumer)

    def __aiter__(self) -> AsyncIterator[SessionSnapshot]:
        return self.changes()

    def _broadcast(self, snapshot: SessionSnapshot) -> None:
        for consumer in list(self._consumers):
            if consumer.queue.qsize() >= self._consumer_buffer:
                self._consumers.discard(consumer)
                consumer.queue.put_nowait(
                    FollowerOverflow(f"consumer fell {self._consumer_buffer} changes behind")
                )
            else:
                consumer.queue.put_nowait(snapshot)

    async def _read_loop(self) -> None:
        delay = self._retry_delays[0]
        stop_waiter = asyncio.ensure_future(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                poll = asyncio.ensure_future(self.poll())
                # Race the read against stop() so that stopping does not wait out BLOCK,
                # and bound it so that a hung Redis counts as a failure.
                await asyncio.wait(
                    {poll, stop_waiter},
                    timeout=self._poll_timeout,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if not poll.done():
                    await cancel_and_wait(poll)
                    if self._stopping.is_set():
                        return
                    self._mark_unhealthy()
                    failure: BaseException | None = TimeoutError("stream read hung")
                else:
                    failure = None
                    try:
                        poll.result()
                    except _ERRORS as exc:
                        failure = exc
                if failure is None:
                    delay = self._retry_delays[0]
                    continue
                log.warning(
                    "gateway follower read failed, retrying in %.1fs: %s: %s",
                    delay,
                    type(failure).__name__,
                    failure,
                )
                self._check_outage()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._stopping.wait()
                delay = min(delay * 2, self._retry_delays[1])
        finally:
            stop_waiter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stop_waiter
            for timer in self._timers.values():
                timer[1].cancel()
            self._timers.clear()
            for consumer in list(self._consumers):
                consumer.queue.put_nowait(_END)
            self._consumers.clear()

    def _check_outage(self) -> None:
        """Past ``outage_grace`` without the stream, live sessions end (fail closed)."""
        since = self._unhealthy_since
        if self._outage_grace is None or since is None:
            return
        if time.monotonic() - since < self._outage_grace:
            return
        for device_session_id in list(self._subs):
            self._end_all(device_session_id, SessionEnd("internal_error"))


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

"""The projection reconciler (CONTRACT §12/§9): find and repair drift between the source
of truth and the gateway projection.

It walks the session records, the snapshot keys and the pending-event markers with
``SCAN`` in bounded batches (on every master of a Redis Cluster), so it runs on a store of
any size with bounded memory and never blocks Redis. Each batch is read with one
pipeline; a finding is read again before it counts, so that a write in flight is not
taken for drift. Repairs go through the ordinary publish path, so the version rules hold:

- ``missing_snapshot``: a live record without a snapshot key: published.
- ``stale_version``: a snapshot older than its record: the record is published.
- ``active_but_revoked``: a revoked record whose snapshot says active (at any version):
  the revocation is published over it, with a version above the snapshot's.
- ``orphan``: an active snapshot without a source record (the record was lost): answered
  with a ``revoked`` snapshot, reason ``source_lost``.
- ``missing_event``: a snapshot written whose stream event never made it (its
  pending-event marker is older than :data:`PENDING_GRACE`): the event is appended.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from enum import StrEnum
from typing import Any, Protocol

from authsession.domain.model import Session
from authsession.domain.ports import Clock
from authsession.domain.units import format_time, to_epoch_ms
from authsession.projection_codec import REVOKED, SessionSnapshot, SnapshotError
from authsession.redis.base import (
    Keys,
    Lease,
    RedisClient,
    as_strings,
    glob_escape,
    redis_call,
)
from authsession.redis.projection import RedisProjectionPublisher
from authsession.redis.sessions import session_from

log = logging.getLogger("authsession.reconciler")

BATCH = 500
_LIGHT_FIELDS = ("status", "version", "expires_at")
# A pending-event marker younger than this belongs to a publication still in flight.
PENDING_GRACE = timedelta(seconds=10)


KeepAlive = Callable[[], Awaitable[bool]]


class LeaseLost(Exception):
    """Another process took the reconciler's lease during a pass."""


class DriftKind(StrEnum):
    """What a finding of the reconciler is (metric attribute ``kind``)."""

    MISSING_SNAPSHOT = "missing_snapshot"
    STALE_VERSION = "stale_version"
    ACTIVE_BUT_REVOKED = "active_but_revoked"
    ORPHAN = "orphan"
    MISSING_EVENT = "missing_event"


class DriftMetrics(Protocol):
    """Where the reconciler counts its findings."""

    def projection_drift(self, kind: str, count: int) -> None:
        """``count`` findings of ``kind`` in one run."""
        ...


class Publisher(Protocol):
    """The ordinary publish path (``SessionService.publish``)."""

    async def __call__(self, session: Session) -> None:
        """Publish the session's current version."""
        ...


@dataclass
class DriftReport:
    """What one run found (and, when repairing, repaired)."""

    found: dict[DriftKind, int] = field(default_factory=lambda: dict.fromkeys(DriftKind, 0))
    repaired: int = 0
    sessions: int = 0
    snapshots: int = 0
    seconds: float = 0.0

    @property
    def drift(self) -> int:
        """Findings of every kind together."""
        return sum(self.found.values())


class ProjectionReconciler:
    """Compares records and snapshots in ``SCAN`` batches; repairs what differs."""

    def __init__(
        self,
        client: RedisClient,
        keys: Keys,
        publisher: RedisProjectionPublisher,
        publish: Publisher,
        clock: Clock,
        metrics: DriftMetrics | None = None,
        batch: int = BATCH,
    ) -> None:
        self._redis = client
        self._keys = keys
        self._publisher = publisher
        self._publish = publish
        self._clock = clock
        self._metrics = metrics
        self._batch = batch
        self._keep_alive: KeepAlive | None = None

    async def run_leased(self, lease: Lease) -> DriftReport | None:
        """The periodic pass: repair, renewing ``lease`` between batches; ``None`` when
        the lease went to another process meanwhile."""
        try:
            return await self.run(repair=True, keep_alive=lease.hold)
        except LeaseLost:
            log.info("projection reconciliation handed over to another process")
            return None

    @redis_call
    async def run(self, *, repair: bool, keep_alive: KeepAlive | None = None) -> DriftReport:
        """One full pass over records, snapshots and markers.

        ``keep_alive`` (the lease's renewal) is awaited between batches; the pass stops
        early when it answers ``False`` (another process holds the lease now).
        """
        started = time.perf_counter()
        report = DriftReport()
        self._keep_alive = keep_alive
        async for keys in self._batches(self._keys.session_pattern(), "hash"):
            report.sessions += len(keys)
            await self._records(keys, report, repair)
        prefix = self._publisher.key_prefix
        async for keys in self._batches(glob_escape(prefix) + "*", "string"):
            report.snapshots += len(keys)
            await self._snapshots([k[len(prefix) :] for k in keys], report, repair)
        async for keys in self._batches(self._keys.projection_pending_pattern(), "string"):
            await self._pending(keys, report, repair)
        report.seconds = time.perf_counter() - started
        if self._metrics is not None:
            for kind, count in report.found.items():
                if count:
                    self._metrics.projection_drift(kind.value, count)
        if report.drift:
            log.warning(
                "projection drift found",
                extra={
                    "drift": {k.value: n for k, n in report.found.items() if n},
                    "repaired": report.repaired,
                },
            )
        return report

    async def _batches(self, pattern: str, kind: str) -> AsyncIterator[list[str]]:
        batch: list[str] = []
        async for key in self._redis.scan_iter(match=pattern, count=self._batch, _type=kind):
            batch.append(str(key))
            if len(batch) >= self._batch:
                yield batch
                batch = []
                if self._keep_alive is not None and not await self._keep_alive():
                    raise LeaseLost()
        if batch:
            yield batch

    # ---------------------------------------------------------------- source records
    async def _read_records(
        self, ids: list[str]
    ) -> list[tuple[Session | None, SessionSnapshot | None]]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for device_session_id in ids:
                pipe.hgetall(self._keys.session(device_session_id))
                pipe.get(self._publisher.snapshot_key(device_session_id))
            replies = await pipe.execute()
        out: list[tuple[Session | None, SessionSnapshot | None]] = []
        for i in range(0, len(replies), 2):
            fields = as_strings(replies[i]) if replies[i] else {}
            try:
                session = session_from(fields) if fields else None
            except (KeyError, ValueError):
                session = None  # not a record of ours: nothing to project
            out.append((session, _snapshot(replies[i + 1])))
        return out

    def _record_drift(
        self, session: Session | None, snapshot: SessionSnapshot | None
    ) -> DriftKind | None:
        if session is None:
            return None
        now = self._clock.now()
        if snapshot is None:
            # The snapshot expires at expires_at: none is due after it.
            return DriftKind.MISSING_SNAPSHOT if session.expires_at > now else None
        if session.revoked_at is not None and snapshot.active:
            return DriftKind.ACTIVE_BUT_REVOKED
        if snapshot.version < session.version:
            return DriftKind.STALE_VERSION
        return None

    async def _light_drift(self, ids: list[str]) -> list[str]:
        """The ids whose record and snapshot differ, from three fields of each record."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for device_session_id in ids:
                pipe.hmget(self._keys.session(device_session_id), _LIGHT_FIELDS)
                pipe.get(self._publisher.snapshot_key(device_session_id))
            replies = await pipe.execute()
        now = format_time(self._clock.now())
        suspects: list[str] = []
        for i, device_session_id in enumerate(ids):
            (status, version, expires_at), raw = replies[2 * i], replies[2 * i + 1]
            if status is None or version is None or expires_at is None:
                continue  # gone since the SCAN, or not a record of ours
            if raw is None:
                if str(expires_at) > now:
                    suspects.append(device_session_id)
                continue
            snapshot = _snapshot(raw)
            # A document gateways cannot read is no snapshot: the record is published.
            if (
                snapshot is None
                or (status == REVOKED and snapshot.active)
                or snapshot.version < int(version)
            ):
                suspects.append(device_session_id)
        return suspects

    async def _records(self, keys: list[str], report: DriftReport, repair: bool) -> None:
        suspects = await self._light_drift([self._keys.session_id_of(k) for k in keys])
        if not suspects:
            return
        # Read again, whole: a confirm or a revoke in flight publishes right after its write.
        for session, snapshot in await self._read_records(suspects):
            kind = self._record_drift(session, snapshot)
            if kind is None or session is None:
                continue
            report.found[kind] += 1
            if not repair:
                continue
            if kind is DriftKind.ACTIVE_BUT_REVOKED and snapshot is not None:
                # The revocation must win over whatever version the snapshot claims.
                session = replace(session, version=max(session.version, snapshot.version + 1))
            await self._publish(session)
            report.repaired += 1

    # ---------------------------------------------------------------- snapshot keys
    async def _orphans(self, ids: list[str]) -> list[str]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for device_session_id in ids:
                pipe.exists(self._keys.session(device_session_id))
                pipe.get(self._publisher.snapshot_key(device_session_id))
            replies = await pipe.execute()
        orphans: list[str] = []
        for i, device_session_id in enumerate(ids):
            exists, snapshot = replies[2 * i], _snapshot(replies[2 * i + 1])
            if not exists and snapshot is not None and snapshot.active:
                orphans.append(device_session_id)
        return orphans

    async def _snapshots(self, ids: list[str], report: DriftReport, repair: bool) -> None:
        suspects = await self._orphans(ids)
        if not suspects:
            return
        for device_session_id in await self._orphans(suspects):
            report.found[DriftKind.ORPHAN] += 1
            if repair:
                await self._publisher.revoke_orphan(device_session_id, self._clock.now())
                report.repaired += 1

    # ---------------------------------------------------------------- pending events
    async def _pending(self, keys: list[str], report: DriftReport, repair: bool) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.get(key)
            markers = await pipe.execute()
        horizon = to_epoch_ms(self._clock.now() - PENDING_GRACE)
        prefix = self._publisher.key_prefix
        for key, marker in zip(keys, markers, strict=True):
            if marker is None:
                continue
            _, _, since = str(marker).partition(":")
            if not since.isdigit() or int(since) > horizon:
                continue
            snapshot_key = key[key.index("{") + 1 : key.rindex("}")]
            if not snapshot_key.startswith(prefix):
                continue
            report.found[DriftKind.MISSING_EVENT] += 1
            if repair and await self._publisher.append_pending(snapshot_key[len(prefix) :]):
                report.repaired += 1


def _snapshot(raw: Any) -> SessionSnapshot | None:
    if raw is None:
        return None
    try:
        return SessionSnapshot.from_json(raw)
    except SnapshotError:
        return None

"""The projection codec (authsession/projection_codec.py): the snapshot document's exact
bytes (CONTRACT §9), its round trip, the status rule and the stream event's fields."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from authsession.domain.model import RevokeReason, Session
from authsession.projection_codec import (
    DEFAULT_EVENTS_STREAM,
    DEFAULT_KEY_PREFIX,
    SessionSnapshot,
    SnapshotError,
    event_fields,
    snapshot_status,
)
from authsession.settings import Settings
from authsession.telemetry import KNOWN_REASONS

CREATED = datetime(2026, 12, 2, 9, 30, 15, 123456, tzinfo=UTC)
PUBLISHED = datetime(2026, 12, 2, 9, 31, 0, 999999, tzinfo=UTC)
TOKEN_HASH = "ab" * 32


def session(**changes: object) -> Session:
    record = Session(
        device_session_id="usr1abcdefghijklmnop-s1",
        user_id="usr-1",
        token_sha256=TOKEN_HASH,
        created_at=CREATED,
        expires_at=CREATED + timedelta(days=30),
        client_ip="203.0.113.7",
        user_agent="test/1",
        version=3,
    )
    return replace(record, **changes)  # type: ignore[arg-type]


# Written out by hand: the bytes gateways in any language read (field order, compact
# separators, millisecond UTC times with "Z", nulls kept).
ACTIVE_JSON = (
    '{"device_session_id":"usr1abcdefghijklmnop-s1","user_id":"usr-1","status":"active",'
    f'"token_sha256":"{TOKEN_HASH}","created_at":"2026-12-02T09:30:15.123Z",'
    '"expires_at":"2027-01-01T09:30:15.123Z","revoked_at":null,"revoke_reason":null,'
    '"version":3,"published_at":"2026-12-02T09:31:00.999Z"}'
)
REVOKED_JSON = (
    '{"device_session_id":"usr1abcdefghijklmnop-s1","user_id":"usr-1","status":"revoked",'
    f'"token_sha256":"{TOKEN_HASH}","created_at":"2026-12-02T09:30:15.123Z",'
    '"expires_at":"2027-01-01T09:30:15.123Z","revoked_at":"2026-12-02T09:31:00.999Z",'
    '"revoke_reason":"logout","version":3,"published_at":"2026-12-02T09:31:00.999Z"}'
)


def test_an_active_session_encodes_to_the_contract_bytes() -> None:
    assert session().snapshot(PUBLISHED).to_json() == ACTIVE_JSON


def test_a_revoked_session_encodes_to_the_contract_bytes() -> None:
    revoked = session(revoked_at=PUBLISHED, revoke_reason=RevokeReason.LOGOUT)
    assert revoked.snapshot(PUBLISHED).to_json() == REVOKED_JSON


@pytest.mark.parametrize("document", [ACTIVE_JSON, REVOKED_JSON])
def test_decoding_then_encoding_gives_back_the_same_bytes(document: str) -> None:
    assert SessionSnapshot.from_json(document).to_json() == document
    assert SessionSnapshot.from_json(document.encode()).to_json() == document


def test_encoding_then_decoding_gives_back_the_same_snapshot() -> None:
    # Millisecond precision: what the document can carry.
    exact = session(
        created_at=CREATED.replace(microsecond=123000),
        expires_at=CREATED.replace(microsecond=123000) + timedelta(days=30),
        revoked_at=PUBLISHED.replace(microsecond=999000),
        revoke_reason="revoked_by_backend",
    )
    snapshot = exact.snapshot(PUBLISHED.replace(microsecond=999000))
    assert SessionSnapshot.from_json(snapshot.to_json()) == snapshot


def test_status_is_revoked_once_revoked_whatever_the_expiry() -> None:
    assert snapshot_status(None) == "active"
    assert snapshot_status(CREATED) == "revoked"
    expired = session(expires_at=CREATED)  # gateways check expires_at themselves
    assert expired.snapshot(PUBLISHED).status == "active"
    assert expired.snapshot(PUBLISHED).active


def test_revoked_is_the_next_version_with_only_the_revocation_changed() -> None:
    held = SessionSnapshot.from_json(ACTIVE_JSON)
    now = datetime(2026, 12, 3, 0, 0, 0, 5000, tzinfo=UTC)
    lost = held.revoked(now, RevokeReason.SOURCE_LOST)
    # The same bytes as editing the held document in place (how it was once done).
    edited = json.loads(ACTIVE_JSON)
    edited.update(
        status="revoked",
        revoked_at="2026-12-03T00:00:00.005Z",
        revoke_reason="source_lost",
        version=4,
        published_at="2026-12-03T00:00:00.005Z",
    )
    assert lost.to_json() == json.dumps(edited, separators=(",", ":"))
    assert not lost.active


@pytest.mark.parametrize(
    "document",
    [
        "not json",
        b"\xff",
        "[]",
        ACTIVE_JSON.replace(TOKEN_HASH, "zz" * 32),
        ACTIVE_JSON.replace('"version":3', '"version":true'),
        ACTIVE_JSON.replace('"expires_at":"2027-01-01T09:30:15.123Z"', '"expires_at":"soon"'),
        ACTIVE_JSON.replace("2027-01-01T09:30:15.123Z", "2027-01-01T09:30:15.123"),
        ACTIVE_JSON.replace('"user_id":"usr-1"', '"user_id":""'),
    ],
)
def test_a_document_gateways_cannot_use_is_a_snapshot_error(document: str | bytes) -> None:
    with pytest.raises(SnapshotError):
        SessionSnapshot.from_json(document)


def test_the_event_announces_the_document_it_carries() -> None:
    assert event_fields("usr1abcdefghijklmnop-s1", "usr-1", 3, "active", ACTIVE_JSON) == {
        "event": "session_snapshot",
        "device_session_id": "usr1abcdefghijklmnop-s1",
        "user_id": "usr-1",
        "status": "active",
        "version": "3",
        "snapshot": ACTIVE_JSON,
    }


def test_the_gateway_defaults_are_the_service_defaults() -> None:
    fields = Settings.model_fields
    assert fields["GATEWAY_SESSION_KEY_PREFIX"].default == DEFAULT_KEY_PREFIX
    assert fields["GATEWAY_SESSION_EVENTS_STREAM"].default == DEFAULT_EVENTS_STREAM
    assert (DEFAULT_KEY_PREFIX, DEFAULT_EVENTS_STREAM) == (
        "gateway:session:",
        "gateway:session_events",
    )


def test_every_revoke_reason_of_the_service_is_a_known_metric_reason() -> None:
    assert {
        "revoked_by_backend",
        "user_blocked",
        "session_limit",
        "source_lost",
        "logout",
    } == KNOWN_REASONS

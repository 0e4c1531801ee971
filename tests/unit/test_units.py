"""The contract's textual units (authsession/domain/units.py): Go durations, booleans, rate
limits and the fixed-width RFC 3339 timestamps (CONTRACT §3, §4)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone

import pytest

from authsession.domain.units import (
    RateLimit,
    format_duration,
    format_time,
    parse_bool,
    parse_duration,
    parse_rate_limit,
    parse_time,
    to_epoch_ms,
)

# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("300ms", timedelta(milliseconds=300)),
        ("2s", timedelta(seconds=2)),
        ("1m", timedelta(minutes=1)),
        ("10m", timedelta(minutes=10)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("720h", timedelta(hours=720)),
        ("168h", timedelta(days=7)),
        ("1h30m15s", timedelta(hours=1, minutes=30, seconds=15)),
        ("1m30s", timedelta(seconds=90)),
        ("1.5s", timedelta(milliseconds=1500)),
        ("1.5h", timedelta(minutes=90)),
        (".5s", timedelta(milliseconds=500)),
        ("2s500ms", timedelta(milliseconds=2500)),
        ("1500us", timedelta(microseconds=1500)),
        ("1500µs", timedelta(microseconds=1500)),
        ("1000000ns", timedelta(milliseconds=1)),
        ("0", timedelta(0)),
        ("0s", timedelta(0)),
        (" 2s ", timedelta(seconds=2)),
    ],
)
def test_parse_duration_accepts_go_syntax(text: str, expected: timedelta) -> None:
    assert parse_duration(text) == expected


def test_parse_duration_does_not_read_ms_as_minutes() -> None:
    # "m" is a prefix of "ms": 1ms must not become a minute (and 1m must not be 1ms).
    assert parse_duration("1ms") == timedelta(milliseconds=1)
    assert parse_duration("1m") == timedelta(minutes=1)
    assert parse_duration("1m1ms") == timedelta(minutes=1, milliseconds=1)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "10x",
        "10",  # a unit is required (only a bare 0 may omit it)
        "1.5",
        "s",
        "h1",
        "1H",
        "1 h",
        "1h 30m",
        "2sec",
        "2seconds",
        "1d",
        "1w",
        "1y",
        "2mm",
        "\u0661s",  # ARABIC-INDIC DIGIT ONE: digits are ASCII only
        "PT5S",
        "abc",
        "1h30",
        "+-1s",
        "1..5s",
        "5s!",
    ],
)
def test_parse_duration_rejects_invalid(text: str) -> None:
    with pytest.raises(ValueError, match=r"duration"):
        parse_duration(text)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (timedelta(0), "0s"),
        (timedelta(seconds=2), "2s"),
        (timedelta(minutes=1), "1m"),
        (timedelta(minutes=10), "10m"),
        (timedelta(hours=1, minutes=30), "1h30m"),
        (timedelta(hours=720), "720h"),
        (timedelta(hours=1, seconds=5), "1h5s"),
        (timedelta(milliseconds=1500), "1.5s"),
    ],
)
def test_format_duration(value: timedelta, expected: str) -> None:
    assert format_duration(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        timedelta(0),
        timedelta(milliseconds=1),
        timedelta(milliseconds=300),
        timedelta(milliseconds=1500),
        timedelta(seconds=59),
        timedelta(minutes=1),
        timedelta(hours=1, minutes=30),
        timedelta(hours=1, minutes=2, seconds=3, milliseconds=45),
        timedelta(hours=168),
        timedelta(hours=720),
        timedelta(days=400, milliseconds=7),
    ],
)
def test_format_duration_round_trips_through_parse(value: timedelta) -> None:
    text = format_duration(value)
    assert re.fullmatch(r"(\d+h)?(\d+m)?(\d+(\.\d+)?s)?", text), text
    assert parse_duration(text) == value


# --------------------------------------------------------------------------- booleans


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("false", False), ("1", True), ("0", False), (" true ", True)],
)
def test_parse_bool(text: str, expected: bool) -> None:
    assert parse_bool(text) is expected


@pytest.mark.parametrize("text", ["yes", "no", "on", "off", "y", "n", "2", "-1", "", "truthy"])
def test_parse_bool_rejects_other_words(text: str) -> None:
    with pytest.raises(ValueError, match="boolean"):
        parse_bool(text)


# --------------------------------------------------------------------------- rate limits


@pytest.mark.parametrize(
    ("text", "count", "period"),
    [
        ("30/m", 30, 60),
        ("5/s", 5, 1),
        ("1000/h", 1000, 3600),
        ("1/s", 1, 1),
        (" 30/m ", 30, 60),
    ],
)
def test_parse_rate_limit(text: str, count: int, period: int) -> None:
    assert parse_rate_limit(text) == RateLimit(count=count, period_seconds=period)


@pytest.mark.parametrize("text", ["0", "0/m", "0/s", "0/h"])
def test_zero_rate_limit_is_off(text: str) -> None:
    assert parse_rate_limit(text) is None


@pytest.mark.parametrize(
    "text",
    ["", "30", "30/", "/m", "30/d", "30/min", "30/M", "-1/m", "1.5/s", "30 / m", "abc", "m/30"],
)
def test_parse_rate_limit_rejects_invalid(text: str) -> None:
    with pytest.raises(ValueError, match="rate limit"):
        parse_rate_limit(text)


@pytest.mark.parametrize("text", ["30/m", "5/s", "1000/h"])
def test_rate_limit_str_round_trips(text: str) -> None:
    limit = parse_rate_limit(text)
    assert limit is not None
    assert str(limit) == text


# --------------------------------------------------------------------------- timestamps

RFC3339_MS_Z = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), "2024-01-02T03:04:05.000Z"),
        (datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=UTC), "2024-01-02T03:04:05.123Z"),
        (datetime(2024, 1, 2, 3, 4, 5, 999999, tzinfo=UTC), "2024-01-02T03:04:05.999Z"),
        (datetime(2024, 12, 31, 23, 59, 59, 1000, tzinfo=UTC), "2024-12-31T23:59:59.001Z"),
        # Another zone is converted to UTC, never rendered with an offset.
        (
            datetime(2024, 1, 2, 5, 4, 5, tzinfo=timezone(timedelta(hours=2))),
            "2024-01-02T03:04:05.000Z",
        ),
        (
            datetime(2024, 1, 1, 20, 0, 0, tzinfo=timezone(timedelta(hours=-5))),
            "2024-01-02T01:00:00.000Z",
        ),
    ],
)
def test_format_time(value: datetime, expected: str) -> None:
    assert format_time(value) == expected


def test_format_time_has_a_fixed_width_and_sorts_chronologically() -> None:
    base = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
    instants = [
        base,
        base + timedelta(microseconds=1000),
        base + timedelta(milliseconds=10),
        base + timedelta(milliseconds=999),
        base + timedelta(seconds=1),
        base + timedelta(minutes=1),
        base + timedelta(hours=30),
        base + timedelta(days=400),
    ]
    texts = [format_time(t) for t in instants]
    assert all(RFC3339_MS_Z.match(t) for t in texts), texts
    assert len({len(t) for t in texts}) == 1
    assert sorted(texts) == texts
    assert len(set(texts)) == len(texts)


def test_parse_time_inverts_format_time() -> None:
    value = datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)
    parsed = parse_time(format_time(value))
    assert parsed == value
    assert parsed.utcoffset() == timedelta(0)


def test_parse_time_accepts_offsets_and_returns_utc() -> None:
    parsed = parse_time("2024-01-02T05:04:05+02:00")
    assert parsed == datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert parsed.utcoffset() == timedelta(0)


def test_to_epoch_ms() -> None:
    assert to_epoch_ms(datetime(1970, 1, 1, tzinfo=UTC)) == 0
    assert to_epoch_ms(datetime(1970, 1, 1, 0, 0, 1, 500000, tzinfo=UTC)) == 1500
    assert to_epoch_ms(datetime(2024, 1, 1, tzinfo=UTC)) == 1_704_067_200_000

"""How the per-listener connection limit is fitted to the process's file limit."""

from __future__ import annotations

import logging

import pytest

from authsession import runner
from authsession.http.protocol import descriptors_per_listener
from authsession.runner import RESERVED_FILES, connection_limit


class FakeLimits:
    """RLIMIT_NOFILE as the kernel would keep it (the soft limit may rise up to hard)."""

    def __init__(self, soft: int, hard: int) -> None:
        self.soft = soft
        self.hard = hard

    def getrlimit(self, _: int) -> tuple[int, int]:
        return self.soft, self.hard

    def setrlimit(self, _: int, limits: tuple[int, int]) -> None:
        soft, hard = limits
        if soft > self.hard or hard > self.hard:
            raise ValueError("not allowed to raise the hard limit")
        self.soft, self.hard = soft, hard


@pytest.fixture
def limits(monkeypatch: pytest.MonkeyPatch) -> FakeLimits:
    fake = FakeLimits(1024, 1024)
    monkeypatch.setattr(runner.resource, "getrlimit", fake.getrlimit)
    monkeypatch.setattr(runner.resource, "setrlimit", fake.setrlimit)
    return fake


def test_a_limit_that_fits_is_kept(limits: FakeLimits) -> None:
    limits.soft, limits.hard = 4096, 4096
    assert descriptors_per_listener(1000) == 1125
    assert connection_limit(1000) == 1000
    assert limits.soft == 4096


def test_the_soft_limit_is_raised_toward_the_hard_one(limits: FakeLimits) -> None:
    limits.soft, limits.hard = 1024, 65536
    assert connection_limit(1000) == 1000
    assert limits.soft == 2 * descriptors_per_listener(1000) + RESERVED_FILES


def test_too_low_a_hard_limit_lowers_the_connection_limit(
    limits: FakeLimits, caplog: pytest.LogCaptureFixture
) -> None:
    limits.soft, limits.hard = 256, 256
    with caplog.at_level(logging.WARNING, "authsession.runner"):
        effective = connection_limit(1000)
    # The largest limit whose served and refusing sockets, on both listeners, fit.
    assert 2 * descriptors_per_listener(effective) + RESERVED_FILES <= 256
    assert 2 * descriptors_per_listener(effective + 1) + RESERVED_FILES > 256
    (record,) = caplog.records
    assert record.getMessage() == "AUTHSESSION_HTTP_MAX_CONNECTIONS lowered to fit the file limit"
    assert (record.configured, record.effective, record.file_limit) == (1000, effective, 256)  # type: ignore[attr-defined]


def test_a_tiny_file_limit_still_leaves_one_connection(limits: FakeLimits) -> None:
    limits.soft, limits.hard = 32, 32
    assert connection_limit(1000) == 1

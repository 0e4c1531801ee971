"""The ``resolved config`` line: every non-secret setting, never a password or token."""

from __future__ import annotations

import json
import logging

import pytest

from authsession import __version__
from authsession.resolved import log_resolved_config, resolved_config, strip_userinfo
from authsession.settings import Settings
from authsession.telemetry import JsonFormatter

PASSWORD = "pw-77c1e0aa"
TOKEN = "tok-5b8e2f90"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("redis://user:secret@redis.internal:6379/2", "redis://redis.internal:6379/2"),
        ("rediss://:secret@[::1]:6380", "rediss://[::1]:6380"),
        ("redis://u:p@ss:w@rd@host:1/0", "redis://host:1/0"),
        ("http://svc:secret@users.internal/base", "http://users.internal/base"),
        ("http://users.internal/a@b", "http://users.internal/a@b"),
        ("10.0.0.1:6379,10.0.0.2:6379", "10.0.0.1:6379,10.0.0.2:6379"),
        ("memory://", "memory://"),
    ],
)
def test_strip_userinfo(text: str, expected: str) -> None:
    assert strip_userinfo(text) == expected


def settings(**values: object) -> Settings:
    return Settings.model_validate(values)


def test_every_setting_but_the_secrets_is_listed_under_its_lower_case_name() -> None:
    fields = resolved_config(
        settings(
            REDIS_ADDR="10.1.2.3:6379",
            REDIS_PASSWORD=PASSWORD,
            REDIS_USERNAME="authsession",
            INTERNAL_API_TOKEN=TOKEN,
        )
    )

    secret = {"REDIS_PASSWORD", "INTERNAL_API_TOKEN"}
    expected = {name.lower() for name in Settings.model_fields if name not in secret}
    assert set(fields) == expected | {"version"}
    assert fields["version"] == __version__
    assert fields["redis_addr"] == "10.1.2.3:6379"
    assert fields["redis_username"] == "authsession"
    assert fields["public_http_addr"] == "0.0.0.0:8080"
    assert fields["redis_operation_timeout"] == "1s"
    assert fields["session_ttl"] == "720h"
    assert fields["workers"] == 1
    assert PASSWORD not in json.dumps(fields)
    assert TOKEN not in json.dumps(fields)


def test_a_redis_url_loses_its_password_and_gives_the_database_in_force() -> None:
    fields = resolved_config(
        settings(REDIS_ADDR=f"rediss://app:{PASSWORD}@redis.internal:6380/4", REDIS_DB=1)
    )

    assert fields["redis_addr"] == "rediss://redis.internal:6380/4"
    assert fields["redis_db"] == 4
    assert fields["redis_tls_enabled"] is True


def test_the_log_line_carries_no_secret_even_by_length(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("test.resolved")
    with caplog.at_level(logging.INFO, logger="test.resolved"):
        log_resolved_config(
            settings(
                REDIS_ADDR=f"redis://default:{PASSWORD}@127.0.0.1:6379",
                REDIS_PASSWORD=PASSWORD,
                INTERNAL_API_TOKEN=TOKEN,
                USER_SERVICE_MODE="rest",
                USER_SERVICE_BASE_URL=f"https://svc:{PASSWORD}@users.internal",
                USER_SERVICE_REQUEST_TIMEOUT="2s",
            ),
            logger,
        )

    (record,) = caplog.records
    line = JsonFormatter().format(record)
    entry = json.loads(line)
    assert entry["event"] == "resolved config"
    assert entry["redis_addr"] == "redis://127.0.0.1:6379"
    assert entry["user_service_base_url"] == "https://users.internal"
    assert PASSWORD not in line
    assert TOKEN not in line
    assert "*" * len(PASSWORD) not in line
    assert "*" * len(TOKEN) not in line
    assert not [key for key in entry if "password" in key or "token" in key]

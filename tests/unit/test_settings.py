"""Configuration from the environment (CONTRACT §2 step 1 and §3): defaults, units,
cross-variable rules, and one error naming every offending variable."""

from __future__ import annotations

import ipaddress
import os
from datetime import timedelta
from pathlib import Path

import pytest

from authsession.domain.units import RateLimit
from authsession.settings import (
    RETENTION_RULE,
    ConfigError,
    ListenAddress,
    Settings,
    load_settings,
)

P = "AUTHSESSION_"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No AUTHSESSION_* variable from the caller's environment leaks into a test."""
    for name in list(os.environ):
        if name.startswith(P):
            monkeypatch.delenv(name)
    return monkeypatch


def load(monkeypatch: pytest.MonkeyPatch, **variables: str) -> Settings:
    for name, value in variables.items():
        monkeypatch.setenv(P + name, value)
    return load_settings()


def problems(monkeypatch: pytest.MonkeyPatch, **variables: str) -> ConfigError:
    for name, value in variables.items():
        monkeypatch.setenv(P + name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    return info.value


def assert_single_line_naming(error: ConfigError, *names: str) -> str:
    line = error.one_line()
    assert "\n" not in line
    assert line.strip() == line
    for name in names:
        assert P + name in line, (name, line)
        assert P + name in error.problems, (name, error.problems)
    return line


# --------------------------------------------------------------------------- defaults


DOCUMENTED_DEFAULTS: dict[str, object] = {
    "REDIS_ADDR": "127.0.0.1:6379",
    "REDIS_MODE": "standalone",
    "REDIS_SENTINEL_MASTER": None,
    "REDIS_USERNAME": None,
    "REDIS_PASSWORD": None,
    "REDIS_DB": 0,
    "REDIS_TLS_ENABLED": False,
    "REDIS_TLS_CA_FILE": None,
    "REDIS_KEY_PREFIX": "authsession:",
    "REDIS_OPERATION_TIMEOUT": timedelta(seconds=1),
    "GATEWAY_SESSION_KEY_PREFIX": "gateway:session:",
    "GATEWAY_SESSION_EVENTS_STREAM": "gateway:session_events",
    "GATEWAY_SESSION_EVENTS_MAXLEN": 100_000,
    "USER_SERVICE_MODE": "stub",
    "USER_SERVICE_BASE_URL": None,
    "USER_SERVICE_REQUEST_TIMEOUT": None,
    "MAIL_SERVICE_MODE": "stub",
    "MAIL_SERVICE_BASE_URL": None,
    "MAIL_SERVICE_REQUEST_TIMEOUT": None,
    "STARTUP_CHECK_TIMEOUT": timedelta(seconds=2),
    "SHUTDOWN_TIMEOUT": timedelta(seconds=10),
    "CHALLENGE_TTL": timedelta(minutes=10),
    "CHALLENGE_RETENTION": timedelta(hours=1),
    "CONFIRM_IDEMPOTENCY_WINDOW": timedelta(minutes=5),
    "RESEND_COOLDOWN": timedelta(minutes=1),
    "MAX_CONFIRM_ATTEMPTS": 5,
    "MAX_FAILED_CONFIRMS_PER_EMAIL": 50,
    "SESSION_TTL": timedelta(hours=720),
    "SESSION_RETENTION": timedelta(hours=168),
    "MAX_ACTIVE_SESSIONS_PER_USER": 0,
    "SIGNUP_ENABLED": True,
    "CONFIG_REFRESH_INTERVAL": timedelta(seconds=10),
    "INTERNAL_API_TOKEN": None,
    "PUBLIC_CORS_ALLOWED_ORIGINS": (),
    "TRUSTED_PROXIES": (),
    "PUBLIC_RATE_LIMIT": None,  # "0" = off
    "PUBLIC_RATE_LIMIT_IPV6_PREFIX": 64,
    "HTTP_KEEPALIVE_TIMEOUT": timedelta(seconds=5),
    "HTTP_HEADER_TIMEOUT": timedelta(seconds=10),
    "HTTP_MAX_CONNECTIONS": 1000,
    "SEND_EMAIL_CODE_MIN_DURATION": timedelta(milliseconds=250),
    "LOG_LEVEL": "info",
    "LOG_FORMAT": "json",
}


def test_every_variable_has_the_documented_default(monkeypatch: pytest.MonkeyPatch) -> None:
    settings = load(monkeypatch)
    actual = {}
    for name, expected in DOCUMENTED_DEFAULTS.items():
        value = getattr(settings, name)
        actual[name] = tuple(value) if isinstance(expected, tuple) else value
    assert actual == DOCUMENTED_DEFAULTS
    public, internal = settings.PUBLIC_HTTP_ADDR, settings.INTERNAL_HTTP_ADDR
    assert (public.port, internal.port) == (8080, 8081)
    # ':port' means all interfaces.
    assert ipaddress.ip_address(public.host).is_unspecified
    assert ipaddress.ip_address(internal.host).is_unspecified
    assert settings.memory_store is False


def test_the_defaults_cover_every_contract_variable() -> None:
    contract_names = set(DOCUMENTED_DEFAULTS) | {"PUBLIC_HTTP_ADDR", "INTERNAL_HTTP_ADDR"}
    assert contract_names <= set(Settings.model_fields)


def test_runtime_defaults_follow_the_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load(
        monkeypatch,
        SIGNUP_ENABLED="false",
        CHALLENGE_TTL="5m",
        SESSION_TTL="24h",
        MAX_CONFIRM_ATTEMPTS="3",
        MAX_FAILED_CONFIRMS_PER_EMAIL="7",
        MAX_ACTIVE_SESSIONS_PER_USER="2",
        PUBLIC_RATE_LIMIT="30/m",
    )
    runtime = s.runtime_defaults()
    assert runtime.signup_enabled is False
    assert runtime.challenge_ttl == timedelta(minutes=5)
    assert runtime.session_ttl == timedelta(hours=24)
    assert runtime.max_confirm_attempts == 3
    assert runtime.max_failed_confirms_per_email == 7
    assert runtime.max_active_sessions_per_user == 2
    assert runtime.public_rate_limit == RateLimit(30, 60)


def test_empty_variables_mean_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load(monkeypatch, CHALLENGE_TTL="", SIGNUP_ENABLED="", PUBLIC_HTTP_ADDR="")
    assert (s.CHALLENGE_TTL, s.SIGNUP_ENABLED, s.PUBLIC_HTTP_ADDR.port) == (
        timedelta(minutes=10),
        True,
        8080,
    )


def test_variables_without_the_prefix_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHALLENGE_TTL", "nonsense")
    monkeypatch.setenv("REDIS_ADDR", "nonsense")
    s = load_settings()
    ttl, addr = s.CHALLENGE_TTL, s.REDIS_ADDR
    assert ttl == timedelta(minutes=10)
    assert addr == "127.0.0.1:6379"


# --------------------------------------------------------------------------- durations

DURATION_VARS = [
    "REDIS_OPERATION_TIMEOUT",
    "STARTUP_CHECK_TIMEOUT",
    "SHUTDOWN_TIMEOUT",
    "CHALLENGE_TTL",
    "CHALLENGE_RETENTION",
    "CONFIRM_IDEMPOTENCY_WINDOW",
    "RESEND_COOLDOWN",
    "SESSION_TTL",
    "SESSION_RETENTION",
    "CONFIG_REFRESH_INTERVAL",
]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("300ms", timedelta(milliseconds=300)),
        ("2s", timedelta(seconds=2)),
        ("1m", timedelta(minutes=1)),
        ("1h30m", timedelta(hours=1, minutes=30)),
        ("720h", timedelta(hours=720)),
    ],
)
@pytest.mark.parametrize("variable", DURATION_VARS)
def test_duration_variables_use_go_syntax(
    monkeypatch: pytest.MonkeyPatch, variable: str, text: str, expected: timedelta
) -> None:
    # Keep SESSION_RETENTION >= CONFIRM_IDEMPOTENCY_WINDOW (a rule of its own, below).
    companion = {
        "SESSION_RETENTION": {"CONFIRM_IDEMPOTENCY_WINDOW": "1ms"},
        "CONFIRM_IDEMPOTENCY_WINDOW": {"SESSION_RETENTION": "720h"},
    }.get(variable, {})
    s = load(monkeypatch, **{variable: text, **companion})
    assert getattr(s, variable) == expected


def test_session_retention_must_cover_the_idempotency_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    error = problems(monkeypatch, SESSION_RETENTION="1m", CONFIRM_IDEMPOTENCY_WINDOW="5m")
    assert_single_line_naming(error, "SESSION_RETENTION")
    assert list(error.problems) == [P + "SESSION_RETENTION"]
    assert load(monkeypatch, SESSION_RETENTION="5m", CONFIRM_IDEMPOTENCY_WINDOW="5m")


def test_the_retention_rule_is_reported_with_the_other_problems(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    error = problems(
        monkeypatch, SESSION_RETENTION="1m", CONFIRM_IDEMPOTENCY_WINDOW="5m", REDIS_DB="x"
    )
    assert list(error.problems) == [P + "REDIS_DB", P + "SESSION_RETENTION"]
    assert error.problems[P + "SESSION_RETENTION"] == RETENTION_RULE


def test_the_retention_rule_waits_for_a_valid_window(monkeypatch: pytest.MonkeyPatch) -> None:
    error = problems(monkeypatch, SESSION_RETENTION="1m", CONFIRM_IDEMPOTENCY_WINDOW="5x")
    assert list(error.problems) == [P + "CONFIRM_IDEMPOTENCY_WINDOW"]


@pytest.mark.parametrize("text", ["10x", "10", "1d", "PT10M", "ten minutes", "1H", "-5s"])
@pytest.mark.parametrize("variable", DURATION_VARS)
def test_invalid_duration_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, text: str
) -> None:
    error = problems(monkeypatch, **{variable: text})
    assert_single_line_naming(error, variable)
    assert list(error.problems) == [P + variable]


@pytest.mark.parametrize("variable", ["CHALLENGE_TTL", "SESSION_TTL", "STARTUP_CHECK_TIMEOUT"])
@pytest.mark.parametrize("text", ["0", "0s"])
def test_zero_durations_are_rejected(
    monkeypatch: pytest.MonkeyPatch, variable: str, text: str
) -> None:
    error = problems(monkeypatch, **{variable: text})
    assert_single_line_naming(error, variable)


def test_request_timeouts_use_go_syntax(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load(
        monkeypatch,
        USER_SERVICE_MODE="rest",
        USER_SERVICE_BASE_URL="http://users.internal:8080",
        USER_SERVICE_REQUEST_TIMEOUT="1500ms",
        MAIL_SERVICE_MODE="rest",
        MAIL_SERVICE_BASE_URL="https://mail.internal/base",
        MAIL_SERVICE_REQUEST_TIMEOUT="2s",
    )
    assert s.USER_SERVICE_MODE == "rest"
    user_timeout, mail_timeout = s.USER_SERVICE_REQUEST_TIMEOUT, s.MAIL_SERVICE_REQUEST_TIMEOUT
    assert user_timeout == timedelta(milliseconds=1500)
    assert mail_timeout == timedelta(seconds=2)
    assert s.USER_SERVICE_BASE_URL is not None
    assert s.USER_SERVICE_BASE_URL.startswith("http://users.internal:8080")


@pytest.mark.parametrize("variable", ["USER_SERVICE", "MAIL_SERVICE"])
def test_invalid_request_timeout_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    error = problems(
        monkeypatch,
        **{
            f"{variable}_MODE": "rest",
            f"{variable}_BASE_URL": "http://svc.test",
            f"{variable}_REQUEST_TIMEOUT": "5 seconds",
        },
    )
    assert_single_line_naming(error, f"{variable}_REQUEST_TIMEOUT")
    assert P + f"{variable}_BASE_URL" not in error.problems


# --------------------------------------------------------------------------- booleans

BOOL_VARS = ["SIGNUP_ENABLED", "REDIS_TLS_ENABLED"]


@pytest.mark.parametrize(
    ("text", "expected"), [("true", True), ("false", False), ("1", True), ("0", False)]
)
@pytest.mark.parametrize("variable", BOOL_VARS)
def test_booleans(
    monkeypatch: pytest.MonkeyPatch, variable: str, text: str, expected: bool
) -> None:
    assert getattr(load(monkeypatch, **{variable: text}), variable) is expected


@pytest.mark.parametrize("text", ["yes", "no", "on", "off", "2", "enabled"])
@pytest.mark.parametrize("variable", BOOL_VARS)
def test_boolean_rejects_other_words(
    monkeypatch: pytest.MonkeyPatch, variable: str, text: str
) -> None:
    error = problems(monkeypatch, **{variable: text})
    assert_single_line_naming(error, variable)


# --------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:9000", "127.0.0.1", 9000),
        ("localhost:9000", "localhost", 9000),
        ("0.0.0.0:9000", "0.0.0.0", 9000),
        ("[::1]:9000", "::1", 9000),
        ("[::]:9000", "::", 9000),
        ("127.0.0.1:0", "127.0.0.1", 0),
    ],
)
def test_listener_addresses(
    monkeypatch: pytest.MonkeyPatch, text: str, host: str, port: int
) -> None:
    s = load(monkeypatch, PUBLIC_HTTP_ADDR=text)
    address = s.PUBLIC_HTTP_ADDR
    assert address == ListenAddress(host, port)


def test_port_only_address_means_all_interfaces(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load(monkeypatch, PUBLIC_HTTP_ADDR=":9000", INTERNAL_HTTP_ADDR=":9001")
    assert s.PUBLIC_HTTP_ADDR.port == 9000
    assert s.INTERNAL_HTTP_ADDR.port == 9001
    assert ipaddress.ip_address(s.PUBLIC_HTTP_ADDR.host).is_unspecified


def test_ipv6_listen_address_renders_with_brackets(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load(monkeypatch, INTERNAL_HTTP_ADDR="[::1]:9001")
    assert str(s.INTERNAL_HTTP_ADDR) == "[::1]:9001"


@pytest.mark.parametrize(
    "text",
    [
        "9000",
        "localhost",
        "127.0.0.1:",
        "127.0.0.1:http",
        "127.0.0.1:65536",
        "127.0.0.1:-1",
        "::1:9000",
        "[::1]9000",
        "[::1:9000",
        "[zz::1]:9000",
        "[127.0.0.1]:9000",
        "host:9000:1",
        "http://127.0.0.1:9000",
    ],
)
@pytest.mark.parametrize("variable", ["PUBLIC_HTTP_ADDR", "INTERNAL_HTTP_ADDR"])
def test_invalid_listener_address_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, text: str
) -> None:
    error = problems(monkeypatch, **{variable: text})
    assert_single_line_naming(error, variable)


@pytest.mark.parametrize(
    ("public", "internal"),
    [
        ("127.0.0.1:9000", "127.0.0.1:9000"),
        (":9000", ":9000"),
        (":9000", "0.0.0.0:9000"),
        ("[::1]:9000", "[::1]:9000"),
    ],
)
def test_equal_public_and_internal_addresses_are_rejected(
    monkeypatch: pytest.MonkeyPatch, public: str, internal: str
) -> None:
    error = problems(monkeypatch, PUBLIC_HTTP_ADDR=public, INTERNAL_HTTP_ADDR=internal)
    line = error.one_line()
    assert "\n" not in line
    assert P + "INTERNAL_HTTP_ADDR" in line or P + "PUBLIC_HTTP_ADDR" in line


def test_public_address_equal_to_the_internal_default_is_rejected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    error = problems(monkeypatch, PUBLIC_HTTP_ADDR=":8081")
    line = error.one_line()
    assert P + "INTERNAL_HTTP_ADDR" in line or P + "PUBLIC_HTTP_ADDR" in line


def test_different_ports_on_one_host_are_fine(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load(monkeypatch, PUBLIC_HTTP_ADDR="127.0.0.1:9000", INTERNAL_HTTP_ADDR="127.0.0.1:9001")
    assert s.PUBLIC_HTTP_ADDR != s.INTERNAL_HTTP_ADDR


# --------------------------------------------------------------------------- redis address


@pytest.mark.parametrize(
    "text",
    [
        "127.0.0.1:6379",
        "redis.internal:6380",
        "redis://127.0.0.1:6379",
        "redis://127.0.0.1:6379/2",
        "redis://user:secret@redis.internal:6379/0",
        "rediss://redis.internal:6380",
        "memory://",
    ],
)
def test_redis_addresses(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    addr = load(monkeypatch, REDIS_ADDR=text).REDIS_ADDR
    assert addr == text


def test_memory_store_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load(monkeypatch, REDIS_ADDR="memory://").memory_store is True


@pytest.mark.parametrize(
    "text", ["localhost", "127.0.0.1:", ":6379", "127.0.0.1:port", "http://redis:6379", "x:99999"]
)
def test_invalid_redis_address_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    error = problems(monkeypatch, REDIS_ADDR=text)
    assert_single_line_naming(error, "REDIS_ADDR")


# --------------------------------------------------------------------------- rate limit


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("30/m", RateLimit(30, 60)),
        ("5/s", RateLimit(5, 1)),
        ("1000/h", RateLimit(1000, 3600)),
        ("0", None),
    ],
)
def test_public_rate_limit(
    monkeypatch: pytest.MonkeyPatch, text: str, expected: RateLimit | None
) -> None:
    limit = load(monkeypatch, PUBLIC_RATE_LIMIT=text).PUBLIC_RATE_LIMIT
    assert limit == expected


@pytest.mark.parametrize("text", ["30", "30/d", "30/min", "thirty/m", "-1/m", "30/m/s"])
def test_invalid_public_rate_limit_names_the_variable(
    monkeypatch: pytest.MonkeyPatch, text: str
) -> None:
    error = problems(monkeypatch, PUBLIC_RATE_LIMIT=text)
    assert_single_line_naming(error, "PUBLIC_RATE_LIMIT")


# --------------------------------------------------------------------------- other values


def test_lists_and_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load(
        monkeypatch,
        PUBLIC_CORS_ALLOWED_ORIGINS="https://app.example.com, http://localhost:3000",
        TRUSTED_PROXIES="10.0.0.0/8, 192.168.1.1",
        INTERNAL_API_TOKEN="s3cret-token",
        REDIS_PASSWORD="pw",
        REDIS_USERNAME="svc",
        REDIS_DB="3",
        GATEWAY_SESSION_EVENTS_MAXLEN="500",
        MAX_ACTIVE_SESSIONS_PER_USER="4",
        LOG_LEVEL="debug",
        LOG_FORMAT="console",
    )
    assert tuple(s.PUBLIC_CORS_ALLOWED_ORIGINS) == (
        "https://app.example.com",
        "http://localhost:3000",
    )
    assert ipaddress.ip_address("10.1.2.3") in s.TRUSTED_PROXIES[0]
    assert ipaddress.ip_address("192.168.1.1") in s.TRUSTED_PROXIES[1]
    assert s.INTERNAL_API_TOKEN is not None
    assert s.INTERNAL_API_TOKEN.get_secret_value() == "s3cret-token"
    # Secrets do not show in the settings' repr.
    assert "s3cret-token" not in repr(s)
    assert s.REDIS_PASSWORD is not None
    assert s.REDIS_PASSWORD.get_secret_value() == "pw"
    assert s.REDIS_USERNAME == "svc"
    assert s.REDIS_DB == 3
    assert s.GATEWAY_SESSION_EVENTS_MAXLEN == 500
    assert s.MAX_ACTIVE_SESSIONS_PER_USER == 4
    assert s.LOG_LEVEL == "debug"
    assert s.LOG_FORMAT == "console"


@pytest.mark.parametrize(
    ("variable", "text"),
    [
        ("USER_SERVICE_MODE", "grpc"),
        ("MAIL_SERVICE_MODE", "smtp"),
        ("REDIS_MODE", "replicated"),
        ("REDIS_DB", "-1"),
        ("REDIS_DB", "zero"),
        ("MAX_CONFIRM_ATTEMPTS", "0"),
        ("MAX_CONFIRM_ATTEMPTS", "many"),
        ("MAX_FAILED_CONFIRMS_PER_EMAIL", "0"),
        ("MAX_ACTIVE_SESSIONS_PER_USER", "-1"),
        ("GATEWAY_SESSION_EVENTS_MAXLEN", "0"),
        ("LOG_LEVEL", "verbose"),
        ("LOG_FORMAT", "xml"),
        ("TRUSTED_PROXIES", "not-an-ip"),
        ("PUBLIC_CORS_ALLOWED_ORIGINS", "app.example.com"),
    ],
)
def test_invalid_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, text: str
) -> None:
    error = problems(monkeypatch, **{variable: text})
    assert_single_line_naming(error, variable)


def test_missing_tls_ca_file_is_rejected(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    error = problems(monkeypatch, REDIS_TLS_CA_FILE=str(tmp_path / "missing.pem"))
    assert_single_line_naming(error, "REDIS_TLS_CA_FILE")
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    monkeypatch.setenv(P + "REDIS_TLS_CA_FILE", str(ca))
    ca_file = load_settings().REDIS_TLS_CA_FILE
    assert ca_file == str(ca)


# --------------------------------------------------------------------------- rest mode


@pytest.mark.parametrize("service", ["USER_SERVICE", "MAIL_SERVICE"])
def test_rest_mode_without_url_and_timeout_names_both(
    monkeypatch: pytest.MonkeyPatch, service: str
) -> None:
    error = problems(monkeypatch, **{f"{service}_MODE": "rest"})
    line = assert_single_line_naming(error, f"{service}_BASE_URL", f"{service}_REQUEST_TIMEOUT")
    assert "rest" in line


@pytest.mark.parametrize("service", ["USER_SERVICE", "MAIL_SERVICE"])
@pytest.mark.parametrize("missing", ["BASE_URL", "REQUEST_TIMEOUT"])
def test_rest_mode_with_one_missing_names_it(
    monkeypatch: pytest.MonkeyPatch, service: str, missing: str
) -> None:
    present = {"BASE_URL": "http://svc.test", "REQUEST_TIMEOUT": "2s"}
    present.pop(missing)
    error = problems(
        monkeypatch,
        **{f"{service}_MODE": "rest"},
        **{f"{service}_{k}": v for k, v in present.items()},
    )
    assert list(error.problems) == [f"{P}{service}_{missing}"]


def test_rest_mode_blank_values_count_as_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    error = problems(
        monkeypatch,
        USER_SERVICE_MODE="rest",
        USER_SERVICE_BASE_URL="  ",
        USER_SERVICE_REQUEST_TIMEOUT="",
    )
    assert_single_line_naming(error, "USER_SERVICE_BASE_URL", "USER_SERVICE_REQUEST_TIMEOUT")


@pytest.mark.parametrize("url", ["users.internal:8080", "ftp://users.internal", "http://"])
def test_rest_mode_invalid_base_url(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    error = problems(
        monkeypatch,
        USER_SERVICE_MODE="rest",
        USER_SERVICE_BASE_URL=url,
        USER_SERVICE_REQUEST_TIMEOUT="2s",
    )
    assert_single_line_naming(error, "USER_SERVICE_BASE_URL")


def test_stub_mode_needs_neither(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load(monkeypatch, USER_SERVICE_MODE="stub", MAIL_SERVICE_MODE="stub")
    assert s.USER_SERVICE_MODE == s.MAIL_SERVICE_MODE == "stub"


# --------------------------------------------------------------------------- all at once


def test_every_bad_variable_is_named_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    error = problems(
        monkeypatch,
        CHALLENGE_TTL="10x",
        SIGNUP_ENABLED="yes",
        PUBLIC_HTTP_ADDR="nonsense",
        PUBLIC_RATE_LIMIT="30/d",
        MAIL_SERVICE_MODE="rest",
        MAX_CONFIRM_ATTEMPTS="zero",
        REDIS_ADDR="localhost",
    )
    names = [
        "CHALLENGE_TTL",
        "SIGNUP_ENABLED",
        "PUBLIC_HTTP_ADDR",
        "PUBLIC_RATE_LIMIT",
        "MAIL_SERVICE_BASE_URL",
        "MAIL_SERVICE_REQUEST_TIMEOUT",
        "MAX_CONFIRM_ATTEMPTS",
        "REDIS_ADDR",
    ]
    line = assert_single_line_naming(error, *names)
    assert sorted(error.problems) == sorted(P + n for n in names)
    # The ConfigError's own message is that line too.
    assert str(error) == line


def test_field_and_cross_field_errors_are_reported_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    error = problems(
        monkeypatch,
        SESSION_TTL="forever",
        PUBLIC_HTTP_ADDR="127.0.0.1:9000",
        INTERNAL_HTTP_ADDR="127.0.0.1:9000",
        USER_SERVICE_MODE="rest",
    )
    line = error.one_line()
    assert P + "SESSION_TTL" in line
    assert P + "INTERNAL_HTTP_ADDR" in line or P + "PUBLIC_HTTP_ADDR" in line
    assert P + "USER_SERVICE_BASE_URL" in line
    assert P + "USER_SERVICE_REQUEST_TIMEOUT" in line
    assert "\n" not in line


def test_the_line_does_not_echo_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    error = problems(
        monkeypatch,
        INTERNAL_API_TOKEN="very-secret-token",
        REDIS_PASSWORD="very-secret-password",
        CHALLENGE_TTL="10x",
    )
    line = error.one_line()
    assert "very-secret" not in line


@pytest.mark.parametrize(
    ("raw", "tokens"),
    [("one", ("one",)), ("old, new", ("old", "new")), (" a ,b,, c ", ("a", "b", "c"))],
)
def test_internal_api_token_is_a_comma_separated_list(
    monkeypatch: pytest.MonkeyPatch, raw: str, tokens: tuple[str, ...]
) -> None:
    monkeypatch.setenv("AUTHSESSION_INTERNAL_API_TOKEN", raw)
    assert load_settings().internal_api_tokens == tokens


@pytest.mark.parametrize("raw", [",", " , ,", "good, bad token"])
def test_internal_api_token_without_a_usable_token_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch, raw: str
) -> None:
    monkeypatch.setenv("AUTHSESSION_INTERNAL_API_TOKEN", raw)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "AUTHSESSION_INTERNAL_API_TOKEN" in info.value.problems
    assert "good" not in info.value.one_line()  # a secret is never quoted


def test_unset_internal_api_token_means_no_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AUTHSESSION_INTERNAL_API_TOKEN", raising=False)
    assert load_settings().internal_api_tokens == ()

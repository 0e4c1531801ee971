"""Configuration from ``AUTHSESSION_*`` environment variables (CONTRACT §3).

:func:`load_settings` is the only entry point the process uses: it validates every field,
then the rules that span fields, and reports *every* problem at once in a
:class:`ConfigError`.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from authsession.domain.model import FixedConfig, RuntimeConfig
from authsession.domain.units import RateLimit, parse_bool, parse_duration, parse_rate_limit
from authsession.projection_codec import DEFAULT_EVENTS_STREAM, DEFAULT_KEY_PREFIX

ENV_PREFIX = "AUTHSESSION_"
# SESSION_RETENTION's rule: a replayed confirm must find the record of a session revoked
# meanwhile; otherwise it would write the session again, active.
RETENTION_RULE = f"must be at least {ENV_PREFIX}CONFIRM_IDEMPOTENCY_WINDOW"
# REDIS_ADDR of the embedded in-process store (development only).
MEMORY_STORE = "memory://"
# A bound on AUTHSESSION_WORKERS: a typo must not start thousands of processes.
MAX_WORKERS = 64


def is_memory_store(redis_addr: str) -> bool:
    """Whether a ``REDIS_ADDR`` names the embedded store (:data:`MEMORY_STORE`)."""
    return redis_addr.strip().lower().startswith(MEMORY_STORE)


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """A listener address: ``host:port``, ``:port`` or ``[::1]:port``."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_ADDR = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[^:\[\]]*)):(?P<port>\d{1,5})$")


def parse_listen_address(text: str) -> ListenAddress:
    """Parse a listener address; an empty host means every IPv4 interface."""
    match = _ADDR.match(text.strip())
    if match is None:
        raise ValueError(f"invalid address {text!r} (use host:port, :port or [::1]:port)")
    port = int(match.group("port"))
    if port > 65535:
        raise ValueError(f"port out of range in {text!r}")
    if match.group("v6") is not None:
        ipaddress.IPv6Address(match.group("v6"))
        return ListenAddress(match.group("v6"), port)
    return ListenAddress(match.group("host") or "0.0.0.0", port)  # noqa: S104 - ':port' means all


def _duration(value: Any) -> Any:
    return parse_duration(value) if isinstance(value, str) else value


def _positive(value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise ValueError("must be a positive duration")
    return value


def _not_negative(value: timedelta) -> timedelta:
    if value < timedelta(0):
        raise ValueError("must not be a negative duration")
    return value


def _bool(value: Any) -> Any:
    return parse_bool(value) if isinstance(value, str) else value


def _address(value: Any) -> Any:
    return parse_listen_address(value) if isinstance(value, str) else value


def _split_tokens(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _csv(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


def _networks(value: Any) -> Any:
    parts = _csv(value)
    return tuple(ipaddress.ip_network(p, strict=False) for p in parts)


def _rate_limit(value: Any) -> Any:
    return parse_rate_limit(value) if isinstance(value, str) else value


def _origins(value: tuple[str, ...]) -> tuple[str, ...]:
    for origin in value:
        if origin != "*" and not re.match(r"^https?://[^/\s]+$", origin):
            raise ValueError(f"invalid origin {origin!r} (use scheme://host[:port] or *)")
    return value


def _http_url(value: str | None) -> str | None:
    if value is not None and not re.match(r"^https?://[^\s/]+(/\S*)?$", value):
        raise ValueError(f"invalid URL {value!r} (use http:// or https://)")
    return value.rstrip("/") if value else value


Duration = Annotated[timedelta, BeforeValidator(_duration), AfterValidator(_positive)]
OptionalDuration = Annotated[timedelta, BeforeValidator(_duration), AfterValidator(_not_negative)]
Bool = Annotated[bool, BeforeValidator(_bool)]
Address = Annotated[ListenAddress, NoDecode, BeforeValidator(_address)]
CsvOrigins = Annotated[tuple[str, ...], NoDecode, BeforeValidator(_csv), AfterValidator(_origins)]
Networks = Annotated[
    tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...], NoDecode, BeforeValidator(_networks)
]
OptionalRateLimit = Annotated[RateLimit | None, NoDecode, BeforeValidator(_rate_limit)]
HttpUrl = Annotated[str | None, AfterValidator(_http_url)]
ServiceMode = Literal["stub", "rest"]


class Settings(BaseSettings):
    """Every variable of CONTRACT §3 with its default."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        case_sensitive=True,
        env_ignore_empty=True,
        extra="ignore",
        frozen=True,
    )

    PUBLIC_HTTP_ADDR: Address = parse_listen_address(":8080")
    INTERNAL_HTTP_ADDR: Address = parse_listen_address(":8081")
    # Per listener (and per worker): slow or idle clients cannot hold sockets forever.
    HTTP_KEEPALIVE_TIMEOUT: Duration = timedelta(seconds=5)
    HTTP_HEADER_TIMEOUT: Duration = timedelta(seconds=10)
    HTTP_MAX_CONNECTIONS: int = Field(default=1000, ge=1)
    # Server processes sharing both listening sockets under a supervising parent; 1 = no
    # parent, the process serves by itself.
    WORKERS: int = Field(default=1, ge=1, le=MAX_WORKERS)

    REDIS_ADDR: str = "127.0.0.1:6379"
    REDIS_MODE: Literal["standalone", "sentinel", "cluster"] = "standalone"
    REDIS_SENTINEL_MASTER: str | None = None
    REDIS_USERNAME: str | None = None
    REDIS_PASSWORD: SecretStr | None = None
    REDIS_DB: int = Field(default=0, ge=0)
    REDIS_TLS_ENABLED: Bool = False
    REDIS_TLS_CA_FILE: str | None = None
    REDIS_KEY_PREFIX: str = "authsession:"
    REDIS_OPERATION_TIMEOUT: Duration = timedelta(seconds=1)

    GATEWAY_SESSION_KEY_PREFIX: str = Field(default=DEFAULT_KEY_PREFIX, min_length=1)
    GATEWAY_SESSION_EVENTS_STREAM: str = Field(default=DEFAULT_EVENTS_STREAM, min_length=1)
    GATEWAY_SESSION_EVENTS_MAXLEN: int = Field(default=100_000, ge=1)

    USER_SERVICE_MODE: ServiceMode = "stub"
    USER_SERVICE_BASE_URL: HttpUrl = None
    USER_SERVICE_REQUEST_TIMEOUT: Duration | None = None
    MAIL_SERVICE_MODE: ServiceMode = "stub"
    MAIL_SERVICE_BASE_URL: HttpUrl = None
    MAIL_SERVICE_REQUEST_TIMEOUT: Duration | None = None

    STARTUP_CHECK_TIMEOUT: Duration = timedelta(seconds=2)
    SHUTDOWN_TIMEOUT: Duration = timedelta(seconds=10)

    CHALLENGE_TTL: Duration = timedelta(minutes=10)
    CHALLENGE_RETENTION: Duration = timedelta(hours=1)
    CONFIRM_IDEMPOTENCY_WINDOW: Duration = timedelta(minutes=5)
    RESEND_COOLDOWN: Duration = timedelta(minutes=1)
    MAX_CONFIRM_ATTEMPTS: int = Field(default=5, ge=1)
    MAX_FAILED_CONFIRMS_PER_EMAIL: int = Field(default=50, ge=1)
    SESSION_TTL: Duration = timedelta(hours=720)
    SESSION_RETENTION: Duration = timedelta(hours=168)
    MAX_ACTIVE_SESSIONS_PER_USER: int = Field(default=0, ge=0)
    SIGNUP_ENABLED: Bool = True
    CONFIG_REFRESH_INTERVAL: Duration = timedelta(seconds=10)
    # 0 turns the periodic reconciliation off.
    PROJECTION_RECONCILE_INTERVAL: OptionalDuration = timedelta(minutes=1)
    # send-email-code answers no sooner than this, whatever the outcome; 0 = off.
    SEND_EMAIL_CODE_MIN_DURATION: OptionalDuration = timedelta(milliseconds=250)

    # Comma-separated: any listed token is accepted (rotation); see internal_api_tokens.
    INTERNAL_API_TOKEN: SecretStr | None = None
    PUBLIC_CORS_ALLOWED_ORIGINS: CsvOrigins = ()
    TRUSTED_PROXIES: Networks = ()
    PUBLIC_RATE_LIMIT: OptionalRateLimit = None
    PUBLIC_RATE_LIMIT_IPV6_PREFIX: int = Field(default=64, ge=1, le=128)

    LOG_LEVEL: Literal["debug", "info", "warning", "error"] = "info"
    LOG_FORMAT: Literal["json", "console"] = "json"

    @field_validator("LOG_LEVEL", "LOG_FORMAT", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value

    @field_validator("REDIS_ADDR")
    @classmethod
    def _redis_addr(cls, value: str) -> str:
        text = value.strip()
        if is_memory_store(text):
            return text
        if "://" in text:
            if not re.match(r"^rediss?://[^\s/]+(/\d*)?$", text):
                raise ValueError("invalid Redis URL (use redis://[user:pass@]host:port[/db])")
            return text
        for part in text.split(","):
            host, sep, port = part.strip().rpartition(":")
            if not sep or not host or not port.isdigit() or int(port) > 65535:
                raise ValueError(
                    f"invalid Redis address (use host:port, a redis:// URL or {MEMORY_STORE})"
                )
        return text

    @field_validator("INTERNAL_API_TOKEN")
    @classmethod
    def _tokens(cls, value: SecretStr | None) -> SecretStr | None:
        # The message never quotes the value: it is a secret.
        if value is not None and not _split_tokens(value.get_secret_value()):
            raise ValueError("lists no token (use one token, or several separated by commas)")
        if value is not None and any(
            not t.isprintable() or " " in t for t in _split_tokens(value.get_secret_value())
        ):
            raise ValueError("a token must not contain spaces or control characters")
        return value

    @field_validator("SESSION_RETENTION")
    @classmethod
    def _retention_covers_replays(cls, value: timedelta, info: ValidationInfo) -> timedelta:
        # A field check, not a model one: it is reported under the variable's name
        # together with the other fields' problems. CONFIRM_IDEMPOTENCY_WINDOW is
        # declared first, so it is in info.data unless it failed its own check.
        window = info.data.get("CONFIRM_IDEMPOTENCY_WINDOW")
        if window is not None and value < window:
            raise ValueError(RETENTION_RULE)
        return value

    @field_validator("REDIS_TLS_CA_FILE")
    @classmethod
    def _readable_file(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).is_file():
            raise ValueError(f"file {value!r} does not exist")
        return value

    @property
    def internal_api_tokens(self) -> tuple[str, ...]:
        """Every accepted internal API token (empty: the internal listener needs none)."""
        if self.INTERNAL_API_TOKEN is None:
            return ()
        return _split_tokens(self.INTERNAL_API_TOKEN.get_secret_value())

    @property
    def memory_store(self) -> bool:
        """``memory://``: the embedded in-process store (development only)."""
        return is_memory_store(self.REDIS_ADDR)

    def runtime_defaults(self) -> RuntimeConfig:
        """The runtime limits before any ``<prefix>config`` override."""
        return RuntimeConfig(
            signup_enabled=self.SIGNUP_ENABLED,
            challenge_ttl=self.CHALLENGE_TTL,
            session_ttl=self.SESSION_TTL,
            max_confirm_attempts=self.MAX_CONFIRM_ATTEMPTS,
            max_failed_confirms_per_email=self.MAX_FAILED_CONFIRMS_PER_EMAIL,
            max_active_sessions_per_user=self.MAX_ACTIVE_SESSIONS_PER_USER,
            public_rate_limit=self.PUBLIC_RATE_LIMIT,
        )

    def fixed_config(self) -> FixedConfig:
        """Limits that only change with a restart."""
        return FixedConfig(
            challenge_retention=self.CHALLENGE_RETENTION,
            confirm_idempotency_window=self.CONFIRM_IDEMPOTENCY_WINDOW,
            resend_cooldown=self.RESEND_COOLDOWN,
            session_retention=self.SESSION_RETENTION,
        )


class ConfigError(Exception):
    """Invalid configuration; ``problems`` maps each offending variable to why."""

    def __init__(self, problems: dict[str, str]) -> None:
        self.problems = problems
        super().__init__(self.one_line())

    def one_line(self) -> str:
        """The single stderr line of CONTRACT §2."""
        parts = "; ".join(f"{name}: {why}" for name, why in self.problems.items())
        return f"authsession: invalid configuration: {parts}"


def _cross_field_problems(env: Mapping[str, str]) -> dict[str, str]:
    """Rules spanning variables, checked on the raw environment.

    Working on raw strings means these are reported together with per-field errors.
    """
    problems: dict[str, str] = {}

    def raw(name: str) -> str:
        return env.get(ENV_PREFIX + name, "").strip()

    for service in ("USER_SERVICE", "MAIL_SERVICE"):
        if raw(f"{service}_MODE") == "rest":
            for suffix in ("BASE_URL", "REQUEST_TIMEOUT"):
                if not raw(f"{service}_{suffix}"):
                    problems[f"{ENV_PREFIX}{service}_{suffix}"] = (
                        f"required when {ENV_PREFIX}{service}_MODE=rest"
                    )

    def value(name: str, parse: Callable[[str], Any]) -> Any:
        # The variable parsed, or the field's default: the defaults are written once.
        text = raw(name)
        return parse(text) if text else Settings.model_fields[name].default

    try:
        public = value("PUBLIC_HTTP_ADDR", parse_listen_address)
        internal = value("INTERNAL_HTTP_ADDR", parse_listen_address)
    except ValueError:
        pass  # reported by the field check
    else:
        if public == internal and public.port != 0:
            problems[f"{ENV_PREFIX}INTERNAL_HTTP_ADDR"] = (
                f"must differ from {ENV_PREFIX}PUBLIC_HTTP_ADDR ({public})"
            )
    problems.update(_redis_mode_problems(raw))
    workers = raw("WORKERS")
    if workers.isdigit() and int(workers) > 1 and is_memory_store(raw("REDIS_ADDR")):
        problems[f"{ENV_PREFIX}WORKERS"] = (
            f"must be 1 with {ENV_PREFIX}REDIS_ADDR={MEMORY_STORE} (the embedded store lives "
            "in one process; workers share their state through Redis)"
        )
    return problems


def _redis_mode_problems(raw: Callable[[str], str]) -> dict[str, str]:
    """What ``REDIS_MODE`` (standalone, sentinel, cluster) requires of ``REDIS_ADDR`` and co."""
    problems: dict[str, str] = {}
    mode = raw("REDIS_MODE")
    addr = raw("REDIS_ADDR")
    if mode in ("", "standalone") and "," in addr and "://" not in addr:
        problems[f"{ENV_PREFIX}REDIS_ADDR"] = (
            "standalone mode takes one address; a comma-separated list is for "
            f"{ENV_PREFIX}REDIS_MODE=sentinel or cluster"
        )
    if mode not in ("sentinel", "cluster"):
        return problems  # standalone, or an unknown mode reported by the field check
    if is_memory_store(addr):
        problems[f"{ENV_PREFIX}REDIS_MODE"] = f"{MEMORY_STORE} works only in standalone mode"
    elif "://" in addr:
        nodes = "sentinels" if mode == "sentinel" else "cluster nodes"
        problems[f"{ENV_PREFIX}REDIS_ADDR"] = (
            f"{ENV_PREFIX}REDIS_MODE={mode} takes a comma-separated list of host:port "
            f"addresses of the {nodes}, not a URL"
        )
    if mode == "sentinel" and not raw("REDIS_SENTINEL_MASTER"):
        problems[f"{ENV_PREFIX}REDIS_SENTINEL_MASTER"] = (
            f"required when {ENV_PREFIX}REDIS_MODE=sentinel (the master name the sentinels monitor)"
        )
    if mode == "cluster" and raw("REDIS_DB") not in ("", "0"):
        try:
            db = int(raw("REDIS_DB"))
        except ValueError:
            db = -1  # not a number: reported by the field check
        if db > 0:
            problems[f"{ENV_PREFIX}REDIS_DB"] = (
                f"must be 0 when {ENV_PREFIX}REDIS_MODE=cluster (Redis Cluster has only database 0)"
            )
    return problems


def load_settings() -> Settings:
    """Read and validate the environment, raising :class:`ConfigError` with every problem."""
    problems: dict[str, str] = {}
    settings: Settings | None = None
    try:
        settings = Settings()
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            if not error["loc"]:
                continue  # a rule across fields: reported by _cross_field_problems
            name = ENV_PREFIX + str(error["loc"][0])
            message = str(error["msg"]).removeprefix("Value error, ")
            problems.setdefault(name, message)
    for name, why in _cross_field_problems(os.environ).items():
        problems.setdefault(name, why)
    if problems or settings is None:
        raise ConfigError(dict(sorted(problems.items())))
    return settings

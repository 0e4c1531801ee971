"""The compose stack and its deploy/ files agree with the code and the contract.

Docker does not run in the test environment, so compose.yaml is checked by reading it:
its environment must be a valid configuration, its ports and URLs must line up, and the
Redis configuration and ACL file must give a session store and least-privilege users.
deploy/fake_services.py is run for real, and so is deploy/redis.conf + users.acl when a
``redis-server`` binary is available (the service then logs in through both).
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import redis
import yaml

from authsession.settings import ENV_PREFIX, Settings, load_settings, parse_listen_address
from tests.support.net import LOOPBACK, free_port

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
DEPLOY = ROOT / "deploy"
REDIS_CONF = DEPLOY / "redis.conf"
USERS_ACL = DEPLOY / "users.acl"
FAKES = DEPLOY / "fake_services.py"
LUA_SCRIPTS = ROOT / "authsession" / "redis" / "scripts"

VARIABLE = re.compile(r"\bAUTHSESSION_[A-Z0-9_]*[A-Z0-9]\b")
LISTENING = re.compile(r"^(user|mail) service listening on ([0-9.]+):(\d+)$")
MAIL_LINE = re.compile(
    r"^mail service: login code (?P<code>\d{6}) for (?P<email>\S+) "
    r"\(challenge_id=(?P<challenge_id>\S+) expires_at=(?P<expires_at>\S+) "
    r"locale=(?P<locale>\S+)\)$"
)

# Commands that only read data (plus what any client needs to connect). The gateway user
# may have nothing else.
READ_ONLY_COMMANDS = {
    "get",
    "info",  # the gateway follower reads the run id (INFO server) to notice a reset
    "mget",
    "exists",
    "pttl",
    "ttl",
    "type",
    "scan",
    "xread",
    "xrange",
    "xrevrange",
    "xlen",
    "xinfo",
    "strlen",
}
# Commands the service sends from Python (the Lua scripts' own are read from the scripts).
SERVICE_COMMANDS = {
    "ping",
    "hset",
    "hgetall",
    "pexpireat",
    "pexpire",
    "set",
    "exists",
    "zadd",
    "zcount",
    "zremrangebyscore",
    "zrevrange",
    "zrange",
    "scan",
    "get",
    "zrem",
    "xadd",
    "multi",
    "exec",
    "eval",
    "evalsha",
    "script|load",
}


# --------------------------------------------------------------------------- parsing
def compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def service(name: str) -> dict[str, Any]:
    services = compose()["services"]
    assert name in services, f"compose.yaml has no {name!r} service"
    svc = services[name]
    assert isinstance(svc, dict)
    return svc


def environment(svc: dict[str, Any]) -> dict[str, str]:
    """A service's environment as strings (mapping or ``KEY=VALUE`` list form)."""
    raw = svc.get("environment") or {}
    if isinstance(raw, list):
        pairs = (str(item).partition("=") for item in raw)
        return {key: value for key, _, value in pairs}
    return {str(k): "" if v is None else str(v) for k, v in raw.items()}


def command(svc: dict[str, Any]) -> list[str]:
    raw = svc.get("command") or []
    return shlex.split(raw) if isinstance(raw, str) else [str(part) for part in raw]


def option(args: list[str], name: str) -> str:
    assert name in args, f"{name} missing from {args}"
    return args[args.index(name) + 1]


def published_targets(svc: dict[str, Any]) -> set[int]:
    """Container ports of a service's ``ports`` (short and long syntax)."""
    targets: set[int] = set()
    for entry in svc.get("ports") or []:
        if isinstance(entry, dict):
            targets.add(int(entry["target"]))
        else:
            spec = str(entry).split("/")[0]
            targets.add(int(spec.rsplit(":", 1)[-1]))
    return targets


def mounts(svc: dict[str, Any]) -> dict[str, str]:
    """Bind mounts of a service: container path → host path (relative to the repo)."""
    found: dict[str, str] = {}
    for entry in svc.get("volumes") or []:
        source, _, rest = str(entry).partition(":")
        target = rest.split(":")[0]
        if source.startswith("."):
            found[target] = source
    return found


def redis_directives() -> dict[str, list[list[str]]]:
    directives: dict[str, list[list[str]]] = {}
    for line in REDIS_CONF.read_text(encoding="utf-8").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            directives.setdefault(words[0].lower(), []).append(words[1:])
    return directives


def redis_setting(name: str) -> str:
    values = redis_directives().get(name)
    assert values, f"deploy/redis.conf does not set {name}"
    return " ".join(values[-1])


@dataclass
class AclUser:
    name: str
    rules: list[str]

    @property
    def enabled(self) -> bool:
        states = [r for r in self.rules if r in ("on", "off")]
        return bool(states) and states[-1] == "on"

    @property
    def key_patterns(self) -> set[str]:
        return {r for r in self.rules if r.startswith(("~", "%")) or r == "allkeys"}

    @property
    def passwords(self) -> list[str]:
        return [r[1:] for r in self.rules if r.startswith(">")]

    @property
    def added_commands(self) -> set[str]:
        return {r[1:].lower() for r in self.rules if r.startswith("+") and not r.startswith("+@")}

    @property
    def added_categories(self) -> set[str]:
        return {r[2:].lower() for r in self.rules if r.startswith("+@")}

    def allows(self, command: str) -> bool:
        """Whether an explicit ``+command`` (or ``+command|sub``'s parent) is granted."""
        parent = command.split("|")[0]
        return command in self.added_commands or parent in self.added_commands


def acl_users() -> dict[str, AclUser]:
    users: dict[str, AclUser] = {}
    for line in USERS_ACL.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        words = line.split()
        assert words[0] == "user", f"every ACL line starts with 'user': {line!r}"
        users[words[1]] = AclUser(words[1], words[2:])
    return users


def lua_commands() -> set[str]:
    found: set[str] = set()
    for script in LUA_SCRIPTS.glob("*.lua"):
        found |= {
            m.lower()
            for m in re.findall(r"redis\.call\(\s*'([A-Za-z]+)'", script.read_text("utf-8"))
        }
    return found


def default(name: str) -> str:
    """The default of a string setting (independent of the test's environment)."""
    value = Settings.model_fields[name].default
    assert isinstance(value, str)
    return value


def settings_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """Make ``env`` the whole ``AUTHSESSION_*``/``OTEL_*`` environment."""
    for name in list(os.environ):
        if name.startswith((ENV_PREFIX, "OTEL_")):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


# --------------------------------------------------------------------------- compose.yaml
def test_authsession_variables_are_settings_fields() -> None:
    env = environment(service("authsession"))
    names = [n for n in env if n.startswith(ENV_PREFIX)]
    assert names, "the authsession service sets no AUTHSESSION_* variable"
    unknown = sorted(n for n in names if n.removeprefix(ENV_PREFIX) not in Settings.model_fields)
    assert unknown == [], f"not fields of Settings: {unknown}"


def test_environment_is_a_valid_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    env = environment(service("authsession"))
    settings_env(monkeypatch, env)
    settings = load_settings()
    assert settings.REDIS_ADDR == "redis:6379"
    assert settings.REDIS_USERNAME == "authsession"
    assert settings.REDIS_PASSWORD is not None
    assert settings.USER_SERVICE_MODE == "rest"
    assert settings.MAIL_SERVICE_MODE == "rest"
    assert settings.USER_SERVICE_REQUEST_TIMEOUT is not None
    assert settings.MAIL_SERVICE_REQUEST_TIMEOUT is not None
    assert settings.INTERNAL_API_TOKEN is not None
    assert settings.LOG_FORMAT == "json"
    # Whatever file-valued variable is set must name a file that exists where it is read.
    assert settings.REDIS_TLS_CA_FILE is None


def test_redis_credentials_match_the_acl_file() -> None:
    env = environment(service("authsession"))
    users = acl_users()
    username = env["AUTHSESSION_REDIS_USERNAME"]
    assert username in users
    assert users[username].enabled
    assert env["AUTHSESSION_REDIS_PASSWORD"] in users[username].passwords
    for user in users.values():
        assert all("placeholder" in p for p in user.passwords), (
            f"ACL user {user.name}: passwords must be marked as development placeholders"
        )
    assert "placeholder" in env["AUTHSESSION_INTERNAL_API_TOKEN"]


def test_both_listeners_are_published() -> None:
    svc = service("authsession")
    env = environment(svc)
    public = parse_listen_address(env.get("AUTHSESSION_PUBLIC_HTTP_ADDR", ":8080"))
    internal = parse_listen_address(env.get("AUTHSESSION_INTERNAL_HTTP_ADDR", ":8081"))
    assert (public.port, internal.port) == (8080, 8081)
    assert published_targets(svc) >= {8080, 8081}
    assert public.host == internal.host == "0.0.0.0", "listeners must be reachable in the network"


def test_authsession_is_built_from_the_dockerfile_and_waits_for_redis() -> None:
    svc = service("authsession")
    build = svc["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert (ROOT / context / dockerfile).resolve() == (ROOT / "Dockerfile").resolve()
    assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "healthcheck" in service("redis")

    text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^FROM python:3\.12-slim\b", text, re.M)
    assert re.search(r'^ENTRYPOINT \["authsession"\]$', text, re.M)
    assert re.search(r"^EXPOSE 8080 8081$", text, re.M)
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user, "the image must switch to an unprivileged user"
    assert not user[-1].startswith(("root", "0")), "the image must not run as root"


def test_service_urls_point_at_the_fakes() -> None:
    env = environment(service("authsession"))
    fakes = command(service("fakes"))
    assert any(part.endswith("fake_services.py") for part in fakes)
    assert mounts(service("fakes")).get(next(p for p in fakes if p.endswith(".py"))) == (
        "./deploy/fake_services.py"
    )
    for kind, flag in (("USER", "--user-port"), ("MAIL", "--mail-port")):
        url = urlsplit(env[f"AUTHSESSION_{kind}_SERVICE_BASE_URL"])
        assert url.scheme == "http"
        assert url.hostname == "fakes"
        assert url.port == int(option(fakes, flag))
    assert option(fakes, "--host") == "0.0.0.0"


def test_redis_is_configured_as_a_session_store() -> None:
    assert redis_setting("maxmemory-policy") == "noeviction"
    assert redis_setting("appendonly") == "yes"
    assert redis_setting("appendfsync") == "everysec"

    svc = service("redis")
    assert str(svc["image"]).split(":")[0] == "redis"
    assert str(svc["image"]).split(":")[1].startswith("7")
    files = mounts(svc)
    conf_path = command(svc)[-1]
    assert files.get(conf_path) == "./deploy/redis.conf"
    assert files.get(redis_setting("aclfile")) == "./deploy/users.acl"


def test_acl_default_user_is_disabled() -> None:
    default = acl_users()["default"]
    assert not default.enabled
    assert "nopass" not in default.rules
    assert not default.passwords


def test_acl_gateway_user_only_reads_gateway_keys() -> None:
    gateway = acl_users()["gateway"]
    assert gateway.enabled
    assert gateway.key_patterns == {f"~{default('GATEWAY_SESSION_KEY_PREFIX').split(':')[0]}:*"}
    assert "-@all" in gateway.rules
    assert gateway.rules.index("-@all") < min(
        i for i, r in enumerate(gateway.rules) if r.startswith("+")
    )
    assert gateway.added_categories <= {"connection"}
    if "connection" in gateway.added_categories:
        assert "-@dangerous" in gateway.rules
    extra = gateway.added_commands - READ_ONLY_COMMANDS
    assert extra == set(), f"gateway may only read, but gets {sorted(extra)}"
    for needed in ("get", "xread", "xrange", "xrevrange", "xinfo", "info"):
        assert gateway.allows(needed), f"gateway needs {needed}"


def test_acl_authsession_user_has_what_the_service_sends() -> None:
    user = acl_users()["authsession"]
    gateway_namespace = default("GATEWAY_SESSION_KEY_PREFIX").split(":")[0] + ":"
    assert user.enabled
    assert user.key_patterns == {
        f"~{default('REDIS_KEY_PREFIX')}*",
        f"~{gateway_namespace}*",
    }
    assert default("GATEWAY_SESSION_EVENTS_STREAM").startswith(gateway_namespace)
    assert "+@all" not in user.rules
    assert "allkeys" not in user.rules
    needed = (lua_commands() | SERVICE_COMMANDS) - {"ping"}
    missing = sorted(c for c in needed if not user.allows(c))
    assert missing == [], f"the authsession ACL user lacks {missing}"


# --------------------------------------------------------------------------- docs
# Variables the docs announce as being built (CONTRACT §12), before the settings read them.
ANNOUNCED: set[str] = set()


def test_documented_variables_exist() -> None:
    runbook = ROOT / "RUNBOOK.md"
    assert runbook.is_file(), "RUNBOOK.md is missing"
    docs = [runbook]
    readme = ROOT / "README.md"
    if readme.is_file():
        docs.append(readme)
    for doc in docs:
        named = set(VARIABLE.findall(doc.read_text(encoding="utf-8")))
        assert named, f"{doc.name} names no AUTHSESSION_* variable"
        unknown = sorted(
            n
            for n in named
            if n.removeprefix(ENV_PREFIX) not in Settings.model_fields and n not in ANNOUNCED
        )
        assert unknown == [], f"{doc.name} names variables that do not exist: {unknown}"


# --------------------------------------------------------------------------- fake services
@dataclass
class FakeServices:
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)
    ports: dict[str, int] = field(default_factory=dict)

    def url(self, kind: str) -> str:
        return f"http://{LOOPBACK}:{self.ports[kind]}"

    def read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()

    def wait_for(self, pattern: re.Pattern[str], start: int = 0, timeout: float = 10.0) -> str:
        """The first line matching ``pattern`` at or after index ``start``."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for line in self.lines[start:]:
                    if pattern.search(line):
                        return line
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no line matching {pattern.pattern!r} in {self.lines}"
                self.cond.wait(remaining)

    def mark(self) -> int:
        with self.cond:
            return len(self.lines)


@pytest.fixture(scope="module")
def fakes() -> Iterator[FakeServices]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-u",
            str(FAKES),
            "--host",
            LOOPBACK,
            "--user-port",
            "0",
            "--mail-port",
            "0",
            "--users",
            "known@example.com",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    running = FakeServices(proc)
    reader = threading.Thread(target=running.read, daemon=True)
    reader.start()
    try:
        for kind in ("user", "mail"):
            line = running.wait_for(re.compile(rf"^{kind} service listening on "))
            match = LISTENING.match(line)
            assert match is not None, line
            running.ports[kind] = int(match.group(3))
        yield running
        proc.terminate()  # SIGTERM: the fakes must stop cleanly (PID 1 in a container)
        assert proc.wait(timeout=10) == 0
        running.wait_for(re.compile(r"^fake services stopped$"))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=5)
        if proc.stdout is not None:
            proc.stdout.close()


def test_fake_user_service(fakes: FakeServices) -> None:
    with httpx.Client(base_url=fakes.url("user"), timeout=5) as client:
        resolve = client.post("/api/v1/users/resolve-by-email", json={"email": "new@example.com"})
        assert (resolve.status_code, resolve.json()) == (200, {"outcome": "unknown"})

        created = client.post("/api/v1/users/ensure", json={"email": "new@example.com"})
        assert created.status_code == 200
        user_id = created.json()["user_id"]
        assert created.json() == {"user_id": user_id, "outcome": "created"}
        assert re.fullmatch(r"[A-Za-z0-9._:@-]{1,128}", user_id)

        again = client.post("/api/v1/users/ensure", json={"email": "new@example.com"})
        assert again.json() == {"user_id": user_id, "outcome": "existing"}
        resolve = client.post("/api/v1/users/resolve-by-email", json={"email": "new@example.com"})
        assert resolve.json() == {"outcome": "existing", "user_id": user_id}

        known = client.post("/api/v1/users/resolve-by-email", json={"email": "known@example.com"})
        assert known.json()["outcome"] == "existing"

        blocked = client.post(f"/api/v1/users/{user_id}/block", json={"reason": "abuse"})
        assert blocked.status_code in (200, 204)
        resolve = client.post("/api/v1/users/resolve-by-email", json={"email": "new@example.com"})
        assert resolve.json() == {"outcome": "blocked", "user_id": user_id}
        ensure = client.post("/api/v1/users/ensure", json={"email": "new@example.com"})
        assert ensure.json() == {"user_id": user_id, "outcome": "blocked"}

        unknown = client.post("/api/v1/users/usr_nobody/block", json={"reason": "abuse"})
        assert unknown.status_code == 404

        assert client.post("/api/v1/users/ensure", json={}).status_code == 400
        assert client.post("/api/v1/users/ensure", content=b"not json").status_code == 400
        assert client.post("/api/v1/users/nothing-here", json={}).status_code == 404


def test_fake_mail_service_prints_the_code(fakes: FakeServices) -> None:
    body = {
        "email": "jane@example.com",
        "code": "123456",
        "challenge_id": "c" * 32,
        "expires_at": "2030-01-01T00:00:00.000Z",
        "locale": "en",
    }
    with httpx.Client(base_url=fakes.url("mail"), timeout=5) as client:
        start = fakes.mark()
        sent = client.post(
            "/api/v1/mail/login-code", json=body, headers={"Idempotency-Key": "c" * 32}
        )
        assert sent.is_success
        line = fakes.wait_for(MAIL_LINE, start)
        match = MAIL_LINE.match(line)
        assert match is not None
        assert match.group("code") == "123456"
        assert match.group("email") == "jane@example.com"
        assert match.group("challenge_id") == "c" * 32

        # The same Idempotency-Key again: accepted, not printed twice.
        repeat = client.post(
            "/api/v1/mail/login-code", json=body, headers={"Idempotency-Key": "c" * 32}
        )
        assert repeat.is_success
        assert repeat.json()["duplicate"] is True

        null_locale = dict(body, locale=None, challenge_id="d" * 32)
        assert client.post(
            "/api/v1/mail/login-code", json=null_locale, headers={"Idempotency-Key": "d" * 32}
        ).is_success

        no_key = client.post("/api/v1/mail/login-code", json=dict(body, challenge_id="e" * 32))
        assert no_key.status_code == 400
        bad_code = client.post(
            "/api/v1/mail/login-code",
            json=dict(body, code="12345"),
            headers={"Idempotency-Key": "f" * 32},
        )
        assert bad_code.status_code == 400
    with fakes.cond:
        printed = [line for line in fakes.lines[start:] if MAIL_LINE.match(line)]
    assert len(printed) == 2


# --------------------------------------------------------------------------- live Redis
@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[int]:
    """deploy/redis.conf with deploy/users.acl on a local redis-server (paths rewritten)."""
    from tests.support.redis_server import RedisServerError, find_redis_server

    try:
        binary = find_redis_server()
    except RedisServerError as exc:
        pytest.skip(str(exc))
    port = free_port()
    replaced = {
        "dir": str(tmp_path),
        "aclfile": str(USERS_ACL),
        "port": str(port),
        "bind": LOOPBACK,
        "daemonize": "no",
    }
    lines = []
    for line in REDIS_CONF.read_text(encoding="utf-8").splitlines():
        words = shlex.split(line, comments=True)
        if words and words[0].lower() in replaced:
            continue
        lines.append(line)
    lines += [f"{name} {value}" for name, value in replaced.items()]
    conf = tmp_path / "redis.conf"
    conf.write_text("\n".join(lines) + "\n", encoding="utf-8")
    log = (tmp_path / "redis.log").open("wb")
    proc = subprocess.Popen([binary, str(conf)], stdout=log, stderr=subprocess.STDOUT)
    password = acl_users()["gateway"].passwords[0]
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, (tmp_path / "redis.log").read_text()
            with (
                contextlib.suppress(redis.ConnectionError),
                redis.Redis(port=port, username="gateway", password=password) as probe,
            ):
                if probe.ping():
                    break
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def _user_client(port: int, name: str) -> redis.Redis:
    return redis.Redis(
        port=port,
        username=name,
        password=acl_users()[name].passwords[0],
        decode_responses=True,
    )


@pytest.mark.timeout(60)
async def test_login_through_the_acl_users(
    acl_redis: int, fakes: FakeServices, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compose environment, pointed at local Redis and fakes, runs a whole login."""
    from authsession.http.internal import create_internal_app
    from authsession.http.public import create_public_app
    from authsession.wiring import build_core

    env = environment(service("authsession"))
    env["AUTHSESSION_REDIS_ADDR"] = f"{LOOPBACK}:{acl_redis}"
    env["AUTHSESSION_USER_SERVICE_BASE_URL"] = fakes.url("user")
    env["AUTHSESSION_MAIL_SERVICE_BASE_URL"] = fakes.url("mail")
    settings_env(monkeypatch, env)
    settings = load_settings()
    token = env["AUTHSESSION_INTERNAL_API_TOKEN"]

    core = build_core(settings)
    try:
        await core.check()
        public = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_public_app(core)), base_url="http://public"
        )
        internal = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_internal_app(core)),
            base_url="http://internal",
            headers={"Authorization": f"Bearer {token}"},
        )
        async with public, internal:
            start = fakes.mark()
            sent = await public.post(
                "/api/v1/public/auth/send-email-code", json={"email": "Compose@Example.com"}
            )
            assert sent.status_code == 200, sent.text
            challenge_id = sent.json()["challenge_id"]
            line = fakes.wait_for(re.compile(re.escape(f"challenge_id={challenge_id}")), start)
            match = MAIL_LINE.match(line)
            assert match is not None
            assert match.group("email") == "compose@example.com"

            confirmed = await public.post(
                "/api/v1/public/auth/confirm",
                json={"challenge_id": challenge_id, "code": match.group("code")},
            )
            assert confirmed.status_code == 200, confirmed.text
            session_id = confirmed.json()["device_session_id"]
            user_id = confirmed.json()["user_id"]

            listed = await internal.get(f"/api/v1/internal/users/{user_id}/sessions")
            assert [s["device_session_id"] for s in listed.json()["sessions"]] == [session_id]
            revoked = await internal.post(f"/api/v1/internal/sessions/{session_id}/revoke")
            assert revoked.json()["status"] == "revoked"
            blocked = await internal.post(f"/api/v1/internal/users/{user_id}/block", json={})
            assert blocked.status_code == 200, blocked.text
    finally:
        await core.aclose()

    # The gateway user reads the projection and nothing else.
    with _user_client(acl_redis, "gateway") as gateway:
        snapshot = gateway.get(f"gateway:session:{session_id}")
        assert snapshot is not None
        assert '"status":"revoked"' in snapshot
        events = gateway.xrevrange("gateway:session_events", count=1)
        assert events
        assert events[0][1]["device_session_id"] == session_id
        gateway.xread({"gateway:session_events": "0-0"}, count=1)
        gateway.xinfo_stream("gateway:session_events")
        with pytest.raises(redis.exceptions.NoPermissionError):
            gateway.set(f"gateway:session:{session_id}", "{}")
        with pytest.raises(redis.exceptions.NoPermissionError):
            gateway.xadd("gateway:session_events", {"event": "forged"})
        with pytest.raises(redis.exceptions.NoPermissionError):
            gateway.hgetall(f"authsession:session:{session_id}")
    # The service user cannot step outside its key namespaces.
    with _user_client(acl_redis, "authsession") as service_user:
        with pytest.raises(redis.exceptions.NoPermissionError):
            service_user.get("other:key")
        with pytest.raises(redis.exceptions.NoPermissionError):
            service_user.flushall()
    # The default user is off.
    with (
        redis.Redis(port=acl_redis) as anonymous,
        pytest.raises((redis.exceptions.AuthenticationError, redis.exceptions.ResponseError)),
    ):
        anonymous.get("gateway:session:x")

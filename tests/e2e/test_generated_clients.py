"""The committed OpenAPI documents generate Python clients that work against the process.

``openapi-python-client`` (dev extra) generates a client from ``openapi/public.yaml`` and
one from ``openapi/internal.yaml``, once per test session; the login flow and internal
calls then go through those clients to the real ``authsession`` process. This proves what
the documents promise client authors: one module per tag (no ``default``), timestamps
parsed as ``datetime``, error codes as an enum, the bearer token of the internal API.
"""

from __future__ import annotations

import contextlib
import importlib
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests.support.process import AuthsessionFactory, AuthsessionProcess
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.e2e

OPENAPI = Path(__file__).resolve().parents[2] / "openapi"
TOKEN = "generated-client-test-token"
PACKAGES = {"public": "authsession_public_client", "internal": "authsession_internal_client"}


@pytest.fixture(scope="session")
def clients(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """``{"public": <package dir>, "internal": <package dir>}``, importable."""
    root = tmp_path_factory.mktemp("generated-clients")
    config = root / "config.yaml"
    config.write_text("post_hooks: []\n", encoding="utf-8")  # no formatter run: faster
    generator = Path(sys.executable).parent / "openapi-python-client"
    packages: dict[str, Path] = {}
    for document, package in PACKAGES.items():
        target = root / package
        result = subprocess.run(
            [
                str(generator),
                "generate",
                "--path",
                str(OPENAPI / f"{document}.yaml"),
                "--config",
                str(config),
                "--meta",
                "none",
                "--output-path",
                str(target),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        # Anything the generator could not express is a warning on its output.
        assert "Warning" not in result.stdout + result.stderr, result.stdout + result.stderr
        packages[document] = target
    sys.path.insert(0, str(root))
    yield packages
    sys.path.remove(str(root))
    for name in list(sys.modules):
        if name.split(".")[0] in PACKAGES.values():
            del sys.modules[name]


def module(document: str, name: str) -> ModuleType:
    return importlib.import_module(f"{PACKAGES[document]}.{name}")


def stub_code(process: AuthsessionProcess, challenge_id: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in process.log_records():
            if record.get("challenge_id") == challenge_id and "code" in record:
                return str(record["code"])
        time.sleep(0.02)
    raise AssertionError(f"no stub mail line for {challenge_id}\n{process.output_report()}")


def test_every_operation_lands_in_the_module_of_its_tag(clients: dict[str, Path]) -> None:
    modules = {
        document: {
            str(p.relative_to(path / "api")).removesuffix(".py")
            for p in (path / "api").glob("*/*.py")
            if p.name != "__init__.py"
        }
        for document, path in clients.items()
    }
    assert not [n for names in modules.values() for n in names if n.startswith("default/")]
    assert {"auth/confirm", "auth/send_email_code"} <= modules["public"]
    assert {
        "sessions/extend_session",
        "sessions/get_session",
        "sessions/revoke_session",
        "users/block_user",
        "users/list_sessions",
        "users/revoke_all",
    } <= modules["internal"]


def test_login_and_internal_calls_through_the_generated_clients(
    clients: dict[str, Path],
    authsession_process: AuthsessionFactory,
    redis_server: RedisServer,
) -> None:
    process = authsession_process(
        {
            "AUTHSESSION_REDIS_ADDR": redis_server.addr,
            "AUTHSESSION_REDIS_KEY_PREFIX": "generated-client:",
            "AUTHSESSION_INTERNAL_API_TOKEN": TOKEN,
        }
    )
    process.wait_ready()
    with contextlib.ExitStack() as stack:
        public: Any = stack.enter_context(
            module("public", "client").Client(base_url=process.public_url)
        )
        internal: Any = stack.enter_context(
            module("internal", "client").AuthenticatedClient(
                base_url=process.internal_url, token=TOKEN
            )
        )
        anonymous: Any = stack.enter_context(
            module("internal", "client").Client(base_url=process.internal_url)
        )
        login_and_manage(process, public, internal, anonymous)


def login_and_manage(
    process: AuthsessionProcess, public: Any, internal: Any, anonymous: Any
) -> None:
    public_models: Any = module("public", "models")
    internal_models: Any = module("internal", "models")
    send_email_code: Any = module("public", "api.auth.send_email_code")
    confirm: Any = module("public", "api.auth.confirm")
    list_sessions: Any = module("internal", "api.users.list_sessions")
    get_session: Any = module("internal", "api.sessions.get_session")

    before = datetime.now(UTC)
    challenge = send_email_code.sync(
        client=public, body=public_models.SendEmailCodeRequest(email="gen.client@example.com")
    )
    assert isinstance(challenge, public_models.ChallengeResponse), challenge
    assert isinstance(challenge.expires_at, datetime)
    assert challenge.expires_at > before

    code = stub_code(process, challenge.challenge_id)
    wrong = f"{(int(code) + 1) % 1_000_000:06d}"
    rejected = confirm.sync_detailed(
        client=public,
        body=public_models.ConfirmRequest(challenge_id=challenge.challenge_id, code=wrong),
    )
    assert rejected.status_code == 400
    assert isinstance(rejected.parsed, public_models.ErrorResponse)
    assert rejected.parsed.error.code is public_models.ErrorDetailCode.INVALID_CODE
    assert rejected.parsed.error.details.additional_properties == {"attempts_remaining": 4}

    session = confirm.sync(
        client=public,
        body=public_models.ConfirmRequest(
            challenge_id=challenge.challenge_id, code=code, device_name="generated client"
        ),
    )
    assert isinstance(session, public_models.ConfirmResponse), session
    assert session.created is True
    assert session.session_token.startswith(session.device_session_id + ".")

    listed = list_sessions.sync(session.user_id, client=internal)
    assert isinstance(listed, internal_models.SessionListResponse), listed
    assert [s.device_session_id for s in listed.sessions] == [session.device_session_id]
    (record,) = listed.sessions
    assert record.status is internal_models.SessionResponseStatus.ACTIVE
    assert record.device_name == "generated client"
    assert isinstance(record.created_at, datetime)
    assert record.expires_at == session.expires_at
    assert record.revoked_at is None

    one = get_session.sync(session.device_session_id, client=internal)
    assert isinstance(one, internal_models.SessionResponse), one
    assert one.version == record.version

    refused = get_session.sync_detailed(session.device_session_id, client=anonymous)
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == "Bearer"
    assert refused.parsed.error.code is internal_models.ErrorDetailCode.UNAUTHORIZED

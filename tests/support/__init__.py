"""Reusable test harness: private redis-server processes, the authsession process, and
fake user/mail services. See the module docstrings for details."""

from tests.support.fake_services import (
    FakeHTTPService,
    FakeMailService,
    FakeUserService,
    MailMessage,
    RecordedRequest,
    Response,
)
from tests.support.net import free_port, free_ports, port_accepts, wait_port
from tests.support.process import (
    AuthsessionFactory,
    AuthsessionProcess,
    AuthsessionProcessError,
    authsession_script,
    base_env,
    port_of,
)
from tests.support.redis_server import RedisServer, RedisServerError, find_redis_server

__all__ = [
    "AuthsessionFactory",
    "AuthsessionProcess",
    "AuthsessionProcessError",
    "FakeHTTPService",
    "FakeMailService",
    "FakeUserService",
    "MailMessage",
    "RecordedRequest",
    "RedisServer",
    "RedisServerError",
    "Response",
    "authsession_script",
    "base_env",
    "find_redis_server",
    "free_port",
    "free_ports",
    "port_accepts",
    "port_of",
    "wait_port",
]

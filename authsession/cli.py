"""Entry point: settings → logging → checks → serve. Exit status 0, 1 or 2 (CONTRACT §2)."""

from __future__ import annotations

import logging
import sys

from authsession.settings import ConfigError, Settings, load_settings
from authsession.telemetry import configure_logging

log = logging.getLogger("authsession")


def _startup_warnings(settings: Settings) -> None:
    if settings.INTERNAL_API_TOKEN is None:
        log.warning(
            "AUTHSESSION_INTERNAL_API_TOKEN is not set: the internal listener trusts its "
            "network and accepts every request",
            extra={"listener": "internal"},
        )


def main() -> int:
    """Run the service; the process exit status."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(exc.one_line(), file=sys.stderr, flush=True)
        return 2
    configure_logging(settings.LOG_LEVEL, settings.LOG_FORMAT)
    _startup_warnings(settings)

    import uvloop

    from authsession.runner import run

    try:
        return uvloop.run(run(settings))
    except KeyboardInterrupt:  # a signal before the handlers were installed
        return 0

"""The ``authsession`` command (CONTRACT §2 and §12): serve, ``check``, ``projection``.

Exit statuses: 0 success; 1 a component failed (wiring, a startup check, a listener, or
drift found by ``projection check``); 2 a usage or configuration error, or the service's
dependencies (the ``server`` extra) are not installed.

Only the standard library is imported until the arguments are parsed, so ``--help``,
``--version`` and a usage error answer at once, open no connection and work even where
only the gateway library is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, cast

from authsession import __version__

if TYPE_CHECKING:
    from authsession.settings import Settings

log = logging.getLogger("authsession")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

SERVER_EXTRA_HINT = (
    "authsession: the service is not installed (missing module {module!r}); "
    "`pip install authsession` is the gateway library only, the service is "
    "`pip install 'authsession[server]'`"
)

DESCRIPTION = """\
Passwordless e-mail login and device sessions. Without a command, serve the public
and internal listeners until SIGTERM or SIGINT. Configured only by AUTHSESSION_* and
OTEL_* environment variables (see the README and RUNBOOK.md)."""

EPILOG = """\
exit status:
  0  success (serve: stopped by a signal)
  1  a component failed: wiring, a startup check, a listener; drift for projection check
  2  usage or configuration error, or the server extra is not installed"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the console script."""
    parser = argparse.ArgumentParser(
        prog="authsession",
        usage="authsession [-h] [--version] [serve | check | projection {check,repair}]",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"authsession {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", prog="authsession")
    commands.add_parser(
        "serve",
        help="serve both listeners (the default)",
        description="Check the components, then serve both listeners until a signal.",
    )
    commands.add_parser(
        "check",
        help="validate the configuration and ping every component, then exit",
        description=(
            "Validate the configuration, build the core and run the startup checks; print "
            "one line per component and exit 0 (all passed), 1 (a check failed) or 2 "
            "(configuration). Opens no listener; logs go to stderr."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    projection = commands.add_parser(
        "projection",
        help="compare the gateway projection with the source of truth",
        description="Reconcile the gateway projection with the sessions in Redis.",
    )
    actions = projection.add_subparsers(
        dest="action", metavar="ACTION", required=True, prog="authsession projection"
    )
    actions.add_parser(
        "check",
        help="report drift by kind; exit 1 when there is any",
        description="Scan the sessions and snapshot keys and report drift by kind.",
    )
    actions.add_parser(
        "repair",
        help="report drift and repair it through the ordinary publish path",
        description="Scan, report and repair drift (version rules hold).",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; the process exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version (0) or a usage error (2)
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE
    command: str = args.command or "serve"
    try:
        return _dispatch(command, getattr(args, "action", None))
    except ModuleNotFoundError as exc:
        missing = (exc.name or "").partition(".")[0]
        if not missing or missing == "authsession":
            raise
        print(SERVER_EXTRA_HINT.format(module=missing), file=sys.stderr, flush=True)
        return EXIT_USAGE


def _dispatch(command: str, action: str | None) -> int:
    from authsession.settings import ConfigError, load_settings
    from authsession.telemetry import configure_logging

    try:
        settings = load_settings()
    except ConfigError as exc:
        print(exc.one_line(), file=sys.stderr, flush=True)
        return EXIT_USAGE
    configure_logging(settings.LOG_LEVEL, settings.LOG_FORMAT)
    if command == "serve":
        return _serve(settings)
    # A command's report goes to stdout; its log lines go to stderr.
    _logs_to_stderr()
    if command == "check":
        _startup_warnings(settings)
        return _run(_check(settings))
    return _run(_projection(settings, repair=action == "repair"))


def _startup_warnings(settings: Settings) -> None:
    if settings.INTERNAL_API_TOKEN is None:
        log.warning(
            "AUTHSESSION_INTERNAL_API_TOKEN is not set: the internal listener trusts its "
            "network and accepts every request",
            extra={"listener": "internal"},
        )


def _serve(settings: Settings) -> int:
    _startup_warnings(settings)
    if settings.WORKERS > 1:
        from authsession.supervisor import supervise

        return supervise(settings)
    import uvloop

    from authsession.runner import run

    try:
        return uvloop.run(run(settings))
    except KeyboardInterrupt:  # a signal before the handlers were installed
        return EXIT_OK


def _logs_to_stderr() -> None:
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(sys.stderr)


def _run(command: Awaitable[int]) -> int:
    async def wrapped() -> int:
        return await command

    try:
        return asyncio.run(wrapped())
    except KeyboardInterrupt:
        print("authsession: interrupted", file=sys.stderr, flush=True)
        return EXIT_FAILURE


async def _check(settings: Settings) -> int:
    """``authsession check``: one line per component on stdout."""
    from authsession.resolved import log_resolved_config
    from authsession.telemetry import Telemetry
    from authsession.wiring import build_core

    try:
        telemetry = Telemetry(install_global=False)
        core = build_core(settings, telemetry=telemetry)
    except Exception as exc:
        print(f"wiring: failed: {exc}", flush=True)
        return EXIT_FAILURE
    try:
        results = await core.check_each()
    finally:
        await core.aclose()
        telemetry.shutdown(settings.SHUTDOWN_TIMEOUT.total_seconds())
    failed = False
    for name in core.components:
        if name not in results:
            print(f"{name}: not checked (an earlier check failed)", flush=True)
        elif (cause := results[name]) is None:
            print(f"{name}: ok", flush=True)
        else:
            failed = True
            print(f"{name}: failed: {cause}", flush=True)
    if failed:
        return EXIT_FAILURE
    log_resolved_config(settings)
    return EXIT_OK


async def _projection(settings: Settings, *, repair: bool) -> int:
    """``authsession projection check|repair``: the reconciler of CONTRACT §12, §9."""
    try:
        module = importlib.import_module("authsession.reconcile")
    except ModuleNotFoundError as exc:
        if exc.name != "authsession.reconcile":
            raise
        print("authsession: this build has no projection reconciler", file=sys.stderr)
        return EXIT_FAILURE
    command = cast(Callable[..., Awaitable[int]], module.run_projection_command)
    return await command(settings, repair=repair)

"""``authsession projection check`` and ``authsession projection repair`` (CONTRACT §12/§9).

One pass of the projection reconciler over the configured Redis, with the same
configuration as the service: ``check`` reports drift by kind and exits 1 when it finds
any; ``repair`` repairs it through the ordinary publish path and exits 0 once everything
found was repaired. Exit 1 also when Redis cannot be reached.
"""

from __future__ import annotations

import sys
from typing import TextIO

from authsession.domain.errors import ServiceUnavailable
from authsession.redis.reconciler import DriftKind
from authsession.settings import Settings
from authsession.telemetry import Telemetry
from authsession.wiring import StartupCheckFailed, build_core


async def run_projection_command(
    settings: Settings, *, repair: bool, out: TextIO | None = None
) -> int:
    """Run one reconciliation; print one line per drift kind; the exit status."""
    out = out or sys.stdout
    verb = "repair" if repair else "check"
    core = build_core(settings, telemetry=Telemetry(install_global=False))
    try:
        try:
            await core.check()
            report = await core.reconciler.run(repair=repair)
        except StartupCheckFailed as exc:
            print(f"projection {verb}: {exc.component} unavailable: {exc.cause}", file=out)
            return 1
        except ServiceUnavailable as exc:
            print(f"projection {verb}: failed: {exc}", file=out)
            return 1
    finally:
        await core.aclose()
    print(
        f"projection {verb}: {report.sessions} session records and {report.snapshots} "
        f"snapshots scanned in {report.seconds:.2f}s",
        file=out,
    )
    for kind in DriftKind:
        print(f"{kind.value} {report.found[kind]}", file=out)
    if repair:
        print(f"repaired {report.repaired}", file=out)
        return 0 if report.repaired == report.drift else 1
    print(f"drift {report.drift}", file=out)
    return 1 if report.drift else 0

"""The gateway library stays light: no web framework, no HTTP client, no service wiring."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("fastapi", "httpx", "starlette", "authsession.http", "authsession.wiring")


def test_importing_the_library_pulls_in_nothing_of_the_service() -> None:
    code = (
        "import sys, authsession.gateway\n"
        f"forbidden = {FORBIDDEN!r}\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in forbidden or m in forbidden]\n"
        "print(','.join(sorted(bad)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )

    assert result.stdout.strip() == ""

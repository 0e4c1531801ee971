"""send-email-code timing by outcome (CONTRACT §12/§3 SEND_EMAIL_CODE_MIN_DURATION).

The real process in ``rest`` mode with signup disabled, a fake user service, and a fake
mail service that takes 50 ms per mail. Four outcomes, interleaved so that the machine's
noise falls on all of them alike: an existing user (``sent``), an unknown address
(``delivery_suppressed``), a blocked user (``delivery_suppressed``) and an address inside
its cooldown (``delivery_throttled``). Prints the median and p10-p90 of each and whether
the goal holds: medians within 2 ms of each other and overlapping p10-p90 ranges.

    python bench/timing.py                     # BENCH_TIMING_ROUNDS=40
    BENCH_TIMING_FLOOR=0 python bench/timing.py   # the same without the floor
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from tests.support.fake_services import FakeMailService, FakeUserService  # noqa: E402
from tests.support.net import LOOPBACK, free_ports  # noqa: E402
from tests.support.process import AuthsessionProcess  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_TIMING_ROUNDS", "40"))
FLOOR = os.environ.get("BENCH_TIMING_FLOOR", "250ms")
MAIL_DELAY = 0.05
SEND = "/api/v1/public/auth/send-email-code"
OUTCOMES = ("existing", "unknown", "blocked", "throttled")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def main() -> int:
    users, mail = FakeUserService(), FakeMailService()
    with RedisServer() as redis_server, users, mail:
        mail.delay(MAIL_DELAY)
        public, internal = free_ports(2)
        env = {
            "AUTHSESSION_PUBLIC_HTTP_ADDR": f"{LOOPBACK}:{public}",
            "AUTHSESSION_INTERNAL_HTTP_ADDR": f"{LOOPBACK}:{internal}",
            "AUTHSESSION_REDIS_ADDR": redis_server.addr,
            "AUTHSESSION_USER_SERVICE_MODE": "rest",
            "AUTHSESSION_USER_SERVICE_BASE_URL": users.base_url,
            "AUTHSESSION_USER_SERVICE_REQUEST_TIMEOUT": "2s",
            "AUTHSESSION_MAIL_SERVICE_MODE": "rest",
            "AUTHSESSION_MAIL_SERVICE_BASE_URL": mail.base_url,
            "AUTHSESSION_MAIL_SERVICE_REQUEST_TIMEOUT": "2s",
            "AUTHSESSION_SIGNUP_ENABLED": "false",
            "AUTHSESSION_SEND_EMAIL_CODE_MIN_DURATION": FLOOR,
            "AUTHSESSION_LOG_LEVEL": "warning",
        }
        workdir = Path(tempfile.mkdtemp(prefix="bench-timing-"))
        with (
            AuthsessionProcess(
                env, public_port=public, internal_port=internal, workdir=workdir
            ) as process,
            httpx.Client(base_url=process.public_url, timeout=10) as client,
        ):
            process.wait_ready()
            throttled = f"throttled-{uuid.uuid4().hex[:8]}@example.com"
            users.add_user(throttled)
            client.post(SEND, json={"email": throttled})  # opens its cooldown
            samples: dict[str, list[float]] = {o: [] for o in OUTCOMES}
            for _ in range(ROUNDS + 3):  # the first three rounds warm up
                for outcome in OUTCOMES:
                    email = throttled
                    if outcome != "throttled":
                        email = f"{outcome}-{uuid.uuid4().hex[:12]}@example.com"
                        if outcome in ("existing", "blocked"):
                            user_id = users.add_user(email)
                            if outcome == "blocked":
                                users.block_user(user_id)
                    started = time.perf_counter()
                    response = client.post(SEND, json={"email": email})
                    elapsed = (time.perf_counter() - started) * 1000
                    assert response.status_code == 200, response.text
                    samples[outcome].append(elapsed)
            for values in samples.values():
                del values[:3]
    print(
        f"send-email-code by outcome, floor {FLOOR}, "
        f"mail service {MAIL_DELAY * 1000:.0f} ms, n={ROUNDS}"
    )
    print(f"{'outcome':<10} {'median ms':>10} {'p10 ms':>8} {'p90 ms':>8}")
    ranges = {}
    for outcome, values in samples.items():
        median = statistics.median(values)
        p10, p90 = percentile(values, 0.1), percentile(values, 0.9)
        ranges[outcome] = (median, p10, p90)
        print(f"{outcome:<10} {median:>10.2f} {p10:>8.2f} {p90:>8.2f}")
    medians = [m for m, _, _ in ranges.values()]
    spread = max(medians) - min(medians)
    overlap = max(p10 for _, p10, _ in ranges.values()) <= min(p90 for _, _, p90 in ranges.values())
    verdict = "met" if spread <= 2.0 and overlap else "NOT met"
    print(f"median spread {spread:.2f} ms; p10-p90 ranges overlap: {overlap}; goal {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How the providers are set up from the OTEL_* environment (no export by default)."""

from __future__ import annotations

import json

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from authsession.telemetry import Telemetry


@pytest.fixture(autouse=True)
def no_otel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "OTEL_TRACES_EXPORTER",
        "OTEL_METRICS_EXPORTER",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
        "OTEL_TRACES_SAMPLER",
    ):
        monkeypatch.delenv(name, raising=False)


def test_without_exporters_spans_are_not_recorded_but_carry_trace_ids() -> None:
    telemetry = Telemetry(install_global=False)
    with telemetry.tracer.start_as_current_span("request") as span:
        context = span.get_span_context()
        assert not span.is_recording()
        assert context.is_valid  # logs get a trace_id, outbound calls a traceparent
    telemetry.shutdown(1)


def test_a_configured_exporter_records_every_span() -> None:
    exporter = InMemorySpanExporter()
    telemetry = Telemetry(span_exporters=[exporter], install_global=False)
    with telemetry.tracer.start_as_current_span("request") as span:
        assert span.is_recording()
    assert [s.name for s in exporter.get_finished_spans()] == ["request"]
    telemetry.shutdown(1)


def test_a_per_signal_otlp_endpoint_turns_that_signal_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://127.0.0.1:9/v1/traces")
    telemetry = Telemetry(install_global=False)
    # No span is started: nothing listens at that endpoint, and a flush would wait.
    assert telemetry.tracer_provider.sampler is not ALWAYS_OFF
    exporters = [
        type(p.span_exporter).__name__
        for p in telemetry.tracer_provider._active_span_processor._span_processors  # type: ignore[attr-defined]
    ]
    assert exporters == ["OTLPSpanExporter"]
    telemetry.shutdown(1)


@pytest.mark.parametrize("value", ["zipkin", "jaeger"])
def test_an_unsupported_exporter_is_refused(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", value)
    with pytest.raises(ValueError, match="OTEL_TRACES_EXPORTER"):
        Telemetry(install_global=False)


def _format(msg: str, **extra: object) -> dict[str, object]:
    import json
    import logging

    from authsession.telemetry import log_handler

    record = logging.LogRecord("authsession.x", logging.INFO, __file__, 1, msg, None, None)
    record.__dict__.update(extra)
    # Through the process's own handler: its filter masks, its formatter renders.
    handler = log_handler("json")
    assert handler.filter(record)
    parsed: dict[str, object] = json.loads(handler.format(record))
    return parsed


def test_addresses_are_masked_in_every_field_and_the_message() -> None:
    entry = _format("blocked jane.doe@example.com", user_id="bob@corp.example", n=3)
    assert entry["event"] == "blocked j***@example.com"
    assert entry["user_id"] == "b***@corp.example"
    assert entry["n"] == 3


def test_secrets_are_redacted_and_codes_only_kept_for_the_stub_mail_logger() -> None:
    entry = _format("x", session_token="abc.def", code="123456", password="p")
    assert entry["session_token"] == entry["code"] == entry["password"] == "[redacted]"


def test_a_stuck_flush_is_abandoned_after_the_shutdown_budget() -> None:
    import threading
    import time

    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    release = threading.Event()

    class StuckReader(InMemoryMetricReader):
        """A reader whose flush hangs like an export to an unreachable collector."""

        def force_flush(self, timeout_millis: float = 10_000) -> bool:
            release.wait(30)
            return True

    telemetry = Telemetry(metric_readers=[StuckReader()], install_global=False)
    started = time.monotonic()
    telemetry.shutdown(0.3)
    elapsed = time.monotonic() - started
    release.set()  # let the abandoned daemon thread finish
    assert elapsed < 2, elapsed


@pytest.mark.parametrize(
    "value",
    ["jane.doe@corp", "usr:jane.doe@corp", "JANE@localhost", "x@y"],
    ids=["dotless-domain", "prefixed-id", "localhost", "shortest"],
)
def test_address_shaped_values_without_a_dot_in_the_domain_are_masked(value: str) -> None:
    entry = _format(f"session of {value}", user_id=value)
    local = value.rpartition("@")[0].rpartition(":")[2]
    for text in (str(entry["event"]), str(entry["user_id"])):
        assert f"{local}@" not in text, entry
        assert "***@" in text, entry


def test_addresses_nested_in_lists_dicts_and_objects_are_masked() -> None:
    class Opaque:
        def __str__(self) -> str:
            return "opaque jane.doe@corp"

    entry = _format(
        "x",
        user_ids=["jane.doe@corp", ("bob@corp",)],
        detail={"owner": "carol@corp", "token": "abc"},
        raw=b"dave@corp",
        thing=Opaque(),
    )
    text = json.dumps(entry)
    for local in ("jane.doe@", "bob@", "carol@", "dave@"):
        assert local not in text, entry
    assert entry["detail"] == {"owner": "c***@corp", "token": "[redacted]"}
    assert entry["thing"] == "opaque j***@corp"


def test_a_traceback_is_masked_and_written_after_the_extras() -> None:
    import logging
    import sys

    from authsession.telemetry import log_handler

    try:
        raise ValueError("boom for jane.doe@corp")
    except ValueError:
        record = logging.LogRecord(
            "authsession.x", logging.ERROR, __file__, 1, "failed", None, sys.exc_info()
        )
    record.__dict__["service"] = "user_service"
    handler = log_handler("json")
    assert handler.filter(record)
    entry = json.loads(handler.format(record))
    assert list(entry)[:6] == ["timestamp", "level", "event", "logger", "request_id", "trace_id"]
    assert list(entry)[-2:] == ["service", "exception"]
    assert "ValueError: boom for j***@corp" in entry["exception"]
    assert "jane.doe@" not in entry["exception"]
    # The record keeps its exception for any other consumer of it.
    assert record.exc_info is not None


def test_a_message_that_does_not_format_never_raises_at_the_call_site(
    capsys: pytest.CaptureFixture[str],
) -> None:
    import logging

    from authsession.telemetry import log_handler

    logger = logging.getLogger("authsession.test.badformat")
    logger.propagate = False
    logger.handlers[:] = [log_handler("json")]
    try:
        logger.warning("%d widgets", "many")
    finally:
        logger.handlers[:] = []
        logger.propagate = True
    assert "--- Logging error ---" in capsys.readouterr().err

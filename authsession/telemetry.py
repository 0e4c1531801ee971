"""Logging (one JSON object per line, secrets never written) and, later, OpenTelemetry."""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
import sys
import threading
from datetime import UTC, datetime
from typing import Any

import pythonjsonlogger.json
from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    MetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from authsession.domain.email import mask_email
from authsession.domain.model import RevokeReason
from authsession.domain.units import format_time

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "authsession_request_id", default=None
)

# Attributes every LogRecord has; anything else was passed with ``extra=``.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}
_SECRET_FIELDS = {"session_token", "token", "password", "authorization", "secret", "code_hmac"}
# The stub mail service is the one place allowed to log a code (CONTRACT §8).
_CODE_LOGGERS = {"authsession.mail.stub"}


# Anything shaped like an address, wherever it appears (a user id of the user service
# may be an address, an exception message may quote one). No dot is required in the
# domain: user ids such as ``jane.doe@corp`` are addresses too (CONTRACT §12, §11).
_ADDRESS = re.compile(r"[^\s@\"'<>(),;:/]+@[^\s@\"'<>(),;:/]+")


def _mask_addresses(text: str) -> str:
    if "@" not in text:
        return text
    return _ADDRESS.sub(lambda m: mask_email(m.group(0)), text)


def _clean(record: logging.LogRecord, key: str, value: Any) -> Any:
    lowered = key.lower()
    if lowered in _SECRET_FIELDS:
        return "[redacted]"
    if lowered == "code" and record.name not in _CODE_LOGGERS:
        return "[redacted]"
    return _scrub(record, value)


def _scrub(record: logging.LogRecord, value: Any) -> Any:
    """Mask addresses in a value, and in the strings nested in lists, tuples, sets, dicts."""
    if isinstance(value, str):
        return _mask_addresses(value)
    if isinstance(value, dict):
        return {_mask_addresses(str(k)): _clean(record, str(k), v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrub(record, item) for item in value]
    if isinstance(value, bytes | bytearray):
        return _mask_addresses(bytes(value).decode("utf-8", "replace"))
    return value


def _trace_id() -> str | None:
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


class MaskingFilter(logging.Filter):
    """Masks addresses and redacts secrets in a record's message and extras before it is written.

    It rewrites the record in place: the one handler of the process carries it, so nothing
    downstream sees an address either.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Scrub ``record``; never drops one."""
        # A message that does not format is left as it is: the formatter fails on it again and
        # logging reports that through handleError, where raising here would reach the caller.
        with contextlib.suppress(Exception):
            record.msg = _mask_addresses(record.getMessage())
            record.args = None
        fields = record.__dict__
        # The set difference runs in C: a record carries some 25 standard attributes and a
        # handful of extras, and this runs for every line.
        for key in fields.keys() - _STANDARD:
            if not key.startswith("_"):
                fields[key] = _clean(record, key, fields[key])
        return True


# Output keys taken from the record itself; an extra of the same name never replaces them.
_HEAD = ("timestamp", "level", "event", "logger", "request_id", "trace_id")


class JsonFormatter(pythonjsonlogger.json.JsonFormatter):
    """``timestamp``, ``level``, ``event``, ``logger``, ``request_id``, ``trace_id``, extras.

    Write records through :class:`MaskingFilter` (``log_handler`` does): the formatter masks
    only what it renders itself, tracebacks and objects ``json`` cannot encode.
    """

    def __init__(self) -> None:
        super().__init__(
            [],
            reserved_attrs=[*_STANDARD, *_HEAD],
            # Anything json cannot encode is rendered with str(), then masked like the rest.
            json_default=lambda o: _mask_addresses(str(o)),
            json_ensure_ascii=False,
        )

    def add_fields(
        self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]
    ) -> None:
        """The fixed head first, then the extras, then the traceback as ``exception``."""
        log_data.update(
            timestamp=format_time(datetime.fromtimestamp(record.created, UTC)),
            level=record.levelname.lower(),
            event=record.message,
            logger=record.name,
            request_id=request_id_var.get(),
            trace_id=_trace_id(),
        )
        super().add_fields(log_data, record, message_dict)
        formatted = log_data.pop("exc_info", None)
        log_data.pop("stack_info", None)
        if formatted is not None and record.exc_info and record.exc_info[0] is not None:
            log_data["exception"] = _mask_addresses(str(formatted).rstrip())


class ConsoleFormatter(JsonFormatter):
    """Human-readable single line for local development (same redaction)."""

    def format(self, record: logging.LogRecord) -> str:
        """``time level logger event key=value …``."""
        data = json.loads(super().format(record))
        head = f"{data.pop('timestamp')} {data.pop('level'):<7} {data.pop('event')}"
        data.pop("logger", None)
        rest = " ".join(f"{k}={v}" for k, v in data.items() if v is not None)
        return f"{head} {rest}".rstrip()


def log_handler(fmt: str) -> logging.Handler:
    """The handler of the process: masking, then one ``json`` or ``console`` line on stdout."""
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(MaskingFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    return handler


def configure_logging(level: str, fmt: str) -> None:
    """Send every log record, uvicorn's included, to stdout in one format."""
    root = logging.getLogger()
    root.handlers[:] = [log_handler(fmt)]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers[:] = []
        uvicorn_logger.propagate = True
    # uvicorn's per-request access lines duplicate our own request log; httpx's
    # per-call lines would put user ids of block calls in the log at info level.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)


# --------------------------------------------------------------------------- OpenTelemetry

TRACER_NAME = "authsession"
# Revoke reasons are free-form ([a-z0-9_.-]{1,64}); metric attributes must stay bounded.
KNOWN_REASONS: frozenset[str] = frozenset(RevokeReason)


def _exporter_names(signal: str) -> list[str]:
    """Exporters named by ``OTEL_<SIGNAL>_EXPORTER`` (signal ``TRACES`` or ``METRICS``).

    Unlike the SDK's own default (``otlp``), nothing is exported unless configured
    (CONTRACT §11): unset means ``none`` unless an OTLP endpoint is set.
    """
    raw = os.environ.get(f"OTEL_{signal}_EXPORTER", "").strip().lower()
    if not raw:
        endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
            f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"
        )
        return ["otlp"] if endpoint else []
    return [name.strip() for name in raw.split(",") if name.strip() and name.strip() != "none"]


class Telemetry:
    """The tracer and meter providers of the process, and the service's instruments.

    It implements the metrics ports of the domain (``LoginMetrics``, ``SessionMetrics``) and the
    outbound-call hook of the REST adapters.
    """

    def __init__(
        self,
        *,
        span_exporters: list[SpanExporter] | None = None,
        metric_readers: list[MetricReader] | None = None,
        install_global: bool = True,
    ) -> None:
        resource = Resource.create(
            {"service.name": os.environ.get("OTEL_SERVICE_NAME") or "authsession"}
        )
        exporters = list(span_exporters or [])
        for name in _exporter_names("TRACES"):
            exporters.append(_span_exporter(name))
        # With nothing to export, spans are not recorded (ALWAYS_OFF), which costs almost
        # nothing, yet still carry valid trace ids: logs keep a trace_id and the user
        # and mail services still receive a traceparent. OTEL_TRACES_SAMPLER overrides.
        sampler = None if exporters or os.environ.get("OTEL_TRACES_SAMPLER") else ALWAYS_OFF
        self.recording = sampler is None
        """Whether spans are recorded at all (something exports them, or a sampler says)."""
        self.tracer_provider = TracerProvider(resource=resource, sampler=sampler)
        for exporter in exporters:
            processor = (
                SimpleSpanProcessor(exporter)
                if span_exporters and exporter in span_exporters
                else BatchSpanProcessor(exporter)
            )
            self.tracer_provider.add_span_processor(processor)
        readers = list(metric_readers or [])
        for name in _exporter_names("METRICS"):
            readers.append(PeriodicExportingMetricReader(_metric_exporter(name)))
        self.meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        if install_global:
            trace.set_tracer_provider(self.tracer_provider)
            metrics.set_meter_provider(self.meter_provider)
        meter = self.meter_provider.get_meter("authsession")
        self.tracer = self.tracer_provider.get_tracer(TRACER_NAME)
        self._challenges = meter.create_counter(
            "authsession.challenges", description="Challenges by recorded status"
        )
        self._confirms = meter.create_counter(
            "authsession.confirms", description="Confirm answers by result"
        )
        self._revoked = meter.create_counter(
            "authsession.sessions.revoked", description="Sessions revoked, by reason"
        )
        self._publishes = meter.create_counter(
            "authsession.projection.publishes", description="Projection publications by result"
        )
        self._drift = meter.create_counter(
            "authsession.projection.drift",
            description="Projection drift found by the reconciler, by kind",
        )
        self._outbound = meter.create_histogram(
            "authsession.outbound.duration",
            unit="s",
            description="Duration of calls to the user and mail services",
        )
        self._server_duration = meter.create_histogram(
            "http.server.request.duration",
            unit="s",
            description="Duration of HTTP requests served, per listener and route",
        )

    # LoginMetrics
    def challenge(self, status: str) -> None:
        """One challenge recorded with ``status``."""
        self._challenges.add(1, {"status": status})

    def confirm(self, result: str) -> None:
        """One confirm answered."""
        self._confirms.add(1, {"result": result})

    # SessionMetrics
    def session_revoked(self, reason: str) -> None:
        """One session revoked; backend-chosen reasons are counted as ``other``."""
        self._revoked.add(1, {"reason": reason if reason in KNOWN_REASONS else "other"})

    def projection_published(self, result: str) -> None:
        """One projection publication."""
        self._publishes.add(1, {"result": result})

    def projection_drift(self, kind: str, count: int) -> None:
        """``count`` findings of drift of ``kind`` in one reconciliation."""
        self._drift.add(count, {"kind": kind})

    # REST adapters' hook
    def outbound(self, service: str, result: str, seconds: float) -> None:
        """One outbound call finished."""
        self._outbound.record(seconds, {"service": service, "result": result})

    def server_request(
        self, listener: str, method: str, route: str, status: int, seconds: float
    ) -> None:
        """One HTTP request served."""
        self._server_duration.record(
            seconds,
            {
                "authsession.listener": listener,
                "http.request.method": method,
                "http.route": route,
                "http.response.status_code": status,
            },
        )

    def shutdown(self, timeout: float) -> None:
        """Flush and stop both providers, waiting at most ``timeout`` seconds.

        The SDK's span flush waits for its exporter's own timeout whatever it is told, so
        the flush runs in a daemon thread that is abandoned when the budget is spent: an
        unreachable collector cannot hold the process past its shutdown budget.
        """
        millis = int(timeout * 1000)

        def flush() -> None:
            self.tracer_provider.force_flush(millis)
            self.tracer_provider.shutdown()
            self.meter_provider.force_flush(millis)
            self.meter_provider.shutdown(millis)

        worker = threading.Thread(target=flush, name="telemetry-flush", daemon=True)
        worker.start()
        worker.join(timeout)
        if worker.is_alive():
            logging.getLogger("authsession").warning(
                "telemetry flush abandoned after the shutdown budget",
                extra={"budget_s": timeout},
            )


def _span_exporter(name: str) -> SpanExporter:
    match name:
        case "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            return OTLPSpanExporter()
        case "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            return ConsoleSpanExporter(out=sys.stderr)
        case other:
            raise ValueError(f"unsupported OTEL_TRACES_EXPORTER {other!r} (otlp, console, none)")


def _metric_exporter(name: str) -> MetricExporter:
    match name:
        case "otlp":
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

            return OTLPMetricExporter()
        case "console":
            from opentelemetry.sdk.metrics.export import ConsoleMetricExporter

            return ConsoleMetricExporter(out=sys.stderr)
        case other:
            raise ValueError(f"unsupported OTEL_METRICS_EXPORTER {other!r} (otlp, console, none)")

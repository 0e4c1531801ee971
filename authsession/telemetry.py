"""Logging (one JSON object per line, secrets never written) and, later, OpenTelemetry."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import traceback
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace

from authsession.domain.email import mask_email
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


def _clean(record: logging.LogRecord, key: str, value: Any) -> Any:
    lowered = key.lower()
    if lowered in _SECRET_FIELDS:
        return "[redacted]"
    if lowered == "code" and record.name not in _CODE_LOGGERS:
        return "[redacted]"
    if lowered == "email" and isinstance(value, str) and "***" not in value:
        return mask_email(value)
    return value


def _trace_id() -> str | None:
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None


class JsonFormatter(logging.Formatter):
    """``timestamp``, ``level``, ``event``, ``logger``, ``request_id``, ``trace_id``, extras."""

    def format(self, record: logging.LogRecord) -> str:
        """Render one record as one line of JSON."""
        entry: dict[str, Any] = {
            "timestamp": format_time(datetime.fromtimestamp(record.created, UTC)),
            "level": record.levelname.lower(),
            "event": record.getMessage(),
            "logger": record.name,
            "request_id": request_id_var.get(),
            "trace_id": _trace_id(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_") and key not in entry:
                entry[key] = _clean(record, key, value)
        if record.exc_info and record.exc_info[0] is not None:
            entry["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return json.dumps(entry, default=str, ensure_ascii=False)


class ConsoleFormatter(JsonFormatter):
    """Human-readable single line for local development (same redaction)."""

    def format(self, record: logging.LogRecord) -> str:
        """``time level logger event key=value …``."""
        data = json.loads(super().format(record))
        head = f"{data.pop('timestamp')} {data.pop('level'):<7} {data.pop('event')}"
        data.pop("logger", None)
        rest = " ".join(f"{k}={v}" for k, v in data.items() if v is not None)
        return f"{head} {rest}".rstrip()


def configure_logging(level: str, fmt: str) -> None:
    """Send every log record, uvicorn's included, to stdout in one format."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        uvicorn_logger = logging.getLogger(name)
        uvicorn_logger.handlers[:] = []
        uvicorn_logger.propagate = True
    # uvicorn's per-request access lines duplicate our own request log.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)

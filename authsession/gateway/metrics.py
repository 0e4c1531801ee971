"""Handshake and disconnect metrics of live connections, as OpenTelemetry instruments.

Only ``opentelemetry-api`` is used, and only if it is importable: without it (or without
an SDK configured by the gateway) every call is a no-op. The names are the ones gateways
already alert on (CONTRACT §12, §10).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("authsession.gateway")

HANDSHAKES = "socket_handshake_total"
REJECTIONS = "socket_handshake_rejections"
DISCONNECTS = "socket_disconnect_total"
ACTIVE = "socket_active"


class SocketMetrics:
    """``socket_handshake_total`` (``status``), ``socket_handshake_rejections``
    (``reason``), ``socket_disconnect_total`` (``reason``), ``socket_active``; every
    point also carries ``transport`` (``websocket`` or ``socketio``)."""

    def __init__(self, transport: str, meter_provider: Any = None) -> None:
        self._transport = transport
        self._instruments: tuple[Any, Any, Any, Any] | None = None
        try:
            from opentelemetry import metrics
        except ImportError:  # the API is optional: no metrics then
            return
        provider = meter_provider if meter_provider is not None else metrics.get_meter_provider()
        meter = provider.get_meter("authsession.gateway")
        self._instruments = (
            meter.create_counter(HANDSHAKES, description="Live connection handshakes"),
            meter.create_counter(REJECTIONS, description="Rejected handshakes by reason"),
            meter.create_counter(DISCONNECTS, description="Closed live connections by reason"),
            meter.create_up_down_counter(ACTIVE, description="Open live connections"),
        )

    def accepted(self) -> None:
        """A handshake was accepted: one more open connection."""
        if self._instruments is not None:
            handshakes, _, _, active = self._instruments
            handshakes.add(1, {"status": "accepted", "transport": self._transport})
            active.add(1, {"transport": self._transport})

    def rejected(self, reason: str) -> None:
        """A handshake was rejected for ``reason``."""
        if self._instruments is not None:
            handshakes, rejections, _, _ = self._instruments
            handshakes.add(1, {"status": "rejected", "transport": self._transport})
            rejections.add(1, {"reason": reason, "transport": self._transport})

    def disconnected(self, reason: str) -> None:
        """An accepted connection closed for ``reason``."""
        if self._instruments is not None:
            _, _, disconnects, active = self._instruments
            disconnects.add(1, {"reason": reason, "transport": self._transport})
            active.add(-1, {"transport": self._transport})

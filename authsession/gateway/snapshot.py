"""The snapshot document of CONTRACT §9, parsed for gateways.

The codec itself lives in :mod:`authsession.projection_codec`, shared with the service
that writes the documents; this module keeps the library's import path.
"""

from __future__ import annotations

from authsession.domain.units import parse_time
from authsession.projection_codec import SessionSnapshot, SnapshotError

__all__ = ["SessionSnapshot", "SnapshotError", "parse_time"]

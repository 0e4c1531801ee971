"""The two listening sockets: bound by the process itself, or by a supervising parent."""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping

from authsession.settings import ListenAddress

log = logging.getLogger("authsession")

BACKLOG = 2048


def bind(address: ListenAddress, *, listen: bool = True) -> socket.socket:
    """A non-blocking TCP socket bound to ``address`` (IPv6 when the host is an IPv6 literal).

    With ``listen=False`` it is bound only: the first worker that serves calls ``listen``,
    so the port accepts connections only once a worker can answer them (probes and
    rolling deploys see the service as up when it is), yet the port is held from then on.
    """
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address.host, address.port))
        if listen:
            sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def bind_all(
    addresses: Mapping[str, ListenAddress],
    *,
    listen: bool = True,
    bound: Mapping[str, socket.socket] | None = None,
) -> dict[str, socket.socket] | None:
    """A socket per listener name (those in ``bound`` are kept as they are).

    ``None`` when one cannot be bound: the error is logged and every socket opened here
    is closed again.
    """
    sockets: dict[str, socket.socket] = dict(bound or {})
    for name, address in addresses.items():
        if name in sockets:
            continue
        try:
            sockets[name] = bind(address, listen=listen)
        except OSError as exc:
            for opened, sock in sockets.items():
                if bound is None or opened not in bound:
                    sock.close()
            log.error(
                "cannot open listener",
                extra={"listener": name, "address": str(address), "cause": str(exc)},
            )
            return None
    return sockets


def describe(sock: socket.socket) -> str:
    """``host:port`` of a bound socket (``[host]:port`` for IPv6)."""
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

"""The uvicorn server under ``diffusionret serve``, with limits on what one client can hold.

uvicorn's own timers only cover idle keep-alive connections: a client that sends its request
headers one byte at a time (slowloris) resets them with every byte and holds its connection
forever, and enough such clients exhaust the server's sockets. :class:`ServerLimits` adds a
deadline for the request headers, caps the number of connections and the header size.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerLimits:
    """Per-connection limits of the HTTP server.

    Attributes:
        header_timeout_s: a connection must deliver a request's complete headers within this many
            seconds of opening (or of its previous response); otherwise it is closed.
        keep_alive_s: an idle keep-alive connection is closed after this many seconds.
        max_connections: connections (and requests) served at once; more are answered ``503``.
        max_header_bytes: largest request head (request line and headers) accepted.
    """

    header_timeout_s: float = 10.0
    keep_alive_s: int = 5
    max_connections: int = 100
    max_header_bytes: int = 16 * 1024

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "keep_alive_s", "max_connections", "max_header_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


def header_deadline_protocol(timeout_s: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a deadline for receiving each request's headers."""

    class HeaderDeadlineProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(timeout_s, self._header_deadline)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _header_deadline(self) -> None:
            self._header_timer = None
            # IDLE: no request has been parsed since the timer was armed (maybe half of one is buffered).
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                logger.info("closing a connection from %s that sent no complete request in %.0f s",
                            self.client[0] if self.client else "?", timeout_s)
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderDeadlineProtocol


def uvicorn_config(app: Any, host: str, port: int, limits: ServerLimits | None = None, **kwargs: Any) -> uvicorn.Config:
    """A uvicorn config serving ``app`` on ``host:port`` within ``limits`` (``kwargs``: other uvicorn options)."""
    limits = limits or ServerLimits()
    return uvicorn.Config(
        app, host=host, port=port, http=header_deadline_protocol(limits.header_timeout_s),
        timeout_keep_alive=limits.keep_alive_s, limit_concurrency=limits.max_connections,
        h11_max_incomplete_event_size=limits.max_header_bytes, **kwargs,
    )

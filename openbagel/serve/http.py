"""Running the server: the process's thread pools, uvicorn's settings, and a
header timeout uvicorn lacks.

uvicorn closes a keep-alive connection that stays idle after a response, but
it waits forever for the first request of a connection and for headers sent
slowly, so idle or slowloris connections pile up. :func:`uvicorn_options`
gives ``uvicorn.run`` the keep-alive timeout and an HTTP protocol that closes
a connection whose request line and headers have not all arrived within the
header timeout. (The body's timeout is enforced by the app, which reads it.)
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from openbagel.serve.settings import ServeSettings


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, plus a deadline for each request's line and
    headers: ``header_timeout`` seconds from the connection (or from the first
    byte of the next request on a kept-alive connection)."""

    header_timeout: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._header_timer: asyncio.TimerHandle | None = None
        super().connection_made(transport)
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:  # a request starts (or goes on arriving)
            self._arm()
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # its line and headers are in
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._timed_out)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _timed_out(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()


def uvicorn_options(settings: ServeSettings) -> dict[str, Any]:
    """Keyword arguments for ``uvicorn.run`` / ``uvicorn.Config``: the
    keep-alive timeout and the protocol with the header timeout (seconds, from
    ``settings``)."""
    protocol = type("Protocol", (HeaderTimeoutProtocol,), {"header_timeout": settings.header_timeout})
    return {"timeout_keep_alive": settings.keep_alive_timeout, "http": protocol}


def run_server(settings: ServeSettings, host: str, port: int) -> None:
    """Serve ``settings`` on ``host:port`` until interrupted (what ``openbagel serve`` runs).

    First sizes PyTorch's intra-op thread pool to
    :attr:`~openbagel.serve.settings.ServeSettings.threads_per_slot`: each
    engine slot runs its work in its own thread with a pool of that size, so
    ``max_concurrency`` slots use about the available cores, not that many times them.
    """
    import torch
    import uvicorn

    from openbagel.serve.app import create_app

    torch.set_num_threads(settings.threads_per_slot)
    logging.getLogger("openbagel.serve").info(
        "%d engine slot(s) x %d thread(s)", settings.max_concurrency, settings.threads_per_slot
    )
    uvicorn.run(
        create_app(settings), host=host, port=port, log_level="info", access_log=False, **uvicorn_options(settings)
    )

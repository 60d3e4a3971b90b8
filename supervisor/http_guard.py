"""Protect the supervisor's HTTP server from slow, idle and malformed clients.

Rules of this module:
- aiohttp closes a keep-alive connection after ``keepalive_timeout`` (an AppRunner
  option), but it has no timeout for a connection that never completes its first request
  (silent, or dripping header bytes: slowloris) and no cap on connections. The
  ``ConnectionGuard`` adds both, without reaching into aiohttp's private state: it sees
  each connection when it is accepted (the listening socket's protocol factory), learns
  which ones are handling a request from a middleware (``request.protocol``), and reads
  the live set from ``web.Server.connections``.
- At the cap, or out of file descriptors, the connection idle the longest is closed to
  make room, so ``/health`` keeps answering through a flood of idle connections.
- Every line a client can provoke is rate-limited (``RateLimitedLog``): a client must not
  be able to flood the log.
- A connection answered by supervisor/fastpath.py (GET /v1/models before aiohttp) reports
  each answer (``answered``): it counts as a request, as one through the middleware does.
- Everything here runs on the event loop: no locks.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

log = logging.getLogger("vram_llm.http")

# File descriptors kept out of the connection cap: the worker's socket, its pipes,
# log files, NVML, the runtime dir. Each proxied request also holds one upstream
# connection to the worker, hence the halving in ``effective_cap``.
FD_RESERVE = 64


class RateLimitedLog:
    """At most ``burst`` lines at once, then one every ``every_s``; says how many were dropped."""

    def __init__(self, logger: logging.Logger, *, burst: int = 10, every_s: float = 1.0) -> None:
        self._log = logger
        self._burst = float(burst)
        self._every_s = every_s
        self._tokens = float(burst)
        self._last = time.monotonic()
        self._dropped = 0

    def warning(self, msg: str, *args: Any) -> None:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._last) / self._every_s)
        self._last = now
        if self._tokens < 1.0:
            self._dropped += 1
            return
        self._tokens -= 1.0
        if self._dropped:
            msg += " (%d similar line(s) suppressed)"
            args = (*args, self._dropped)
            self._dropped = 0
        self._log.warning(msg, *args)


class MalformedRequestFilter(logging.Filter):
    """aiohttp logs a request it cannot parse as an ERROR with a traceback; it is the
    client's mistake, not ours: one rate-limited WARNING line instead."""

    def __init__(self, limited: RateLimitedLog) -> None:
        super().__init__()
        self._limited = limited

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        self._limited.warning("malformed HTTP request from %s: %s", remote, one_line(str(exc.message)) or type(exc).__name__)
        return False


def one_line(text: str, limit: int = 200) -> str:
    """aiohttp's parse errors span lines (the bad bytes, then a ^ under the fault)."""
    parts = [p.strip() for p in text.splitlines() if p.strip() and set(p.strip()) != {"^"}]
    joined = " ".join(parts)
    return joined if len(joined) <= limit else joined[: limit - 3] + "..."


def server_logger(limited: RateLimitedLog) -> logging.Logger:
    """The logger the HTTP server reports connection errors to (AppRunner ``logger=``)."""
    logger = logging.getLogger("vram_llm.http.server")
    for f in list(logger.filters):
        if isinstance(f, MalformedRequestFilter):
            logger.removeFilter(f)
    logger.addFilter(MalformedRequestFilter(limited))
    return logger


def effective_cap(configured: int) -> int:
    """The connection cap: the configured one, lowered to what the descriptor limit allows."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    return max(1, min(configured, (soft - FD_RESERVE) // 2))


@dataclass
class _Conn:
    opened: float
    last_active: float
    busy: int = 0
    requests: int = 0
    closing: bool = False  # evicted, refused or timed out: no longer counted


class ConnectionGuard:
    def __init__(self, *, header_timeout_s: float, max_connections: int) -> None:
        self.header_timeout_s = header_timeout_s
        self.max_connections = max_connections
        # Its own limit: a flood of malformed requests must not hide these lines.
        self._limited = RateLimitedLog(log)
        self._conns: dict[web.RequestHandler, _Conn] = {}
        self._server: web.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    # ---- wiring -------------------------------------------------------------------

    def factory(
        self, server: web.Server, wrap: Callable[[web.RequestHandler], asyncio.Protocol] | None = None
    ) -> Callable[[], asyncio.Protocol]:
        """The protocol factory for the listening socket: every accepted connection, its
        aiohttp protocol wrapped by ``wrap`` if given (supervisor/fastpath.py)."""
        self._server = server

        def accept() -> asyncio.Protocol:
            proto = server()
            self._accepted(proto)
            return proto if wrap is None else wrap(proto)

        return accept

    def answered(self, proto: web.RequestHandler) -> None:
        """A request on this connection was answered without aiohttp (supervisor/fastpath.py)."""
        conn = self._conns.get(proto)
        if conn is not None:
            conn.requests += 1
            conn.last_active = time.monotonic()

    def requests_of(self, proto: web.RequestHandler) -> int:
        """Requests this connection has had so far: answered, or handed to a handler."""
        conn = self._conns.get(proto)
        return 0 if conn is None else conn.requests

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        conn = self._conns.get(request.protocol)  # type: ignore[arg-type]
        if conn is None:
            return await handler(request)
        conn.busy += 1
        conn.requests += 1
        try:
            return await handler(request)
        finally:
            conn.busy -= 1
            conn.last_active = time.monotonic()

    def start(self) -> None:
        self._sweeper = asyncio.create_task(self._sweep(), name="connection-guard")

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            try:
                await self._sweeper
            except asyncio.CancelledError:
                pass

    def exception_handler(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        """The event loop's handler: running out of descriptors while accepting is logged
        once (rate-limited) and answered by closing idle connections."""
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE):
            live = self._live()
            closed = self._evict_idle(live, max(1, len(live) // 10))
            self._limited.warning(
                "out of file descriptors with %d connection(s) open: closed %d idle one(s)", len(live), closed
            )
            return
        loop.default_exception_handler(context)

    # ---- decisions ----------------------------------------------------------------

    def _live(self) -> list[web.RequestHandler]:
        # Connections accepted in this same loop iteration are not registered yet: a burst
        # can pass the cap by that many; the descriptor headroom of effective_cap absorbs it.
        if self._server is None:
            return []
        return [p for p in self._server.connections if not self._conns.get(p, _GONE).closing]

    def _accepted(self, proto: web.RequestHandler) -> None:
        now = time.monotonic()
        self._prune()
        self._conns[proto] = _Conn(opened=now, last_active=now)
        live = self._live()
        if len(live) < self.max_connections:
            return
        if self._evict_idle(live, len(live) - self.max_connections + 1):
            self._limited.warning(
                "connection limit reached (%d open, server.max_connections %d): closed the longest idle one",
                len(live),
                self.max_connections,
            )
            return
        # Every connection is busy with a request: this one is refused.
        self._conns[proto].closing = True
        self._limited.warning(
            "connection limit reached (%d open, all busy, server.max_connections %d): refusing a connection",
            len(live),
            self.max_connections,
        )
        loop = asyncio.get_running_loop()
        # Twice call_soon: the transport's connection_made is itself scheduled by call_soon.
        loop.call_soon(loop.call_soon, self._close, proto)

    def _evict_idle(self, live: list[web.RequestHandler], n: int) -> int:
        idle = [(c.last_active, id(p), p) for p in live if (c := self._conns.get(p)) is not None and c.busy == 0]
        idle.sort(key=lambda t: (t[0], t[1]))
        for _, _, p in idle[:n]:
            self._conns[p].closing = True
            self._close(p)
        return min(n, len(idle))

    @staticmethod
    def _close(proto: web.RequestHandler) -> None:
        if proto.transport is not None:
            proto.transport.close()

    def _prune(self) -> None:
        # A protocol's transport is None before connection_made and after connection_lost;
        # a second after its accept only the second remains possible.
        now = time.monotonic()
        for p in [p for p, c in self._conns.items() if p.transport is None and now - c.opened > 1.0]:
            del self._conns[p]

    async def _sweep(self) -> None:
        interval = min(1.0, max(0.05, self.header_timeout_s / 4))
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            self._prune()
            for p, c in list(self._conns.items()):
                if c.closing:
                    self._close(p)
                elif c.requests == 0 and c.busy == 0 and now - c.opened > self.header_timeout_s:
                    # Never completed a first request: silent, or dripping its headers.
                    self._limited.warning(
                        "closing a connection from %s: no complete request within %gs (server.header_timeout_s)",
                        _peer(p),
                        self.header_timeout_s,
                    )
                    c.closing = True
                    self._close(p)


_GONE = _Conn(opened=0.0, last_active=0.0, closing=True)


def _peer(proto: web.RequestHandler) -> str:
    t = proto.transport
    peer = t.get_extra_info("peername") if t is not None else None
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "?"


class GuardedTCPSite(web.TCPSite):
    """A TCPSite whose accepted connections go through the ConnectionGuard."""

    def __init__(
        self,
        runner: web.AppRunner,
        host: str,
        port: int,
        guard: ConnectionGuard,
        wrap: Callable[[web.RequestHandler], asyncio.Protocol] | None = None,
    ) -> None:
        super().__init__(runner, host, port, reuse_address=True)
        self._g_host = host
        self._g_port = port
        self._guard = guard
        self._wrap = wrap

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with the runner
        server = self._runner.server
        assert server is not None
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._guard.factory(server, self._wrap), self._g_host, self._g_port, reuse_address=True, backlog=1024
        )

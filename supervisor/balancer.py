"""What a load balancer or scheduler reads of this box besides the API: the drain on
SIGTERM, and llama-server's ``GET /slots``.

Rules of this module:
- The drain is one flag pair owned here (``Drain``): ``begin`` (serve() on SIGTERM) and
  ``refusing`` (once ``shutdown.drain_s`` has passed). /health reads it; its middleware
  refuses new API requests once refusing. It never touches requests already admitted:
  those finish within ``shutdown.grace_s`` (serve() waits for them).
- While draining the listener stays open: a balancer's health check then reads a 503
  "draining" instead of a refused connection it may take for a network blip, and a
  request it sends meanwhile gets an answer it can retry elsewhere (503 ``shutting_down``
  with ``Retry-After`` and ``Connection: close``), never a connection reset mid-request.
- /slots is a read of the model's ready worker, outside admission: a balancer polling
  it every few seconds must not keep a model loaded (idle TTL) or take a queue place.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from supervisor.fleet import Fleet
from supervisor.proxy import openai_error
from supervisor.router import model_not_found
from supervisor.states import WorkerState

log = logging.getLogger("vram_llm")

# Still answered while draining: what balancers, Prometheus and operators read.
_OPEN_WHILE_DRAINING = frozenset({"/health", "/metrics", "/status"})
_SLOTS_TIMEOUT_S = 10.0


class Drain:
    """The shutdown drain as balancers see it."""

    def __init__(self) -> None:
        self.draining = False  # SIGTERM came: /health is 503
        self.refusing = False  # drain_s is over: new requests are answered 503

    def begin(self, drain_s: float) -> asyncio.TimerHandle | None:
        """SIGTERM: /health turns 503 now; new requests are refused after ``drain_s``."""
        self.draining = True
        if drain_s <= 0:
            self.refusing = True
            return None
        return asyncio.get_running_loop().call_later(drain_s, self._refuse)

    def _refuse(self) -> None:
        self.refusing = True

    def install(self, app: web.Application) -> None:
        app.middlewares.append(self.middleware)

    @web.middleware
    async def middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if not self.refusing or request.path in _OPEN_WHILE_DRAINING:
            return await handler(request)
        resp = openai_error(503, "the server is shutting down; send the request to another instance",
                            type_="server_error", code="shutting_down", retry_after=1)
        resp.force_close()  # the balancer's next request opens a connection elsewhere
        return resp


def slots_model(fleet: Fleet, named: str | None) -> str | None:
    """The model ``GET /slots?model=`` asks about: the named one, else the first (the
    fallback serves any name with one model); None when there is no such model."""
    mid = named or fleet.first
    if mid not in fleet.ids:
        return fleet.fallback
    return mid


async def slots(request: web.Request, fleet: Fleet) -> web.StreamResponse:
    """llama-server's GET /slots of one model, read from its ready worker (its shape and
    ``?fail_on_no_slot=1``: worker/api/slots.py)."""
    named = request.query.get("model") or None
    mid = slots_model(fleet, named)
    if mid is None:
        return model_not_found(named or "")
    view = fleet.managers[mid].view
    handle = view.handle
    if view.state is not WorkerState.READY or handle is None:
        # llama-server answers 503 "Loading model" before its model is ready.
        return openai_error(503, f"model {mid} is not ready (state {view.state.value})",
                            type_="unavailable_error", code="model_not_ready", retry_after=5)
    query = {k: v for k, v in request.query.items() if k != "model"}
    try:
        async with handle.session.get("http://worker/slots", params=query,
                                      timeout=aiohttp.ClientTimeout(total=_SLOTS_TIMEOUT_S)) as up:
            body = await up.read()
            return web.Response(status=up.status, body=body, content_type="application/json")
    except (aiohttp.ClientError, asyncio.TimeoutError) as e:
        return openai_error(503, f"model {mid}'s worker did not answer /slots: {e.__class__.__name__}",
                            type_="unavailable_error", code="worker_unavailable", retry_after=1)

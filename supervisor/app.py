"""Wiring: the HTTP app, the worker manager, signals, sd_notify, shutdown.

Rules of this module:
- ``serve(config)`` is a coroutine; cli.py chooses the event loop (uvloop) and
  configures logging. This module installs the signal handlers.
- Shutdown order matters: /health 503 and new requests refused (after shutdown.drain_s:
  supervisor/balancer.py), let in-flight requests finish (bounded by shutdown.grace_s) with
  the port still open, stop accepting, stop the worker, close the HTTP runner, remove the
  runtime dir.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import msgspec
from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest

from supervisor import routes
from supervisor.access_log import RequestLog
from supervisor.auth import KeyStore
from supervisor.balancer import Drain, slots
from supervisor.config import Config, ModelEntry, base_url, listen_hosts, resolved_models, resolved_runtime_dir
from supervisor.cors import Cors, CorsPolicy
from supervisor.dialect_errors import anthropic_errors
from supervisor.fastpath import FastPath
from supervisor.fleet import Fleet
from supervisor.gpus import make_probe
from supervisor.http_guard import ConnectionGuard, GuardedTCPSite, RateLimitedLog, effective_cap, server_logger
from supervisor.launch import Preparer, default_entry_path
from supervisor.metrics import ServingMetrics
from supervisor.proxy import openai_error
from supervisor.router import ModelCards, Router, model_not_found
from supervisor.sdnotify import SdNotify
from supervisor.spawn import worker_pids_of
from supervisor.states import WorkerState
from supervisor.status import HealthVerdict, SupervisorInfo
from supervisor.status_view import model_requests, model_rows, replica_rows
from supervisor.worker_process import WorkerManager

log = logging.getLogger("vram_llm")

FLEET: web.AppKey[Fleet] = web.AppKey("fleet", Fleet)
REGISTRY: web.AppKey[CollectorRegistry] = web.AppKey("registry", CollectorRegistry)
SERVING: web.AppKey[ServingMetrics] = web.AppKey("serving", ServingMetrics)
REQUEST_LOG: web.AppKey[RequestLog] = web.AppKey("request_log", RequestLog)
CARDS: web.AppKey[ModelCards] = web.AppKey("cards", ModelCards)
CORS: web.AppKey[Cors] = web.AppKey("cors", Cors)
DRAIN: web.AppKey[Drain] = web.AppKey("drain", Drain)


def _first(app: web.Application) -> tuple[WorkerManager, Preparer]:
    """The first model's manager and preparer (the one that answers requests without a
    "model" field): SIGHUP may change which model that is."""
    fleet = app[FLEET]
    return fleet.managers[fleet.first], fleet.preparers[fleet.first]


def health_of(app: web.Application) -> HealthVerdict:
    """The one /health rule, also in /status (`vram-llm status` exits by it): ready when
    every pinned model is ready and every model loaded at start has been (Fleet.ready_for_health).
    A model that serves every request (the fleet's fallback: the only one) is the service
    itself: it must be ready now."""
    fleet = app[FLEET]
    if app[DRAIN].draining:
        # SIGTERM: out of every balancer's rotation at once, while running answers finish.
        return HealthVerdict(ok=False, status="draining",
                             reason=f"shutting down: {fleet.in_flight} request(s) in flight finish first")
    if fleet.fallback is None:
        ok, why = fleet.ready_for_health()
        return HealthVerdict(ok=ok, status="ok" if ok else "loading", reason="" if ok else why,
                             retry_after_s=None if ok else 5)
    mgr = fleet.managers[fleet.fallback]
    if mgr.state is WorkerState.READY:
        return HealthVerdict(ok=True, status="ok")
    # While a restart is scheduled, tell load balancers when it comes.
    retry = None if mgr.next_attempt_in_s() is None else mgr.retry_after_s()
    return HealthVerdict(ok=False, status=mgr.state.value, reason=mgr.reason, retry_after_s=retry)


async def _health(request: web.Request) -> web.Response:
    h = health_of(request.app)
    if h.ok:
        return web.json_response({"status": "ok"})
    headers = None if h.retry_after_s is None else {"Retry-After": str(h.retry_after_s)}
    return web.json_response({"status": h.status, "reason": h.reason}, status=503, headers=headers)


async def _status(request: web.Request) -> web.Response:
    mgr, prep = _first(request.app)
    snap = mgr.snapshot()
    snap.supervisor = SupervisorInfo(
        pid=os.getpid(), uptime_s=round(time.time() - mgr.started_wall, 3), model=str(prep.model_path)
    )
    snap.health = health_of(request.app)
    worker = snap.worker
    rows = await prep.gpus_now(worker_pids_of(worker.pid) if worker else ())
    snap.gpus_now = rows
    fleet = request.app[FLEET]
    snap.replicas = replica_rows(fleet, fleet.first, asyncio.get_running_loop().time())
    snap.requests = model_requests(fleet, fleet.first)
    if len(fleet.all_ids) > 1:
        snap.models = model_rows(fleet, asyncio.get_running_loop().time())
        snap.swaps = fleet.swaps
        snap.gpus_now = await prep.gpus_now(())
    return web.Response(body=msgspec.json.encode(snap), content_type="application/json")


async def _metrics(request: web.Request) -> web.Response:
    await request.app[SERVING].refresh()
    return web.Response(body=generate_latest(request.app[REGISTRY]), content_type="text/plain")


async def _load_unload(request: web.Request, load: bool) -> web.Response:
    fleet = request.app[FLEET]
    mid = request.match_info["id"]
    if mid not in fleet.managers:
        return model_not_found(mid)
    if load:
        fleet.load(mid)
    else:
        fleet.unload(mid)
    return web.json_response({"id": mid, "requested": "load" if load else "unload"}, status=202)


async def _not_found(request: web.Request) -> web.Response:
    return openai_error(404, f"no route {request.method} {request.path}", type_="invalid_request_error", code="not_found")


def build_app(fleet: Fleet, guard: ConnectionGuard | None = None) -> web.Application:
    """The HTTP app of a fleet (one model is a fleet of one)."""
    app = web.Application(middlewares=[] if guard is None else [guard.middleware])
    app[FLEET] = fleet
    app[DRAIN] = Drain()
    reg = CollectorRegistry()
    # Every model with a manager (SIGHUP may add and remove them); one model is labelled with
    # its id, which is [model]'s alias or file stem.
    app[SERVING] = ServingMetrics(reg, fleet)
    app[REQUEST_LOG] = RequestLog(app[SERVING].observe)
    app[REQUEST_LOG].install(app)  # outermost: ids and log lines for refusals too
    app.middlewares.insert(1, anthropic_errors)  # refusals on /v1/messages in Anthropic's shape
    app[CORS] = Cors(CorsPolicy.from_config(fleet.config))
    app[CORS].install(app)  # preflights answered before the keys (serve() installs those after)
    app[REGISTRY] = reg
    for path in routes.HEALTH_PATHS:
        app.router.add_get(path, _health)
    app.router.add_get("/status", _status)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/slots", lambda r: slots(r, fleet))  # llama-server's, for paddler
    # The supervisor lists the models itself, one or several (no worker round trip; it
    # answers while a worker loads). Other methods on these paths fall through below.
    cards = app[CARDS] = ModelCards(fleet)
    app.router.add_get("/v1/models", cards.models)
    app.router.add_get("/v1/models/{id}", cards.model)
    # llama-server answers the list at the root too; POST /models/{id}/load is one segment longer.
    app.router.add_get(routes.MODELS_ALIAS, cards.models)
    app.router.add_get(routes.MODELS_ALIAS + "/{id}", cards.model)
    # The rest of /v1, its root aliases and llama-server's native endpoints at the root are
    # the workers' (the table: supervisor/routes.py): the request's "model" field picks the
    # worker (the router's rule; one model serves any).
    router = Router(fleet, fleet.config.server.body_timeout_s)
    app.router.add_route("*", "/v1/{tail:.*}", router.handle, expect_handler=router.expect_handler)
    for path in (*routes.V1_ALIASES, *routes.WORKER_ROOT_PATHS):
        app.router.add_route("*", path, router.handle, expect_handler=router.expect_handler)
    app.router.add_post(routes.SLOT_ACTION_PREFIX + "{id}", router.handle, expect_handler=router.expect_handler)
    app.router.add_post("/models/{id}/load", lambda r: _load_unload(r, True))
    app.router.add_post("/models/{id}/unload", lambda r: _load_unload(r, False))
    app.router.add_route("*", "/{tail:.*}", _not_found)
    return app


async def serve(config: Config, reload_config: Callable[[], Config] | None = None) -> int:
    """Run until SIGTERM/SIGINT. Returns the process exit code.

    ``reload_config`` re-reads the configuration on SIGHUP (the same file and flags).
    """
    loop = asyncio.get_running_loop()
    # The worker must not inherit NOTIFY_SOCKET and talk to systemd on our behalf.
    notify = SdNotify.from_env(unset_environment=True)
    entries = resolved_models(config, default_entry_path)  # ConfigError: cli reports it
    keys = KeyStore.from_config(config)  # raises ConfigError too
    log.info("API keys: %s", keys.describe())
    for host in listen_hosts(config):
        keys.warn_if_exposed(host)
    base = resolved_runtime_dir(config)
    base.mkdir(parents=True, exist_ok=True)
    # SIGTERM/SIGINT from here on end the server in order (and remove the runtime dir),
    # even when they come while it is still starting.
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runtime_dir = Path(tempfile.mkdtemp(prefix="vram-llm-", dir=base))  # mode 0700
    try:
        return await _serve_in(config, reload_config, loop, notify, entries, keys, runtime_dir, stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        shutil.rmtree(runtime_dir, ignore_errors=True)


async def _serve_in(
    config: Config,
    reload_config: Callable[[], Config] | None,
    loop: asyncio.AbstractEventLoop,
    notify: SdNotify,
    entries: list[ModelEntry],
    keys: KeyStore,
    runtime_dir: Path,
    stop: asyncio.Event,
) -> int:
    log.info("vram-llm supervisor pid %d; worker sockets in %s", os.getpid(), runtime_dir)
    sent_ready = False

    fleet: Fleet | None = None  # the callbacks below are handed to it; it exists before they run

    def on_state(mid: str, state: WorkerState, reason: str) -> None:
        nonlocal sent_ready
        several = fleet is not None and fleet.fallback is None
        notify.status(f"{mid}: {state.value}: {reason}" if several else f"{state.value}: {reason}")
        # READY follows /health (Fleet.ready_for_health).
        if not sent_ready and fleet is not None and fleet.ready_for_health()[0]:
            sent_ready = True
            notify.ready()

    def on_progress(progress: float) -> None:
        # A long load that makes progress must not hit systemd's start timeout.
        if not sent_ready:
            notify.extend_timeout(int(config.worker.load_stall_timeout_s * 1_000_000))

    # ModelError (a model file that cannot be read) is reported by cli.
    fleet = Fleet(config, entries, runtime_dir, make_probe(config), reload_config, on_state, on_progress)
    guard = ConnectionGuard(
        header_timeout_s=config.server.header_timeout_s,
        max_connections=effective_cap(config.server.max_connections),
    )
    app = build_app(fleet, guard)
    app[DRAIN].install(app)  # refusals during a drain get an id and a log line too
    keys.install(app)  # inside the request log: refusals get an id and a log line too
    # handler_cancellation: a client that disconnects cancels its handler, which
    # closes the upstream request, which stops the worker's generation.
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=5,
        keepalive_timeout=config.server.keepalive_timeout_s,
        logger=server_logger(RateLimitedLog(logging.getLogger("vram_llm.http"))),
    )
    await runner.setup()
    # GET /v1/models answered before aiohttp's request machinery (its rules: supervisor/fastpath.py).
    fast = FastPath(app[CARDS], keys, app[REQUEST_LOG], guard, config.server.keepalive_timeout_s, app[CORS])
    mgr_task: asyncio.Task[None] | None = None
    watchdog_task: asyncio.Task[None] | None = None
    old_exception_handler = loop.get_exception_handler()
    try:
        # One site per address (server.host may list several, IPv6 included: asyncio binds an
        # IPv6 socket IPV6_V6ONLY, so "0.0.0.0" and "::" can both be listed); all share the
        # guard, the fast path and the app. One that cannot bind ends the start (runner.cleanup
        # below stops the others).
        hosts = listen_hosts(config)
        sites = [GuardedTCPSite(runner, h, config.server.port, guard, fast.wrap) for h in hosts]
        for host, site in zip(hosts, sites):
            try:
                await site.start()
            except OSError as e:
                log.error("cannot listen on %s: %s", base_url(host, config.server.port), e)
                return 1
        guard.start()
        loop.set_exception_handler(guard.exception_handler)
        log.info(
            "listening on %s (at most %d connections)",
            ", ".join(base_url(h, config.server.port) for h in hosts),
            guard.max_connections,
        )

        def on_reload() -> None:
            log.warning("SIGHUP: re-reading the configuration")
            notify.reloading()
            read = fleet.request_reload()  # a bad new config keeps the old one (logged)
            keys.reload(read or fleet.config)  # a revoked key stops working now, whatever else failed
            app[CORS].reload(read or fleet.config)
            if sent_ready:  # systemd ends the reload job on READY=1 (sd_notify(3)), else times out
                notify.ready()

        loop.add_signal_handler(signal.SIGHUP, on_reload)

        mgr_task = asyncio.create_task(fleet.run(), name="worker-manager")
        interval = notify.watchdog_interval_s()
        if interval is not None:
            watchdog_task = asyncio.create_task(_watchdog(notify, interval / 2), name="watchdog")

        stop_task = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({stop_task, mgr_task}, return_when=asyncio.FIRST_COMPLETED)
        stop_task.cancel()
        if mgr_task in done:
            # The manager only returns on shutdown; anything else is a bug: say so.
            exc = mgr_task.exception()
            log.critical("worker manager stopped unexpectedly: %r", exc)
            return 1

        # The drain (supervisor/balancer.py): /health 503 now, the port open while requests in
        # flight finish, new requests served for drain_s (balancers that have not looked at
        # /health yet), then refused 503 so a retrying balancer sends them elsewhere.
        drain_s, grace_s = config.shutdown.drain_s, config.shutdown.grace_s
        log.info("shutting down: /health is 503; new requests %s; waiting up to %.0fs for %d request(s) in flight",
                 f"served for {drain_s:g}s more, then refused" if drain_s > 0 else "refused",
                 drain_s + grace_s, fleet.in_flight)
        notify.stopping()
        started = loop.time()
        app[DRAIN].begin(drain_s)
        if drain_s > 0:
            await asyncio.sleep(drain_s)  # a SIGTERM's wait, not a poll: nothing to check meanwhile
        if not await fleet.wait_no_requests(started + drain_s + grace_s):
            log.warning("grace period over: %d request(s) still in flight will be cut", fleet.in_flight)
        for site in sites:
            await site.stop()
        fleet.request_shutdown()
        await mgr_task
        return 0
    finally:
        loop.remove_signal_handler(signal.SIGHUP)  # SIGTERM/SIGINT: serve() removes them last
        if watchdog_task is not None:
            watchdog_task.cancel()
        if mgr_task is not None and not mgr_task.done():
            fleet.request_shutdown()
            with contextlib.suppress(BaseException):
                await mgr_task
        fast.stop()
        await guard.stop()
        await runner.cleanup()
        loop.set_exception_handler(old_exception_handler)
        shutil.rmtree(runtime_dir, ignore_errors=True)
        log.info("supervisor stopped")


async def _watchdog(notify: SdNotify, interval_s: float) -> None:
    # Pinged from the event loop itself: a blocked loop stops the pings and systemd
    # restarts us, which is the point.
    while True:
        notify.watchdog()
        await asyncio.sleep(interval_s)

"""The worker's HTTP server: the API dialects on a Unix socket, and the worker's lifecycle.

Rules for this module:
- It never imports llama_cpp: it talks to the model through ``engine.Engine`` only.
- HTTP only: routes go to one module per dialect (``worker/api/``), each a thin adapter
  over one internal request and one generation path (``api/run.py``).
- The event loop never blocks on the model. Loading runs in a loader thread, request
  preparation (template + tokenize) in a helper thread, and generation in the engine's
  batch loop thread, which admits requests in arrival order into ``parallel`` slots and
  hands each request's pieces back through the runner's sink.
- A request whose handler is cancelled (client gone) sets its generation's cancel flag;
  the batch loop frees its slot at its next step.
- Every client mistake is a 4xx in the route's error shape (OpenAI's; Anthropic's on
  /v1/messages); an engine failure is a 500 in the same shape and the worker keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from worker import openai_schema as oai
from worker.api.chat import ChatApi
from worker.api.completions import CompletionsApi
from worker.api.llamacpp import LlamaCppApi
from worker.api.messages import MessagesApi
from worker.api.native import NativeApi
from worker.api.responses import ResponsesApi
from worker.api.run import Runner
from worker.api.shapes import ModelCard, ModelList, enc, json_response
from worker.api.slots import active_kv_tokens, slots_json
from worker.engine import BadSetting, Engine, LoadCancelled, LoadError, OutOfMemory
from worker.protocol import (
    ExitCode,
    Health,
    LaunchSpec,
    anthropic_error_body,
    encoder,
    is_anthropic_path,
)

log = logging.getLogger("worker")

# How long a stopping worker waits for its handlers: a cut generation must still get its
# error answer out, and the generation thread notices the cut only at its next token,
# which on an overloaded CPU can take seconds (3 s was seen to be too short). Stays under
# the supervisor's default worker.stop_timeout_s (10 s), after which it sends SIGKILL.
_SHUTDOWN_TIMEOUT_S = 8.0
_LOAD_ABORT_WAIT_S = 30.0
_BACKLOG = 1024


class WorkerServer:
    def __init__(self, spec: LaunchSpec, engine: Engine) -> None:
        self.spec = spec
        self.engine = engine
        self.progress = 0.0  # written by the loader thread (a float store is atomic)
        self.params: Any = None  # AppliedParams, set once, when the model is ready
        self.created = int(time.time())
        self.runner = Runner(spec, engine)
        self.chat = ChatApi(self.runner)
        self.completions = CompletionsApi(self.runner)
        self.native = NativeApi(self.runner)
        self.responses = ResponsesApi(self.runner)
        self.messages = MessagesApi(self.runner)
        self.llamacpp = LlamaCppApi(self.runner)

    @property
    def ready(self) -> bool:
        return self.runner.ready

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.spec.max_body_bytes, middlewares=[_request_log, _errors]
        )
        add_get, add_post = app.router.add_get, app.router.add_post
        add_get("/health", self.health)
        add_get("/v1/models", self.models)
        add_get("/v1/models/{model_id}", self.model)
        add_post("/v1/chat/completions", self.chat.chat)
        add_post("/v1/chat/completions/input_tokens", self.chat.input_tokens)
        add_post("/v1/completions", self.completions.completions)
        add_post("/v1/responses", self.responses.create)
        add_post("/v1/responses/input_tokens", self.responses.input_tokens)
        add_get("/v1/responses/{response_id}", self.responses.get)
        app.router.add_delete("/v1/responses/{response_id}", self.responses.delete)
        add_post("/v1/messages", self.messages.messages)
        add_post("/v1/messages/count_tokens", self.messages.count_tokens)
        add_post("/v1/embeddings", self.native.embeddings)
        add_post("/tokenize", self.native.tokenize)
        add_post("/detokenize", self.native.detokenize)
        add_post("/apply-template", self.native.apply_template)
        add_get("/slots", self.slots)
        # llama-server's own routes, in its shapes (worker/api/llamacpp.py).
        add_post("/completion", self.llamacpp.completion)
        add_get("/props", self.llamacpp.props)
        add_post("/props", self.llamacpp.set_props)
        add_post("/slots/{id_slot}", self.llamacpp.slot_action)
        for path in ("/rerank", "/reranking", "/v1/rerank", "/v1/reranking"):
            add_post(path, self.llamacpp.rerank)
        return app

    # --- info endpoints ---

    async def health(self, request: web.Request) -> web.Response:
        common: dict[str, Any] = {"pid": os.getpid()}
        loop = self.engine.loop
        if loop is not None:
            common.update(
                active=loop.active,
                queued=loop.queued,
                seconds_since_token=loop.seconds_since_token(),
                requests_served=loop.served,
                cache_hits=loop.stats.hits,
                cache_tokens_reused=loop.stats.tokens_reused,
                kv_tokens=sum(len(s.tokens) for s in list(loop.slots)),  # a snapshot of the loop's
                kv_tokens_active=active_kv_tokens(loop.slots),
                kv_capacity=loop.n_ctx * len(loop.slots),
                draft_tokens=loop.drafts.drafted,
                draft_tokens_accepted=loop.drafts.accepted,
                draft_acceptance=loop.drafts.acceptance(),
                steps=loop.steps.steps,
                step_rows=loop.steps.rows,
                prompt_steps=loop.steps.prompt_steps,
                shared_prompt_steps=loop.steps.shared_prompt_steps,
                step_seconds=round(loop.steps.step_s, 6),
                decode_seconds=round(loop.steps.decode_s, 6),
            )
            if loop.ram is not None:
                ram = loop.ram.stats
                common.update(
                    ram_cache_entries=ram.entries,
                    ram_cache_bytes=ram.bytes,
                    ram_cache_hits=ram.hits,
                    ram_cache_tokens_saved=ram.tokens_saved,
                )
            if loop.io is not None and loop.io.disk is not None:
                disk = loop.io.disk.stats
                common.update(
                    disk_cache_entries=disk.entries,
                    disk_cache_bytes=disk.bytes,
                    disk_cache_hits=disk.hits,
                    disk_cache_tokens_saved=disk.tokens_saved,
                    disk_cache_errors=disk.errors,
                )
        if not self.ready:
            body = Health(status="loading", progress=round(self.progress, 4), **common)
            return json_response(encoder.encode(body), 503)
        body = Health(
            status="ok",
            progress=1.0,
            model=self.engine.model_id,
            params=self.params,
            **common,
        )
        return json_response(encoder.encode(body))

    async def slots(self, request: web.Request) -> web.Response:
        """llama-server's GET /slots (worker/api/slots.py); ``?fail_on_no_slot=1``: 503 when
        no slot is idle, as llama-server answers."""
        self.runner.require_ready()
        loop = self.engine.loop
        body = [] if loop is None else slots_json(loop.slots, loop.n_ctx)
        if request.query.get("fail_on_no_slot", "") not in ("", "0", "false") and not any(
            not s["is_processing"] for s in body
        ):
            raise oai.RequestError("no slot available", type="unavailable_error", code=None, status=503)
        return json_response(encoder.encode(body))

    def _card(self) -> ModelCard:
        return ModelCard(id=self.engine.model_id, created=self.created)

    async def models(self, request: web.Request) -> web.Response:
        self.runner.require_ready()
        return json_response(enc.encode(ModelList(data=[self._card()])))

    async def model(self, request: web.Request) -> web.Response:
        self.runner.require_ready()
        if request.match_info["model_id"] != self.engine.model_id:
            raise oai.RequestError(
                f"The model '{request.match_info['model_id']}' does not exist",
                param="model", code="model_not_found", status=404,
            )
        return json_response(enc.encode(self._card()))


def _error_response(request: web.Request, err: oai.RequestError) -> web.Response:
    if is_anthropic_path(request.path):
        return json_response(anthropic_error_body(err.status, err.message), err.status)
    return json_response(err.body(), err.status)


@web.middleware
async def _request_log(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """One line per API request, naming the supervisor's request id (X-Request-Id)."""
    if request.path == "/health":  # polled every few seconds: not worth a line each
        return await handler(request)
    t0 = time.monotonic()
    status = 499  # the client (the supervisor) went away before an answer
    try:
        resp = await handler(request)
        status = resp.status
        return resp
    finally:
        log.info("request %s: %s %s -> %d in %.3fs", request.headers.get("X-Request-Id", "-"),
                 request.method, request.path, status, time.monotonic() - t0)


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error leaves in the route's shape; nothing a client sends becomes a 500."""
    try:
        return await handler(request)
    except oai.RequestError as e:
        return _error_response(request, e)
    except web.HTTPRequestEntityTooLarge as e:
        return _error_response(request, oai.RequestError(
            f"the request body is too large: {e.text}", code="request_too_large", status=413,
        ))
    except web.HTTPMethodNotAllowed as e:
        resp = _error_response(request, oai.RequestError(
            f"method {request.method} is not allowed for {request.path}; use "
            + ", ".join(sorted(e.allowed_methods)),
            code="method_not_allowed", status=405,
        ))
        resp.headers["Allow"] = ",".join(sorted(e.allowed_methods))
        return resp
    except web.HTTPNotFound:
        return _error_response(request, oai.RequestError(
            f"no route {request.method} {request.path}", code="not_found", status=404,
        ))
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _error_response(request, oai.RequestError(e.reason, code=None, status=e.status))
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as e:
        log.exception("request %s %s failed", request.method, request.path)
        return _error_response(request, oai.RequestError(
            f"internal error: {e}", type="server_error", code=None, status=500,
        ))


# --- running ------------------------------------------------------------------------------


def _prepare_socket(path: str) -> None:
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        # The supervisor normally creates it (mode 0700); we create it just as private.
        os.makedirs(directory, mode=0o700, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)  # stale socket of a previous worker


async def serve(spec: LaunchSpec, engine: Engine, stop: asyncio.Event) -> ExitCode:
    """Listen, load the model, serve until ``stop`` is set; the exit code says why we ended.

    The socket answers (health: 503 loading) before the load starts.
    """
    server = WorkerServer(spec, engine)
    runner = web.AppRunner(
        server.app(),
        access_log=None,
        handle_signals=False,
        handler_cancellation=True,  # a client that disconnects cancels its handler
        shutdown_timeout=_SHUTDOWN_TIMEOUT_S,
    )
    await runner.setup()
    _prepare_socket(spec.socket_path)
    # The supervisor admits at most the worker's generation slots at once plus a few
    # reads (health, model list); a refused connect is retried there. The backlog only
    # has to hold a burst of those: 1024 is far above any admission limit in use.
    site = web.UnixSite(runner, spec.socket_path, backlog=_BACKLOG)
    code = ExitCode.OK
    listening = False  # the socket file is ours to remove only once we have bound it
    try:
        await site.start()
        listening = True
        os.chmod(spec.socket_path, 0o600)
        log.info("listening on %s, loading %s", spec.socket_path, spec.model_path)

        def progress(value: float) -> None:
            server.progress = value

        loop = asyncio.get_running_loop()
        loader = loop.run_in_executor(None, engine.load, progress)
        stopper: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        await asyncio.wait([loader, stopper], return_when=asyncio.FIRST_COMPLETED)
        if not loader.done():
            log.info("stop requested while loading: aborting the load")
            engine.abort_load()
            await asyncio.wait([loader], timeout=_LOAD_ABORT_WAIT_S)
        if loader.done() and loader.exception() is not None:
            exc = loader.exception()
            if isinstance(exc, LoadCancelled) or stop.is_set():
                code = ExitCode.OK
            elif isinstance(exc, BadSetting):
                log.error("invalid launch spec: %s", exc)
                code = ExitCode.BAD_SPEC
            elif isinstance(exc, OutOfMemory):
                log.error("%s", exc)
                code = ExitCode.OOM
            elif isinstance(exc, LoadError):
                log.error("%s", exc)
                code = ExitCode.FAILURE
            else:
                log.error("model load failed: %s", exc, exc_info=exc)
                code = ExitCode.FAILURE
        elif loader.done() and not stop.is_set():
            server.params = engine.applied_params()
            server.runner.ready = True
            log.info("ready: model %s", engine.model_id)
            await stopper
        stopper.cancel()
    finally:
        if stop.is_set():
            log.info("stopping: cancelling the running generations and closing %s", spec.socket_path)
        if listening:
            # No new request from here on; the ones being generated are cut and answered
            # with an error (the supervisor lets them finish before it sends SIGTERM).
            await site.stop()
        if engine.loop is not None:
            engine.loop.cancel_all()
        await runner.cleanup()
        if listening:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(spec.socket_path)
    return code

"""The worker's HTTP server: an OpenAI-compatible API on a Unix socket.

Rules for this module:
- It never imports llama_cpp: it talks to the model through ``engine.Engine`` only.
- The event loop never blocks on the model. Loading runs in a loader thread, request
  preparation (template + tokenize) in a helper thread, and generation in the engine's
  batch loop thread, which admits requests in arrival order into ``parallel`` slots and
  hands each request's pieces back through an ``_AsyncSink``.
- A request whose handler is cancelled (client gone) sets its generation's cancel flag;
  the batch loop frees its slot at its next step.
- Every client mistake is a 4xx in OpenAI's error shape; an engine failure is a 500 in the
  same shape and the worker keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import logging
import os
import stat
import threading
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import numpy as np
from aiohttp import web
from msgspec import UNSET, UnsetType

from worker import openai_schema as oai
from worker.engine import (
    ChatMessage,
    Engine,
    Generation,
    InvalidInput,
    LoadCancelled,
    LoadError,
    OutOfMemory,
    ParsedCall,
    Prepared,
    PromptTooLong,
    Sampling,
    StreamSplit,
    TokenLogprob,
    ToolRequest,
    parse_calls,
)
from worker.log_limit import LogLimiter
from worker.protocol import (
    STREAM_DONE,
    AppliedParams,
    ExitCode,
    Health,
    LaunchSpec,
    StreamUsage,
    encoder,
    usage_trailer,
)

log = logging.getLogger("worker")

_STARTED = object()  # the generation got a slot
_END = object()  # end of a generation's piece stream
_JSON = "application/json"
# How long a stopping worker waits for its handlers: a cut generation must still get its
# error answer out, and the generation thread notices the cut only at its next token,
# which on an overloaded CPU can take seconds (3 s was seen to be too short). Stays under
# the supervisor's default worker.stop_timeout_s (10 s), after which it sends SIGKILL.
_SHUTDOWN_TIMEOUT_S = 8.0
_LOAD_ABORT_WAIT_S = 30.0
_BACKLOG = 1024


# --- response bodies (msgspec: encoded once per chunk, no dict building) ----------------


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int  # prompt tokens reused from the KV cache, not evaluated again


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


# vLLM's return_token_ids: these fields appear only when a request asks for them.
TokenIds = list[int] | UnsetType


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(msgspec.Struct):
    content: list[ChatTokenLogprob]
    refusal: None = None


class TextLogprobs(msgspec.Struct):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


def _text(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


def _chat_logprobs(lps: list[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs([
        ChatTokenLogprob(
            _text(lp.piece), lp.logprob, list(lp.piece),
            [TopLogprob(_text(p), v, list(p)) for p, v in lp.top],
        )
        for lp in lps
    ])


def _text_logprobs(lps: list[TokenLogprob], offset: int) -> TextLogprobs:
    """Completions' shape; ``offset``: characters of the completion before these tokens."""
    tokens = [_text(lp.piece) for lp in lps]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    tops = []
    for lp in lps:
        top: dict[str, float] = {}
        for p, v in lp.top:
            top.setdefault(_text(p), v)  # two byte pieces may render alike: keep the likelier
        tops.append(top)
    return TextLogprobs(tokens, [lp.logprob for lp in lps], tops, offsets)


class FunctionOut(msgspec.Struct):
    name: str
    arguments: str


class ToolCallOut(msgspec.Struct):
    id: str
    function: FunctionOut
    type: str = "function"


class ToolCallDelta(msgspec.Struct):
    index: int
    id: str
    function: FunctionOut
    type: str = "function"


class ChatMessageOut(msgspec.Struct):
    role: str
    content: str | None
    tool_calls: list[ToolCallOut] | UnsetType = UNSET


def _tool_calls(calls: list[ParsedCall]) -> list[ToolCallOut]:
    return [
        ToolCallOut(f"call_{uuid.uuid4().hex[:24]}", FunctionOut(c.name, c.arguments))
        for c in calls
    ]


def _answer(prepared: Prepared, text: str, finish: str) -> tuple[ChatMessageOut, str]:
    """The assistant message (tool calls parsed out when the request offered tools)."""
    if prepared.tool_format is not None and finish == "stop":
        content, calls = parse_calls(prepared.tool_format, text)
        if calls:
            return ChatMessageOut("assistant", content, _tool_calls(calls)), "tool_calls"
    return ChatMessageOut("assistant", text), finish


class ChatChoice(msgspec.Struct):
    index: int
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None
    token_ids: TokenIds = UNSET


class ChatCompletion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: str = "chat.completion"
    system_fingerprint: None = None
    prompt_token_ids: TokenIds = UNSET


class Delta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(msgspec.Struct):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None
    token_ids: TokenIds = UNSET  # the tokens generated since the previous chunk


class ChatChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    object: str = "chat.completion.chunk"
    system_fingerprint: None = None
    prompt_token_ids: TokenIds = UNSET  # on the first chunk


class ChatChunkWithUsage(ChatChunk):
    usage: Usage | None = None


class TextChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: str | None
    logprobs: TextLogprobs | None = None
    # vLLM puts a completion's prompt tokens on the choice (streamed: the first chunk's).
    prompt_token_ids: TokenIds = UNSET
    token_ids: TokenIds = UNSET


class TextCompletion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage
    object: str = "text_completion"
    system_fingerprint: None = None


class TextChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[TextChoice]
    object: str = "text_completion"
    system_fingerprint: None = None


class TextChunkWithUsage(TextChunk):
    usage: Usage | None = None


class Embedding(msgspec.Struct):
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32 (OpenAI's)
    object: str = "embedding"


class EmbeddingUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(msgspec.Struct):
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
    object: str = "list"


class ModelCard(msgspec.Struct):
    id: str
    created: int
    object: str = "model"
    owned_by: str = "vram-llm"


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"


_enc = msgspec.json.Encoder()


def _sse(obj: Any) -> bytes:
    return b"data: " + _enc.encode(obj) + b"\n\n"


def _json_response(
    body: bytes, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(body=body, status=status, content_type=_JSON, headers=headers)


_MAX_NAMES_SHOWN = 16
_MAX_NAME_CHARS = 64


def _names_for_humans(names: tuple[str, ...]) -> str:
    """Field names for a header and a log line: ASCII, no control characters, bounded.

    The names come from the client: quoting keeps a newline or a megabyte-long key out of
    our headers and logs.
    """
    shown = [
        urllib.parse.quote(n[:_MAX_NAME_CHARS], safe="!#$&'*+-.^_`|~:/@[]()<>?=;")
        for n in names[:_MAX_NAMES_SHOWN]
    ]
    if len(names) > _MAX_NAMES_SHOWN:
        shown.append(f"... {len(names) - _MAX_NAMES_SHOWN} more")
    return ", ".join(shown)


def _error_response(err: oai.RequestError) -> web.Response:
    return _json_response(err.body(), err.status)


def _usage(gen: Generation) -> Usage:
    return Usage(
        gen.prompt_tokens, gen.completion_tokens, gen.prompt_tokens + gen.completion_tokens,
        PromptTokensDetails(gen.prompt_cached),
    )


def _finish(gen: Generation) -> str:
    return gen.finish_reason if gen.finish_reason in ("stop", "length") else "stop"


def _cut(gen: Generation) -> bool:
    """True when the generation was cut (the worker is stopping), not finished: the
    client must get an error then, never a short answer called "stop" (issue 13)."""
    return gen.finish_reason not in ("stop", "length")


def _cut_error() -> bytes:
    return oai.error_body(
        "the model worker stopped before this generation finished; the request can be retried",
        type="server_error",
        code="generation_cut",
    )


# --- the bridge from the batch loop -------------------------------------------------------


class _AsyncSink:
    """Receives a generation's events on the batch loop thread, queues them on the event loop.

    A piece is queued as (text, token ids generated since the previous piece, their
    logprobs), the ids with ``with_ids`` (return_token_ids) and the logprobs when the
    request asked for them, else None. It is called right after the generation appended
    the piece's tokens, on the loop thread, so the ids match the text; ``sent`` counts
    those handed out (read by the event loop once the end is queued).
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, gen: Generation, with_ids: bool, with_logprobs: bool
    ) -> None:
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self._call = loop.call_soon_threadsafe
        self._put = self.queue.put_nowait
        self._gen = gen
        self._with_ids = with_ids
        self._with_logprobs = with_logprobs
        self.sent = 0

    def _send(self, item: object) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop is closed: nobody listens
            self._call(self._put, item)

    def started(self) -> None:
        self._send(_STARTED)

    def piece(self, text: str) -> None:
        ids = lps = None
        if self._with_ids or self._with_logprobs:
            gen, sent = self._gen, self.sent
            n = len(gen.token_ids)
            if self._with_ids:
                ids = gen.token_ids[sent:n]
            if self._with_logprobs:
                lps = gen.logprobs[sent:n]
            self.sent = n
        self._send((text, ids, lps))

    def ended(self) -> None:
        self._send(_END)


class _GenerationFailed(Exception):
    def __init__(self, gen: Generation) -> None:
        super().__init__(gen.error)
        self.message = gen.error or "generation failed"
        self.status = gen.error_status


# A text piece, the token ids generated since the previous one and their logprobs.
Piece = tuple[str, list[int] | None, list[TokenLogprob] | None]

# --- the application --------------------------------------------------------------------


class WorkerServer:
    def __init__(self, spec: LaunchSpec, engine: Engine) -> None:
        self.spec = spec
        self.engine = engine
        self.progress = 0.0  # written by the loader thread (a float store is atomic)
        self.ready = False
        self.params: AppliedParams | None = None  # set once, when the model is ready
        self.created = int(time.time())
        self._ignored_log = LogLimiter()  # ignored-parameter warnings (event loop only)

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=self.spec.max_body_bytes, middlewares=[_request_log, _openai_errors]
        )
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model_id}", self.model)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_post("/apply-template", self.apply_template)
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
                kv_tokens=loop.kv_tokens(),
                kv_capacity=loop.n_ctx * len(loop.slots),
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
            return _json_response(encoder.encode(body), 503)
        body = Health(
            status="ok",
            progress=1.0,
            model=self.engine.model_id,
            params=self.params,
            **common,
        )
        return _json_response(encoder.encode(body))

    def _card(self) -> ModelCard:
        return ModelCard(id=self.engine.model_id, created=self.created)

    async def models(self, request: web.Request) -> web.Response:
        self._require_ready()
        return _json_response(_enc.encode(ModelList(data=[self._card()])))

    async def model(self, request: web.Request) -> web.Response:
        self._require_ready()
        if request.match_info["model_id"] != self.engine.model_id:
            raise oai.RequestError(
                f"The model '{request.match_info['model_id']}' does not exist",
                param="model", code="model_not_found", status=404,
            )
        return _json_response(_enc.encode(self._card()))

    def _require_ready(self) -> None:
        if not self.ready:
            raise oai.RequestError(
                "the model is still loading; retry shortly",
                type="server_error", code="model_loading", status=503,
            )

    # --- embeddings ---

    async def embeddings(self, request: web.Request) -> web.Response:
        self._require_ready()
        req = oai.decode_as(oai.EmbeddingRequest, await request.read())
        inputs = oai.embedding_inputs(req)
        if not self.engine.serves_embeddings:
            raise oai.RequestError(
                f"the model {self.engine.model_id!r} is not configured for embeddings: set "
                "embeddings = true in its [model] section", param="model",
                code="embeddings_disabled",
            )
        vectors, n_tokens = await self._off_loop(lambda: self.engine.embed(inputs))
        b64 = req.encoding_format == "base64"
        data = [
            Embedding(i, base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode() if b64 else v)
            for i, v in enumerate(vectors)
        ]
        body = EmbeddingList(data, self.engine.model_id, EmbeddingUsage(n_tokens, n_tokens))
        return _json_response(_enc.encode(body))

    # --- llama-server's tokenizer endpoints (prompt budgeting against n_ctx) ---

    async def _off_loop(self, fn: Callable[[], Any]) -> Any:
        """Run a tokenizer call in a helper thread; a bad token id is a 400."""
        try:
            return await asyncio.get_running_loop().run_in_executor(None, fn)
        except InvalidInput as e:
            raise oai.RequestError(e.message, param=e.param, code=e.code) from None

    async def tokenize(self, request: web.Request) -> web.Response:
        self._require_ready()
        req = oai.decode_as(oai.TokenizeRequest, await request.read())
        engine = self.engine

        def run() -> list[Any]:
            ids = engine.tokenize(req.content, req.add_special, req.parse_special)
            if not req.with_pieces:
                return ids
            out: list[Any] = []
            for t in ids:
                raw = engine.piece(t)
                try:  # llama-server: the piece as text, or its bytes when not valid UTF-8
                    piece: Any = raw.decode("utf-8")
                except UnicodeDecodeError:
                    piece = list(raw)
                out.append({"id": t, "piece": piece})
            return out

        return _json_response(_enc.encode({"tokens": await self._off_loop(run)}))

    async def detokenize(self, request: web.Request) -> web.Response:
        self._require_ready()
        req = oai.decode_as(oai.DetokenizeRequest, await request.read())
        content = await self._off_loop(lambda: self.engine.detokenize(req.tokens))
        return _json_response(_enc.encode({"content": content}))

    async def apply_template(self, request: web.Request) -> web.Response:
        self._require_ready()
        req = oai.decode_as(oai.ApplyTemplateRequest, await request.read())
        oai.check_messages(req.messages)
        messages = _chat_messages(req.messages)
        tools = [_tool_dict(t) for t in req.tools] if req.tools else None
        prompt = await self._off_loop(lambda: self.engine.apply_template(messages, tools))
        return _json_response(_enc.encode({"prompt": prompt}))

    # --- generation endpoints ---

    async def chat(self, request: web.Request) -> web.StreamResponse:
        self._require_ready()
        req, ignored = oai.decode_chat(await request.read(), self.spec.strict_params)
        headers = self._ignored_params(request, ignored)
        messages = _chat_messages(req.messages)
        sampling = _sampling(req, oai.max_tokens_of(req, None), req.response_format)
        if req.logprobs:
            sampling = dataclasses.replace(sampling, logprobs=req.top_logprobs or 0)
        choice = oai.tool_choice_of(req)
        tools = None
        if choice is not None and req.tools:
            tools = ToolRequest([_tool_dict(t) for t in req.tools], choice, req.parallel_tool_calls)
        prepared = await self._prepare(
            lambda: self.engine.prepare_chat(messages, sampling, tools), "messages"
        )
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await self._stream_chat(
                request, prepared, cid, include_usage, req.return_token_ids, headers
            )
        gen, text = await self._complete(prepared)
        if _cut(gen):
            return _json_response(_cut_error(), 503)
        ids = req.return_token_ids
        message, finish = _answer(prepared, text, _finish(gen))
        body = ChatCompletion(
            id=cid,
            created=int(time.time()),
            model=self.engine.model_id,
            choices=[ChatChoice(
                0, message, finish,
                logprobs=_chat_logprobs(gen.logprobs) if req.logprobs else None,
                token_ids=gen.token_ids if ids else UNSET,
            )],
            usage=_usage(gen),
            prompt_token_ids=prepared.tokens if ids else UNSET,
        )
        return _json_response(_enc.encode(body), headers=headers)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        self._require_ready()
        req, ignored = oai.decode_completion(await request.read(), self.spec.strict_params)
        headers = self._ignored_params(request, ignored)
        prompt: str | list[int]
        if isinstance(req.prompt, str):
            prompt = req.prompt
        elif isinstance(req.prompt[0], str):
            prompt = req.prompt[0]  # type: ignore[assignment]
        else:
            prompt = req.prompt  # type: ignore[assignment]
        max_tokens = oai.max_tokens_of(req, 16)  # 16: OpenAI's default
        sampling = _sampling(req, max_tokens, req.response_format)
        if req.logprobs is not None:
            sampling = dataclasses.replace(sampling, logprobs=req.logprobs)
        prepared = await self._prepare(
            lambda: self.engine.prepare_completion(prompt, sampling), "prompt"
        )
        cid = f"cmpl-{uuid.uuid4().hex}"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await self._stream_text(
                request, prepared, cid, include_usage, req.return_token_ids, headers
            )
        gen, text = await self._complete(prepared)
        if _cut(gen):
            return _json_response(_cut_error(), 503)
        ids = req.return_token_ids
        body = TextCompletion(
            id=cid,
            created=int(time.time()),
            model=self.engine.model_id,
            choices=[TextChoice(
                0, text, _finish(gen),
                logprobs=_text_logprobs(gen.logprobs, 0) if req.logprobs is not None else None,
                prompt_token_ids=prepared.tokens if ids else UNSET,
                token_ids=gen.token_ids if ids else UNSET,
            )],
            usage=_usage(gen),
        )
        return _json_response(_enc.encode(body), headers=headers)

    def _ignored_params(self, request: web.Request, names: tuple[str, ...]) -> dict[str, str]:
        """Headers naming the unknown fields a request carried; one rate-limited WARNING."""
        if not names:
            return {}
        shown = _names_for_humans(names)
        if self._ignored_log.allow(names, time.monotonic()):
            held = self._ignored_log.suppressed
            self._ignored_log.suppressed = 0
            log.warning(
                "request %s: ignored unknown parameters: %s (set [server] strict_params = true "
                "to reject them)%s",
                request.headers.get("X-Request-Id", "-"), shown,
                f"; {held} similar warnings left out since the last one" if held else "",
            )
        return {"X-Ignored-Params": shown}

    async def _prepare(self, fn: Callable[[], Prepared], what: str) -> Prepared:
        try:
            return await asyncio.get_running_loop().run_in_executor(None, fn)
        except InvalidInput as e:
            raise oai.RequestError(e.message, param=e.param, code=e.code) from None
        except PromptTooLong as e:
            raise oai.RequestError(
                f"This model's maximum context length is {e.n_ctx} tokens. However, your "
                f"{what} resulted in {e.n_prompt} tokens. Please reduce the length of the {what}.",
                param=what,
                code="context_length_exceeded",
            ) from None

    async def _run(
        self,
        prepared: Prepared,
        on_start: Callable[[], Awaitable[None]] | None,
        on_pieces: Callable[[list[Piece]], Awaitable[None]],
        with_ids: bool = False,
    ) -> tuple[Generation, _AsyncSink]:
        """Queue a generation and follow it to its end; raises _GenerationFailed.

        ``on_start`` runs when the request gets a slot, ``on_pieces`` with the pieces
        that arrived meanwhile (a slow client or a busy loop gets them in one write). If
        this task is cancelled (client gone) or a callback fails, the generation is
        cancelled: the batch loop frees its slot at its next step, other slots go on.
        """
        gen = self.engine.generation(prepared, threading.Event())
        sink = _AsyncSink(
            asyncio.get_running_loop(), gen, with_ids, prepared.sampling.logprobs is not None
        )
        self.engine.start(gen, sink)
        queue = sink.queue
        try:
            while True:
                item = await queue.get()
                if item is _STARTED:
                    if on_start is not None:
                        await on_start()
                    continue
                out: list[Piece] = []
                while item is not _END:
                    out.append(item)  # type: ignore[arg-type]
                    if queue.empty():
                        break
                    item = queue.get_nowait()
                if out:
                    await on_pieces(out)
                if item is _END:
                    break
        except BaseException:
            gen.cancel.set()
            raise
        if gen.error is not None:
            raise _GenerationFailed(gen)
        return gen, sink

    async def _complete(self, prepared: Prepared) -> tuple[Generation, str]:
        parts: list[str] = []

        async def collect(pieces: list[Piece]) -> None:
            parts.extend(piece[0] for piece in pieces)

        try:
            gen, _ = await self._run(prepared, None, collect)
        except _GenerationFailed as e:
            raise oai.RequestError(
                e.message, type="server_error", code=None, status=e.status
            ) from None
        return gen, "".join(parts)

    async def _stream(
        self,
        request: web.Request,
        prepared: Prepared,
        first: bytes | None,
        piece_chunk: Callable[[Piece], bytes],
        final_chunks: Callable[[Generation, Piece], bytes],
        with_ids: bool,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        """Stream a generation as SSE.

        With ``with_ids`` (return_token_ids) each piece carries the token ids generated
        since the previous one, and ``final_chunks`` gets those not sent yet (tokens whose
        text was held back or cut by a stop string), so the chunks' ids add up to all;
        the same for logprobs when the request asked for them.
        """
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **headers}
        )
        times = [time.monotonic()]  # arrival, then the first piece (usage trailer)

        async def start() -> None:
            # Headers go out when this request gets a slot, not while it waits in the
            # queue: a stream that has not started can still be resent elsewhere by the
            # supervisor if this worker dies before its turn.
            await resp.prepare(request)
            if first is not None:
                await resp.write(first)

        async def write(pieces: list[Piece]) -> None:
            if len(times) == 1:
                times.append(time.monotonic())
            await resp.write(b"".join(piece_chunk(piece) for piece in pieces))

        try:
            gen, sink = await self._run(prepared, start, write, with_ids)
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as e:
            # Headers are gone already: report the failure in-stream, OpenAI style.
            if not isinstance(e, _GenerationFailed):
                log.exception("generation failed")
            status = e.status if isinstance(e, _GenerationFailed) else 500
            message = e.message if isinstance(e, _GenerationFailed) else f"internal error: {e}"
            err = oai.error_body(message, type="server_error")
            if not resp.prepared:
                return web.Response(status=status, body=err, content_type="application/json")
            with contextlib.suppress(ConnectionResetError):
                await resp.write(b"data: " + err + b"\n\n")
            return resp
        if _cut(gen) and not resp.prepared:
            return _json_response(_cut_error(), 503)  # cut while waiting for a slot
        if _cut(gen):
            # No finish chunk and no [DONE]: an error event says the answer is incomplete.
            await resp.write(b"data: " + _cut_error() + b"\n\n")
        else:
            trailer = usage_trailer(StreamUsage(
                model=self.engine.model_id, prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens,
                ttft_s=times[1] - times[0] if len(times) > 1 else None,
                gen_s=(gen.last_token_at or times[-1]) - times[1] if len(times) > 1 else None,
            ))
            rest = (
                "",
                gen.token_ids[sink.sent :] if with_ids else None,
                gen.logprobs[sink.sent :] if prepared.sampling.logprobs is not None else None,
            )
            await resp.write(final_chunks(gen, rest) + trailer + STREAM_DONE)
        await resp.write_eof()
        return resp

    async def _stream_chat(
        self, request: web.Request, prepared: Prepared, cid: str, include_usage: bool,
        with_ids: bool, headers: dict[str, str],
    ) -> web.StreamResponse:
        created = int(time.time())
        model = self.engine.model_id
        chunk_cls = ChatChunkWithUsage if include_usage else ChatChunk

        def chunk(delta: Delta, finish: str | None, piece: Piece) -> bytes:
            _, ids, lps = piece
            choice = ChatChunkChoice(
                0, delta, finish, logprobs=None if lps is None else _chat_logprobs(lps),
                token_ids=UNSET if ids is None else ids,
            )
            return _sse(chunk_cls(cid, created, model, [choice]))

        # With tools, plain text streams as it comes and a call is held from its marker
        # on, then parsed at the end and sent as delta.tool_calls (tools.StreamSplit).
        split = StreamSplit(prepared.tool_format) if prepared.tool_format is not None else None
        held_ids: list[int] = []
        held_lps: list[TokenLogprob] = []

        def take(ids: list[int] | None, lps: list[TokenLogprob] | None) -> Piece:
            """The ids/logprobs not sent yet, these included, for the next chunk."""
            held_ids.extend(ids or ())
            held_lps.extend(lps or ())
            out = ("", None if ids is None else held_ids[:], None if lps is None else held_lps[:])
            held_ids.clear()
            held_lps.clear()
            return out

        def piece_chunk(piece: Piece) -> bytes:
            if split is None:
                return chunk(Delta(content=piece[0]), None, piece)
            text, ids, lps = piece
            now = split.feed(text)
            if not now:
                held_ids.extend(ids or ())
                held_lps.extend(lps or ())
                return b""
            return chunk(Delta(content=now), None, take(ids, lps))

        def final(gen: Generation, rest: Piece) -> bytes:
            out = b""
            finish = _finish(gen)
            if split is not None:
                assert prepared.tool_format is not None
                content: str | None = split.held
                calls: list[ParsedCall] = []
                if split.holding and finish == "stop":
                    content, calls = parse_calls(prepared.tool_format, split.held)
                _, ids, lps = rest
                if content:
                    out += chunk(Delta(content=content), None, take(ids, lps))
                    ids = [] if ids is not None else None
                    lps = [] if lps is not None else None
                if calls:
                    finish = "tool_calls"
                    deltas = [
                        ToolCallDelta(i, c.id, c.function) for i, c in enumerate(_tool_calls(calls))
                    ]
                    out += chunk(Delta(tool_calls=deltas), None, take(ids, lps))
                    ids = [] if ids is not None else None
                    lps = [] if lps is not None else None
                rest = take(ids, lps)
            out += chunk(Delta(), finish, rest)
            if include_usage:
                out += _sse(ChatChunkWithUsage(cid, created, model, [], usage=_usage(gen)))
            return out

        role = ChatChunkChoice(
            0, Delta(role="assistant", content=""), token_ids=[] if with_ids else UNSET
        )
        first = _sse(chunk_cls(
            cid, created, model, [role], prompt_token_ids=prepared.tokens if with_ids else UNSET
        ))
        return await self._stream(
            request, prepared, first, piece_chunk, final, with_ids, headers,
        )

    async def _stream_text(
        self, request: web.Request, prepared: Prepared, cid: str, include_usage: bool,
        with_ids: bool, headers: dict[str, str],
    ) -> web.StreamResponse:
        created = int(time.time())
        model = self.engine.model_id
        chunk_cls = TextChunkWithUsage if include_usage else TextChunk
        offset = [0]  # characters of the tokens whose logprobs were sent (text_offset)

        def chunk(finish: str | None, piece: Piece) -> bytes:
            text, ids, lps = piece
            logprobs = None
            if lps is not None:
                logprobs = _text_logprobs(lps, offset[0])
                offset[0] += sum(len(t) for t in logprobs.tokens)
            choice = TextChoice(
                0, text, finish, logprobs=logprobs, token_ids=UNSET if ids is None else ids
            )
            return _sse(chunk_cls(cid, created, model, [choice]))

        def final(gen: Generation, rest: Piece) -> bytes:
            out = chunk(_finish(gen), rest)
            if include_usage:
                out += _sse(TextChunkWithUsage(cid, created, model, [], usage=_usage(gen)))
            return out

        first = None
        if with_ids:  # vLLM sends the prompt's token ids on the first chunk's choice
            choice = TextChoice(0, "", None, prompt_token_ids=prepared.tokens, token_ids=[])
            first = _sse(chunk_cls(cid, created, model, [choice]))
        return await self._stream(
            request, prepared, first, lambda piece: chunk(None, piece), final, with_ids, headers,
        )


def _chat_messages(messages: list[oai.Message]) -> list[ChatMessage]:
    return [
        ChatMessage(
            m.role, oai.message_text(m), m.name, m.tool_call_id,
            [msgspec.to_builtins(c) for c in m.tool_calls] if m.tool_calls else None,
        )
        for m in messages
    ]


def _tool_dict(tool: oai.Tool) -> dict[str, Any]:
    """A tool as the chat template gets it (Hugging Face's shape, unset fields left out)."""
    fn = {k: v for k, v in msgspec.structs.asdict(tool.function).items() if v is not None}
    return {"type": "function", "function": fn}


def _sampling(req: Any, max_tokens: int | None, fmt: Any) -> Sampling:
    stop: tuple[str, ...] = ()
    if isinstance(req.stop, str):
        stop = (req.stop,)
    elif req.stop:
        stop = tuple(req.stop)
    return Sampling(
        max_tokens=max_tokens,
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        min_p=req.min_p,
        seed=req.seed,
        stop=stop,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        # repetition_penalty is vLLM's (and Hugging Face's) name for repeat_penalty.
        repeat_penalty=req.repetition_penalty or req.repeat_penalty,
        logit_bias=req.logit_bias,
        json_mode=isinstance(fmt, (oai.ResponseFormatJsonObject, oai.ResponseFormatJsonSchema)),
        json_schema=fmt.json_schema.schema if isinstance(fmt, oai.ResponseFormatJsonSchema) else None,
        typical_p=req.typical_p,
        ignore_eos=req.ignore_eos,
        min_tokens=req.min_tokens,
        stop_token_ids=tuple(req.stop_token_ids or ()),
        include_stop_str_in_output=req.include_stop_str_in_output,
        skip_special_tokens=req.skip_special_tokens,
        cache_prompt=req.cache_prompt,
    )


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
async def _openai_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error leaves in OpenAI's shape; nothing a client sends becomes a 500."""
    try:
        return await handler(request)
    except oai.RequestError as e:
        return _error_response(e)
    except web.HTTPRequestEntityTooLarge as e:
        return _error_response(oai.RequestError(
            f"the request body is too large: {e.text}", code="request_too_large", status=413,
        ))
    except web.HTTPMethodNotAllowed as e:
        resp = _error_response(oai.RequestError(
            f"method {request.method} is not allowed for {request.path}; use "
            + ", ".join(sorted(e.allowed_methods)),
            code="method_not_allowed", status=405,
        ))
        resp.headers["Allow"] = ",".join(sorted(e.allowed_methods))
        return resp
    except web.HTTPNotFound:
        return _error_response(oai.RequestError(
            f"no route {request.method} {request.path}", code="not_found", status=404,
        ))
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return _error_response(oai.RequestError(e.reason, code=None, status=e.status))
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as e:
        log.exception("request %s %s failed", request.method, request.path)
        return _error_response(oai.RequestError(
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
            server.ready = True
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

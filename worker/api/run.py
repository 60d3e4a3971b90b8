"""The one generation path every dialect uses: prepare, run, and read a turn's outcome.

Rules for this module:
- ``Runner.run`` follows one generation from the batch loop to the event loop (pieces
  through ``_AsyncSink``); a handler that is cancelled (client gone) cancels it.
- ``Runner.turn`` adds the tool-call rules on top (``engine.CallStream``): text that may be
  the start of tool markup is held back, complete calls are parsed whatever ended the
  generation, a call cut off at max_tokens is dropped, and with ``tool_choice`` "required"
  and parallel calls a call repeated with identical arguments stops the generation.
  Chat completions' stream (token ids and logprobs per chunk) applies the same
  ``CallStream`` itself.
- The finish reason is decided here for every dialect (``finish_of``, ``is_cut``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from aiohttp import web

from worker import openai_schema as oai
from worker.api.shapes import Timings, names_for_humans
from worker.engine import (
    CallStream,
    Engine,
    Generation,
    InvalidInput,
    ParsedCall,
    Prepared,
    PromptTooLong,
    TokenLogprob,
)
from worker.log_limit import LogLimiter
from worker.protocol import LaunchSpec, StreamUsage, usage_trailer

log = logging.getLogger("worker")

_STARTED = object()  # the generation got a slot
_END = object()  # end of a generation's piece stream

# A text piece, the token ids generated since the previous one and their logprobs.
Piece = tuple[str, list[int] | None, list[TokenLogprob] | None]
P = TypeVar("P")


def finish_of(gen: Generation, calls: list[ParsedCall] | None = None, stopped: bool = False) -> str:
    """"tool_calls" when calls were returned, else "stop" or "length"."""
    if calls:
        return "tool_calls"
    if stopped:
        return "stop"
    return gen.finish_reason if gen.finish_reason in ("stop", "length") else "stop"


def is_cut(gen: Generation, stopped: bool = False) -> bool:
    """True when the generation was cut (the worker is stopping), not finished: the
    client must get an error then, never a short answer called "stop" (issue 13). A
    generation we stopped ourselves (the repeat rule) finished."""
    return not stopped and gen.finish_reason not in ("stop", "length")


CUT_MESSAGE = "the model worker stopped before this generation finished; the request can be retried"


def cut_error() -> bytes:
    return oai.error_body(CUT_MESSAGE, type="server_error", code="generation_cut")


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


class Stopwatch:
    """A generation's llama-server ``timings``: give ``on_gen`` to ``Runner.run`` and call
    ``piece`` as text arrives (the first piece ends the prompt phase)."""

    def __init__(self) -> None:
        self.gen: Generation | None = None
        self.first_at: float | None = None

    def on_gen(self, gen: Generation) -> None:
        self.gen = gen

    def piece(self) -> None:
        if self.first_at is None:
            self.first_at = time.monotonic()

    def timings(self) -> Timings:
        assert self.gen is not None
        return timings_of(self.gen, self.first_at, time.monotonic())


def millis(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def timings_of(gen: Generation, first_at: float | None, now: float) -> Timings:
    """The prompt phase runs from the slot's start to the first text piece, the predicted
    phase from there to the last token (the first token's sampling counts to the prompt
    phase; llama-server splits at the same point)."""
    start = gen.started_at if gen.started_at is not None else now
    first = first_at if first_at is not None else (gen.last_token_at or now)
    last = gen.last_token_at if gen.done and gen.last_token_at is not None else now
    prompt_n = max(gen.prompt_tokens - gen.prompt_cached, 0)
    prompt_ms = millis(max(first - start, 0.0))
    predicted_n = gen.completion_tokens
    predicted_ms = millis(max(last - first, 0.0))

    def per_token(ms: float, n: int) -> float:
        return round(ms / n, 3) if n else 0.0

    def per_second(ms: float, n: int) -> float:
        return round(1000.0 * n / ms, 3) if ms > 0 else 0.0

    return Timings(
        gen.prompt_cached, prompt_n, prompt_ms, per_token(prompt_ms, prompt_n), per_second(prompt_ms, prompt_n),
        predicted_n, predicted_ms, per_token(predicted_ms, predicted_n), per_second(predicted_ms, predicted_n),
    )


class GenerationFailed(Exception):
    def __init__(self, gen: Generation) -> None:
        super().__init__(gen.error)
        self.message = gen.error or "generation failed"
        self.status = gen.error_status


@dataclass
class Run:
    """A generation that ended: the engine's record, the sink (ids/logprobs handed out) and
    whether we stopped it ourselves (the repeat rule)."""

    gen: Generation
    sink: _AsyncSink
    stopped: bool


@dataclass
class Outcome:
    """A turn's answer in no dialect's shape: the text (tool markup never in it), the calls,
    the finish reason ("stop", "length", "tool_calls") and whether it was cut."""

    gen: Generation
    text: str
    calls: list[ParsedCall]
    finish: str
    cut: bool


def turn_trailer(model: str, gen: Generation) -> bytes:
    """The usage trailer a Responses or Anthropic stream ends with (the supervisor cuts it
    out and counts the tokens, as for chat streams; worker/protocol.py)."""
    return usage_trailer(StreamUsage(model=model, prompt_tokens=gen.prompt_tokens,
                                     completion_tokens=gen.completion_tokens))


async def stream_failed(
    resp: web.StreamResponse, e: Exception, as_response: Callable[[int, str], web.Response],
    as_event: Callable[[int, str], bytes],
) -> web.StreamResponse:
    """A streamed generation that failed: an error response if nothing was sent yet, else an
    error event in the dialect's shape (the headers are gone)."""
    if isinstance(e, GenerationFailed):
        status, message = e.status, e.message
    else:
        log.error("generation failed", exc_info=e)
        status, message = 500, f"internal error: {e}"
    if not resp.prepared:
        return as_response(status, message)
    with contextlib.suppress(ConnectionResetError):
        await resp.write(as_event(status, message))
    return resp


class Runner:
    """The state every dialect shares: the engine, the spec, readiness, the warning limiter."""

    def __init__(self, spec: LaunchSpec, engine: Engine) -> None:
        self.spec = spec
        self.engine = engine
        self.ready = False
        self._ignored_log = LogLimiter()  # ignored-parameter warnings (event loop only)

    def require_ready(self) -> None:
        if not self.ready:
            raise oai.RequestError(
                "the model is still loading; retry shortly",
                type="server_error", code="model_loading", status=503,
            )

    def ignored_params(self, request: web.Request, names: tuple[str, ...], what: str = "parameters") -> dict[str, str]:
        """Headers naming the unknown fields a request carried; one rate-limited WARNING."""
        if not names:
            return {}
        shown = names_for_humans(names)
        if self._ignored_log.allow(names, time.monotonic()):
            held = self._ignored_log.suppressed
            self._ignored_log.suppressed = 0
            log.warning(
                "request %s: ignored unknown %s: %s (set [server] strict_params = true "
                "to reject them)%s",
                request.headers.get("X-Request-Id", "-"), what, shown,
                f"; {held} similar warnings left out since the last one" if held else "",
            )
        return {"X-Ignored-Params": shown}

    async def off_loop(self, fn: Callable[[], Any]) -> Any:
        """Run a tokenizer call in a helper thread; a bad token id is a 400."""
        try:
            return await asyncio.get_running_loop().run_in_executor(None, fn)
        except InvalidInput as e:
            raise oai.RequestError(e.message, param=e.param, code=e.code) from None

    async def prepare(self, fn: Callable[[], P], what: str) -> P:
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

    async def run(
        self,
        prepared: Prepared,
        on_start: Callable[[], Awaitable[None]] | None,
        on_pieces: Callable[[list[Piece]], Awaitable[bool | None]],
        with_ids: bool = False,
        on_gen: Callable[[Generation], None] | None = None,
    ) -> Run:
        """Queue a generation and follow it to its end; raises GenerationFailed.

        ``on_start`` runs when the request gets a slot, ``on_pieces`` with the pieces
        that arrived meanwhile (a slow client or a busy loop gets them in one write); when
        it returns True the generation is stopped (it finished: ``Run.stopped``) and later
        pieces are dropped. If this task is cancelled (client gone) or a callback fails,
        the generation is cancelled: the batch loop frees its slot at its next step.
        ``on_gen`` gets the generation before it is queued (llama-server's answers name
        its slot and timings).
        """
        gen = self.engine.generation(prepared, threading.Event())
        if on_gen is not None:
            on_gen(gen)
        sink = _AsyncSink(
            asyncio.get_running_loop(), gen, with_ids, prepared.sampling.logprobs is not None
        )
        self.engine.start(gen, sink)
        queue = sink.queue
        stopped = False
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
                if out and not stopped and await on_pieces(out):
                    stopped = True
                    gen.cancel.set()  # the batch loop frees the slot at its next step
                if item is _END:
                    break
        except BaseException:
            gen.cancel.set()
            raise
        if gen.error is not None:
            raise GenerationFailed(gen)
        return Run(gen, sink, stopped)

    async def turn(
        self,
        prepared: Prepared,
        on_start: Callable[[], Awaitable[None]] | None = None,
        on_text: Callable[[str], Awaitable[None]] | None = None,
    ) -> Outcome:
        """Generate one answer with the tool-call rules applied; ``on_text`` gets the text
        as it may be shown. Raises GenerationFailed."""
        split = (
            CallStream(prepared.tool_format, prepared.stop_on_repeat)
            if prepared.tool_format is not None else None
        )
        parts: list[str] = []

        async def pieces(ps: list[Piece]) -> bool:
            text = "".join(p[0] for p in ps)
            if split is not None:
                text = split.feed(text)
            if text:
                parts.append(text)
                if on_text is not None:
                    await on_text(text)
            return split is not None and split.repeated

        run = await self.run(prepared, on_start, pieces)
        gen = run.gen
        cut = is_cut(gen, run.stopped)
        calls: list[ParsedCall] = []
        if split is not None and not cut:
            tail, calls = split.finish(cut_off=gen.finish_reason == "length")
            if tail:
                parts.append(tail)
                if on_text is not None:
                    await on_text(tail)
        return Outcome(gen, "".join(parts), calls, finish_of(gen, calls, run.stopped), cut)

    async def complete(self, prepared: Prepared) -> Outcome:
        """A whole answer (not streamed); an engine failure is an error response."""
        try:
            return await self.turn(prepared)
        except GenerationFailed as e:
            raise oai.RequestError(
                e.message, type="server_error", code=None, status=e.status
            ) from None

"""OpenAI chat completions (``POST /v1/chat/completions``) and the request conversions the
other dialects share (``chat_messages``, ``tool_dict``)."""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

import msgspec
from aiohttp import web
from msgspec import UNSET

from worker import openai_schema as oai
from worker.api.openai_sse import stream_openai
from worker.api.run import Piece, Run, Runner, Stopwatch, cut_error, finish_of
from worker.api.shapes import (
    ChatChoice,
    ChatChunk,
    ChatChunkChoice,
    ChatChunkWithUsage,
    ChatCompletion,
    ChatMessageOut,
    Delta,
    PromptTokensDetails,
    ToolCallDelta,
    Usage,
    chat_logprobs,
    enc,
    json_response,
    sse,
    tool_calls_out,
)
from worker.engine import CallStream, ChatMessage, Generation, ParsedCall, Prepared, Sampling, TokenLogprob, ToolRequest


def usage_of(gen: Generation) -> Usage:
    return Usage(
        gen.prompt_tokens, gen.completion_tokens, gen.prompt_tokens + gen.completion_tokens,
        PromptTokensDetails(gen.prompt_cached),
    )


def chat_messages(messages: list[oai.Message]) -> list[ChatMessage]:
    return [
        ChatMessage(
            m.role, oai.message_text(m), m.name, m.tool_call_id,
            [msgspec.to_builtins(c) for c in m.tool_calls] if m.tool_calls else None,
        )
        for m in messages
    ]


def tool_dict(tool: oai.Tool) -> dict[str, Any]:
    """A tool as the chat template gets it (Hugging Face's shape, unset fields left out)."""
    fn = {k: v for k, v in msgspec.structs.asdict(tool.function).items() if v is not None}
    return {"type": "function", "function": fn}


def sampling_of(req: Any, max_tokens: int | None) -> Sampling:
    """Sampling from a chat or completion request (the fields of ``oai._Common``)."""
    constraint = oai.constraint_of(req)
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
        json_mode=constraint.json_mode,
        json_schema=constraint.json_schema,
        grammar=constraint.grammar,
        constraint_param=constraint.param,
        typical_p=req.typical_p,
        ignore_eos=req.ignore_eos,
        min_tokens=req.min_tokens,
        stop_token_ids=tuple(req.stop_token_ids or ()),
        include_stop_str_in_output=req.include_stop_str_in_output,
        skip_special_tokens=req.skip_special_tokens,
        cache_prompt=req.cache_prompt,
    )


class ChatApi:
    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    async def _prepare(self, request: web.Request) -> tuple[oai.ChatRequest, Prepared, dict[str, str]]:
        runner = self.runner
        runner.require_ready()
        req, ignored = oai.decode_chat(await request.read(), runner.spec.strict_params)
        headers = runner.ignored_params(request, ignored)
        messages = chat_messages(req.messages)
        sampling = sampling_of(req, oai.max_tokens_of(req, None))
        if req.logprobs:
            sampling = dataclasses.replace(sampling, logprobs=req.top_logprobs or 0)
        choice = oai.tool_choice_of(req)
        tools = None
        if choice is not None and req.tools:
            tools = ToolRequest([tool_dict(t) for t in req.tools], choice, req.parallel_tool_calls)
        engine = runner.engine
        prefill = oai.continues_final_message(req)
        prepared = await runner.prepare(
            lambda: engine.prepare_chat(messages, sampling, tools, prefill), "messages"
        )
        return req, prepared, headers

    async def input_tokens(self, request: web.Request) -> web.Response:
        """llama-server's ``POST /v1/chat/completions/input_tokens``: the prompt tokens a chat
        request would evaluate (template, tools and prefill applied), nothing generated."""
        _, prepared, headers = await self._prepare(request)
        body = {"input_tokens": len(prepared.tokens), "object": "response.input_tokens"}  # llama-server's
        return json_response(enc.encode(body), headers=headers)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        runner = self.runner
        req, prepared, headers = await self._prepare(request)
        engine = runner.engine
        cid = f"chatcmpl-{uuid.uuid4().hex}"
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            clock = Stopwatch() if req.timings_per_token else None
            return await self._stream(request, prepared, cid, include_usage, req.return_token_ids, headers, clock)
        out = await runner.complete(prepared)
        if out.cut:
            return json_response(cut_error(), 503)
        gen = out.gen
        ids = req.return_token_ids
        message = ChatMessageOut("assistant", out.text or (None if out.calls else ""))
        if out.calls:
            message.tool_calls = tool_calls_out(out.calls)
        body = ChatCompletion(
            id=cid,
            created=int(time.time()),
            model=engine.model_id,
            choices=[ChatChoice(
                0, message, out.finish,
                logprobs=chat_logprobs(gen.logprobs) if req.logprobs else None,
                token_ids=gen.token_ids if ids else UNSET,
            )],
            usage=usage_of(gen),
            prompt_token_ids=prepared.tokens if ids else UNSET,
        )
        return json_response(enc.encode(body), headers=headers)

    async def _stream(
        self, request: web.Request, prepared: Prepared, cid: str, include_usage: bool,
        with_ids: bool, headers: dict[str, str], clock: Stopwatch | None = None,
    ) -> web.StreamResponse:
        """``clock``: llama-server's timings_per_token (each chunk carries ``timings``)."""
        created = int(time.time())
        model = self.runner.engine.model_id
        chunk_cls = ChatChunkWithUsage if include_usage else ChatChunk

        def chunk(delta: Delta, finish: str | None, piece: Piece) -> bytes:
            _, ids, lps = piece
            choice = ChatChunkChoice(
                0, delta, finish, logprobs=None if lps is None else chat_logprobs(lps),
                token_ids=UNSET if ids is None else ids,
            )
            out = chunk_cls(cid, created, model, [choice])
            if clock is not None:
                clock.piece()
                out.timings = clock.timings()
            return sse(out)

        # With tools, plain text streams as it comes and a call is held from its marker
        # on, then parsed at the end and sent as delta.tool_calls (tools.CallStream).
        fmt = prepared.tool_format
        split = CallStream(fmt, prepared.stop_on_repeat) if fmt is not None else None
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

        def final(run: Run, rest: Piece) -> bytes:
            gen = run.gen
            out = b""
            calls: list[ParsedCall] = []
            if split is not None:
                content, calls = split.finish(cut_off=gen.finish_reason == "length")
                _, ids, lps = rest
                if content:
                    out += chunk(Delta(content=content), None, take(ids, lps))
                    ids = [] if ids is not None else None
                    lps = [] if lps is not None else None
                if calls:
                    deltas = [ToolCallDelta(i, c.id, c.function) for i, c in enumerate(tool_calls_out(calls))]
                    out += chunk(Delta(tool_calls=deltas), None, take(ids, lps))
                    ids = [] if ids is not None else None
                    lps = [] if lps is not None else None
                rest = take(ids, lps)
            out += chunk(Delta(), finish_of(gen, calls, run.stopped), rest)
            if include_usage:
                out += sse(ChatChunkWithUsage(cid, created, model, [], usage=usage_of(gen)))
            return out

        role = ChatChunkChoice(0, Delta(role="assistant", content=""), token_ids=[] if with_ids else UNSET)
        first = sse(chunk_cls(cid, created, model, [role], prompt_token_ids=prepared.tokens if with_ids else UNSET))
        return await stream_openai(
            self.runner, request, prepared, first, piece_chunk, final, with_ids, headers,
            should_stop=(lambda: split.repeated) if split is not None else None,
            on_gen=clock.on_gen if clock is not None else None,
        )

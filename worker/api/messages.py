"""Anthropic Messages (``POST /v1/messages``, ``POST /v1/messages/count_tokens``).

A thin adapter over the one generation path (``run.Runner.turn``): the request becomes
chat messages, sampling and tools (``messages_schema``); the outcome becomes content blocks
(``text``, ``tool_use``) and a stop reason; a stream is Anthropic's event sequence
(``message_start``, ``ping``, ``content_block_start``/``_delta``/``_stop``, ``message_delta``,
``message_stop``). Errors on these routes are in Anthropic's shape (``server.py``
middleware), in-stream as an ``error`` event.

Usage: ``input_tokens`` counts the whole prompt (what ``count_tokens`` answers);
``cache_read_input_tokens`` reports the prompt tokens reused from the KV cache among them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any

from aiohttp import web

from worker.api import messages_schema as ms
from worker.api.run import CUT_MESSAGE, GenerationFailed, Outcome, Runner, stream_failed, turn_trailer
from worker.api.shapes import enc, json_response
from worker.engine import Generation, Prepared
from worker.protocol import anthropic_error_body

log = logging.getLogger("worker")

_STOP_REASONS = {"tool_calls": "tool_use", "length": "max_tokens"}


def _stop(out: Outcome, req: ms.MessagesRequest) -> tuple[str, str | None]:
    if out.finish in _STOP_REASONS:
        return _STOP_REASONS[out.finish], None
    matched = out.gen.stop_string
    if matched is not None and matched in (req.stop_sequences or ()):
        return "stop_sequence", matched
    return "end_turn", None


def _usage(gen: Generation, output: bool = True) -> dict[str, int]:
    u = {"input_tokens": gen.prompt_tokens, "cache_creation_input_tokens": 0,
         "cache_read_input_tokens": gen.prompt_cached, "output_tokens": gen.completion_tokens if output else 0}
    return u


def _tool_use(name: str, arguments: str) -> dict[str, Any]:
    return {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": name, "input": json.loads(arguments)}


def _event(name: str, data: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + enc.encode({"type": name, **data}) + b"\n\n"


def _error_response(status: int, message: str) -> web.Response:
    return json_response(anthropic_error_body(status, message), status)


def _error_event(status: int, message: str) -> bytes:
    return b"event: error\ndata: " + anthropic_error_body(status, message) + b"\n\n"


class MessagesApi:
    def __init__(self, runner: Runner) -> None:
        self.runner = runner

    async def _prepare(self, request: web.Request, count_only: bool) -> tuple[ms.MessagesRequest, Prepared, dict[str, str]]:
        runner = self.runner
        runner.require_ready()
        req, ignored = ms.decode(await request.read(), runner.spec.strict_params, count_only)
        headers = runner.ignored_params(request, ignored)
        messages = ms.chat_messages(req)
        tools = ms.tools_of(req)
        sampling = ms.sampling_of(req)
        engine = runner.engine
        # Anthropic's prefill: a final assistant turn is the start of the answer, continued.
        last = messages[-1]
        prefill = last.role == "assistant" and not last.tool_calls and bool(last.content)
        prepared = await runner.prepare(
            lambda: engine.prepare_chat(messages, sampling, tools, prefill), "messages"
        )
        return req, prepared, headers

    async def count_tokens(self, request: web.Request) -> web.Response:
        _, prepared, headers = await self._prepare(request, count_only=True)
        return json_response(enc.encode({"input_tokens": len(prepared.tokens)}), headers=headers)

    async def messages(self, request: web.Request) -> web.StreamResponse:
        req, prepared, headers = await self._prepare(request, count_only=False)
        mid = f"msg_{uuid.uuid4().hex[:24]}"
        if req.stream:
            return await self._stream(request, req, prepared, mid, headers)
        try:
            out = await self.runner.turn(prepared)
        except GenerationFailed as e:
            return _error_response(e.status, e.message)
        if out.cut:
            return _error_response(503, CUT_MESSAGE)
        content: list[dict[str, Any]] = []
        if out.text:
            content.append({"type": "text", "text": out.text})
        content.extend(_tool_use(c.name, c.arguments) for c in out.calls)
        stop_reason, stop_sequence = _stop(out, req)
        body = {
            "id": mid, "type": "message", "role": "assistant", "model": self.runner.engine.model_id,
            "content": content, "stop_reason": stop_reason, "stop_sequence": stop_sequence,
            "usage": _usage(out.gen),
        }
        return json_response(enc.encode(body), headers=headers)

    async def _stream(
        self, request: web.Request, req: ms.MessagesRequest, prepared: Prepared, mid: str, headers: dict[str, str],
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **headers})
        blocks = [0]  # content blocks opened so far
        text_open = [False]

        async def start() -> None:
            # As with chat: headers go out once the request has a slot (a resend is still possible before).
            await resp.prepare(request)
            message: dict[str, Any] = {"id": mid, "type": "message", "role": "assistant", "model": self.runner.engine.model_id,
                       "content": [], "stop_reason": None, "stop_sequence": None,
                       "usage": {"input_tokens": len(prepared.tokens), "output_tokens": 0}}
            await resp.write(_event("message_start", {"message": message}) + _event("ping", {}))

        async def text(delta: str) -> None:
            out = b""
            if not text_open[0]:
                text_open[0] = True
                out += _event("content_block_start", {"index": 0, "content_block": {"type": "text", "text": ""}})
                blocks[0] = 1
            out += _event("content_block_delta", {"index": 0, "delta": {"type": "text_delta", "text": delta}})
            await resp.write(out)

        try:
            out = await self.runner.turn(prepared, start, text)
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as e:
            return await stream_failed(resp, e, _error_response, _error_event)
        if out.cut:
            if not resp.prepared:
                return _error_response(503, CUT_MESSAGE)
            await resp.write(_error_event(503, CUT_MESSAGE))
            await resp.write_eof()
            return resp
        tail = b""
        if text_open[0]:
            tail += _event("content_block_stop", {"index": 0})
        for call in out.calls:
            i = blocks[0]
            blocks[0] += 1
            block = _tool_use(call.name, call.arguments)
            tail += _event("content_block_start", {"index": i, "content_block": {**block, "input": {}}})
            tail += _event("content_block_delta", {"index": i, "delta": {"type": "input_json_delta", "partial_json": call.arguments}})
            tail += _event("content_block_stop", {"index": i})
        stop_reason, stop_sequence = _stop(out, req)
        tail += _event("message_delta", {"delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                                         "usage": _usage(out.gen)})
        tail += _event("message_stop", {})
        await resp.write(tail + turn_trailer(self.runner.engine.model_id, out.gen))
        await resp.write_eof()
        return resp

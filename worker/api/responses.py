"""OpenAI Responses (``POST /v1/responses``, ``GET``/``DELETE /v1/responses/{id}``,
``POST /v1/responses/input_tokens``).

A thin adapter over the one generation path (``run.Runner.turn``), as llama-server does it
(Responses converted to chat): instructions become the system message, input items chat
messages (``responses_schema``), and the outcome becomes output items (a ``message`` with
``output_text``, ``function_call`` items). A stream is the event sequence the openai SDK
parses, each event with its ``sequence_number``: ``response.created``,
``response.in_progress``, per item ``response.output_item.added``, (text)
``response.content_part.added``, ``response.output_text.delta``...,
``response.output_text.done``, ``response.content_part.done``, (call)
``response.function_call_arguments.delta``/``.done``, then ``response.output_item.done``,
and ``response.completed`` (``response.incomplete`` when max_output_tokens cut it).

``ResponseStore`` keeps answers (bounded, with a TTL) for ``previous_response_id`` and GET;
``store: false`` answers are never kept. It lives in the worker's memory: a restarted
worker has forgotten them (the id is then a 404, as an expired one).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from worker import openai_schema as oai
from worker.api import responses_schema as rs
from worker.api.run import CUT_MESSAGE, Outcome, Runner, stream_failed, turn_trailer
from worker.api.shapes import enc, json_response
from worker.engine import ChatMessage, Prepared, PromptTooLong, Sampling

log = logging.getLogger("worker")


@dataclass
class Stored:
    body: dict[str, Any]  # the response object, as GET returns it
    messages: list[ChatMessage]  # the conversation through this answer (no instructions)
    expires: float  # monotonic


class ResponseStore:
    """At most ``size`` answers, each for ``ttl_s``; the least recently stored go first.
    Used from the event loop only; "now" is an argument."""

    def __init__(self, size: int, ttl_s: float) -> None:
        self.size = size
        self.ttl_s = ttl_s
        self._items: OrderedDict[str, Stored] = OrderedDict()

    def put(self, rid: str, body: dict[str, Any], messages: list[ChatMessage], now: float) -> None:
        if self.size <= 0:
            return
        self._items[rid] = Stored(body, messages, now + self.ttl_s)
        self._items.move_to_end(rid)
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        while self._items:  # drop the expired at the old end
            oldest = next(iter(self._items.values()))
            if oldest.expires > now:
                break
            self._items.popitem(last=False)

    def get(self, rid: str, now: float) -> Stored | None:
        item = self._items.get(rid)
        if item is not None and item.expires <= now:
            del self._items[rid]
            return None
        return item

    def delete(self, rid: str) -> bool:
        return self._items.pop(rid, None) is not None


def _not_found(rid: str, param: str | None) -> oai.RequestError:
    what = "Previous response" if param else "Response"
    return oai.RequestError(f"{what} with id '{rid}' not found.", param=param, code="not_found", status=404)


def _message_item(mid: str, text: str, status: str) -> dict[str, Any]:
    return {"id": mid, "type": "message", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _call_item(name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"id": f"fc_{uuid.uuid4().hex}", "type": "function_call", "status": status,
            "call_id": f"call_{uuid.uuid4().hex[:24]}", "name": name, "arguments": arguments}


class ResponsesApi:
    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self.store = ResponseStore(runner.spec.responses_store_size, runner.spec.responses_store_ttl_s)

    # --- the request -------------------------------------------------------------------

    async def _prepare(
        self, request: web.Request, count_only: bool = False
    ) -> tuple[rs.ResponsesRequest, list[ChatMessage], Prepared | int, dict[str, str]]:
        """The request, its conversation (for the store) and the prepared generation; with
        ``count_only`` a prompt too long for the context gives its token count instead."""
        runner = self.runner
        runner.require_ready()
        req, ignored = rs.decode(await request.read(), runner.spec.strict_params)
        tools, _, ignored_tools = rs.tools_of(req)
        headers = runner.ignored_params(request, ignored + ignored_tools)
        history: list[ChatMessage] = []
        if req.previous_response_id is not None:
            prior = self.store.get(req.previous_response_id, time.monotonic())
            if prior is None:
                raise _not_found(req.previous_response_id, "previous_response_id")
            history = list(prior.messages)
        conversation = history + rs.input_messages(req)
        messages = list(conversation)
        if req.instructions:
            messages.insert(0, ChatMessage("system", req.instructions))
        if not any(m.role != "system" for m in messages):
            messages.append(ChatMessage("user", ""))  # an empty probe (Codex): a turn to answer
        fmt = req.text.format if req.text is not None else None
        sampling = Sampling(
            max_tokens=req.max_output_tokens, temperature=req.temperature, top_p=req.top_p,
            json_mode=isinstance(fmt, (rs.FormatJsonObject, rs.FormatJsonSchema)),
            json_schema=fmt.schema if isinstance(fmt, rs.FormatJsonSchema) else None,
        )
        engine = runner.engine

        def prepare() -> Prepared | int:
            try:
                return engine.prepare_chat(messages, sampling, tools)
            except PromptTooLong as e:
                if count_only:
                    return e.n_prompt
                raise

        prepared = await runner.prepare(prepare, "input")
        return req, conversation, prepared, headers

    def _body(self, rid: str, created: int, req: rs.ResponsesRequest, status: str,
              output: list[dict[str, Any]], usage: dict[str, Any] | None) -> dict[str, Any]:
        _, functions, _ = rs.tools_of(req)
        fmt = req.text.format if req.text is not None and req.text.format is not None else rs.FormatText()
        choice: Any = req.tool_choice or "auto"
        return {
            "id": rid, "object": "response", "created_at": created, "status": status,
            # OpenAI's (and llama-server's): when it completed, only once it has.
            "completed_at": int(time.time()) if status == "completed" else None,
            "background": False, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "model": self.runner.engine.model_id, "output": output,
            "parallel_tool_calls": req.parallel_tool_calls,
            "previous_response_id": req.previous_response_id, "reasoning": None,
            "store": req.store, "temperature": req.temperature, "top_p": req.top_p,
            "text": {"format": json.loads(enc.encode(fmt))},
            "tool_choice": choice,
            "tools": [{"type": "function", "name": f.name, "description": f.description,
                       "parameters": f.parameters, "strict": f.strict} for f in functions],
            "truncation": "disabled", "usage": usage, "user": req.user, "metadata": req.metadata or {},
        }

    def _finish(self, rid: str, req: rs.ResponsesRequest, body: dict[str, Any],
                conversation: list[ChatMessage], out: Outcome) -> None:
        if not req.store:
            return
        calls = [{"id": item["call_id"], "type": "function",
                  "function": {"name": item["name"], "arguments": item["arguments"]}}
                 for item in body["output"] if item["type"] == "function_call"]
        answer = ChatMessage("assistant", out.text, tool_calls=calls or None)
        self.store.put(rid, body, [*conversation, answer], time.monotonic())

    @staticmethod
    def _usage(out: Outcome) -> dict[str, Any]:
        gen = out.gen
        return {"input_tokens": gen.prompt_tokens, "input_tokens_details": {"cached_tokens": gen.prompt_cached},
                "output_tokens": gen.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": gen.prompt_tokens + gen.completion_tokens}

    @staticmethod
    def _output(out: Outcome) -> list[dict[str, Any]]:
        items = []
        if out.text or not out.calls:
            items.append(_message_item(f"msg_{uuid.uuid4().hex}", out.text, "completed"))
        items.extend(_call_item(c.name, c.arguments, "completed") for c in out.calls)
        return items

    # --- the routes --------------------------------------------------------------------

    async def create(self, request: web.Request) -> web.StreamResponse:
        req, conversation, prepared, headers = await self._prepare(request)
        assert not isinstance(prepared, int)
        rid = f"resp_{uuid.uuid4().hex}"
        created = int(time.time())
        if req.stream:
            return await self._stream(request, req, conversation, prepared, rid, created, headers)
        out = await self.runner.complete(prepared)
        if out.cut:
            raise oai.RequestError(CUT_MESSAGE, type="server_error", code="generation_cut", status=503)
        status = "incomplete" if out.finish == "length" else "completed"
        body = self._body(rid, created, req, status, self._output(out), self._usage(out))
        self._finish(rid, req, body, conversation, out)
        return json_response(enc.encode(body), headers=headers)

    async def get(self, request: web.Request) -> web.Response:
        rid = request.match_info["response_id"]
        item = self.store.get(rid, time.monotonic())
        if item is None:
            raise _not_found(rid, None)
        return json_response(enc.encode(item.body))

    async def delete(self, request: web.Request) -> web.Response:
        rid = request.match_info["response_id"]
        if not self.store.delete(rid):
            raise _not_found(rid, None)
        return json_response(enc.encode({"id": rid, "object": "response.deleted", "deleted": True}))

    async def input_tokens(self, request: web.Request) -> web.Response:
        _, _, prepared, headers = await self._prepare(request, count_only=True)
        # Counting is the point: a prompt too long to generate from still has a count.
        n = prepared if isinstance(prepared, int) else len(prepared.tokens)
        return json_response(enc.encode({"object": "response.input_tokens", "input_tokens": n}), headers=headers)

    # --- streaming ---------------------------------------------------------------------

    async def _stream(
        self, request: web.Request, req: rs.ResponsesRequest, conversation: list[ChatMessage],
        prepared: Prepared, rid: str, created: int, headers: dict[str, str],
    ) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", **headers})
        seq = [0]
        msg_id = f"msg_{uuid.uuid4().hex}"
        text_parts: list[str] = []
        opened = [False]

        def event(kind: str, **data: Any) -> bytes:
            n = seq[0]
            seq[0] += 1
            return b"event: " + kind.encode() + b"\ndata: " + enc.encode({"type": kind, "sequence_number": n, **data}) + b"\n\n"

        def open_message() -> bytes:
            opened[0] = True
            item = {**_message_item(msg_id, "", "in_progress"), "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            return (event("response.output_item.added", output_index=0, item=item)
                    + event("response.content_part.added", item_id=msg_id, output_index=0, content_index=0, part=part))

        async def start() -> None:
            await resp.prepare(request)
            shell = self._body(rid, created, req, "in_progress", [], None)
            await resp.write(event("response.created", response=shell) + event("response.in_progress", response=shell))

        async def text(delta: str) -> None:
            out = b"" if opened[0] else open_message()
            text_parts.append(delta)
            out += event("response.output_text.delta", item_id=msg_id, output_index=0, content_index=0,
                         delta=delta, logprobs=[])
            await resp.write(out)

        try:
            out = await self.runner.turn(prepared, start, text)
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as e:
            return await stream_failed(
                resp, e, lambda status, message: json_response(oai.error_body(message, type="server_error"), status),
                lambda status, message: event("error", code="server_error", message=message, param=None),
            )
        if out.cut:
            if not resp.prepared:
                return json_response(oai.error_body(CUT_MESSAGE, type="server_error", code="generation_cut"), 503)
            await resp.write(event("error", code="generation_cut", message=CUT_MESSAGE, param=None))
            await resp.write_eof()
            return resp
        tail = b""
        items: list[dict[str, Any]] = []
        if out.text or not out.calls:
            if not opened[0]:
                tail += open_message()
            whole = "".join(text_parts)
            part = {"type": "output_text", "text": whole, "annotations": [], "logprobs": []}
            item = _message_item(msg_id, whole, "completed")
            tail += event("response.output_text.done", item_id=msg_id, output_index=0, content_index=0, text=whole, logprobs=[])
            tail += event("response.content_part.done", item_id=msg_id, output_index=0, content_index=0, part=part)
            tail += event("response.output_item.done", output_index=0, item=item)
            items.append(item)
        for call in out.calls:
            index = len(items)
            item = _call_item(call.name, call.arguments, "completed")
            tail += event("response.output_item.added", output_index=index,
                          item={**item, "arguments": "", "status": "in_progress"})
            tail += event("response.function_call_arguments.delta", item_id=item["id"], output_index=index, delta=call.arguments)
            tail += event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                          name=call.name, arguments=call.arguments)
            tail += event("response.output_item.done", output_index=index, item=item)
            items.append(item)
        done = "incomplete" if out.finish == "length" else "completed"
        body = self._body(rid, created, req, done, items, self._usage(out))
        self._finish(rid, req, body, conversation, out)
        tail += event(f"response.{done}", response=body)
        await resp.write(tail + turn_trailer(self.runner.engine.model_id, out.gen))
        await resp.write_eof()
        return resp


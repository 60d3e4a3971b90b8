"""OpenAI Responses requests (``POST /v1/responses``, ``/v1/responses/input_tokens``): the
schema and its conversion to the internal request (messages, sampling, tools).

Input items: messages (a string or text parts), ``function_call`` and
``function_call_output``; ``reasoning`` items are skipped (this model did not write them).
Tools: ``function`` tools are served. Hosted tools that a client offers as extras (Codex CLI
sends ``web_search`` when enabled) are ignored with a warning: the model answers without
them. Any other tool type (``custom``, ``local_shell``, ``mcp``, ...) is a 400 naming it.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from worker import openai_schema as oai
from worker.engine import ChatMessage, ToolRequest

# Hosted tools that only add an optional capability: ignored (named in X-Ignored-Params).
IGNORED_TOOL_TYPES = frozenset({
    "web_search", "web_search_preview", "web_search_preview_2025_03_11", "image_generation",
    "file_search", "code_interpreter",
})


class InputText(msgspec.Struct, tag="input_text", tag_field="type"):
    text: str


class OutputText(msgspec.Struct, tag="output_text", tag_field="type"):
    text: str
    annotations: Any = None
    logprobs: Any = None


class Refusal(msgspec.Struct, tag="refusal", tag_field="type"):
    refusal: str


class InputImage(msgspec.Struct, tag="input_image", tag_field="type"):
    image_url: Any = None
    file_id: Any = None
    detail: Any = None


class InputFile(msgspec.Struct, tag="input_file", tag_field="type"):
    file_id: Any = None
    file_data: Any = None
    filename: Any = None
    file_url: Any = None


Part = InputText | OutputText | Refusal | InputImage | InputFile


class MessageItem(msgspec.Struct, kw_only=True):
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Part]
    type: Literal["message"] = "message"
    id: Any = None
    status: Any = None
    phase: Any = None


class FunctionCallItem(msgspec.Struct, kw_only=True):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str
    id: Any = None
    status: Any = None


class FunctionCallOutputItem(msgspec.Struct, kw_only=True):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[Part]
    id: Any = None
    status: Any = None


class FunctionTool(msgspec.Struct, kw_only=True):
    type: Literal["function"]
    name: oai.FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FormatText(msgspec.Struct, tag="text", tag_field="type", forbid_unknown_fields=True):
    pass


class FormatJsonObject(msgspec.Struct, tag="json_object", tag_field="type", forbid_unknown_fields=True):
    pass


class FormatJsonSchema(msgspec.Struct, tag="json_schema", tag_field="type", forbid_unknown_fields=True):
    name: Annotated[str, Meta(min_length=1, max_length=64)]
    schema: dict[str, Any]
    description: str | None = None
    strict: bool | None = None


class TextConfig(msgspec.Struct):
    format: FormatText | FormatJsonObject | FormatJsonSchema | None = None
    verbosity: Any = None


class ResponsesRequest(msgspec.Struct, kw_only=True):
    # Unknown top-level fields are tolerated (named in X-Ignored-Params) unless strict.
    model: str | None = None
    input: str | Annotated[list[dict[str, Any]], Meta(max_length=100_000)] = msgspec.field(default_factory=list)
    instructions: str | None = None
    tools: Annotated[list[dict[str, Any]], Meta(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    max_output_tokens: Annotated[int, Meta(ge=1, le=2**31 - 1)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] = 1.0
    top_p: oai.Float01 = 1.0
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    background: bool = False
    conversation: Any = None
    # Accepted and not acted on.
    user: Any = None
    reasoning: Any = None
    include: Any = None
    truncation: Any = None
    service_tier: Any = None
    prompt_cache_key: Any = None
    prompt_cache_retention: Any = None
    safety_identifier: Any = None
    stream_options: Any = None
    max_tool_calls: Any = None
    top_logprobs: Any = None
    personality: Any = None


class _StrictResponses(ResponsesRequest, forbid_unknown_fields=True, kw_only=True):
    pass


_decoders = oai.decoders_of(_StrictResponses, ResponsesRequest)


def decode(body: bytes, strict: bool) -> tuple[ResponsesRequest, tuple[str, ...]]:
    req: ResponsesRequest
    req, ignored = oai.decode_top_level(_decoders, body, strict)
    if req.background:
        raise oai.RequestError("background responses are not supported", param="background", code="unsupported")
    if req.conversation is not None:
        raise oai.RequestError(
            "conversations are not supported; use previous_response_id", param="conversation", code="unsupported"
        )
    return req, ignored


def _convert(obj: Any, cls: type[Any], param: str) -> Any:
    try:
        return msgspec.convert(obj, cls)
    except msgspec.ValidationError as e:
        err = oai._request_error(e)
        err.param = f"{param}.{err.param}" if err.param else param
        raise err from None


def _text_of(content: str | list[Part], param: str) -> str:
    if isinstance(content, str):
        return content
    out = []
    for j, p in enumerate(content):
        if isinstance(p, (InputText, OutputText)):
            out.append(p.text)
        elif isinstance(p, Refusal):
            out.append(p.refusal)
        else:
            raise oai.RequestError(
                f"only text content is supported, not {type(p).__struct_config__.tag!r}",
                param=f"{param}[{j}].type", code="unsupported",
            )
    return "".join(out)


def input_messages(req: ResponsesRequest) -> list[ChatMessage]:
    """The request's input items as chat messages (instructions not included)."""
    if isinstance(req.input, str):
        return [ChatMessage("user", req.input)]
    out: list[ChatMessage] = []
    names: dict[str, str] = {}
    for i, item in enumerate(req.input):
        param = f"input[{i}]"
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            m = _convert(item, MessageItem, param)
            out.append(ChatMessage(m.role, _text_of(m.content, f"{param}.content")))
        elif kind == "function_call":
            c = _convert(item, FunctionCallItem, param)
            names[c.call_id] = c.name
            call = {"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            last = out[-1] if out else None
            if last is not None and last.role == "assistant":
                last.tool_calls = [*(last.tool_calls or ()), call]
            else:
                out.append(ChatMessage("assistant", "", tool_calls=[call]))
        elif kind == "function_call_output":
            r = _convert(item, FunctionCallOutputItem, param)
            out.append(ChatMessage("tool", _text_of(r.output, f"{param}.output"), names.get(r.call_id), r.call_id))
        elif kind == "reasoning":
            continue  # another model's reasoning: nothing this one reads
        else:
            raise oai.RequestError(
                f"input items of type {kind!r} are not supported (message, function_call, "
                "function_call_output are)", param=f"{param}.type", code="unsupported",
            )
    return out


def tools_of(req: ResponsesRequest) -> tuple[ToolRequest | None, list[FunctionTool], tuple[str, ...]]:
    """The tool request (None: tools off), the function tools, and the ignored tools' names."""
    functions: list[FunctionTool] = []
    ignored: list[str] = []
    for i, t in enumerate(req.tools or ()):
        kind = t.get("type")
        if kind == "function":
            f = _convert(t, FunctionTool, f"tools[{i}]")
            if f.name in (g.name for g in functions):
                raise oai.RequestError(f"two tools are named {f.name!r}", param=f"tools[{i}].name", code="invalid_value")
            functions.append(f)
        elif kind in IGNORED_TOOL_TYPES:
            ignored.append(f"tools[{i}]:{kind}")
        else:
            raise oai.RequestError(
                f"tool type {kind!r} is not supported: function tools are served, and "
                f"{', '.join(sorted(IGNORED_TOOL_TYPES))} are ignored", param=f"tools[{i}].type", code="unsupported",
            )
    choice = req.tool_choice
    named: str | None = None
    if isinstance(choice, dict):
        if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
            raise oai.RequestError(
                f"tool_choice {json.dumps(choice)[:80]} is not supported: use none, auto, required or "
                '{"type": "function", "name": ...}', param="tool_choice", code="unsupported",
            )
        named = choice["name"]
        if named not in (f.name for f in functions):
            raise oai.RequestError(f"tool_choice names {named!r}, which is not among the tools",
                                   param="tool_choice.name", code="invalid_value")
    elif choice == "required" and not functions:
        raise oai.RequestError("tool_choice requires tools", param="tool_choice", code="invalid_value")
    if not functions or choice == "none":
        return None, functions, tuple(ignored)
    dicts = [{"type": "function", "function": {k: v for k, v in
              (("name", f.name), ("description", f.description), ("parameters", f.parameters)) if v is not None}}
             for f in functions]
    mode = f"function:{named}" if named else (choice if isinstance(choice, str) else "auto")
    return ToolRequest(dicts, mode, req.parallel_tool_calls), functions, tuple(ignored)

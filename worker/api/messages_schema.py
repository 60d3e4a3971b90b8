"""Anthropic Messages requests (``POST /v1/messages``, ``/v1/messages/count_tokens``): the
schema and its conversion to the internal request (messages, sampling, tools).

Shape checks only, as in ``openai_schema``: every mistake is a ``RequestError`` naming the
field; the server renders it in Anthropic's error shape on these routes.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from worker import openai_schema as oai
from worker.engine import ChatMessage, Sampling, ToolRequest

ToolName = Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_-]{1,128}$")]


class TextBlock(msgspec.Struct, tag="text", tag_field="type"):
    text: str
    cache_control: Any = None
    citations: Any = None


class ImageBlock(msgspec.Struct, tag="image", tag_field="type"):
    source: Any = None
    cache_control: Any = None


class DocumentBlock(msgspec.Struct, tag="document", tag_field="type"):
    source: Any = None
    cache_control: Any = None


class ToolUseBlock(msgspec.Struct, tag="tool_use", tag_field="type"):
    id: str
    name: str
    input: dict[str, Any]
    cache_control: Any = None


class ToolResultBlock(msgspec.Struct, tag="tool_result", tag_field="type"):
    tool_use_id: str
    content: str | list[TextBlock | ImageBlock | DocumentBlock] | None = None
    is_error: bool = False
    cache_control: Any = None


class ThinkingBlock(msgspec.Struct, tag="thinking", tag_field="type"):
    thinking: str = ""
    signature: str = ""


class RedactedThinkingBlock(msgspec.Struct, tag="redacted_thinking", tag_field="type"):
    data: str = ""


Block = TextBlock | ImageBlock | DocumentBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | RedactedThinkingBlock


class Message(msgspec.Struct):
    role: Literal["user", "assistant"]
    content: str | list[Block]


class ToolDef(msgspec.Struct):
    name: ToolName
    input_schema: dict[str, Any] | None = None
    description: str | None = None
    type: str | None = None  # "custom" or absent; Anthropic's server tools are refused
    cache_control: Any = None


class ChoiceAuto(msgspec.Struct, tag="auto", tag_field="type", forbid_unknown_fields=True):
    disable_parallel_tool_use: bool = False


class ChoiceAny(msgspec.Struct, tag="any", tag_field="type", forbid_unknown_fields=True):
    disable_parallel_tool_use: bool = False


class ChoiceTool(msgspec.Struct, tag="tool", tag_field="type", forbid_unknown_fields=True):
    name: ToolName
    disable_parallel_tool_use: bool = False


class ChoiceNone(msgspec.Struct, tag="none", tag_field="type", forbid_unknown_fields=True):
    pass


ToolChoice = ChoiceAuto | ChoiceAny | ChoiceTool | ChoiceNone


class MessagesRequest(msgspec.Struct, kw_only=True):
    # Unknown top-level fields are tolerated (named in X-Ignored-Params) unless strict.
    model: str | None = None
    messages: Annotated[list[Message], Meta(min_length=1)]
    max_tokens: Annotated[int, Meta(ge=1, le=2**31 - 1)] | None = None  # required on /v1/messages
    system: str | list[TextBlock] | None = None
    tools: Annotated[list[ToolDef], Meta(max_length=128)] | None = None
    tool_choice: ToolChoice | None = None
    stop_sequences: Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(max_length=16)] | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=1.0)] = 1.0
    top_p: oai.Float01 | None = None
    top_k: Annotated[int, Meta(ge=0, le=1_000_000)] | None = None
    stream: bool = False
    # Accepted and not acted on: request metadata, extended thinking, tiers, caching hints.
    metadata: Any = None
    thinking: Any = None
    service_tier: Any = None
    container: Any = None


class _StrictMessages(MessagesRequest, forbid_unknown_fields=True, kw_only=True):
    pass


_decoders = oai.decoders_of(_StrictMessages, MessagesRequest)


def decode(body: bytes, strict: bool, count_only: bool = False) -> tuple[MessagesRequest, tuple[str, ...]]:
    req: MessagesRequest
    req, ignored = oai.decode_top_level(_decoders, body, strict)
    if req.max_tokens is None and not count_only:
        raise oai.RequestError("max_tokens: Field required", param="max_tokens", code="invalid_value")
    return req, ignored


def _text_of(content: str | list[Any] | None, param: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for j, b in enumerate(content):
        if not isinstance(b, TextBlock):
            raise oai.RequestError(
                f"only text content is supported here, not {type(b).__struct_config__.tag!r}",
                param=f"{param}[{j}].type", code="unsupported",
            )
        parts.append(b.text)
    return "".join(parts)


def chat_messages(req: MessagesRequest) -> list[ChatMessage]:
    """System, user and assistant turns as chat messages: tool_use blocks become an
    assistant's tool_calls, tool_result blocks tool messages (before the turn's text)."""
    out: list[ChatMessage] = []
    if req.system:
        out.append(ChatMessage("system", _text_of(req.system, "system")))
    names: dict[str, str] = {}
    for i, m in enumerate(req.messages):
        if isinstance(m.content, str):
            out.append(ChatMessage(m.role, m.content))
            continue
        text: list[str] = []
        calls: list[dict[str, Any]] = []
        for j, b in enumerate(m.content):
            param = f"messages[{i}].content[{j}]"
            if isinstance(b, TextBlock):
                text.append(b.text)
            elif isinstance(b, ToolUseBlock):
                if m.role != "assistant":
                    raise oai.RequestError("tool_use blocks belong to assistant turns", param=f"{param}.type", code="invalid_value")
                names[b.id] = b.name
                calls.append({"id": b.id, "type": "function",
                              "function": {"name": b.name, "arguments": json.dumps(b.input, ensure_ascii=False)}})
            elif isinstance(b, ToolResultBlock):
                if m.role != "user":
                    raise oai.RequestError("tool_result blocks belong to user turns", param=f"{param}.type", code="invalid_value")
                result = _text_of(b.content, f"{param}.content")
                out.append(ChatMessage("tool", f"Error: {result}" if b.is_error else result,
                                       names.get(b.tool_use_id), b.tool_use_id))
            elif isinstance(b, (ThinkingBlock, RedactedThinkingBlock)):
                continue  # earlier reasoning: not part of what this model reads
            else:
                raise oai.RequestError(
                    f"content blocks of type {type(b).__struct_config__.tag!r} are not supported (text, "
                    "tool_use and tool_result are)", param=f"{param}.type", code="unsupported",
                )
        if text or calls or m.role == "assistant":
            out.append(ChatMessage(m.role, "".join(text), tool_calls=calls or None))
    return out


def tools_of(req: MessagesRequest) -> ToolRequest | None:
    """The tools and the choice: auto, any ("required"), tool (one name), none (tools off)."""
    if not req.tools:
        if req.tool_choice is not None and not isinstance(req.tool_choice, (ChoiceAuto, ChoiceNone)):
            raise oai.RequestError("tool_choice requires tools", param="tool_choice", code="invalid_value")
        return None
    dicts: list[dict[str, Any]] = []
    for i, t in enumerate(req.tools):
        if t.type not in (None, "custom"):
            raise oai.RequestError(
                f"tool type {t.type!r} is not supported: only custom tools (name, description, "
                "input_schema) are served", param=f"tools[{i}].type", code="unsupported",
            )
        if t.input_schema is None:
            raise oai.RequestError("input_schema: Field required", param=f"tools[{i}].input_schema", code="invalid_value")
        if t.name in (d["function"]["name"] for d in dicts):
            raise oai.RequestError(f"two tools are named {t.name!r}", param=f"tools[{i}].name", code="invalid_value")
        fn: dict[str, Any] = {"name": t.name, "parameters": t.input_schema}
        if t.description:
            fn["description"] = t.description
        dicts.append({"type": "function", "function": fn})
    c = req.tool_choice
    if isinstance(c, ChoiceNone):
        return None
    parallel = not (c is not None and c.disable_parallel_tool_use)
    choice = "auto"
    if isinstance(c, ChoiceAny):
        choice = "required"
    elif isinstance(c, ChoiceTool):
        if c.name not in (d["function"]["name"] for d in dicts):
            raise oai.RequestError(f"tool_choice names {c.name!r}, which is not among the tools",
                                   param="tool_choice.name", code="invalid_value")
        choice = f"function:{c.name}"
    return ToolRequest(dicts, choice, parallel)


def sampling_of(req: MessagesRequest) -> Sampling:
    return Sampling(
        max_tokens=req.max_tokens,
        temperature=req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=40 if req.top_k is None else req.top_k,
        stop=tuple(req.stop_sequences or ()),
    )

"""OpenAI's response bodies for chat completions, completions, embeddings and models.

msgspec Structs: each chunk is encoded once, no dict building. Only shapes live here; the
handlers that fill them are in ``chat.py``, ``completions.py`` and ``native.py``.
"""

from __future__ import annotations

import urllib.parse
import uuid
from typing import Any

import msgspec
from aiohttp import web
from msgspec import UNSET, UnsetType

from worker.engine import ParsedCall, TokenLogprob

JSON = "application/json"

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


def piece_text(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


def chat_logprobs(lps: list[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs([
        ChatTokenLogprob(
            piece_text(lp.piece), lp.logprob, list(lp.piece),
            [TopLogprob(piece_text(p), v, list(p)) for p, v in lp.top],
        )
        for lp in lps
    ])


def text_logprobs(lps: list[TokenLogprob], offset: int) -> TextLogprobs:
    """Completions' shape; ``offset``: characters of the completion before these tokens."""
    tokens = [piece_text(lp.piece) for lp in lps]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    tops = []
    for lp in lps:
        top: dict[str, float] = {}
        for p, v in lp.top:
            top.setdefault(piece_text(p), v)  # two byte pieces may render alike: keep the likelier
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


def tool_calls_out(calls: list[ParsedCall]) -> list[ToolCallOut]:
    return [
        ToolCallOut(f"call_{uuid.uuid4().hex[:24]}", FunctionOut(c.name, c.arguments))
        for c in calls
    ]



class ChatChoice(msgspec.Struct):
    index: int
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None
    token_ids: TokenIds = UNSET


class Timings(msgspec.Struct):
    """llama-server's ``timings`` (result_timings::to_json)."""

    cache_n: int
    prompt_n: int
    prompt_ms: float
    prompt_per_token_ms: float
    prompt_per_second: float
    predicted_n: int
    predicted_ms: float
    predicted_per_token_ms: float
    predicted_per_second: float


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
    timings: Timings | UnsetType = UNSET  # llama-server's timings_per_token


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
    timings: Timings | UnsetType = UNSET  # llama-server's timings_per_token


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



enc = msgspec.json.Encoder()


def sse(obj: Any) -> bytes:
    return b"data: " + enc.encode(obj) + b"\n\n"


def json_response(
    body: bytes, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(body=body, status=status, content_type=JSON, headers=headers)


_MAX_NAMES_SHOWN = 16
_MAX_NAME_CHARS = 64


def names_for_humans(names: tuple[str, ...]) -> str:
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


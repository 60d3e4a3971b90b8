"""OpenAI request schemas and error bodies for the worker's HTTP API.

Rules for this module:
- It validates the *shape* of a request (types, ranges, unknown fields) with msgspec and
  nothing else: checks that need the model (token ids, context length, grammar) live in
  engine.py, which raises ``InvalidInput`` for them.
- Every client mistake becomes ``RequestError`` (an HTTP status + an OpenAI-shaped body
  naming the offending parameter), never a crash or a 500.
- It imports nothing heavy (no llama_cpp, no aiohttp) so it can be tested on its own.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

# Fields OpenAI clients send that we accept but do not act on (the SDK fills some of them
# in for you; rejecting them would break ordinary clients).
_Ignored = Any

Float01 = Annotated[float, Meta(ge=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
MaxTokens = Annotated[int, Meta(ge=1, le=2**31 - 1)]
Seed = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
StopList = Annotated[list[Annotated[str, Meta(min_length=1)]], Meta(max_length=16)]
Stop = Annotated[str, Meta(min_length=1)] | StopList | None


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool = False


class ResponseFormatText(msgspec.Struct, tag="text", tag_field="type", forbid_unknown_fields=True):
    pass


class ResponseFormatJsonObject(
    msgspec.Struct, tag="json_object", tag_field="type", forbid_unknown_fields=True
):
    pass


class JsonSchemaSpec(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, Meta(min_length=1, max_length=64)]
    schema: dict[str, Any] | None = None
    description: str | None = None
    strict: bool | None = None


class ResponseFormatJsonSchema(
    msgspec.Struct, tag="json_schema", tag_field="type", forbid_unknown_fields=True
):
    json_schema: JsonSchemaSpec


ResponseFormat = ResponseFormatText | ResponseFormatJsonObject | ResponseFormatJsonSchema


class TextPart(msgspec.Struct, tag="text", tag_field="type", forbid_unknown_fields=True):
    text: str


class ImagePart(msgspec.Struct, tag="image_url", tag_field="type"):
    image_url: Any = None


ContentPart = TextPart | ImagePart

Role = Literal["system", "developer", "user", "assistant", "tool"]


class Message(msgspec.Struct):
    # Unknown fields are tolerated here on purpose: a client that sends back the SDK's
    # own assistant message (model_dump) includes refusal/audio/annotations keys.
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None


class _Common(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    model: str | None = None
    max_tokens: MaxTokens | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] = 1.0
    top_p: Float01 = 1.0
    top_k: Annotated[int, Meta(ge=0, le=1_000_000)] = 40
    min_p: Float01 = 0.05
    seed: Seed | None = None
    stop: Stop = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repeat_penalty: Annotated[float, Meta(gt=0.0, le=10.0)] = 1.0
    logit_bias: dict[str, Annotated[float, Meta(ge=-100.0, le=100.0)]] | None = None
    n: Annotated[int, Meta(ge=1, le=128)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: _Ignored = None
    logprobs: bool | None = None


class ChatRequest(_Common, kw_only=True):
    messages: Annotated[list[Message], Meta(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    response_format: ResponseFormat | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: _Ignored = None
    store: _Ignored = None
    metadata: _Ignored = None
    service_tier: _Ignored = None


class CompletionRequest(_Common, kw_only=True):
    # msgspec allows one array type per union: a list of strings or token ids, checked below.
    prompt: str | list[str | int]
    response_format: ResponseFormat | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: Annotated[int, Meta(ge=1, le=1)] | None = None


class RequestError(Exception):
    """A client error, rendered as an OpenAI-shaped JSON body."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int = 400,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status
        self.type = type

    def body(self) -> bytes:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


class _ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class _ErrorBody(msgspec.Struct):
    error: _ErrorDetail


_encoder = msgspec.json.Encoder()


def error_body(
    message: str, *, type: str = "invalid_request_error", param: str | None = None,
    code: str | None = None,
) -> bytes:
    return _encoder.encode(_ErrorBody(_ErrorDetail(message, type, param, code)))


_chat_decoder = msgspec.json.Decoder(ChatRequest)
_completion_decoder = msgspec.json.Decoder(CompletionRequest)

# msgspec reports where a problem is as "... - at `$.messages[0].role`".
_AT_PATH = re.compile(r" - at `\$\.?([^`]*)`$")
_FIELD_NAME = re.compile(r"(?:unknown|required) field `([^`]*)`")


def _param_of(message: str) -> tuple[str, str | None]:
    """Split a msgspec error into (message, param path)."""
    path: str | None = None
    m = _AT_PATH.search(message)
    if m:
        # "[...]" stands for a dict key (logit_bias[...]): the field name says enough.
        path = m.group(1).replace("[...]", "") or None
        message = message[: m.start()]
    f = _FIELD_NAME.search(message)
    if f:
        path = f"{path}.{f.group(1)}" if path else f.group(1)
    return message, path


def _decode(decoder: msgspec.json.Decoder[Any], body: bytes) -> Any:
    if not body.strip():
        raise RequestError("the request body is empty: send a JSON object", code="invalid_json")
    try:
        return decoder.decode(body)
    except msgspec.ValidationError as e:
        msg, param = _param_of(str(e))
        raise RequestError(f"invalid request: {msg}", param=param, code="invalid_value") from None
    except UnicodeDecodeError:
        raise RequestError("the request body is not valid UTF-8", code="invalid_json") from None
    except msgspec.DecodeError as e:
        raise RequestError(
            f"the request body is not valid JSON: {e}", code="invalid_json"
        ) from None


def _check_common(req: _Common) -> None:
    if req.n != 1:
        raise RequestError("only n=1 is supported", param="n", code="invalid_value")
    if req.stream_options is not None and not req.stream:
        raise RequestError(
            "stream_options is only allowed when stream is true",
            param="stream_options",
            code="invalid_value",
        )
    if req.logprobs:
        raise RequestError("logprobs are not supported", param="logprobs", code="unsupported")
    if req.logit_bias:
        for key in req.logit_bias:
            if not key.isdigit():
                raise RequestError(
                    f"logit_bias keys must be token ids, got {key!r}",
                    param="logit_bias",
                    code="invalid_value",
                )


def decode_chat(body: bytes) -> ChatRequest:
    req: ChatRequest = _decode(_chat_decoder, body)
    _check_common(req)
    if req.tools or req.tool_choice not in (None, "none"):
        raise RequestError("tools are not supported", param="tools", code="unsupported")
    if req.top_logprobs is not None:
        raise RequestError("top_logprobs is not supported", param="top_logprobs", code="unsupported")
    for i, msg in enumerate(req.messages):
        if isinstance(msg.content, list):
            for j, part in enumerate(msg.content):
                if not isinstance(part, TextPart):
                    raise RequestError(
                        "only text content parts are supported",
                        param=f"messages[{i}].content[{j}].type",
                        code="unsupported",
                    )
        elif msg.content is None and msg.role != "assistant":
            raise RequestError(
                f"messages[{i}].content is required for role {msg.role!r}",
                param=f"messages[{i}].content",
                code="invalid_value",
            )
    return req


def decode_completion(body: bytes) -> CompletionRequest:
    req: CompletionRequest = _decode(_completion_decoder, body)
    _check_common(req)
    if isinstance(req.prompt, list):
        if not req.prompt:
            raise RequestError("prompt must not be empty", param="prompt", code="invalid_value")
        if all(isinstance(p, str) for p in req.prompt):
            if len(req.prompt) != 1:
                raise RequestError(
                    "only one prompt per request is supported", param="prompt", code="unsupported"
                )
        elif not all(isinstance(p, int) and not isinstance(p, bool) for p in req.prompt):
            raise RequestError(
                "prompt must be a string, a list of one string, or a list of token ids",
                param="prompt",
                code="invalid_value",
            )
    if req.echo:
        raise RequestError("echo is not supported", param="echo", code="unsupported")
    if req.suffix:
        raise RequestError("suffix is not supported", param="suffix", code="unsupported")
    return req


def message_text(msg: Message) -> str:
    """A message's content as one string (text parts joined)."""
    if msg.content is None:
        return ""
    if isinstance(msg.content, str):
        return msg.content
    return "".join(p.text for p in msg.content if isinstance(p, TextPart))

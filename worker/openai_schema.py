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
TokenId = Annotated[int, Meta(ge=0, le=2**31 - 1)]


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool = False


class ResponseFormatText(msgspec.Struct, tag="text", tag_field="type", forbid_unknown_fields=True):
    pass


class ResponseFormatJsonObject(
    msgspec.Struct, tag="json_object", tag_field="type", forbid_unknown_fields=True
):
    # llama-server's extension: a JSON object that follows this schema.
    schema: dict[str, Any] | None = None


class JsonSchemaSpec(msgspec.Struct, forbid_unknown_fields=True):
    # OpenAI requires a name; llama-server does not (it only reads the schema).
    name: Annotated[str, Meta(min_length=1, max_length=64)] | None = None
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
# OpenAI's rule for a function name.
FunctionName = Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]


class FunctionDef(msgspec.Struct, forbid_unknown_fields=True):
    name: FunctionName
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema
    strict: bool | None = None


class Tool(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["function"]
    function: FunctionDef


class ChosenFunction(msgspec.Struct, forbid_unknown_fields=True):
    name: FunctionName


class NamedToolChoice(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["function"]
    function: ChosenFunction


class CalledFunction(msgspec.Struct):
    name: str
    arguments: str = "{}"  # a JSON object as a string (OpenAI's shape)


class ToolCall(msgspec.Struct):
    # Unknown fields tolerated: the SDK's own objects sent back carry more.
    function: CalledFunction
    id: str | None = None
    type: Literal["function"] = "function"


class Message(msgspec.Struct):
    # Unknown fields are tolerated here on purpose: a client that sends back the SDK's
    # own assistant message (model_dump) includes refusal/audio/annotations keys.
    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls


class _Common(msgspec.Struct, kw_only=True):
    # Unknown top-level fields are tolerated here and rejected by the _Strict* subclasses
    # below; decode_chat/decode_completion choose per the worker's strict_params setting.
    model: str | None = None
    max_tokens: MaxTokens | None = None
    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] = 1.0
    top_p: Float01 = 1.0
    # -1 is vLLM's "disabled" and 0 llama-server's: llama.cpp skips top-k for any k <= 0.
    top_k: Annotated[int, Meta(ge=-1, le=1_000_000)] = 40
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
    # Extensions of llama-server, vLLM and Hugging Face that their clients send as a matter
    # of course; each has the meaning its home server gives it (README "Request extensions").
    ignore_eos: bool = False
    min_tokens: Annotated[int, Meta(ge=0, le=2**31 - 1)] = 0
    repetition_penalty: Annotated[float, Meta(gt=0.0, le=10.0)] | None = None  # = repeat_penalty
    typical_p: Float01 = 1.0
    # llama-server's max_tokens: -1 (and -2, "until the context is full") mean no limit.
    n_predict: Annotated[int, Meta(ge=-2, le=2**31 - 1)] | None = None
    stop_token_ids: Annotated[list[TokenId], Meta(max_length=64)] | None = None
    cache_prompt: bool = True
    return_token_ids: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # llama-server's slot and context-shift controls: accepted and ignored (one KV cache,
    # no context shift: a prompt that does not fit is a 400), as is its sampler order.
    id_slot: Annotated[int, Meta(ge=-1)] = -1
    n_keep: Annotated[int, Meta(ge=-1)] = 0
    samplers: Annotated[list[str], Meta(max_length=32)] | str | None = None
    # llama-server's output constraints: a GBNF grammar, or a JSON schema (turned into one).
    grammar: Annotated[str, Meta(min_length=1)] | None = None
    json_schema: dict[str, Any] | None = None
    # llama-server's stream extras: timings in every chunk, prompt progress before the text.
    timings_per_token: bool = False
    return_progress: bool = False


class ChatRequest(_Common, kw_only=True):
    messages: Annotated[list[Message], Meta(min_length=1)]
    max_completion_tokens: MaxTokens | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=20)] | None = None
    tools: Annotated[list[Tool], Meta(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    # Assistant prefill (llama-server, vLLM): the answer continues the last assistant
    # message. None: not sent (add_generation_prompt's default is true).
    continue_final_message: bool = False
    add_generation_prompt: bool | None = None
    store: _Ignored = None
    metadata: _Ignored = None
    service_tier: _Ignored = None


class CompletionRequest(_Common, kw_only=True):
    # msgspec allows one array type per union: a list of strings or token ids, checked below.
    prompt: str | list[str | int]
    # OpenAI's range for completions (llama-server allows more).
    logprobs: Annotated[int, Meta(ge=0, le=5)] | None = None
    response_format: ResponseFormat | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: Annotated[int, Meta(ge=1, le=1)] | None = None


class _StrictChat(ChatRequest, forbid_unknown_fields=True, kw_only=True):
    pass


class _StrictCompletion(CompletionRequest, forbid_unknown_fields=True, kw_only=True):
    pass


# --- llama-server's native /completion and /rerank ------------------------------------


class NativeCompletionRequest(CompletionRequest, kw_only=True):
    """llama-server's ``POST /completion``: its defaults (temperature 0.8, top_p 0.95, no
    token limit), a prompt that may mix strings and token ids, and its answer options."""

    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] = 0.8
    top_p: Float01 = 0.95
    # llama-server's forms: {"token id or text": bias} or [[token id or text, bias], ...];
    # a bias of false bans the token(s). Turned into token ids by the route
    # (LlamaCppApi._token_biases: texts need the tokenizer).
    logit_bias: (
        dict[str, Annotated[float, Meta(ge=-100.0, le=100.0)] | bool]
        | Annotated[list[tuple[int | str, Annotated[float, Meta(ge=-100.0, le=100.0)] | bool]], Meta(max_length=4096)]
        | None
    ) = None  # type: ignore[assignment]
    n_probs: Annotated[int, Meta(ge=0, le=20)] = 0
    return_tokens: bool = False
    post_sampling_probs: bool = False
    # llama-server's time limit on the generation phase: not served (a 400 when set).
    t_max_predict_ms: Annotated[int, Meta(ge=0)] = 0


def native_biases(req: NativeCompletionRequest) -> list[tuple[int | str, float]]:
    """llama-server's logit_bias as (token id or text to tokenize, bias) pairs: a key of
    digits is a token id, any other a text; false is a ban (-inf), true is skipped."""
    lb = req.logit_bias
    pairs: list[tuple[int | str, float | bool]] = []
    if isinstance(lb, dict):
        pairs = [(int(k) if k.isdigit() else k, v) for k, v in lb.items()]
    elif lb:
        pairs = list(lb)
    out: list[tuple[int | str, float]] = []
    for key, value in pairs:
        if value is True:
            continue
        out.append((key, float("-inf") if value is False else float(value)))
    return out


class _StrictNativeCompletion(NativeCompletionRequest, forbid_unknown_fields=True, kw_only=True):
    pass


_native_decoders = (
    msgspec.json.Decoder(_StrictNativeCompletion), msgspec.json.Decoder(NativeCompletionRequest)
)


def _decode_prompted(
    decoders: tuple[msgspec.json.Decoder[Any], msgspec.json.Decoder[Any]], body: bytes, strict: bool
) -> tuple[Any, tuple[str, ...]]:
    """A completion request (OpenAI's or llama-server's) with the checks both share."""
    req, ignored = decode_top_level(decoders, body, strict)
    _check_common(req)
    _check_grammar_can_end(req)
    if isinstance(req.prompt, list) and not req.prompt:
        raise RequestError("prompt must not be empty", param="prompt", code="invalid_value")
    return req, ignored


def decode_native_completion(
    body: bytes, strict: bool = True
) -> tuple[NativeCompletionRequest, tuple[str, ...]]:
    """llama-server's prompt forms: a string, token ids, or strings and ids mixed (one
    prompt); several prompts (a list of strings) are not served."""
    req: NativeCompletionRequest
    req, ignored = _decode_prompted(_native_decoders, body, strict)
    if isinstance(req.prompt, list):
        if len(req.prompt) > 1 and all(isinstance(p, str) for p in req.prompt):
            raise RequestError(
                "only one prompt per request is supported (a list of strings is several)",
                param="prompt", code="unsupported",
            )
    for name, on in (("echo", req.echo), ("suffix", bool(req.suffix)), ("post_sampling_probs", req.post_sampling_probs),
                     ("t_max_predict_ms", req.t_max_predict_ms > 0)):
        if on:
            raise RequestError(f"{name} is not supported", param=name, code="unsupported")
    if req.logprobs is not None and not req.n_probs:
        # llama-server takes OpenAI's logprobs for n_probs when n_probs is not sent.
        req = msgspec.structs.replace(req, n_probs=req.logprobs, logprobs=None)
    return req, ignored


class RerankRequest(msgspec.Struct):
    # Unknown fields tolerated, as on /v1/embeddings (Jina's and Cohere's clients send more).
    query: str
    documents: Annotated[list[str], Meta(min_length=1, max_length=4096)]
    model: str | None = None
    top_n: Annotated[int, Meta(ge=0)] | None = None
    return_documents: bool = False


class SlotFileRequest(msgspec.Struct):
    # llama-server's body for save and restore (erase sends none); unknown fields tolerated.
    filename: Annotated[str, Meta(min_length=1, max_length=255)] | None = None


# --- llama-server's tokenizer endpoints -------------------------------------------------


class TokenizeRequest(msgspec.Struct, forbid_unknown_fields=True):
    content: str
    add_special: bool = False  # llama-server's default: no BOS
    parse_special: bool = True  # "<|im_end|>" in the text is the special token
    with_pieces: bool = False


class DetokenizeRequest(msgspec.Struct, forbid_unknown_fields=True):
    tokens: list[TokenId]


class ApplyTemplateRequest(msgspec.Struct):
    # Unknown fields tolerated: a client sends the body of its chat request as it is.
    messages: Annotated[list[Message], Meta(min_length=1)]
    tools: Annotated[list[Tool], Meta(max_length=128)] | None = None  # rendered as chat does


class EmbeddingRequest(msgspec.Struct):
    # Unknown fields tolerated, as on the other OpenAI endpoints (not named: no header here).
    input: str | Annotated[list[Any], Meta(min_length=1, max_length=2048)]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: _Ignored = None


def embedding_inputs(req: EmbeddingRequest) -> list[str] | list[list[int]]:
    """OpenAI's input forms: a string, strings, one token array, or token arrays."""
    if req.dimensions is not None:
        raise RequestError(
            "dimensions is not supported: vectors have the model's own size",
            param="dimensions", code="unsupported",
        )
    inp = req.input
    if isinstance(inp, str):
        return [inp]

    def is_id(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)

    if all(isinstance(x, str) for x in inp):
        return list(inp)
    if all(is_id(x) for x in inp):
        return [list(inp)]
    if all(isinstance(x, list) and x and all(is_id(t) for t in x) for x in inp):
        return [list(x) for x in inp]
    raise RequestError(
        "input must be a string, a list of strings, a list of token ids, or a list of "
        "non-empty lists of token ids", param="input", code="invalid_value",
    )


def decode_as(cls: type[Any], body: bytes) -> Any:
    """A small endpoint's request (no unknown-field forgiveness: these are not OpenAI's)."""
    if not body.strip():
        raise RequestError("the request body is empty: send a JSON object", code="invalid_json")
    try:
        return msgspec.json.decode(body, type=cls)
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        raise _request_error(e) from None


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


_chat_decoders = (msgspec.json.Decoder(_StrictChat), msgspec.json.Decoder(ChatRequest))
_completion_decoders = (
    msgspec.json.Decoder(_StrictCompletion), msgspec.json.Decoder(CompletionRequest)
)
_top_level_keys = msgspec.json.Decoder(dict[str, msgspec.Raw])

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


def _request_error(e: Exception) -> RequestError:
    """The client error for a failed decode (ValidationError, UnicodeDecodeError, DecodeError)."""
    if isinstance(e, msgspec.ValidationError):
        msg, param = _param_of(str(e))
        return RequestError(f"invalid request: {msg}", param=param, code="invalid_value")
    if isinstance(e, UnicodeDecodeError):
        return RequestError("the request body is not valid UTF-8", code="invalid_json")
    return RequestError(f"the request body is not valid JSON: {e}", code="invalid_json")


def decoders_of(strict_cls: type[Any], lenient_cls: type[Any]) -> tuple[msgspec.json.Decoder[Any], msgspec.json.Decoder[Any]]:
    return msgspec.json.Decoder(strict_cls), msgspec.json.Decoder(lenient_cls)


def decode_top_level(
    decoders: tuple[msgspec.json.Decoder[Any], msgspec.json.Decoder[Any]], body: bytes,
    strict: bool,
) -> tuple[Any, tuple[str, ...]]:
    """The request and the names of the unknown top-level fields it ignored.

    The strict decoder runs first, so a request without unknown fields (nearly all) is
    parsed once. Only an unknown field at the top level is forgiven (when not ``strict``):
    one inside a nested object (a message part, response_format, stream_options) changes
    what the request means and stays an error.
    """
    if not body.strip():
        raise RequestError("the request body is empty: send a JSON object", code="invalid_json")
    strict_decoder, lenient_decoder = decoders
    try:
        return strict_decoder.decode(body), ()
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        text = str(e)
        top_level_unknown = (
            isinstance(e, msgspec.ValidationError)
            and text.startswith("Object contains unknown field")
            and not _AT_PATH.search(text)
        )
        if strict or not top_level_unknown:
            raise _request_error(e) from None
    try:
        req = lenient_decoder.decode(body)  # the rest of the body may still be wrong
    except (msgspec.DecodeError, UnicodeDecodeError) as e:
        raise _request_error(e) from None
    known = type(req).__struct_fields__
    return req, tuple(k for k in _top_level_keys.decode(body) if k not in known)


def _check_common(req: _Common) -> None:
    if req.n != 1:
        raise RequestError("only n=1 is supported", param="n", code="invalid_value")
    if req.stream_options is not None and not req.stream:
        raise RequestError(
            "stream_options is only allowed when stream is true",
            param="stream_options",
            code="invalid_value",
        )
    if req.n_predict == 0:
        raise RequestError(
            "n_predict 0 (evaluate the prompt only) is not supported",
            param="n_predict", code="unsupported",
        )
    if req.repetition_penalty is not None and req.repeat_penalty not in (1.0, req.repetition_penalty):
        raise RequestError(
            "repetition_penalty and repeat_penalty are two names of one setting: send one",
            param="repetition_penalty", code="invalid_value",
        )
    if req.logit_bias and not isinstance(req, NativeCompletionRequest):  # (text keys there)
        for key in req.logit_bias:
            if not key.isdigit():
                raise RequestError(
                    f"logit_bias keys must be token ids, got {key!r}",
                    param="logit_bias",
                    code="invalid_value",
                )


class Constraint(msgspec.Struct, frozen=True):
    """What a request constrains its output to: any JSON value (``json_mode``), JSON
    following ``json_schema``, or a GBNF ``grammar``; ``param`` names the field it came
    from (errors name it)."""

    json_mode: bool = False
    json_schema: dict[str, Any] | None = None
    grammar: str | None = None
    param: str | None = None


def constraint_of(req: ChatRequest | CompletionRequest) -> Constraint:
    """The output constraint of a chat or completion request: ``response_format``,
    llama-server's top-level ``json_schema`` or its ``grammar`` (one of them)."""
    fmt = req.response_format
    sent = [name for name, on in (
        ("response_format", isinstance(fmt, (ResponseFormatJsonObject, ResponseFormatJsonSchema))),
        ("json_schema", req.json_schema is not None),
        ("grammar", req.grammar is not None),
    ) if on]
    if len(sent) > 1:
        raise RequestError(
            f"{' and '.join(sent)} both constrain the output: send one", param=sent[-1],
            code="invalid_value",
        )
    if req.grammar is not None:
        return Constraint(grammar=req.grammar, param="grammar")
    if req.json_schema is not None:
        return Constraint(json_mode=True, json_schema=req.json_schema, param="json_schema")
    if isinstance(fmt, ResponseFormatJsonSchema):
        return Constraint(json_mode=True, json_schema=fmt.json_schema.schema,
                          param="response_format.json_schema.schema")
    if isinstance(fmt, ResponseFormatJsonObject):
        if fmt.schema is not None:
            return Constraint(json_mode=True, json_schema=fmt.schema, param="response_format.schema")
        return Constraint(json_mode=True, param="response_format")
    return Constraint()


def _check_grammar_can_end(req: ChatRequest | CompletionRequest) -> None:
    """A JSON constraint ends where its grammar ends: at that point only an
    end-of-generation token is allowed, so banning it (ignore_eos, min_tokens) would leave
    llama.cpp no token it may sample."""
    if constraint_of(req).json_mode:
        for name, on in (("ignore_eos", req.ignore_eos), ("min_tokens", req.min_tokens > 0)):
            if on:
                raise RequestError(
                    f"{name} cannot be combined with a JSON response_format or json_schema "
                    "(the JSON value ends the generation)", param=name, code="invalid_value",
                )


def max_tokens_of(req: ChatRequest | CompletionRequest, default: int | None) -> int | None:
    """The generation limit asked for; None: up to the end of the context.

    max_tokens (chat: max_completion_tokens first) or llama-server's n_predict, which must
    agree when both are sent; ``default`` when neither is (raised to min_tokens).
    """
    limit = req.max_tokens
    if isinstance(req, ChatRequest) and req.max_completion_tokens:
        limit = req.max_completion_tokens
    if req.n_predict is not None:
        n_predict = req.n_predict if req.n_predict > 0 else None
        if limit is not None and n_predict != limit:
            raise RequestError(
                f"n_predict ({req.n_predict}) and max_tokens ({limit}) disagree: send one",
                param="n_predict", code="invalid_value",
            )
        limit = n_predict
    elif limit is None:
        return None if default is None else max(default, req.min_tokens)
    if limit is not None and req.min_tokens > limit:
        raise RequestError(
            f"min_tokens ({req.min_tokens}) must not exceed max_tokens ({limit})",
            param="min_tokens", code="invalid_value",
        )
    return limit


def decode_chat(body: bytes, strict: bool = True) -> tuple[ChatRequest, tuple[str, ...]]:
    """The request and the unknown top-level fields it ignored (none when ``strict``)."""
    req: ChatRequest
    req, ignored = decode_top_level(_chat_decoders, body, strict)
    _check_common(req)
    _check_grammar_can_end(req)
    _check_tools(req)
    if req.top_logprobs is not None and not req.logprobs:
        raise RequestError(
            "top_logprobs requires logprobs to be true", param="top_logprobs", code="invalid_value"
        )
    check_messages(req.messages)
    continues_final_message(req)
    return req, ignored


def _check_tools(req: ChatRequest) -> None:
    choice = req.tool_choice
    if choice not in (None, "none", "auto") and not req.tools:
        raise RequestError(
            "tool_choice requires tools", param="tool_choice", code="invalid_value"
        )
    names = [t.function.name for t in req.tools or ()]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise RequestError(
                f"two tools are named {name!r}", param=f"tools[{i}].function.name",
                code="invalid_value",
            )
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise RequestError(
            f"tool_choice names {choice.function.name!r}, which is not among the tools",
            param="tool_choice.function.name", code="invalid_value",
        )
    forced = req.tools and choice not in (None, "none", "auto")
    constraint = constraint_of(req)
    if forced and constraint.param is not None:
        raise RequestError(
            f"a forced tool call cannot also follow {constraint.param.split('.')[0]}",
            param=constraint.param.split(".")[0], code="invalid_value",
        )


def continues_final_message(req: ChatRequest) -> bool:
    """Assistant prefill: the answer continues the last (assistant) message, as llama-server
    and vLLM do with continue_final_message true or add_generation_prompt false."""
    if req.continue_final_message and req.add_generation_prompt:
        raise RequestError(
            "continue_final_message and add_generation_prompt cannot both be true: the answer "
            "either continues the last assistant message or starts a new one",
            param="continue_final_message", code="invalid_value",
        )
    prefill = req.continue_final_message or req.add_generation_prompt is False
    if prefill and req.messages[-1].role != "assistant":
        param = "continue_final_message" if req.continue_final_message else "add_generation_prompt"
        raise RequestError(
            f"{param} continues a final assistant message, but the last message's role is "
            f"{req.messages[-1].role!r}", param=param, code="invalid_value",
        )
    if prefill and req.messages[-1].tool_calls:
        raise RequestError(
            "a final assistant message with tool_calls cannot be continued",
            param="messages", code="invalid_value",
        )
    return prefill


def tool_choice_of(req: ChatRequest) -> str | None:
    """None (tools off), "auto", "required" or "function:NAME"."""
    if not req.tools or req.tool_choice == "none":
        return None
    if isinstance(req.tool_choice, NamedToolChoice):
        return f"function:{req.tool_choice.function.name}"
    return req.tool_choice or "auto"


def check_messages(messages: list[Message]) -> None:
    """Only text parts; content required except on an assistant message."""
    for i, msg in enumerate(messages):
        if msg.tool_calls and msg.role != "assistant":
            raise RequestError(
                "only an assistant message carries tool_calls",
                param=f"messages[{i}].tool_calls", code="invalid_value",
            )
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


def decode_completion(
    body: bytes, strict: bool = True
) -> tuple[CompletionRequest, tuple[str, ...]]:
    """The request and the unknown top-level fields it ignored (none when ``strict``)."""
    req: CompletionRequest
    req, ignored = _decode_prompted(_completion_decoders, body, strict)
    if isinstance(req.prompt, list):
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
    return req, ignored


def message_text(msg: Message) -> str:
    """A message's content as one string (text parts joined)."""
    if msg.content is None:
        return ""
    if isinstance(msg.content, str):
        return msg.content
    return "".join(p.text for p in msg.content if isinstance(p, TextPart))

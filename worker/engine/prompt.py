"""Prompt preparation: chat template, tokenizing and validating a request's settings.

Preparing reads only the vocabulary and the chat template, never the context, so it runs
in a helper thread while the batch loop decodes. A client mistake that needs the model to
detect (a token id out of range, a prompt longer than the context, a JSON schema llama.cpp
cannot turn into a grammar) raises ``InvalidInput`` or ``PromptTooLong``; nothing here
knows about HTTP.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any, cast

import llama_cpp
import llama_cpp.llama_cpp as llama_lib
from llama_cpp import llama_chat_format
from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

from worker.engine.tools import (
    GENERIC,
    ToolRequest,
    call_grammar,
    detect_format,
    generic_grammar,
    generic_history_call,
    generic_history_result,
    generic_instructions,
)


class InvalidInput(Exception):
    """A request the model cannot serve as asked; ``param`` names the field."""

    def __init__(self, message: str, param: str | None, code: str = "invalid_value") -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class PromptTooLong(Exception):
    def __init__(self, n_prompt: int, n_ctx: int) -> None:
        super().__init__(f"prompt of {n_prompt} tokens does not fit a context of {n_ctx}")
        self.n_prompt = n_prompt
        self.n_ctx = n_ctx


@dataclass(frozen=True)
class Sampling:
    """What a request asks of one generation (already shape-validated by the server)."""

    max_tokens: int | None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 40
    min_p: float = 0.05
    seed: int | None = None
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    logit_bias: dict[str, float] | None = None
    json_mode: bool = False  # constrain the output to JSON
    json_schema: dict[str, Any] | None = None  # ... matching this schema
    grammar: str | None = None  # a GBNF grammar (llama-server's ``grammar``) instead
    constraint_param: str | None = None  # the request field the constraint came from
    # Extensions of llama-server and vLLM (README "Request extensions"):
    typical_p: float = 1.0  # locally typical sampling; 1.0 = off
    ignore_eos: bool = False  # end-of-generation tokens are never sampled
    min_tokens: int = 0  # end-of-generation, stop_token_ids and stop strings wait this long
    stop_token_ids: tuple[int, ...] = ()  # these tokens end the generation like EOS
    include_stop_str_in_output: bool = False  # the matched stop string / stop token is kept
    skip_special_tokens: bool = True  # False: special tokens' text is part of the output
    cache_prompt: bool = True  # False: reuse no cached prefix for this request
    # Log-probabilities of each sampled token plus this many top alternatives (0..20);
    # None: not asked, nothing is computed.
    logprobs: int | None = None


@dataclass
class Prepared:
    """A request turned into tokens and sampler settings, ready to generate."""

    tokens: list[int]
    sampling: Sampling
    max_tokens: int
    stop: tuple[str, ...]
    grammar: LlamaGrammar | None
    logit_bias: dict[int, float] | None
    eog_tokens: tuple[int, ...] = ()  # every end-of-generation token; only for ignore_eos/min_tokens
    tool_format: str | None = None  # the request offered tools: parse the output in this format
    # tool_choice "required" with parallel calls: a call repeated with identical arguments
    # ends the answer (tools.CallStream), else a small model repeats it up to max_tokens.
    stop_on_repeat: bool = False


@dataclass
class ChatMessage:
    role: str
    content: str
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls (OpenAI's shape)


class _Captured(Exception):
    def __init__(self, kwargs: dict[str, Any]) -> None:
        super().__init__("captured")
        self.kwargs = kwargs


class _CaptureLlama:
    """Stands in for Llama when calling llama-cpp-python's chat handler.

    The handler renders the chat template, tokenizes and then calls create_completion;
    we capture that call's arguments (prompt tokens and the format's stop strings)
    instead of generating, so every chat format the library knows works unchanged and
    generation stays in our own loop (cancellable per token).
    """

    def __init__(self, llama: llama_cpp.Llama) -> None:
        self._llama = llama

    def __getattr__(self, name: str) -> Any:
        return getattr(self._llama, name)

    def create_completion(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            kwargs["prompt"] = args[0]
        raise _Captured(kwargs)


def _template_call(call: dict[str, Any]) -> dict[str, Any]:
    """An earlier call for the template: templates (Qwen's, Llama's) write the arguments
    with ``tojson``, so they get the object, not OpenAI's JSON string."""
    fn = dict(call.get("function") or {})
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            fn["arguments"] = json.loads(args)
        except ValueError:
            pass  # not JSON: the template gets the string as sent
    return {**call, "type": "function", "function": fn}


def _generic_messages(messages: list[ChatMessage], tools: ToolRequest) -> list[ChatMessage]:
    """The conversation for a template without tool markup: the tools described in the
    system message, earlier calls and results written as the generic format's JSON."""
    names = {c.get("id"): (c.get("function") or {}).get("name") for m in messages for c in m.tool_calls or ()}
    out: list[ChatMessage] = []
    for m in messages:
        if m.role == "assistant" and m.tool_calls:
            out.append(ChatMessage("assistant", generic_history_call(m.tool_calls)))
        elif m.role == "tool":
            name = m.name or names.get(m.tool_call_id)
            out.append(ChatMessage("user", generic_history_result(name, m.tool_call_id, m.content)))
        else:
            out.append(m)
    text = generic_instructions(tools)
    if out and out[0].role in ("system", "developer"):
        out[0] = ChatMessage("system", f"{out[0].content}\n\n{text}" if out[0].content else text)
    else:
        out.insert(0, ChatMessage("system", text))
    return out


class PromptPreparer:
    """Turns requests into ``Prepared`` for one loaded model (thread-safe: reads only)."""

    def __init__(self, llama: llama_cpp.Llama, n_ctx: int, tools_mode: str = "generic") -> None:
        self._llama = llama
        self._n_ctx = n_ctx  # one slot's context (each sequence has its own cells)
        self._eog: tuple[int, ...] | None = None  # end-of-generation token ids, once needed
        # The GGUF's own Jinja template (not a named chat_format) says how tools are called.
        template = llama.metadata.get("tokenizer.chat_template")
        jinja = llama.chat_handler is None and (llama.chat_format or "").startswith("chat_template.")
        own = detect_format(template) if jinja else None
        # A template without tool markup (or a named chat_format) gets the generic format,
        # unless the model's config says "refuse" (README "Tool calling").
        self.tool_format = own or (GENERIC if tools_mode == "generic" else None)

    def _render_chat(
        self, messages: list[ChatMessage], tools: list[dict[str, Any]] | None = None
    ) -> tuple[list[int], list[str]]:
        """The chat template's prompt tokens and the format's stop strings."""
        llama = self._llama
        handler = (
            llama.chat_handler
            or llama._chat_handlers.get(llama.chat_format or "")
            or llama_chat_format.get_chat_completion_handler(llama.chat_format or "")
        )
        dicts: list[dict[str, Any]] = []
        for m in messages:
            # Chat templates know system/user/assistant/tool; "developer" is OpenAI's new
            # name for system.
            d: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                                 "content": m.content}
            if m.name is not None:
                d["name"] = m.name
            if m.tool_call_id is not None:
                d["tool_call_id"] = m.tool_call_id
            if m.tool_calls:
                d["tool_calls"] = [_template_call(c) for c in m.tool_calls]
            dicts.append(d)
        # Tools reach the template as Hugging Face's apply_chat_template passes them.
        extra: dict[str, Any] = {"tools": tools} if tools else {}
        try:
            handler(
                llama=cast(Any, _CaptureLlama(llama)), messages=cast(Any, dicts), stream=False,
                **extra,
            )
        except _Captured as c:
            captured = c.kwargs
        except Exception as e:  # the template rejected the conversation (jinja raise_exception)
            raise InvalidInput(f"the chat template rejected the messages: {e}", "messages") from None
        else:
            raise RuntimeError("the chat handler returned without calling create_completion")
        prompt: Any = captured.get("prompt")
        if isinstance(prompt, str):
            prompt = llama.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        fmt_stop = captured.get("stop") or []
        if isinstance(fmt_stop, str):
            fmt_stop = [fmt_stop]
        return list(prompt), list(fmt_stop)

    def _tool_format(self, tools: ToolRequest | list[dict[str, Any]] | None) -> str | None:
        fmt = self.tool_format
        if tools and fmt is None:
            raise InvalidInput(
                "this model's chat template has no tool support (it renders no tools, or in "
                "a format vram-llm does not parse: README \"Tool calling\") and its config says "
                'tools = "refuse"; send tool_choice "none" or no tools', "tools", code="tools_unsupported",
            )
        return fmt

    def prepare_chat(
        self, messages: list[ChatMessage], sampling: Sampling, tools: ToolRequest | None = None,
        continue_final: bool = False,
    ) -> Prepared:
        """``continue_final``: the answer continues the last message (an assistant's
        prefill), as llama-server does it: the conversation before it is rendered with the
        generation prompt and the prefill's text follows, without an end of turn."""
        fmt = self._tool_format(tools)
        template_tools = tools.tools if tools else None
        prefill = ""
        if continue_final:
            prefill, messages = messages[-1].content, messages[:-1]
        if tools is not None and fmt == GENERIC:
            messages, template_tools = _generic_messages(messages, tools), None
        tokens, fmt_stop = self._render_chat(messages, template_tools)
        if prefill:
            tokens = tokens + self.tokenize(prefill, add_special=False, parse_special=True)
        stop = tuple(dict.fromkeys([*sampling.stop, *fmt_stop]))
        tool_grammar = None
        if tools is not None:
            assert fmt is not None
            # Markers such as <|python_tag|> or [TOOL_CALLS] may be special tokens: keep
            # their text, the parser needs it.
            sampling = dataclasses.replace(sampling, skip_special_tokens=False)
            try:
                if fmt == GENERIC:
                    tool_grammar = generic_grammar(tools)  # always JSON: a call or a "response"
                elif tools.choice != "auto":
                    tool_grammar = call_grammar(fmt, tools)
            except Exception as e:  # json-schema-to-grammar refuses a schema (an unknown $ref, ...)
                raise InvalidInput(f"no grammar for these tools' JSON schemas: {e}", "tools") from None
        prepared = self._prepare(tokens, sampling, stop, "messages", tool_grammar)
        if tools is not None:
            prepared.tool_format = fmt
            prepared.stop_on_repeat = tools.choice == "required" and tools.parallel
        return prepared

    # --- llama-server's /tokenize, /detokenize, /apply-template -------------------------

    def apply_template(
        self, messages: list[ChatMessage], tools: list[dict[str, Any]] | None = None
    ) -> str:
        """The prompt a chat request with these messages (and tools) evaluates, as text
        (special tokens rendered, a BOS the template did not write included)."""
        if self._tool_format(tools) == GENERIC and tools:
            messages, tools = _generic_messages(messages, ToolRequest(tools, "auto")), None
        tokens, _ = self._render_chat(messages, tools)
        return self.detokenize(tokens)

    def tokenize(self, content: str, add_special: bool, parse_special: bool) -> list[int]:
        return list(self._llama.tokenize(
            content.encode("utf-8"), add_bos=add_special, special=parse_special
        ))

    def piece(self, token: int) -> bytes:
        """A token's bytes, special tokens rendered (may be part of a UTF-8 character)."""
        return bytes(self._llama.detokenize([token], special=True))

    def detokenize(self, tokens: list[int], param: str = "tokens") -> str:
        n_vocab = self._llama.n_vocab()
        for i, t in enumerate(tokens):
            if not 0 <= t < n_vocab:
                raise InvalidInput(
                    f"token id {t} is outside the vocabulary (0..{n_vocab - 1})", f"{param}[{i}]"
                )
        return bytes(self._llama.detokenize(tokens, special=True)).decode("utf-8", errors="replace")

    def prepare_completion(self, prompt: str | list[int], sampling: Sampling) -> Prepared:
        llama = self._llama
        if isinstance(prompt, str):
            tokens = llama.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)
        else:
            n_vocab = llama.n_vocab()
            for i, t in enumerate(prompt):
                if not 0 <= t < n_vocab:
                    raise InvalidInput(
                        f"token id {t} is outside the vocabulary (0..{n_vocab - 1})", f"prompt[{i}]"
                    )
            tokens = list(prompt)
        return self._prepare(tokens, sampling, sampling.stop, "prompt")

    def _prepare(
        self, tokens: list[int], sampling: Sampling, stop: tuple[str, ...], what: str,
        tool_grammar: str | None = None,
    ) -> Prepared:
        llama = self._llama
        n_ctx = self._n_ctx
        if not tokens:
            raise InvalidInput(f"{what} must not be empty", what)
        # Need at least one free slot to generate into.
        if len(tokens) >= n_ctx:
            raise PromptTooLong(len(tokens), n_ctx)
        room = n_ctx - len(tokens)
        max_tokens = min(sampling.max_tokens, room) if sampling.max_tokens else room
        bias: dict[int, float] | None = None
        if sampling.logit_bias:
            n_vocab = llama.n_vocab()
            bias = {}
            for key, value in sampling.logit_bias.items():
                tid = int(key)
                if not 0 <= tid < n_vocab:
                    raise InvalidInput(
                        f"logit_bias token id {tid} is outside the vocabulary (0..{n_vocab - 1})",
                        "logit_bias",
                    )
                bias[tid] = value
        for i, tid in enumerate(sampling.stop_token_ids):
            if tid >= llama.n_vocab():
                raise InvalidInput(
                    f"token id {tid} is outside the vocabulary (0..{llama.n_vocab() - 1})",
                    f"stop_token_ids[{i}]",
                )
        grammar = self._grammar(sampling, tool_grammar)
        # ignore_eos and min_tokens ban every end-of-generation token (listed once per worker).
        eog = self._eog_tokens() if sampling.ignore_eos or sampling.min_tokens else ()
        return Prepared(tokens, sampling, max_tokens, stop, grammar, bias, eog)

    def _eog_tokens(self) -> tuple[int, ...]:
        if self._eog is None:  # two threads may both compute it: the same tuple either way
            vocab = self._llama._model.vocab
            n_vocab = int(llama_lib.llama_vocab_n_tokens(vocab))
            self._eog = tuple(t for t in range(n_vocab) if llama_lib.llama_vocab_is_eog(vocab, t))
        return self._eog

    def _grammar(self, sampling: Sampling, tool_grammar: str | None = None) -> LlamaGrammar | None:
        if tool_grammar is not None:
            param = "tools"
            try:
                grammar = LlamaGrammar.from_string(tool_grammar, verbose=False)
            except Exception as e:
                raise InvalidInput(f"no grammar for these tools' JSON schemas: {e}", param) from None
        elif sampling.grammar is not None:
            param = sampling.constraint_param or "grammar"
            grammar = LlamaGrammar.from_string(sampling.grammar, verbose=False)
        elif sampling.json_schema is not None:
            param = sampling.constraint_param or "response_format.json_schema.schema"
            try:
                grammar = LlamaGrammar.from_json_schema(json.dumps(sampling.json_schema), verbose=False)
            except Exception as e:
                raise InvalidInput(f"unsupported JSON schema: {e}", param) from None
        elif sampling.json_mode:
            param = sampling.constraint_param or "response_format"
            grammar = LlamaGrammar.from_string(JSON_GBNF, verbose=False)
        else:
            return None
        # A grammar llama.cpp cannot parse gives a NULL sampler, which would crash the
        # generation later; try it here, where it is still a client error (a request's own
        # GBNF with a syntax error, an undefined rule or no root rule included).
        vocab = self._llama._model.vocab
        sampler = llama_lib.llama_sampler_init_grammar(
            vocab, grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8")
        )
        if not sampler:
            what = "this grammar (see llama.cpp's GBNF syntax: a root rule, every rule defined)" \
                if sampling.grammar is not None else "a grammar for this schema"
            raise InvalidInput(f"llama.cpp could not parse {what}", param)
        llama_lib.llama_sampler_free(sampler)
        return grammar

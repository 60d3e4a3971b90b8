"""The inference engine: the only module in vram-llm that imports llama_cpp.

Rules for this module:
- server.py reaches the model only through ``Engine``: ``load()``, ``prepare_chat()``,
  ``prepare_completion()`` and ``Generation`` (iterate it for text). The generation loop
  will be rewritten on llama.cpp's low-level API (issue 6) behind this same interface.
- Every method blocks. The server calls ``load()`` in a loader thread, iterates a
  ``Generation`` in its one generation thread, and calls ``prepare_*()`` in a helper
  thread (preparing only renders the template and tokenizes: it reads the vocabulary,
  never the context, so it may overlap a running generation).
- A client mistake that needs the model to detect (a token id out of range, a prompt
  longer than the context, a JSON schema llama.cpp cannot turn into a grammar) raises
  ``InvalidInput`` or ``PromptTooLong``; nothing here knows about HTTP.
"""

from __future__ import annotations

import codecs
import ctypes
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO, cast

import llama_cpp
import llama_cpp._internals
import llama_cpp.llama
import llama_cpp.llama_cpp as llama_lib
import numpy as np
from llama_cpp import llama_chat_format
from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar

from worker.protocol import LLAMA_LOG_PREFIX, AppliedParams, LaunchSpec, is_oom_line

_SPLIT_MODES = {
    "none": llama_lib.LLAMA_SPLIT_MODE_NONE,
    "layer": llama_lib.LLAMA_SPLIT_MODE_LAYER,
    "row": llama_lib.LLAMA_SPLIT_MODE_ROW,
}


class LoadError(Exception):
    """The model could not be loaded (reason in the message)."""


class OutOfMemory(LoadError):
    """Loading failed and llama.cpp logged out-of-memory lines."""


class LoadCancelled(LoadError):
    """Loading was aborted on purpose (the worker is stopping)."""


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


# ggml_log_level in the llama.cpp that llama-cpp-python 0.3.36 vendors.
_LOG_DEBUG = 1
_LOG_CONT = 5  # continues the previous message


class LlamaLog:
    """Receives llama.cpp / ggml log text from any thread.

    Text arrives in fragments (and as CONT continuations), so it is buffered until a
    newline; each whole line goes to ``stream`` with LLAMA_LOG_PREFIX, except DEBUG lines
    (thousands per load: one per tensor). Every line, DEBUG included, is checked for
    out-of-memory messages: the worker's exit code depends on them.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self._buf = ""
        self._buf_level = 0
        self._lock = threading.Lock()
        self.oom_lines: list[str] = []
        # Keep a reference: llama.cpp holds only the raw function pointer.
        self._callback = llama_lib.llama_log_callback(self._on_log)

    def install(self) -> None:
        llama_lib.llama_log_set(self._callback, ctypes.c_void_p(0))

    def _on_log(self, level: int, text: bytes | None, user_data: ctypes.c_void_p) -> None:
        # An exception escaping a ctypes callback is printed and swallowed; never raise.
        try:
            if not text:
                return
            chunk = text.decode("utf-8", errors="replace")
            with self._lock:
                if not self._buf and level != _LOG_CONT:
                    self._buf_level = level
                self._buf += chunk
                if "\n" not in self._buf:
                    return
                *lines, self._buf = self._buf.split("\n")
                for line in lines:
                    self._line(line, self._buf_level)
                if level != _LOG_CONT:
                    self._buf_level = level
        except Exception:
            pass

    def _line(self, line: str, level: int) -> None:
        if is_oom_line(line):
            self.oom_lines.append(line)
        elif level == _LOG_DEBUG:
            return
        stream = self._stream if self._stream is not None else sys.stderr
        stream.write(f"{LLAMA_LOG_PREFIX}{line}\n")
        stream.flush()

    def flush(self) -> None:
        with self._lock:
            if self._buf:
                line, self._buf = self._buf, ""
                self._line(line, self._buf_level)


class _NoRedirect:
    """Replacement for llama_cpp's suppress_stdout_stderr.

    With verbose=False llama-cpp-python dup2()s /dev/null over fds 1 and 2 for the whole
    process while it loads; that would swallow our own log lines (and the HTTP server's)
    from other threads. Our log callback already decides what reaches stderr.
    """

    def __init__(self, disable: bool = True) -> None:
        pass

    def __enter__(self) -> _NoRedirect:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


for _mod in (llama_cpp.llama, llama_cpp._internals, llama_chat_format):
    if hasattr(_mod, "suppress_stdout_stderr"):
        setattr(_mod, "suppress_stdout_stderr", _NoRedirect)


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


@dataclass
class Prepared:
    """A request turned into tokens and sampler settings, ready to generate."""

    tokens: list[int]
    sampling: Sampling
    max_tokens: int
    stop: tuple[str, ...]
    grammar: LlamaGrammar | None
    logit_bias: dict[int, float] | None


@dataclass
class ChatMessage:
    role: str
    content: str
    name: str | None = None
    tool_call_id: str | None = None


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


def _stop_at(text: str, stops: tuple[str, ...]) -> int | None:
    """Index of the earliest stop string in text, or None."""
    best: int | None = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i < best):
            best = i
    return best


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest tail of text that could still become a stop string."""
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:n]):
                hold = n
                break
    return hold


def _sampler_chain(llama: llama_cpp.Llama, prep: Prepared) -> Any:
    """The sampler chain Llama._init_sampler would build, plus logit bias, minus mirostat."""
    s = prep.sampling
    chain = llama_cpp._internals.LlamaSampler()
    if prep.logit_bias:
        chain.add_logit_bias(llama.n_vocab(), prep.logit_bias)
    chain.add_penalties(
        n_vocab=llama.n_vocab(),
        penalty_last_n=llama.last_n_tokens_size,
        penalty_repeat=s.repeat_penalty,
        penalty_freq=s.frequency_penalty,
        penalty_present=s.presence_penalty,
    )
    if prep.grammar is not None:
        chain.add_grammar(llama._model, prep.grammar)
    if s.temperature == 0.0:
        chain.add_greedy()
    else:
        chain.add_top_k(s.top_k)
        chain.add_top_p(s.top_p, 1)
        chain.add_min_p(s.min_p, 1)
        chain.add_temp(s.temperature)
        chain.add_dist(llama._seed)
    return chain


def _prime(llama: llama_cpp.Llama, prompt: list[int]) -> list[int]:
    """Evaluate all prompt tokens but the last, reusing the cached prefix; return the last.

    The last prompt token is always evaluated alone, as its own batch. llama.cpp's CPU
    kernels for a one-token batch and for a larger batch round differently, so letting
    llama-cpp-python's generate() decide (a full batch on a cache miss, one token on a
    full-prefix hit) made the same greedy request give different text depending on the
    previous request.
    """
    head = prompt[:-1]
    cached = llama.input_ids[: llama.n_tokens]
    m = min(len(cached), len(head))
    n = m
    if m:
        diff = np.flatnonzero(cached[:m] != np.asarray(head[:m], dtype=np.intc))
        if len(diff):
            n = int(diff[0])
    if not llama._ctx.kv_cache_seq_rm(-1, n, -1):
        n = 0  # partial removal unsupported (recurrent models): start over
        llama.reset()
    llama.n_tokens = n
    if n < len(head):
        llama.eval(head[n:])
    return prompt[-1:]


class Generation:
    """One request's generation. Iterate it (in the generation thread) for text pieces.

    After iteration: ``finish_reason`` is "stop", "length" or "cancelled";
    ``completion_tokens`` counts sampled tokens (end-of-generation tokens excluded).
    ``last_token_at`` (monotonic) is written per token by the generating thread and read
    by the server's health endpoint; a float store is atomic under the GIL.
    """

    def __init__(self, llama: llama_cpp.Llama, prepared: Prepared, cancel: threading.Event) -> None:
        self._llama = llama
        self._prep = prepared
        self._cancel = cancel
        self.prompt_tokens = len(prepared.tokens)
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.started_at: float | None = None
        self.last_token_at: float | None = None

    def __iter__(self) -> Iterator[str]:
        llama = self._llama
        prep = self._prep
        s = prep.sampling
        vocab = llama._model.vocab
        self.started_at = self.last_token_at = time.monotonic()
        if self._cancel.is_set():
            self.finish_reason = "cancelled"
            return
        # 0xFFFFFFFF is LLAMA_DEFAULT_SEED: llama.cpp picks a random seed.
        llama.set_seed(s.seed & 0xFFFFFFFF if s.seed is not None else llama_lib.LLAMA_DEFAULT_SEED)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        stops = prep.stop
        pending = ""
        cut_at_stop = False
        finish = "stop"  # the token stream ended on its own
        # generate() builds its sampler chain through llama._init_sampler, which can only
        # bias logits through a Python callback over the whole vocabulary (4x slower per
        # token here). We hand it our own chain instead, with llama.cpp's logit-bias sampler.
        sampler = _sampler_chain(llama, prep)
        llama._init_sampler = lambda **_kwargs: sampler  # type: ignore[method-assign]
        tokens: Iterator[int] | None = None
        try:
            tokens = llama.generate(_prime(llama, prep.tokens), reset=False)
            for token in tokens:
                self.last_token_at = time.monotonic()
                if self._cancel.is_set():
                    self.finish_reason = "cancelled"
                    return
                if llama_lib.llama_vocab_is_eog(vocab, token):
                    finish = "stop"
                    break
                self.completion_tokens += 1
                pending += decoder.decode(llama.detokenize([token]))
                if stops:
                    cut = _stop_at(pending, stops)
                    if cut is not None:
                        pending = pending[:cut]
                        finish = "stop"
                        cut_at_stop = True
                        break
                    hold = _held_back(pending, stops)
                    if len(pending) > hold:
                        out = pending[: len(pending) - hold]
                        pending = pending[len(out) :]
                        yield out
                elif pending:
                    yield pending
                    pending = ""
                if self.completion_tokens >= prep.max_tokens:
                    finish = "length"
                    break
        finally:
            if tokens is not None:
                tokens.close()  # type: ignore[attr-defined]
            del llama._init_sampler  # back to the class's method
        if not cut_at_stop:
            # Bytes of an unfinished UTF-8 character at the very end become U+FFFD.
            pending += decoder.decode(b"", final=True)
        if pending:
            yield pending
        self.finish_reason = finish


class Engine:
    """One loaded llama.cpp model. See the module rules for threading."""

    def __init__(self, spec: LaunchSpec, log: LlamaLog) -> None:
        self.spec = spec
        self.log = log
        self.model_id = spec.model_alias or os.path.splitext(os.path.basename(spec.model_path))[0]
        self._llama: llama_cpp.Llama | None = None
        self._abort_load = threading.Event()

    # --- loading -------------------------------------------------------------------

    def abort_load(self) -> None:
        """Ask a running load() to stop at its next progress report."""
        self._abort_load.set()

    def load(self, progress: Callable[[float], None]) -> None:
        """Load the model; raises OutOfMemory, LoadCancelled or LoadError."""
        spec = self.spec

        def on_progress(value: float, _user_data: ctypes.c_void_p) -> bool:
            try:
                progress(float(value))
            except Exception:
                pass
            return not self._abort_load.is_set()  # False aborts the load

        progress_cb = llama_lib.llama_progress_callback(on_progress)
        # Llama() builds its llama_model_params itself and offers no progress hook, so we
        # wrap the default-params factory it calls for the duration of the constructor.
        # Nothing else calls it meanwhile: the load is the only llama.cpp work running.
        original = llama_lib.llama_model_default_params

        def params_with_progress() -> Any:
            params = original()
            params.progress_callback = progress_cb
            return params

        kwargs: dict[str, Any] = {
            "n_gpu_layers": spec.n_gpu_layers,
            "split_mode": _SPLIT_MODES[spec.split_mode],
            "main_gpu": spec.main_gpu,
            "tensor_split": spec.tensor_split,
            "n_ctx": spec.n_ctx,
            "n_batch": spec.n_batch,
            "flash_attn": spec.flash_attn,
            "chat_format": spec.chat_format,
            "verbose": False,
        }
        if spec.n_threads is not None:
            kwargs["n_threads"] = spec.n_threads
            kwargs["n_threads_batch"] = spec.n_threads
        llama_lib.llama_model_default_params = params_with_progress
        try:
            llama = llama_cpp.Llama(spec.model_path, **kwargs)
        except Exception as e:
            self.log.flush()
            if self._abort_load.is_set():
                raise LoadCancelled("model load aborted: the worker is stopping") from None
            if self.log.oom_lines:
                raise OutOfMemory(f"out of memory while loading: {self.log.oom_lines[-1]}") from None
            raise LoadError(f"llama.cpp could not load {spec.model_path}: {e}") from None
        finally:
            llama_lib.llama_model_default_params = original
        self.log.flush()
        self._llama = llama
        progress(1.0)

    def applied_params(self) -> AppliedParams:
        llama = self._require()
        return AppliedParams(
            model_path=self.spec.model_path,
            n_gpu_layers=self.spec.n_gpu_layers,
            tensor_split=self.spec.tensor_split,
            split_mode=self.spec.split_mode,
            main_gpu=self.spec.main_gpu,
            n_ctx=llama.n_ctx(),
            n_batch=llama.n_batch,
            n_threads=llama.n_threads,
            chat_format=llama.chat_format,
            cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
            cuda_device_order=os.environ.get("CUDA_DEVICE_ORDER"),
            llama_cpp_version=llama_cpp.__version__,
            gpu_offload_supported=bool(llama_lib.llama_supports_gpu_offload()),
        )

    def close(self) -> None:
        if self._llama is not None:
            self._llama.close()
            self._llama = None

    def _require(self) -> llama_cpp.Llama:
        if self._llama is None:
            raise RuntimeError("the model is not loaded")
        return self._llama

    # --- preparing requests ----------------------------------------------------------

    def prepare_chat(self, messages: list[ChatMessage], sampling: Sampling) -> Prepared:
        llama = self._require()
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
            dicts.append(d)
        try:
            handler(llama=cast(Any, _CaptureLlama(llama)), messages=cast(Any, dicts), stream=False)
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
        stop = tuple(dict.fromkeys([*sampling.stop, *fmt_stop]))
        return self._prepare(list(prompt), sampling, stop, "messages")

    def prepare_completion(self, prompt: str | list[int], sampling: Sampling) -> Prepared:
        llama = self._require()
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
        self, tokens: list[int], sampling: Sampling, stop: tuple[str, ...], what: str
    ) -> Prepared:
        llama = self._require()
        n_ctx = llama.n_ctx()
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
        grammar = self._grammar(sampling)
        return Prepared(tokens, sampling, max_tokens, stop, grammar, bias)

    def _grammar(self, sampling: Sampling) -> LlamaGrammar | None:
        if sampling.json_schema is not None:
            param = "response_format.json_schema.schema"
            try:
                grammar = LlamaGrammar.from_json_schema(json.dumps(sampling.json_schema), verbose=False)
            except Exception as e:
                raise InvalidInput(f"unsupported JSON schema: {e}", param) from None
        elif sampling.json_mode:
            param = "response_format"
            grammar = LlamaGrammar.from_string(JSON_GBNF, verbose=False)
        else:
            return None
        # A grammar llama.cpp cannot parse gives a NULL sampler, which would crash the
        # generation later; try it here, where it is still a client error.
        vocab = self._require()._model.vocab
        sampler = llama_lib.llama_sampler_init_grammar(
            vocab, grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8")
        )
        if not sampler:
            raise InvalidInput("llama.cpp could not compile a grammar for this schema", param)
        llama_lib.llama_sampler_free(sampler)
        return grammar

    # --- generating --------------------------------------------------------------------

    def generation(self, prepared: Prepared, cancel: threading.Event) -> Generation:
        """A generation to iterate in the generation thread (never two at once)."""
        return Generation(self._require(), prepared, cancel)

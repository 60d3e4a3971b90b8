"""The inference engine: the only module in vram-llm that imports llama_cpp.

Rules for this module:
- server.py reaches the model only through ``Engine``: ``load()``, ``prepare_chat()``,
  ``prepare_completion()`` and ``Generation`` (iterate it for text).
- ``Llama`` is used to load the model, render chat templates and tokenize. Generation
  does not go through its Python loop: it calls llama.cpp's C API directly
  (``llama_decode`` on a reused ``llama_batch``, a ``llama_sampler`` chain per request,
  ``llama_token_to_piece`` once per vocabulary entry) so the per-token Python work is a
  few calls and no copy of the logits.
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
import functools
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
    # Extensions of llama-server and vLLM (README "Request extensions"):
    typical_p: float = 1.0  # locally typical sampling; 1.0 = off
    ignore_eos: bool = False  # end-of-generation tokens are never sampled
    min_tokens: int = 0  # end-of-generation, stop_token_ids and stop strings wait this long
    stop_token_ids: tuple[int, ...] = ()  # these tokens end the generation like EOS
    include_stop_str_in_output: bool = False  # the matched stop string / stop token is kept
    skip_special_tokens: bool = True  # False: special tokens' text is part of the output
    cache_prompt: bool = True  # False: reuse no cached prefix for this request


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


def _stop_end(text: str, stops: tuple[str, ...], at: int) -> int:
    """Where the longest stop string that starts at ``at`` in text ends."""
    return at + max(len(s) for s in stops if text.startswith(s, at))


def _held_back(text: str, stops: tuple[str, ...], prefix_chars: frozenset[str]) -> int:
    """Length of the longest tail of text that could still become a stop string.

    ``prefix_chars`` holds every character of every stop string but its last: a tail that
    is a proper prefix of a stop string ends in one of them, so most pieces are passed
    with one set lookup.
    """
    if not text or text[-1] not in prefix_chars:
        return 0
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:n]):
                hold = n
                break
    return hold


class _Cache:
    """The context's KV cache, used as one sequence (seq 0), and the tokens it holds.

    Only the generation thread uses it (one generation at a time). ``tokens`` always
    mirrors the KV cache: every decode appends what it stored, and any failure clears
    both, so the next request's prefix match can trust it.
    """

    def __init__(self, llama: llama_cpp.Llama) -> None:
        self.ctx = llama._ctx.ctx
        self.vocab = llama._model.vocab
        self.n_vocab = int(llama_lib.llama_vocab_n_tokens(self.vocab))
        self.mem = llama_lib.llama_get_memory(self.ctx)
        self.n_batch = int(llama_lib.llama_n_batch(self.ctx))
        self.tokens: list[int] = []
        self.batch = llama_lib.llama_batch_init(self.n_batch, 0, 1)
        # Every slot belongs to sequence 0 and only that: set once, never rewritten.
        for i in range(self.n_batch):
            self.batch.n_seq_id[i] = 1
            self.batch.seq_id[i][0] = 0
        # token id -> its UTF-8 bytes; the vocabulary is fixed, so each piece is asked
        # of llama.cpp once per worker, not once per generated token.
        self._pieces: dict[int, bytes] = {}
        self._special_pieces: dict[int, bytes] = {}  # the same, special tokens rendered
        self._piece_buf = ctypes.create_string_buffer(256)

    def close(self) -> None:
        llama_lib.llama_batch_free(self.batch)

    def clear(self) -> None:
        llama_lib.llama_memory_clear(self.mem, True)
        self.tokens.clear()

    def keep_prefix(self, prompt: list[int]) -> int:
        """Drop what the cache holds after its common prefix with prompt; return its length."""
        cached = self.tokens
        n = 0
        m = min(len(cached), len(prompt))
        while n < m and cached[n] == prompt[n]:
            n += 1
        if n < len(cached):
            if not llama_lib.llama_memory_seq_rm(self.mem, 0, n, -1):
                self.clear()  # partial removal unsupported (recurrent models): start over
                return 0
            del cached[n:]
        return n

    def decode(self, tokens: list[int], logits: bool) -> None:
        """Append tokens (at most n_batch) to the sequence; logits for the last if asked."""
        batch = self.batch
        n = len(tokens)
        pos0 = len(self.tokens)
        if n == 1:
            batch.token[0] = tokens[0]
            batch.pos[0] = pos0
        else:
            ctypes.memmove(batch.token, (llama_lib.llama_token * n)(*tokens), 4 * n)
            ctypes.memmove(batch.pos, (llama_lib.llama_pos * n)(*range(pos0, pos0 + n)), 4 * n)
            ctypes.memset(batch.logits, 0, n)
        batch.logits[n - 1] = logits
        batch.n_tokens = n
        rc = llama_lib.llama_decode(self.ctx, batch)
        if rc != 0:
            # Some ubatches may have landed in the KV cache: forget all of it.
            self.clear()
            raise RuntimeError(f"llama_decode failed (code {rc}) at position {pos0}")
        self.tokens.extend(tokens)

    def piece(self, token: int, special: bool = False) -> bytes:
        """A token's text; a special (control) token's is empty unless ``special``."""
        pieces = self._special_pieces if special else self._pieces
        piece = pieces.get(token)
        if piece is None:
            buf = self._piece_buf
            n = llama_lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
            if n < 0:  # longer than the buffer: -n is the size it needs
                buf = ctypes.create_string_buffer(-n)
                n = llama_lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
            piece = pieces[token] = buf.raw[:n]
        return piece


def _sampler_chain(cache: _Cache, prep: Prepared, seed: int) -> Any:
    """A llama.cpp sampler chain for one request (the caller frees it).

    The order is the one llama-cpp-python's Llama.generate used (logit bias, penalties,
    grammar, then greedy or top-k/top-p/min-p/temperature/seeded draw), so outputs match
    the worker's earlier ones. Every step runs in C over the logits llama.cpp holds: no
    per-token copy of the vocabulary's logits into Python.
    """
    s = prep.sampling
    params = llama_lib.llama_sampler_chain_default_params()
    params.no_perf = True
    chain = llama_lib.llama_sampler_chain_init(params)
    add = llama_lib.llama_sampler_chain_add
    if s.min_tokens > 0:
        # min_tokens: end-of-generation and stop_token_ids are banned by the chain's FIRST
        # sampler, which Generation._tokens removes (chain index 0) once min_tokens exist.
        add(chain, _ban(cache, (*prep.eog_tokens, *s.stop_token_ids)))
    if s.ignore_eos:
        # ignore_eos: end-of-generation tokens are never sampled, as llama-server does.
        add(chain, _ban(cache, prep.eog_tokens))
    if prep.logit_bias:
        bias = (llama_lib.llama_logit_bias * len(prep.logit_bias))()
        for i, (token, value) in enumerate(prep.logit_bias.items()):
            bias[i].token = token  # type: ignore[assignment]  # ctypes converts the int
            bias[i].bias = value
        add(chain, llama_lib.llama_sampler_init_logit_bias(cache.n_vocab, len(bias), bias))
    if (s.repeat_penalty, s.frequency_penalty, s.presence_penalty) != (1.0, 0.0, 0.0):
        # Neutral penalties change nothing; the sampler would still scan every candidate.
        add(chain, llama_lib.llama_sampler_init_penalties(
            cache.n_vocab, _PENALTY_LAST_N, s.repeat_penalty, s.frequency_penalty, s.presence_penalty
        ))
    if prep.grammar is not None:
        grammar = llama_lib.llama_sampler_init_grammar(
            cache.vocab, prep.grammar._grammar.encode("utf-8"), prep.grammar._root.encode("utf-8")
        )
        if not grammar:  # prepare() compiled it once already; this would be a llama.cpp bug
            llama_lib.llama_sampler_free(chain)
            raise RuntimeError("llama.cpp could not compile the request's grammar")
        add(chain, grammar)
    if s.temperature == 0.0:
        add(chain, llama_lib.llama_sampler_init_greedy())
    else:
        add(chain, llama_lib.llama_sampler_init_top_k(s.top_k))
        if s.typical_p < 1.0:  # typical_p: after top-k, as in llama.cpp's default order
            add(chain, llama_lib.llama_sampler_init_typical(s.typical_p, 1))
        add(chain, llama_lib.llama_sampler_init_top_p(s.top_p, 1))
        add(chain, llama_lib.llama_sampler_init_min_p(s.min_p, 1))
        add(chain, llama_lib.llama_sampler_init_temp(s.temperature))
        add(chain, llama_lib.llama_sampler_init_dist(seed))
    return chain


def _ban(cache: _Cache, tokens: tuple[int, ...]) -> Any:
    """A logit-bias sampler that makes ``tokens`` impossible (-inf, as llama-server does)."""
    bias = (llama_lib.llama_logit_bias * max(1, len(tokens)))()
    for i, token in enumerate(tokens):
        bias[i].token = token  # type: ignore[assignment]  # ctypes converts the int
        bias[i].bias = float("-inf")
    return llama_lib.llama_sampler_init_logit_bias(cache.n_vocab, len(tokens), bias)


# Llama.last_n_tokens_size: how many recent tokens the repetition penalties look at.
_PENALTY_LAST_N = 64


class Generation:
    """One request's generation. Iterate it (in the generation thread) for text pieces.

    After iteration: ``finish_reason`` is "stop", "length" or "cancelled";
    ``completion_tokens`` counts sampled tokens (end-of-generation tokens excluded) and
    ``token_ids`` lists them.
    ``prompt_cached`` counts prompt tokens reused from the previous requests' KV cache;
    ``prompt_evaluated`` counts prompt tokens in the KV cache so far (cached ones
    included). ``last_token_at`` (monotonic) is written per token and per prompt chunk by
    the generating thread and read by the server's health endpoint; a float store is
    atomic under the GIL.
    """

    def __init__(self, cache: _Cache, prepared: Prepared, cancel: threading.Event) -> None:
        self._cache = cache
        self._prep = prepared
        self._cancel = cancel
        self.prompt_tokens = len(prepared.tokens)
        self.prompt_cached = 0
        self.prompt_evaluated = 0
        self.completion_tokens = 0
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self.started_at: float | None = None
        self.last_token_at: float | None = None

    def _prefill(self) -> bool:
        """Put the prompt in the KV cache, reusing the cached prefix; False if cancelled.

        The head (all but the last prompt token) goes in chunks of at most n_batch, with a
        cancel check between chunks. The last prompt token is always decoded alone, as its
        own batch, whatever was cached: llama.cpp's CPU kernels round a one-token batch and
        a larger batch differently, so producing the first logits from a batch whose size
        depends on the cache made the same greedy request give different text depending on
        the previous request.
        """
        cache = self._cache
        prompt = self._prep.tokens
        head = prompt[:-1]
        # cache_prompt false: keep no prefix, the whole prompt is evaluated again.
        n = cache.keep_prefix(head if self._prep.sampling.cache_prompt else [])
        self.prompt_cached = self.prompt_evaluated = n
        step = cache.n_batch
        while n < len(head):
            if self._cancel.is_set():
                return False
            chunk = head[n : n + step]
            cache.decode(chunk, logits=False)
            n += len(chunk)
            self.prompt_evaluated = n
            self.last_token_at = time.monotonic()
        if self._cancel.is_set():
            return False
        cache.decode(prompt[-1:], logits=True)
        self.prompt_evaluated = len(prompt)
        return True

    def __iter__(self) -> Iterator[str]:
        cache = self._cache
        prep = self._prep
        cancel = self._cancel
        self.started_at = self.last_token_at = time.monotonic()
        if cancel.is_set():
            self.finish_reason = "cancelled"
            return
        s = prep.sampling
        # 0xFFFFFFFF is LLAMA_DEFAULT_SEED: llama.cpp picks a random seed.
        seed = s.seed & 0xFFFFFFFF if s.seed is not None else llama_lib.LLAMA_DEFAULT_SEED
        chain = _sampler_chain(cache, prep, seed)
        try:
            if not self._prefill():
                self.finish_reason = "cancelled"
                return
            yield from self._tokens(chain)
        finally:
            llama_lib.llama_sampler_free(chain)

    def _tokens(self, chain: Any) -> Iterator[str]:
        cache = self._cache
        prep = self._prep
        cancel = self._cancel
        # Hot loop: one sample, one piece lookup, one incremental UTF-8 decode and one
        # one-token decode per token; everything else is skipped when not needed.
        sample = llama_lib.llama_sampler_sample
        is_eog = llama_lib.llama_vocab_is_eog
        monotonic = time.monotonic
        ctx = cache.ctx
        vocab = cache.vocab
        piece = cache.piece
        decode = cache.decode
        s = prep.sampling
        if not s.skip_special_tokens:  # skip_special_tokens false: control tokens have text
            piece = functools.partial(cache.piece, special=True)
        min_tokens = s.min_tokens  # stop strings are not looked for before this many tokens
        stop_ids = frozenset(s.stop_token_ids)
        include_stop = s.include_stop_str_in_output
        token_ids = self.token_ids
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        utf8 = decoder.decode
        stops = prep.stop
        prefix_chars = frozenset(c for s in stops for c in s[:-1])
        max_tokens = prep.max_tokens
        pending = ""  # text held back: it may be the start of a stop string
        finish = "stop"  # the token stream ended on its own
        n = 0
        while True:
            token = sample(chain, ctx, -1)
            self.last_token_at = monotonic()
            if cancel.is_set():
                self.finish_reason = "cancelled"
                return
            if is_eog(vocab, token) or token in stop_ids:
                if include_stop and token in stop_ids:  # the stop token is kept, and counted
                    n += 1
                    self.completion_tokens = n
                    token_ids.append(token)
                    pending += utf8(piece(token))
                break
            n += 1
            self.completion_tokens = n
            token_ids.append(token)
            if n == min_tokens:
                # min_tokens reached: drop the ban at the head of the chain (_sampler_chain).
                llama_lib.llama_sampler_free(llama_lib.llama_sampler_chain_remove(chain, 0))
            text = utf8(piece(token))
            if stops and n >= min_tokens:
                pending += text
                cut = _stop_at(pending, stops)
                if cut is not None:
                    if include_stop:  # the matched stop string is part of the output
                        cut = _stop_end(pending, stops, cut)
                    if cut:
                        yield pending[:cut]
                    self.finish_reason = "stop"
                    return
                hold = _held_back(pending, stops, prefix_chars)
                if len(pending) > hold:
                    yield pending[: len(pending) - hold]
                    pending = pending[len(pending) - hold :]
            elif text:
                yield text
            if n >= max_tokens:
                finish = "length"
                break
            decode([token], True)
        # Bytes of an unfinished UTF-8 character at the very end become U+FFFD.
        pending += utf8(b"", True)
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
        self._cache: _Cache | None = None
        self._abort_load = threading.Event()
        self._eog: tuple[int, ...] | None = None  # end-of-generation token ids, once needed

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
        # Generation drives the context itself (llama_decode + a sampler chain); the
        # Llama object's own token bookkeeping (n_tokens, input_ids) is never used.
        self._cache = _Cache(llama)
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
        if self._cache is not None:
            self._cache.close()
            self._cache = None
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
        for i, tid in enumerate(sampling.stop_token_ids):
            if tid >= llama.n_vocab():
                raise InvalidInput(
                    f"token id {tid} is outside the vocabulary (0..{llama.n_vocab() - 1})",
                    f"stop_token_ids[{i}]",
                )
        grammar = self._grammar(sampling)
        # ignore_eos and min_tokens ban every end-of-generation token (listed once per worker).
        eog = self._eog_tokens() if sampling.ignore_eos or sampling.min_tokens else ()
        return Prepared(tokens, sampling, max_tokens, stop, grammar, bias, eog)

    def _eog_tokens(self) -> tuple[int, ...]:
        if self._eog is None:  # two threads may both compute it: the same tuple either way
            vocab = self._require()._model.vocab
            n_vocab = int(llama_lib.llama_vocab_n_tokens(vocab))
            self._eog = tuple(t for t in range(n_vocab) if llama_lib.llama_vocab_is_eog(vocab, t))
        return self._eog

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
        self._require()
        assert self._cache is not None  # set together with _llama
        return Generation(self._cache, prepared, cancel)

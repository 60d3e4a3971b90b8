"""One request's generation: its counters and ALL of its per-token processing.

Rules for this module:
- ``Generation`` is the one place that turns a sampled token into output: sampling from
  its own row of the batch's logits with its own sampler (chains.py), the end-of-generation
  check, the incremental UTF-8 decoder, stop strings, ``max_tokens`` and the finish
  reason. The batch loop (batch.py) never looks inside a token; a per-token feature
  belongs here.
- Only the batch loop thread calls ``begin``, ``next_token`` and ``end`` (it owns the
  llama.cpp context). Other threads read the counters (a str/int/float store is atomic
  under the GIL) and set ``cancel``.
- Output leaves through a ``Sink``, called on the loop thread: ``started`` when the
  request gets a slot, ``piece`` per text piece, ``ended`` exactly once at the end
  (``finish_reason`` and ``error`` are set before it).
"""

from __future__ import annotations

import codecs
import ctypes
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, Protocol

import llama_cpp.llama_cpp as llama_lib
import numpy as np

from worker.engine.chains import Argmax, Chain, make_sampler
from worker.engine.prompt import Prepared
from worker.engine.stops import _held_back, _stop_at, _stop_end

# OpenAI's floor for a log-probability (JSON has no -Infinity).
_MIN_LOGPROB = -9999.0


class TokenLogprob(NamedTuple):
    """A sampled token's log-probability and the top alternatives (bytes, logprob)."""

    piece: bytes
    logprob: float
    top: list[tuple[bytes, float]]


def log_softmax_row(ctx: Any, row: int, n_vocab: int) -> Any:
    """The log-softmax of batch row ``row``'s raw logits (before any sampler), as float64."""
    logits = np.ctypeslib.as_array(llama_lib.llama_get_logits_ith(ctx, row), shape=(n_vocab,))
    x = logits.astype(np.float64)
    m = x.max()
    return x - (m + np.log(np.exp(x - m).sum()))


class Sink(Protocol):
    def started(self) -> None: ...

    def piece(self, text: str) -> None: ...

    def ended(self) -> None: ...


class Pieces:
    """token id -> its UTF-8 bytes, asked of llama.cpp once per token id per worker.

    Used by the loop thread only (the buffer is shared).
    """

    def __init__(self, vocab: Any) -> None:
        self.vocab = vocab
        self.n_vocab = int(llama_lib.llama_vocab_n_tokens(vocab))
        self._pieces: dict[int, bytes] = {}
        self._special_pieces: dict[int, bytes] = {}  # the same, special tokens rendered
        self._buf = ctypes.create_string_buffer(256)

    def piece(self, token: int, special: bool = False) -> bytes:
        """A token's text; a special (control) token's is empty unless ``special``."""
        pieces = self._special_pieces if special else self._pieces
        piece = pieces.get(token)
        if piece is None:
            buf = self._buf
            n = llama_lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
            if n < 0:  # longer than the buffer: -n is the size it needs
                buf = ctypes.create_string_buffer(-n)
                n = llama_lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
            piece = pieces[token] = buf.raw[:n]
        return piece


_END = object()


class _QueueSink:
    """Hands pieces to a thread iterating the generation (tests, benches)."""

    def __init__(self) -> None:
        self.queue: queue.SimpleQueue[object] = queue.SimpleQueue()

    def started(self) -> None:
        pass

    def piece(self, text: str) -> None:
        self.queue.put(text)

    def ended(self) -> None:
        self.queue.put(_END)


class Generation:
    """One request's generation.

    After it ended: ``finish_reason`` is "stop", "length" or "cancelled" (or None with
    ``error`` set when the engine failed it); ``completion_tokens`` counts sampled tokens
    (end-of-generation tokens excluded) and ``token_ids`` lists them. ``prompt_cached`` counts prompt tokens reused
    from a slot's KV cache; ``prompt_evaluated`` counts prompt tokens in the KV cache so
    far (cached ones included). ``last_token_at`` (monotonic) is written per token and
    per prompt chunk.

    Iterating it (from any thread but the loop's) submits it and yields its text pieces;
    the server uses ``Engine.start`` with its own sink instead.
    """

    def __init__(
        self,
        prepared: Prepared,
        cancel: threading.Event,
        pieces: Pieces,
        submit: Callable[[Generation, Sink], None],
    ) -> None:
        self.prepared = prepared
        self.cancel = cancel
        self._pieces = pieces
        self._submit = submit
        self.sink: Sink | None = None
        self.prompt_tokens = len(prepared.tokens)
        self.prompt_cached = 0
        self.prompt_evaluated = 0
        self.completion_tokens = 0
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] = []  # one per token_ids entry, when asked
        self.finish_reason: str | None = None
        self.stop_string: str | None = None  # the stop string that ended it (Anthropic's stop_sequence)
        self.error: str | None = None
        self.error_status = 500  # HTTP status the server gives ``error``
        self.started_at: float | None = None
        self.last_token_at: float | None = None
        self.done = False
        # A state the prompt-cache thread read from disk for this request (tokens, bytes);
        # taken by the batch loop when it admits the request.
        self.from_disk: tuple[list[int], bytearray] | None = None
        self._sampler: Chain | Argmax | None = None
        self._pending = ""  # text held back: it may be the start of a stop string
        self._utf8: Callable[..., str] = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
        stops = prepared.stop
        self._prefix_chars = frozenset(c for s in stops for c in s[:-1])
        s = prepared.sampling
        self._special = not s.skip_special_tokens  # control tokens have text
        self._stop_ids = frozenset(s.stop_token_ids)

    # --- any thread ---

    def __iter__(self) -> Iterator[str]:
        sink = _QueueSink()
        self._submit(self, sink)
        get = sink.queue.get
        try:
            while True:
                item = get()
                if item is _END:
                    break
                yield item  # type: ignore[misc]
        finally:
            if not self.done:
                self.cancel.set()  # the consumer stopped early: free the slot
        if self.error is not None:
            raise RuntimeError(self.error)

    # --- the loop thread ---

    def begin(self) -> None:
        """The request got a slot: build its sampler (chains.py)."""
        s = self.prepared.sampling
        # 0xFFFFFFFF is LLAMA_DEFAULT_SEED: llama.cpp picks a random seed.
        seed = s.seed & 0xFFFFFFFF if s.seed is not None else llama_lib.LLAMA_DEFAULT_SEED
        self._sampler = make_sampler(self._pieces.vocab, self._pieces.n_vocab, self.prepared, seed)
        self.started_at = self.last_token_at = time.monotonic()
        if self.sink is not None:
            self.sink.started()

    def next_token(self, ctx: Any, row: int) -> int | None:
        """Sample this request's token from batch row ``row`` and emit its text.

        Returns the token to decode next, or None when the generation finished (then
        ``finish_reason`` is set; the caller calls ``end``).
        """
        assert self._sampler is not None
        token = self._sampler.sample(ctx, row)
        self.last_token_at = time.monotonic()
        s = self.prepared.sampling
        # Sampling reads the row without changing it: these are the raw logits' values.
        lp = self._logprob(ctx, row, token, s.logprobs) if s.logprobs is not None else None
        sink = self.sink
        if token in self._stop_ids or llama_lib.llama_vocab_is_eog(self._pieces.vocab, token):
            if s.include_stop_str_in_output and token in self._stop_ids:
                # The stop token is kept and counted; end() flushes its text.
                self.completion_tokens += 1
                self.token_ids.append(token)
                if lp is not None:
                    self.logprobs.append(lp)
                self._pending += self._utf8(self._pieces.piece(token, self._special))
            self.finish_reason = "stop"
            return None
        n = self.completion_tokens = self.completion_tokens + 1
        self.token_ids.append(token)
        if lp is not None:
            self.logprobs.append(lp)
        if n == s.min_tokens:
            self._sampler.min_tokens_reached()  # end-of-generation and stop ids are allowed now
        text = self._utf8(self._pieces.piece(token, self._special))
        stops = self.prepared.stop
        if stops and n >= s.min_tokens:
            pending = self._pending + text
            cut = _stop_at(pending, stops)
            if cut is not None:
                self.stop_string = next((x for x in stops if pending.startswith(x, cut)), None)
                if s.include_stop_str_in_output:  # the matched stop string is part of the output
                    cut = _stop_end(pending, stops, cut)
                if cut and sink is not None:
                    sink.piece(pending[:cut])
                self._pending = ""
                self.finish_reason = "stop_string"
                return None
            hold = _held_back(pending, stops, self._prefix_chars)
            if len(pending) > hold:
                if sink is not None:
                    sink.piece(pending[: len(pending) - hold])
                pending = pending[len(pending) - hold :]
            self._pending = pending
        elif text and sink is not None:  # (before min_tokens no stop string is looked for)
            sink.piece(text)
        if n >= self.prepared.max_tokens:
            self.finish_reason = "length"
            return None
        return token

    def _logprob(self, ctx: Any, row: int, token: int, top: int) -> TokenLogprob:
        """Only for requests that ask: the others never pay for the row's log-softmax."""
        lsm = log_softmax_row(ctx, row, self._pieces.n_vocab)
        piece = self._pieces.piece
        best: list[tuple[bytes, float]] = []
        if top:
            ids = np.argpartition(-lsm, top)[:top]
            ids = ids[np.argsort(-lsm[ids], kind="stable")]
            best = [(piece(int(t), True), max(float(lsm[t]), _MIN_LOGPROB)) for t in ids]
        return TokenLogprob(piece(token, True), max(float(lsm[token]), _MIN_LOGPROB), best)

    def end(self, reason: str | None = None, error: str | None = None, status: int = 500) -> None:
        """Finish (once): flush held-back text if the stream ended on its own, tell the sink."""
        if self.done:
            return
        if reason is not None:
            self.finish_reason = reason
        if error is not None:
            self.error, self.error_status, self.finish_reason = error, status, None
        if self.finish_reason == "stop_string":
            self.finish_reason = "stop"  # the text up to the stop string is out already
        elif self.finish_reason in ("stop", "length") and self.error is None:
            # Bytes of an unfinished UTF-8 character at the very end become U+FFFD.
            pending = self._pending + self._utf8(b"", True)
            self._pending = ""
            if pending and self.sink is not None:
                self.sink.piece(pending)
        if self._sampler is not None:
            self._sampler.free()
            self._sampler = None
        self.done = True
        if self.sink is not None:
            self.sink.ended()

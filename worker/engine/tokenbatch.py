"""The ``llama_batch`` a batch step fills: token runs of one sequence each, written with
``memmove`` (a Python loop per prompt token cost more than the step's own bookkeeping).
Used by the batch loop's thread only."""

from __future__ import annotations

import ctypes
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import llama_cpp.llama_cpp as llama_lib

from worker.engine.scheduler import StepCost

log = logging.getLogger("worker")

_CALIBRATION_CONTEXT = 256  # tokens of context the drafts' rows are timed behind


class TokenBatch:
    def __init__(self, n_batch: int) -> None:
        self.capacity = n_batch
        batch = self.batch = llama_lib.llama_batch_init(n_batch, 0, 1)
        for i in range(n_batch):
            batch.n_seq_id[i] = 1
        self._token_addr = ctypes.addressof(batch.token.contents)
        self._pos_addr = ctypes.addressof(batch.pos.contents)
        self._logits_addr = ctypes.addressof(batch.logits.contents)
        self.n = 0

    def clear(self) -> None:
        self.n = 0

    def add(self, seq: int, tokens: Sequence[int], pos0: int, logits: bool) -> int:
        """Append ``tokens`` of sequence ``seq`` at positions pos0.. (with logits or none);
        returns the batch index of the first."""
        i, take = self.n, len(tokens)
        assert i + take <= self.capacity
        ctypes.memmove(self._token_addr + 4 * i, (ctypes.c_int32 * take)(*tokens), 4 * take)
        ctypes.memmove(self._pos_addr + 4 * i, (ctypes.c_int32 * take)(*range(pos0, pos0 + take)), 4 * take)
        ctypes.memset(self._logits_addr + i, 1 if logits else 0, take)
        seq_id = self.batch.seq_id
        for j in range(i, i + take):
            seq_id[j][0] = seq
        self.n = i + take
        return i

    def decode(self, ctx: Any) -> int:
        self.batch.n_tokens = self.n
        return int(llama_lib.llama_decode(ctx, self.batch))

    def free(self) -> None:
        llama_lib.llama_batch_free(self.batch)


def time_rows(ctx: Any, batch: TokenBatch, rows: int, token: int, pos0: int) -> float:
    """Seconds of one decode step of ``rows`` rows with logits on sequence 0 at positions
    pos0.., what sequence 0 held before staying as it was. For the scheduler's row cost,
    measured at load, before any request."""
    batch.clear()
    batch.add(0, [token] * rows, pos0, True)
    t0 = time.perf_counter()
    rc = batch.decode(ctx)
    took = time.perf_counter() - t0
    llama_lib.llama_memory_seq_rm(llama_lib.llama_get_memory(ctx), 0, pos0, -1)
    batch.clear()
    if rc != 0:
        raise RuntimeError(f"llama_decode failed (code {rc}) while timing {rows} rows")
    return took


def calibrate_drafts(ctx: Any, batch: TokenBatch, cost: StepCost) -> None:
    """What a drafted row costs here (in ``cost``, for ``StepCost.draft_threshold``), timed
    once before the first request."""
    model = llama_lib.llama_get_model(ctx)
    if batch.capacity > 1:
        # Timed behind a context of some length, as drafts are: on a CPU the rows' attention
        # over the context is part of their cost (at position 0 a second row looked free).
        many = min(8, batch.capacity)
        bos = max(0, llama_lib.llama_vocab_bos(llama_lib.llama_model_get_vocab(model)))
        context = min(_CALIBRATION_CONTEXT, batch.capacity, int(llama_lib.llama_n_ctx_seq(ctx)) - many)
        batch.clear()
        batch.add(0, [bos] * context, 0, False)
        if batch.decode(ctx) != 0:
            raise RuntimeError("llama_decode failed while timing the drafts' rows")
        try:
            # The best of three, the row counts taking turns: a load elsewhere on the machine
            # (another worker loading) slows all three alike rather than one of them.
            best = dict.fromkeys((1, 2, many), float("inf"))
            for _ in range(3):
                for rows in best:
                    best[rows] = min(best[rows], time_rows(ctx, batch, rows, bos, context))
            cost.calibrated(best[1], best[2], best[many], many)
        finally:
            llama_lib.llama_memory_seq_rm(llama_lib.llama_get_memory(ctx), 0, -1, -1)
            batch.clear()


def logits_batch_invariant(ctx: Any, batch: TokenBatch) -> bool:
    """Whether a prompt's last token gives the same logits, bit for bit, read in one batch
    with the prompt's last chunk as read alone after it: behind a context of 64 tokens,
    with chunks of 1, 7 and 31 tokens. On two CPU cores with flash attention it does;
    without it one logit differed by 0.33 (and GPU kernels change with a batch's size).
    Measured once at load, on the loop's thread, before any request; what sequence 0
    held is removed."""
    vocab = llama_lib.llama_model_get_vocab(llama_lib.llama_get_model(ctx))
    n_vocab = int(llama_lib.llama_vocab_n_tokens(vocab))
    mem = llama_lib.llama_get_memory(ctx)
    cells = int(llama_lib.llama_n_ctx_seq(ctx))
    context = min(64, batch.capacity, cells // 2)
    tokens = [max(0, llama_lib.llama_vocab_bos(vocab))] + [(7 * i + 100) % n_vocab for i in range(1, context + 33)]

    def last_row(chunk: int, together: bool) -> bytes | None:
        # The context stays in the cache; what followed it is removed (a recurrent state
        # cannot be cut: no merge then).
        if not llama_lib.llama_memory_seq_rm(mem, 0, context, -1):
            return None
        last = tokens[context + chunk]
        batch.clear()
        batch.add(0, tokens[context : context + chunk], context, False)
        if together:
            batch.add(0, [last], context + chunk, True)
        elif batch.decode(ctx) != 0:
            return None
        else:
            batch.clear()
            batch.add(0, [last], context + chunk, True)
        if batch.decode(ctx) != 0:
            return None
        return ctypes.string_at(llama_lib.llama_get_logits_ith(ctx, batch.n - 1), 4 * n_vocab)

    try:
        llama_lib.llama_memory_seq_rm(mem, 0, -1, -1)
        batch.clear()
        batch.add(0, tokens[:context], 0, False)  # read once: the trials differ after it
        if context < 1 or batch.decode(ctx) != 0:
            return False
        for chunk in sorted({min(c, batch.capacity - 1, cells - context - 1) for c in (1, 7, 31)}):
            if chunk < 1:
                return False
            together = last_row(chunk, True)
            if together is None or together != last_row(chunk, False):
                return False
        return True
    finally:
        llama_lib.llama_memory_seq_rm(mem, 0, -1, -1)
        batch.clear()


def calibrate(ctx: Any, batch: TokenBatch, cost: StepCost, drafts: bool, done: threading.Event) -> bool:
    """The load-time measures, before the first request: the drafts' row cost (when they
    are on) and whether a prompt's last token may go with its last chunk (the answer).
    ``done`` is set when they are over, whatever happened. A failure is logged, never
    raised: it would end the loop's thread, and every request would wait for it forever;
    the drafts then keep their guessed threshold and the last token is read alone."""
    try:
        if drafts:
            calibrate_drafts(ctx, batch, cost)
        return logits_batch_invariant(ctx, batch)
    except Exception:
        log.exception("the batch loop's load-time measures failed; drafts and prompts use their defaults")
        return False
    finally:
        done.set()

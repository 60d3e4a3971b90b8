"""The ``llama_batch`` a batch step fills: token runs of one sequence each, written with
``memmove`` (a Python loop per prompt token cost more than the step's own bookkeeping).
Used by the batch loop's thread only."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import llama_cpp.llama_cpp as llama_lib


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

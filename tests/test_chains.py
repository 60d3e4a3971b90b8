"""The greedy argmax (chains.Argmax) picks exactly the token llama.cpp's chain picks.

On the real SmolLM2 model: a prompt decoded with logits on every row, then for each row
and each setting (no bias, ignore_eos, biases that move the winner, equal maxima, the
min_tokens ban before and after it lifts) the token of ``make_sampler``'s argmax against
the token of ``sampler_chain``'s chain on the same row. The row's logits must be the same
afterwards (logprobs read them after sampling).
"""

from __future__ import annotations

import ctypes
import io
from collections.abc import Iterator
from typing import Any

import llama_cpp.llama_cpp as llama_lib
import numpy as np
import pytest

from tests.conftest import default_model
from worker.engine import LlamaLog
from worker.engine.chains import Argmax, Chain, make_sampler, sampler_chain
from worker.engine.prompt import Prepared, Sampling
from worker.engine.tokenbatch import TokenBatch

pytestmark = pytest.mark.model

TEXT = b"The quick brown fox jumps over the lazy dog. Once upon a time, in a land far away, there"


class Rows:
    def __init__(self) -> None:
        LlamaLog(io.StringIO()).install()
        self.model = llama_lib.llama_model_load_from_file(str(default_model()).encode(),
                                                          llama_lib.llama_model_default_params())
        assert self.model
        params = llama_lib.llama_context_default_params()
        params.n_ctx, params.n_batch, params.n_threads, params.n_threads_batch = 256, 256, 2, 2
        self.ctx = llama_lib.llama_init_from_model(self.model, params)
        self.vocab = llama_lib.llama_model_get_vocab(self.model)
        self.n_vocab = int(llama_lib.llama_vocab_n_tokens(self.vocab))
        buf = (ctypes.c_int32 * 128)()
        n = llama_lib.llama_tokenize(self.vocab, TEXT, len(TEXT), buf, 128, True, False)
        assert n > 10
        self.batch = TokenBatch(256)
        self.batch.add(0, list(buf[:n]), 0, True)
        assert self.batch.decode(self.ctx) == 0
        self.rows = n

    def logits(self, row: int) -> Any:
        return np.ctypeslib.as_array(llama_lib.llama_get_logits_ith(self.ctx, row), shape=(self.n_vocab,)).copy()

    def close(self) -> None:
        self.batch.free()
        llama_lib.llama_free(self.ctx)
        llama_lib.llama_model_free(self.model)


@pytest.fixture(scope="module")
def rows() -> Iterator[Rows]:
    r = Rows()
    yield r
    r.close()


def prepared(eog: tuple[int, ...], bias: dict[int, float] | None = None, **sampling: Any) -> Prepared:
    return Prepared(tokens=[1], sampling=Sampling(max_tokens=8, temperature=0.0, **sampling), max_tokens=8,
                    stop=(), grammar=None, logit_bias=bias, eog_tokens=eog)


def both(rows: Rows, prep: Prepared) -> tuple[Argmax, Chain]:
    fast = make_sampler(rows.vocab, rows.n_vocab, prep, 0)
    assert isinstance(fast, Argmax)
    return fast, Chain(sampler_chain(rows.vocab, rows.n_vocab, prep, 0))


def same_tokens(rows: Rows, fast: Argmax, chain: Chain) -> list[int]:
    picked = []
    for row in range(rows.rows):
        before = rows.logits(row)
        token = fast.sample(rows.ctx, row)
        assert token == chain.sample(rows.ctx, row), f"row {row}"
        assert np.array_equal(before, rows.logits(row)), "the row's raw logits changed"
        picked.append(token)
    return picked


def settings(rows: Rows) -> list[tuple[str, Prepared]]:
    top = [int(rows.logits(r).argmax()) for r in range(rows.rows)]
    second = [int(np.argsort(rows.logits(r))[-2]) for r in range(rows.rows)]
    eog = (0, 2)
    return [
        ("plain", prepared(eog)),
        ("ignore_eos", prepared(eog, ignore_eos=True)),
        ("each row's winner pushed down", prepared(eog, {t: -100.0 for t in set(top)})),
        ("a small bias that may flip near ties", prepared(eog, {t: 0.37 for t in set(second)})),
        ("equal maxima: the first wins", prepared(eog, {9: 1e30, 5: 1e30})),
        ("a ban and a bias on one token", prepared(eog, {0: 50.0, 3: 1e6}, ignore_eos=True)),
    ]


def test_argmax_matches_the_chain(rows: Rows) -> None:
    for name, prep in settings(rows):
        fast, chain = both(rows, prep)
        try:
            picked = same_tokens(rows, fast, chain)
        finally:
            chain.free()
        if name == "equal maxima: the first wins":
            assert set(picked) == {5}
        if name == "a ban and a bias on one token":
            assert set(picked) == {3}


def test_min_tokens_ban_lifts_in_both(rows: Rows) -> None:
    # Every row's winner is made an end-of-generation token: banned until min_tokens.
    top = tuple(sorted({int(rows.logits(r).argmax()) for r in range(rows.rows)}))
    fast, chain = both(rows, prepared(top, min_tokens=3, stop_token_ids=(7,)))
    try:
        banned = same_tokens(rows, fast, chain)
        assert not set(banned) & set(top)
        fast.min_tokens_reached()
        chain.min_tokens_reached()
        assert same_tokens(rows, fast, chain) == [int(rows.logits(r).argmax()) for r in range(rows.rows)]
    finally:
        chain.free()


def test_what_stays_a_chain(rows: Rows) -> None:
    eog = (0, 2)
    for prep in (prepared(eog, repeat_penalty=1.1), Prepared(
            tokens=[1], sampling=Sampling(max_tokens=8, temperature=0.7), max_tokens=8, stop=(), grammar=None,
            logit_bias=None, eog_tokens=eog)):
        sampler = make_sampler(rows.vocab, rows.n_vocab, prep, 0)
        try:
            assert isinstance(sampler, Chain)
        finally:
            sampler.free()

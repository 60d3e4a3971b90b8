"""A request's sampler, built from its settings: a llama.cpp sampler chain, or for greedy
requests with nothing but biases and bans an argmax read straight off the row's logits.

Rules for this module:
- Both kinds answer ``sample(ctx, row)``, ``min_tokens_reached()`` and ``free()``; the
  generation (generation.py) never knows which it holds.
- ``Argmax`` must pick exactly the token the chain would (logit biases and bans, then
  llama.cpp's greedy sampler: the first of equal maxima), tested against the chain on real
  logits. It exists for speed: the chain copies the whole vocabulary into a candidate
  array per token (0.10 ms for SmolLM2's 49152 tokens on this CPU, 2% of a decode step at
  one stream), the argmax reads it once (0.007 ms). Anything with state or randomness
  (penalties, a grammar, temperature) stays a chain.
"""

from __future__ import annotations

from typing import Any

import llama_cpp.llama_cpp as llama_lib
import numpy as np

from worker.engine.prompt import Prepared


class Chain:
    """A llama.cpp sampler chain (``sampler_chain``); freed by ``free``."""

    def __init__(self, chain: Any) -> None:
        self._chain = chain

    def sample(self, ctx: Any, row: int) -> int:
        return int(llama_lib.llama_sampler_sample(self._chain, ctx, row))

    def min_tokens_reached(self) -> None:
        # The ban at the head of the chain goes (sampler_chain put it first).
        llama_lib.llama_sampler_free(llama_lib.llama_sampler_chain_remove(self._chain, 0))

    def free(self) -> None:
        if self._chain is not None:
            llama_lib.llama_sampler_free(self._chain)
            self._chain = None


class Argmax:
    """Greedy sampling off the row's logits: ``bias`` (token -> what is added; a ban adds
    -inf) applies throughout, ``min_ban`` until ``min_tokens_reached``."""

    def __init__(self, n_vocab: int, bias: dict[int, float], min_ban: tuple[int, ...]) -> None:
        self._n_vocab = n_vocab
        self._bias = bias
        self._arrays(min_ban)

    def _arrays(self, min_ban: tuple[int, ...]) -> None:
        adds = dict(self._bias)
        for token in min_ban:
            adds[token] = adds.get(token, 0.0) + float("-inf")  # -inf whatever else is added
        self._ids = np.fromiter(adds, dtype=np.intp, count=len(adds)) if adds else None
        # float32, as llama.cpp adds a bias to a logit (llama_logit_bias.bias is a C float)
        self._adds = np.fromiter(adds.values(), dtype=np.float32, count=len(adds))

    def sample(self, ctx: Any, row: int) -> int:
        ptr = llama_lib.llama_get_logits_ith(ctx, row)
        if not ptr:
            raise RuntimeError(f"batch row {row} has no logits")
        logits = np.ctypeslib.as_array(ptr, shape=(self._n_vocab,))
        ids = self._ids
        if ids is None:
            return int(logits.argmax())  # numpy's argmax: the first of equal maxima, as llama.cpp's
        # Biased in place and put back (the row's raw logits are read again for logprobs):
        # cheaper than a copy of the vocabulary.
        raw = logits[ids]
        logits[ids] = raw + self._adds
        try:
            return int(logits.argmax())
        finally:
            logits[ids] = raw

    def min_tokens_reached(self) -> None:
        self._arrays(())

    def free(self) -> None:
        pass


def make_sampler(vocab: Any, n_vocab: int, prep: Prepared, seed: int) -> Chain | Argmax:
    """The request's sampler (the caller frees it): an ``Argmax`` where the chain would be
    biases and greedy only, else the chain."""
    s = prep.sampling
    if s.temperature == 0.0 and prep.grammar is None and not _penalised(prep):
        bias: dict[int, float] = {}
        if s.ignore_eos:
            bias.update(dict.fromkeys(prep.eog_tokens, float("-inf")))
        for token, value in (prep.logit_bias or {}).items():
            bias[token] = bias.get(token, 0.0) + value
        min_ban = (*prep.eog_tokens, *s.stop_token_ids) if s.min_tokens > 0 else ()
        return Argmax(n_vocab, bias, min_ban)
    return Chain(sampler_chain(vocab, n_vocab, prep, seed))


def _penalised(prep: Prepared) -> bool:
    s = prep.sampling
    return (s.repeat_penalty, s.frequency_penalty, s.presence_penalty) != (1.0, 0.0, 0.0)


def sampler_chain(vocab: Any, n_vocab: int, prep: Prepared, seed: int) -> Any:
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
        # sampler, which Generation.next_token removes (chain index 0) once min_tokens exist.
        add(chain, _ban(n_vocab, (*prep.eog_tokens, *s.stop_token_ids)))
    if s.ignore_eos:
        # ignore_eos: end-of-generation tokens are never sampled, as llama-server does.
        add(chain, _ban(n_vocab, prep.eog_tokens))
    if prep.logit_bias:
        bias = (llama_lib.llama_logit_bias * len(prep.logit_bias))()
        for i, (token, value) in enumerate(prep.logit_bias.items()):
            bias[i].token = token  # type: ignore[assignment]  # ctypes converts the int
            bias[i].bias = value
        add(chain, llama_lib.llama_sampler_init_logit_bias(n_vocab, len(bias), bias))
    if _penalised(prep):
        # Neutral penalties change nothing; the sampler would still scan every candidate.
        add(chain, llama_lib.llama_sampler_init_penalties(
            n_vocab, _PENALTY_LAST_N, s.repeat_penalty, s.frequency_penalty, s.presence_penalty
        ))
    if prep.grammar is not None:
        grammar = llama_lib.llama_sampler_init_grammar(
            vocab, prep.grammar._grammar.encode("utf-8"), prep.grammar._root.encode("utf-8")
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


def _ban(n_vocab: int, tokens: tuple[int, ...]) -> Any:
    """A logit-bias sampler that makes ``tokens`` impossible (-inf, as llama-server does)."""
    bias = (llama_lib.llama_logit_bias * max(1, len(tokens)))()
    for i, token in enumerate(tokens):
        bias[i].token = token  # type: ignore[assignment]  # ctypes converts the int
        bias[i].bias = float("-inf")
    return llama_lib.llama_sampler_init_logit_bias(n_vocab, len(tokens), bias)


# Llama.last_n_tokens_size: how many recent tokens the repetition penalties look at.
_PENALTY_LAST_N = 64

"""Sampling chains: one llama.cpp sampler chain per request, built from its settings."""

from __future__ import annotations

from typing import Any

import llama_cpp.llama_cpp as llama_lib

from worker.engine.prompt import Prepared


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
    if (s.repeat_penalty, s.frequency_penalty, s.presence_penalty) != (1.0, 0.0, 0.0):
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

"""Drafts from the context (prompt lookup): speculative decoding without a draft model.

Rules for this module (pure Python over token ids; the batch loop verifies):
- A slot's context is everything its sequence holds plus the token it decodes next. When
  the last ``n`` tokens of it (n = 3, else 2) occurred before, the tokens that followed
  that earlier occurrence are the draft: rewriting code, quoting a document or repeating a
  JSON shape copies long runs of the prompt.
- The batch loop decodes the draft in the same step as the slot's token (one row each) and
  samples every row with the request's own sampler chain, in order, keeping drafted tokens
  while each equals what was sampled. Every token sent is therefore a sample of the chain
  given the tokens before it: greedy text is the same with and without drafts, and a
  sampled stream keeps its distribution (a draft is accepted with the probability the
  chain gives it, and a rejected row's sample is a draw from the rest); with a fixed seed
  the chain's random draws are even the same ones.
- A draft costs a decode row per token whether it is accepted or not, and what a row costs
  depends on the device: about half a token on two CPU cores with flash attention (1 row
  5.4 ms, 2 rows 7.8, 8 rows 27 with SmolLM2), almost nothing on a GPU. So a draft's length
  is a cost decision: its i-th token is accepted with probability about alpha^i, and it is
  drafted only while that beats the scheduler's threshold for the step
  (``StepCost.draft_threshold``: what a row costs against what a token costs).
- alpha depends above all on how long the match is: the last 2 tokens seen before are
  followed by the same token about half the time, the last 16 almost always (the text is
  being copied). So alpha is kept per match-length bucket (``_BUCKETS``): learned for the
  whole worker (``DraftStats``), and per request from there (``Drafter``), so that a
  request whose drafts keep failing stops drafting (its own estimates fall below the
  threshold) while the others go on. After ``_COOLDOWN`` steps without a draft a request
  starts again from the worker's estimates. Text with nothing to copy finds no long match
  and drafts little or nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

_SIZES = (3, 2)  # n-gram lengths looked up, longest first
_BUCKETS = (2, 4, 8, 16, 32)  # match lengths (tokens) from which each bucket counts
# A new worker's alpha per bucket (as counts: accepted, rejected). Under 8 tokens: 1/2, which
# no CPU threshold passes (a short match drafts only where rows are almost free, a GPU); 8-15:
# 0.8, 16-31: 0.9, 32 and more: 0.95. Measured on SmolLM2's greedy text for bench.scheduler's
# prompts, the per-token acceptance after matches of 8-15 tokens was 0.86, after 16+ 0.98.
_PRIORS = ((1.0, 1.0), (1.0, 1.0), (4.0, 1.0), (9.0, 1.0), (19.0, 1.0))
_DECAY = 0.8  # weight of the past in a request's acceptance counts, per draft
_WORKER_DECAY = 0.97  # ... in the worker's (it learns from every request)
_FROM_WORKER = 4.0  # a request starts from the worker's alpha, weighted as this many trials
_COOLDOWN = 64  # steps without drafting (acceptance too low) before starting again


def bucket(match: int) -> int:
    """The bucket of a match of ``match`` tokens."""
    b = 0
    while b + 1 < len(_BUCKETS) and match >= _BUCKETS[b + 1]:
        b += 1
    return b


def _learn(counts: list[float], decay: float, drafted: int, accepted: int) -> None:
    # Each drafted position is a trial until the first rejection (alpha's estimate).
    counts[0] = counts[0] * decay + accepted
    counts[1] = counts[1] * decay + (accepted < drafted)


@dataclass
class DraftStats:
    """The worker's drafts: counters for /health (llama-server's draft_n and
    draft_n_accepted) and the acceptance learned per match-length bucket."""

    drafted: int = 0
    accepted: int = 0
    drafts: int = 0  # drafts verified (llama-server's spec_decode_num_drafts)
    by_match: list[list[float]] = field(default_factory=lambda: [list(p) for p in _PRIORS])

    def alpha(self, b: int) -> float:
        acc, rej = self.by_match[b]
        return acc / (acc + rej)

    def acceptance(self) -> dict[str, float]:
        """The learned alpha per bucket, keyed by the bucket's least match length (/health)."""
        return {str(low): round(self.alpha(b), 3) for b, low in enumerate(_BUCKETS)}


@dataclass
class Drafter:
    """One slot's n-gram index and its draft policy; reset for every request."""

    limit: int  # the setting draft_max (0: never draft)
    stats: DraftStats
    _index: list[dict[tuple[int, ...], int]] = field(default_factory=lambda: [{} for _ in _SIZES])
    _indexed: int = 0  # positions of the context indexed so far
    _counts: list[list[float]] = field(default_factory=list)  # this request's, per bucket
    _idle: int = 0  # steps without a draft because acceptance was too low
    _bucket: int = 0  # the bucket of the draft being verified

    def __post_init__(self) -> None:
        self._from_worker()

    def reset(self) -> None:
        for idx in self._index:
            idx.clear()
        self._indexed = 0
        self._from_worker()
        self._idle = 0

    def _from_worker(self) -> None:
        self._counts = [[_FROM_WORKER * a, _FROM_WORKER * (1 - a)]
                        for a in (self.stats.alpha(b) for b in range(len(_BUCKETS)))]

    def alpha(self, b: int) -> float:
        acc, rej = self._counts[b]
        return acc / (acc + rej)

    def length(self, alpha: float, threshold: float) -> int:
        """The longest draft whose last token is still worth its row: alpha^k > threshold."""
        if self.limit <= 0 or alpha <= threshold:
            return 0
        if threshold <= 0 or alpha >= 1.0:
            return self.limit
        return max(1, min(self.limit, int(math.log(threshold) / math.log(alpha))))

    def propose(self, tokens: Sequence[int], last: int, most: int, threshold: float) -> list[int]:
        """A draft to follow ``tokens`` + ``last``: at most ``most`` tokens, and only as many
        as pay for their rows at ``threshold`` (may be empty)."""
        if self.limit <= 0 or most <= 0:
            return []
        self._sync(tokens)
        end = len(tokens)
        for n, idx in zip(_SIZES, self._index):
            if end < n:
                continue
            at = idx.get((*tokens[end - n + 1 : end], last))
            if at is not None:
                break
        else:
            return []
        b = self._bucket = bucket(_match_length(tokens, at, n))
        length = self.length(self.alpha(b), threshold)
        if length == 0:
            self._idle += 1
            if self._idle >= _COOLDOWN:  # try again from the worker's estimates: the text may have changed
                self._from_worker()
                self._idle = 0
            return []
        return list(tokens[at : at + min(most, length)])

    def _sync(self, tokens: Sequence[int]) -> None:
        """Index every n-gram of ``tokens`` with the position of the token that followed it
        (a later occurrence replaces an earlier one). Incremental: the slot's tokens only
        grow while one request runs (``reset`` between requests)."""
        end = len(tokens)
        start = self._indexed
        if end < start:  # the sequence shrank (never expected while a request runs)
            self.reset()
            start = 0
        for n, idx in zip(_SIZES, self._index):
            for i in range(max(start, n), end):
                idx[tuple(tokens[i - n : i])] = i
        self._indexed = end

    def verified(self, drafted: int, accepted: int) -> None:
        """The loop kept ``accepted`` of ``drafted`` tokens."""
        if drafted <= 0:
            return
        stats = self.stats
        stats.drafted += drafted
        stats.accepted += accepted
        stats.drafts += 1
        _learn(self._counts[self._bucket], _DECAY, drafted, accepted)
        _learn(stats.by_match[self._bucket], _WORKER_DECAY, drafted, accepted)


def _match_length(tokens: Sequence[int], at: int, n: int) -> int:
    """How many tokens before ``tokens[at]`` match the context's end (``n`` of them are the
    n-gram found; the context is ``tokens`` and the next token), at most the last bucket's."""
    end, most = len(tokens), _BUCKETS[-1]
    length = n
    while length < most and at - length - 1 >= 0 and tokens[at - length - 1] == tokens[end - length]:
        length += 1
    return length

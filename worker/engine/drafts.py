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
  depends on the device: almost as much as a token on two CPU cores, almost nothing on a
  GPU. So a draft's length is a cost decision: its i-th token is accepted with probability
  about alpha^i (alpha: this request's acceptance so far, a running estimate that starts at
  1/2), and it is drafted only while that beats the scheduler's threshold for the step
  (``StepCost.draft_threshold``: what a row costs against what a token costs). A request
  whose acceptance stays below the threshold drafts nothing; after ``_COOLDOWN`` steps it
  starts again from the prior. Text with nothing to copy never finds a draft at all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

_SIZES = (3, 2)  # n-gram lengths looked up, longest first
# (accepted, rejected) before any draft: alpha = 1/2, so a request starts drafting only where
# a row costs at most about half a step (a GPU, a large model on a CPU); where a row costs
# as much as a step (SmolLM2 on two CPU cores) a draft could rarely pay, and trying cost
# single streams a fifth of their speed (bench.scheduler).
_PRIOR = (1.0, 1.0)
_DECAY = 0.8  # weight of the past in the acceptance counts, per draft
_COOLDOWN = 64  # steps without drafting (acceptance too low) before starting again


@dataclass
class DraftStats:
    """Counters for /health (llama-server's draft_n and draft_n_accepted)."""

    drafted: int = 0
    accepted: int = 0
    drafts: int = 0  # drafts verified (llama-server's spec_decode_num_drafts)


@dataclass
class Drafter:
    """One slot's n-gram index and its draft policy; reset for every request."""

    limit: int  # the setting draft_max (0: never draft)
    stats: DraftStats
    _index: list[dict[tuple[int, ...], int]] = field(default_factory=lambda: [{} for _ in _SIZES])
    _indexed: int = 0  # positions of the context indexed so far
    _acc: float = _PRIOR[0]
    _rej: float = _PRIOR[1]
    _idle: int = 0  # steps without a draft because acceptance was too low

    def reset(self) -> None:
        for idx in self._index:
            idx.clear()
        self._indexed = 0
        self._acc, self._rej = _PRIOR
        self._idle = 0

    @property
    def alpha(self) -> float:
        return self._acc / (self._acc + self._rej)

    def length(self, threshold: float) -> int:
        """The longest draft whose last token is still worth its row: alpha^k > threshold."""
        alpha = self.alpha
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
        length = self.length(threshold)
        if length == 0:
            self._idle += 1
            if self._idle >= _COOLDOWN:  # try again from the prior: the text may have changed
                self._acc, self._rej = _PRIOR
                self._idle = 0
            return []
        most = min(most, length)
        self._sync(tokens)
        end = len(tokens)
        for n, idx in zip(_SIZES, self._index):
            if end < n:
                continue
            at = idx.get((*tokens[end - n + 1 : end], last))
            if at is not None:
                return list(tokens[at : at + most])
        return []

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
        self.stats.drafted += drafted
        self.stats.accepted += accepted
        self.stats.drafts += 1
        # Each drafted position is a trial until the first rejection (alpha's estimate).
        self._acc = self._acc * _DECAY + accepted
        self._rej = self._rej * _DECAY + (accepted < drafted)

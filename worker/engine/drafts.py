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
- A draft costs a decode row per token whether it is accepted or not. Its length follows
  its acceptance (doubling on a full accept, back to what was accepted plus one
  otherwise), and a slot whose acceptance stays low stops drafting for ``_COOLDOWN``
  tokens, so text with nothing to copy pays almost nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

_SIZES = (3, 2)  # n-gram lengths looked up, longest first
_START = 4  # first draft length
_RATE_OFF = 0.25  # acceptance (running average per draft) below which drafting pauses
_COOLDOWN = 64  # tokens without drafts after a pause
_W = 0.3  # weight of the last draft in the running acceptance


@dataclass
class DraftStats:
    """Counters for /health (llama-server's draft_n and draft_n_accepted)."""

    drafted: int = 0
    accepted: int = 0


@dataclass
class Drafter:
    """One slot's n-gram index and its draft policy; reset for every request."""

    limit: int  # the setting draft_max (0: never draft)
    stats: DraftStats
    _index: list[dict[tuple[int, ...], int]] = field(default_factory=lambda: [{} for _ in _SIZES])
    _indexed: int = 0  # positions of the context indexed so far
    _length: int = _START
    _rate: float = 1.0
    _paused: int = 0  # tokens left without drafts

    def reset(self) -> None:
        for idx in self._index:
            idx.clear()
        self._indexed = 0
        self._length, self._rate, self._paused = _START, 1.0, 0

    def propose(self, tokens: Sequence[int], last: int, most: int) -> list[int]:
        """A draft to follow ``tokens`` + ``last`` (at most ``most`` tokens; may be empty)."""
        most = min(most, self._length, self.limit)
        if most <= 0:
            return []
        if self._paused > 0:
            self._paused -= 1
            return []
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
        self._length = min(self.limit, self._length * 2) if accepted == drafted else max(1, accepted + 1)
        self._rate += _W * (accepted / drafted - self._rate)
        if self._rate < _RATE_OFF:
            self._paused, self._rate, self._length = _COOLDOWN, 1.0, _START

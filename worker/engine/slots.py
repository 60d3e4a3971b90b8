"""Slots: the sequences of the shared KV cache and what each holds.

Rules for this module:
- A ``Slot`` is one llama.cpp sequence id. ``tokens`` mirrors exactly what that sequence
  holds in the KV cache (position i holds tokens[i]): every decode appends what it stored
  and every removal truncates, so a new request's prefix match can trust it.
- A finished slot keeps its KV ("idle with a cache"); a new request goes to the idle
  slot whose cache shares the longest prefix with its prompt, least recently used
  breaking ties (``pick_slot``, pure).
- Only the batch loop thread touches slots.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from worker.engine.drafts import Drafter, DraftStats
from worker.engine.generation import Generation


@dataclass
class Slot:
    seq: int
    tokens: list[int] = field(default_factory=list)
    gen: Generation | None = None
    # Prompt tokens of ``gen`` already in the KV cache (cached ones included); the last
    # prompt token is never part of the prefill, it is decoded as ``next_token``.
    prefilled: int = 0
    next_token: int | None = None  # the token to decode with logits next step
    admitted: int = 0  # admission order of ``gen`` (newest = largest)
    last_used: int = 0  # recency of the cache (LRU tie break, eviction order)
    # (admitted, len(tokens)) when its state was last saved to the RAM/disk tiers: the
    # cache changes only while a request runs in it, so an equal mark means "saved".
    saved: tuple[int, int] = (0, 0)
    drafter: Drafter = field(default_factory=lambda: Drafter(0, DraftStats()))  # drafts.py


@dataclass
class CacheStats:
    """Prompt reuse counters, written by the loop thread, read by /health."""

    hits: int = 0  # requests that reused at least one cached prompt token
    tokens_reused: int = 0  # prompt tokens not evaluated again thanks to a slot's cache
    # States copied out of the KV cache on the loop thread to be kept (RAM, disk): how
    # many, and the time the loop spent on them (every slot waits meanwhile).
    snapshots: int = 0
    snapshot_s: float = 0.0
    snapshot_max_s: float = 0.0


# Shortest cached prefix worth choosing a slot for (a BOS token is shared by every prompt).
_MIN_REUSE = 2
# A slot whose cache the prompt would cut is chosen for its prefix only when the prefix is
# at least this share of the prompt (llama-server's --slot-prompt-similarity default).
_MIN_SHARE = 0.1


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share. Slices are compared (C speed) in a
    binary search: a Python loop per token cost milliseconds per request for long
    prompts, run against every slot, RAM entry and disk entry."""
    if type(a) is not type(b):
        a, b = list(a), list(b)
    m = min(len(a), len(b))
    if a[:m] == b[:m]:
        return m
    lo, hi = 0, m  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def pick_slot(idle: Sequence[Slot], head: Sequence[int]) -> tuple[Slot, int] | None:
    """The idle slot to serve a prompt whose head (all but its last token) is ``head``, and
    the prefix of its cache the prompt reuses. None when no slot is idle.

    A slot is chosen for its cache when the prompt keeps all of it (a conversation's next
    turn) or shares at least ``_MIN_SHARE`` of the prompt with it (a long system prompt);
    the longest such prefix wins, least recently used breaking ties. Otherwise the least
    recently used slot (an empty slot has never been used): a chat template's opening
    tokens, shared by every conversation, are no reason to overwrite another's cache (a
    past bug: three conversations on four slots took turns overwriting one slot, and every
    second turn read its whole prompt again).
    """
    best: tuple[Slot, int] | None = None
    lru: tuple[Slot, int] | None = None
    for slot in idle:
        n = common_prefix(slot.tokens, head)
        n = n if n >= _MIN_REUSE else 0
        if lru is None or slot.last_used < lru[0].last_used:
            lru = (slot, n)
        if n and (n == len(slot.tokens) or n >= _MIN_SHARE * len(head)):
            if best is None or n > best[1] or (n == best[1] and slot.last_used < best[0].last_used):
                best = (slot, n)
    return best if best is not None else lru

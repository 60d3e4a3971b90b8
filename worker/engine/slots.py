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
    """The idle slot to serve a prompt whose head (all but its last token) is ``head``.

    Longest shared prefix first (of at least ``_MIN_REUSE`` tokens), then least recently
    used (an empty slot has never been used, so it is taken before a cache is
    overwritten). Returns the slot and the prefix
    length, or None when no slot is idle.
    """
    best: tuple[Slot, int] | None = None
    for slot in idle:
        n = common_prefix(slot.tokens, head)
        if n < _MIN_REUSE:
            n = 0  # a shared BOS alone is no reason to overwrite a cache: take the LRU slot
        if best is None or n > best[1] or (n == best[1] and slot.last_used < best[0].last_used):
            best = (slot, n)
    return best

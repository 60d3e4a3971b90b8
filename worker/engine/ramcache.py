"""Host-RAM cache of sequence snapshots: earlier prompts kept beyond the slots.

Rules for this module:
- An entry is one sequence's KV cache as ``llama_state_seq_get_data`` wrote it, with the
  tokens it holds. Before a slot's cached prompt is overwritten the batch loop saves it
  here; a new request whose prompt shares a longer prefix with an entry than with any
  slot gets that entry restored (``llama_state_seq_set_data``) instead of recomputing.
- The byte budget holds for the snapshots' bytes; eviction drops the least recently used
  entries first. An entry whose tokens are a prefix of a newer one is dropped (the newer
  one serves every prompt the older one could).
- The bookkeeping is pure Python over bytes (testable alone); only ``snapshot`` and
  ``restore`` touch llama.cpp and only the batch loop thread calls them. ``put`` runs on
  the prompt-cache thread (``diskcache.CacheIO``), so the loop pays for the snapshot's
  one copy out of the KV cache and nothing else; ``best``/``used`` run on the loop; one
  lock keeps the two apart.
"""

from __future__ import annotations

import ctypes
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import llama_cpp.llama_cpp as llama_lib

from worker.engine.slots import common_prefix


@dataclass
class Entry:
    tokens: list[int]
    data: bytes | bytearray


@dataclass
class RamCacheStats:
    entries: int = 0
    bytes: int = 0
    hits: int = 0  # requests served from a restored snapshot
    tokens_saved: int = 0  # prompt tokens those requests did not evaluate again


class RamCache:
    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self._entries: OrderedDict[int, Entry] = OrderedDict()  # oldest first
        self._next_key = 0
        self.stats = RamCacheStats()
        self._lock = threading.Lock()

    def put(self, tokens: Sequence[int], data: bytes | bytearray) -> bool:
        """Keep a snapshot; False if it alone exceeds the budget."""
        if not tokens or len(data) > self.budget:
            return False
        with self._lock:
            return self._put(list(tokens), data)

    def _put(self, tokens: list[int], data: bytes | bytearray) -> bool:
        for key, e in list(self._entries.items()):
            if common_prefix(e.tokens, tokens) == len(e.tokens):
                self._drop(key)  # the new snapshot holds all of this one
            elif common_prefix(e.tokens, tokens) == len(tokens):
                self._entries.move_to_end(key)  # an entry already holds all of it
                return True
        self._entries[self._next_key] = Entry(tokens, data)
        self._next_key += 1
        self.stats.bytes += len(data)
        while self.stats.bytes > self.budget:
            self._drop(next(iter(self._entries)))
        self.stats.entries = len(self._entries)
        return True

    def best(self, head: Sequence[int]) -> tuple[int, Entry] | None:
        """The entry sharing the longest prefix with ``head`` (and that length), or None."""
        found: tuple[int, Entry] | None = None
        with self._lock:
            for e in self._entries.values():
                n = common_prefix(e.tokens, head)
                if n and (found is None or n > found[0]):
                    found = (n, e)
        return found

    def used(self, entry: Entry, saved: int) -> None:
        with self._lock:
            for key, e in self._entries.items():
                if e is entry:
                    self._entries.move_to_end(key)
                    break
            self.stats.hits += 1
            self.stats.tokens_saved += saved

    def _drop(self, key: int) -> None:
        e = self._entries.pop(key)
        self.stats.bytes -= len(e.data)
        self.stats.entries = len(self._entries)


def snapshot(ctx: Any, seq: int, limit: int | None = None) -> bytearray | None:
    """The sequence's state (None if llama.cpp gives none, or if it is larger than
    ``limit`` bytes: no tier could keep it, so it is not copied at all). llama.cpp writes
    it straight into the returned buffer: one copy out of the KV cache, the only part of
    saving a state that must run on the batch loop thread (it owns the context)."""
    size = int(llama_lib.llama_state_seq_get_size(ctx, seq))
    if size <= 0 or (limit is not None and size > limit):
        return None
    data = bytearray(size)
    n = int(llama_lib.llama_state_seq_get_data(ctx, (ctypes.c_uint8 * size).from_buffer(data), size, seq))
    if n <= 0:
        return None
    if n < size:
        del data[n:]
    return data


def restore(ctx: Any, seq: int, data: bytes | bytearray) -> bool:
    """Load a snapshot into sequence ``seq`` (replacing what it held); False on failure."""
    buf = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
    return int(llama_lib.llama_state_seq_set_data(ctx, buf, len(data), seq)) > 0

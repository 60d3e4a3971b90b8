"""The slots' saved states: what the batch loop keeps of a slot's KV cache beyond the slot
(the RAM tier, ``ramcache.RamCache``; the disk tier, ``diskcache.DiskCache``).

Rules for this module:
- Only the batch loop thread calls ``save``, ``save_idle`` and ``restore_into`` (they touch
  the llama.cpp context it owns); ``prefetch`` runs on the thread that submits a request.
- The loop's part of saving is one copy of the state out of the KV cache (``snapshot``,
  timed in ``stats``); everything else (the RAM cache's bookkeeping, files) runs on the
  prompt-cache thread (``diskcache.CacheIO``), and so does every disk read.
- States are saved before a slot's cache is overwritten (both tiers) and, with a disk tier,
  while the loop is idle (a finished conversation then survives a restart of the worker).
- A restored state must land exactly: llama.cpp's last position equals its token count, or
  the slot is emptied and the prompt evaluated (never decode on top of a wrong cache).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import llama_cpp.llama_cpp as llama_lib

from worker.engine.diskcache import CacheIO, DiskCache
from worker.engine.generation import Generation
from worker.engine.ramcache import RamCache, restore, snapshot
from worker.engine.slots import _MIN_REUSE, CacheStats, Slot, common_prefix

log = logging.getLogger("worker")

# A slot's cache shorter than this is not worth a saved state.
MIN_SNAPSHOT_TOKENS = 16


def forget(mem: Any, slot: Slot) -> None:
    """Drop the slot's whole sequence from the KV cache."""
    llama_lib.llama_memory_seq_rm(mem, slot.seq, -1, -1)
    slot.tokens.clear()


class SavedStates:
    def __init__(self, ctx: Any, ram_bytes: int, disk: DiskCache | None, stats: CacheStats) -> None:
        self._ctx = ctx
        self._mem = llama_lib.llama_get_memory(ctx)
        self.stats = stats
        self.ram = RamCache(ram_bytes) if ram_bytes > 0 else None
        self.io = CacheIO(self.ram, disk) if self.ram is not None or disk is not None else None

    @property
    def disk(self) -> DiskCache | None:
        return None if self.io is None else self.io.disk

    def prefetch(self, gen: Generation, slots: Sequence[Slot], then: Callable[[Generation], None]) -> bool:
        """When the disk holds a longer prefix of ``gen``'s prompt than any slot, have the
        prompt-cache thread read it (``gen.from_disk``) and then call ``then(gen)``; False
        (``then`` not called) when there is nothing worth reading."""
        if self.io is None or self.io.disk is None or not gen.prepared.sampling.cache_prompt:
            return False
        head = gen.prepared.tokens[:-1]
        local = max(common_prefix(list(s.tokens), head) for s in slots)

        def read(found: tuple[list[int], bytearray] | None) -> None:
            gen.from_disk = found
            then(gen)

        return self.io.fetch(head, local, read)

    def restore_into(self, slot: Slot, gen: Generation, reuse: int) -> tuple[int, bool]:
        """Before ``gen`` takes ``slot`` (whose cache shares ``reuse`` tokens with its
        prompt): load an earlier conversation from RAM or disk when it shares more, after
        saving what the slot held; else save the slot's cache if it is about to be cut.
        Returns the tokens ``gen`` reuses and whether they came from a saved state."""
        prompt = gen.prepared.tokens
        found = self.ram.best(prompt[:-1]) if self.ram is not None and gen.prepared.sampling.cache_prompt else None
        on_disk, gen.from_disk = gen.from_disk, None  # read by the prompt-cache thread (prefetch)
        n_ram = 0 if found is None else found[0]
        n_disk = 0 if on_disk is None else common_prefix(on_disk[0], prompt[:-1])
        if max(n_ram, n_disk) <= max(reuse, _MIN_REUSE - 1):
            if reuse < len(slot.tokens):
                self.save(slot)  # its cached prompt is about to be overwritten
            return reuse, False
        from_ram = n_ram >= n_disk and found is not None
        if from_ram and found is not None:
            n, tokens, data = n_ram, found[1].tokens, found[1].data
        else:
            assert on_disk is not None
            n, (tokens, data) = n_disk, on_disk
        self.save(slot)
        if restore(self._ctx, slot.seq, data) and (
            llama_lib.llama_memory_seq_pos_max(self._mem, slot.seq) == len(tokens) - 1
        ):
            slot.tokens = list(tokens)
            if from_ram and found is not None and self.ram is not None:
                self.ram.used(found[1], n)
            elif self.disk is not None:
                self.disk.hit(n)
            return n, True
        log.warning("restoring a %d-token snapshot failed: evaluating the prompt", len(tokens))
        forget(self._mem, slot)
        return 0, False

    def save(self, slot: Slot) -> None:
        """Keep the slot's cached prompt (RAM tier, disk tier) before it is overwritten."""
        if self.io is None or len(slot.tokens) < MIN_SNAPSHOT_TOKENS:
            return
        if slot.saved == (slot.admitted, len(slot.tokens)) and self.ram is None:
            return  # already on disk, and there is no RAM tier to put it in
        limit = max(self.ram.budget if self.ram is not None else 0, self.disk.budget if self.disk is not None else 0)
        data = self._snapshot(slot, limit)
        if data is not None:
            self.io.keep(slot.tokens, data, ram=self.ram is not None)

    def _unsaved(self, slots: Sequence[Slot]) -> Slot | None:
        """With a disk tier: an idle slot whose cache changed since it was last saved."""
        io = self.io
        if io is None or io.disk is None or not io.disk.writable:
            return None
        for slot in slots:
            if slot.gen is None and len(slot.tokens) >= MIN_SNAPSHOT_TOKENS and slot.saved != (
                slot.admitted, len(slot.tokens)
            ):
                return slot
        return None

    def has_idle_work(self, slots: Sequence[Slot]) -> bool:
        return self._unsaved(slots) is not None

    def save_idle(self, slots: Sequence[Slot]) -> bool:
        """With a disk tier, while nothing runs: save one slot's cache that changed since
        it was last saved. True when it did (the caller looks for new work before the next)."""
        slot = self._unsaved(slots)
        io = self.io
        if slot is None or io is None or io.disk is None:
            return False
        data = self._snapshot(slot, io.disk.budget)
        if data is not None:
            io.keep(slot.tokens, data, ram=False)
        return True

    def close(self) -> None:
        if self.io is not None:
            self.io.close()  # the states already handed over are written first (bounded)

    def _snapshot(self, slot: Slot, limit: int) -> bytearray | None:
        """The slot's state, copied out of the KV cache: the part of saving that pauses
        the loop (timed in ``stats``). A state larger than ``limit`` (what the tiers could
        keep) is not copied: a long context of a large model would pause every slot for
        a copy that is then thrown away."""
        t0 = time.perf_counter()
        data = snapshot(self._ctx, slot.seq, limit)
        paused = time.perf_counter() - t0
        slot.saved = (slot.admitted, len(slot.tokens))
        self.stats.snapshots += 1
        self.stats.snapshot_s += paused
        self.stats.snapshot_max_s = max(self.stats.snapshot_max_s, paused)
        return data

"""The batch loop: ONE thread owns the llama.cpp context and serves every slot.

Rules for this module (llama-server's ``update_slots`` is the model):
- Each step builds ONE ``llama_batch``: first the rows of every slot that is decoding (its
  next token, then its draft, logits on), then prompt chunks of slots still reading their
  prompt (logits off), and calls ``llama_decode`` once. Each decoding slot then samples its
  own rows in order (``_take``); exactly those rows have logits, so "sampling a row without
  logits" (a llama.cpp abort) cannot happen.
- What a step holds is scheduler.py's decision (``plan_step``) from the measured cost of
  earlier steps: running streams keep their inter-token gap within ``token_gap_s`` (at
  least ``prefill_chunk`` prompt tokens a step), a burst's prompts are read together, and
  a step never holds more than ``n_batch`` tokens (the other llama.cpp abort): drafts
  only fill what the slots' own rows leave.
- Drafts come from the slot's own context (drafts.py); a rejected draft's cells are
  removed from the sequence at once, so ``Slot.tokens`` still mirrors the KV cache.
- Requests are admitted in arrival order when a slot is free. Each slot is a llama.cpp
  sequence with n_ctx KV cells of its own (load.py says why not one shared cache), and
  the prompt check plus the ``max_tokens`` clamp (prompt.py) keep every request inside
  its slot, so the cells cannot run out because of other requests. Should llama.cpp
  still find no room, the newest request ends (finish_reason "length", or an error if
  it produced nothing yet): never an abort.
- The last prompt token is decoded as a slot's first "decoding" token, in the step after
  its prompt head is in the cache: a request served alone gets its first logits from a
  one-token batch whatever was cached (see ``Slot.prefilled``), which keeps greedy
  output independent of the cache (a past bug: the first logits came from a batch whose
  size depended on the cached prefix, and the same request gave different text). Where
  a row's logits were measured at load not to depend on its batch (``merge_last``: the
  CPU with flash attention), it goes with the prompt's last chunk instead: the same
  logits, a step sooner. Either way the rule is about the first logits only: the KV of
  a prefix read in other chunks can differ in its last bits (a few tenths in a logit,
  measured on the CPU), so a near tie may still go either way.
- Saving a slot's state for later and restoring one (the RAM and disk tiers) is
  ``saved.SavedStates``'s: the loop only copies a state out of the KV cache; a request
  whose longest cached prefix is on disk is read by the prompt-cache thread before it is
  admitted, never by the loop.
- Other threads only call ``submit``, ``chores.add`` and ``close`` and read the counters.
  A chore (llama-server's slot save/restore/erase, slotfiles.py) runs on this thread
  between steps, on an idle slot only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Any

import llama_cpp.llama_cpp as llama_lib

from worker.engine.diskcache import DiskCache
from worker.engine.drafts import Drafter, DraftStats
from worker.engine.generation import Generation, Sink
from worker.engine.saved import SavedStates, forget
from worker.engine.scheduler import SlotWork, StepCost, StepStats, plan_step
from worker.engine.slotfiles import SlotChores
from worker.engine.slots import CacheStats, Slot, pick_slot
from worker.engine.tokenbatch import TokenBatch, calibrate

log = logging.getLogger("worker")

_CLOSE_WAIT_S = 30.0
_QUIET_BEFORE_SAVE_S = 0.3  # idle this long before an idle save (saved.py): next turns come first


class BatchLoop:
    def __init__(
        self,
        ctx: Any,
        n_ctx: int,
        n_batch: int,
        parallel: int,
        prefill_chunk: int,
        cache_ram_bytes: int,
        token_gap_s: float,
        draft_max: int,
        disk: DiskCache | None = None,
    ) -> None:
        if not 1 <= parallel <= n_batch:
            raise ValueError(f"parallel ({parallel}) must be between 1 and n_batch ({n_batch})")
        self._ctx = ctx
        self._mem = llama_lib.llama_get_memory(ctx)
        self.n_ctx = n_ctx
        self.n_batch = n_batch
        self.prefill_chunk = max(1, prefill_chunk)  # the scheduler's floor beside running streams
        self.gap_s, self.cost = token_gap_s, StepCost()
        self._batch = TokenBatch(n_batch)
        self.steps, self.drafts = StepStats(), DraftStats()  # written by the loop thread, read by /health
        self.draft_threshold: float | None = None  # pinned by tests (0: as on a GPU); None: measured
        self.merge_last = False  # measured at load: a prompt's last token goes with its last chunk
        self.calibrated = threading.Event()  # the load-time measures are done (Engine.load waits)
        self._draft_max = draft_max = 0 if llama_lib.llama_model_is_recurrent(llama_lib.llama_get_model(ctx)) \
            else draft_max  # a rejected draft is removed from the KV cache: a recurrent state cannot be
        self.slots = [Slot(seq, drafter=Drafter(draft_max, self.drafts)) for seq in range(parallel)]
        self._waiting: deque[Generation] = deque()
        self._cond = threading.Condition()
        self.chores = SlotChores(self._cond, lambda: self._stopping)  # slot files' work (slotfiles.py)
        self._stopping, self._clock, self._admissions = False, 0, 0  # the clock: recency of slot caches
        # Counters: written by the loop thread only, read by /health.
        self.stats = CacheStats()
        self.saved = SavedStates(ctx, cache_ram_bytes, disk, self.stats)
        self.ram, self.io = self.saved.ram, self.saved.io  # /health reads their counters
        self.served = self.active = 0
        self._busy_since = self._progress_at = 0.0
        self._thread = threading.Thread(target=self._run, name="batch-loop", daemon=True)
        self._thread.start()

    # --- any thread ---------------------------------------------------------------------

    def submit(self, gen: Generation, sink: Sink) -> None:
        gen.sink = sink
        if not self.saved.prefetch(gen, self.slots, self._enqueue):  # a longer prefix on disk: read first
            self._enqueue(gen)

    def _enqueue(self, gen: Generation) -> None:
        with self._cond:
            if not self._stopping:
                self._waiting.append(gen)
                self._cond.notify()
                return
        gen.end("cancelled")

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def seconds_since_token(self) -> float | None:
        """Seconds since ANY active slot made progress (a token or a prompt chunk)."""
        return None if self.active == 0 else max(0.0, time.monotonic() - max(self._progress_at, self._busy_since))

    def cancel_all(self) -> None:
        """Cancel every running and waiting request (they end "cancelled" within a step)."""
        with self._cond:
            gens = [*self._waiting, *(s.gen for s in self.slots if s.gen is not None)]
            self._cond.notify()
        for gen in gens:
            gen.cancel.set()

    def close(self) -> None:
        """Stop the loop (running and waiting requests end "cancelled") and free the batch."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=_CLOSE_WAIT_S)
        if not self._thread.is_alive():
            self._batch.free()
        self.saved.close()

    # --- the loop thread ------------------------------------------------------------------

    def _run(self) -> None:
        # Timed on this thread, the one that owns the context and decodes (tokenbatch.py).
        self.merge_last = calibrate(self._ctx, self._batch, self.cost, self._draft_max > 0, self.calibrated)
        while True:
            self.chores.run(self.slots)
            with self._cond:
                idle = not self._stopping and not self._waiting and self.active == 0
                if idle and self.saved.has_idle_work(self.slots):
                    # A conversation's next turn often follows its answer at once: serve it
                    # before a save pauses the loop for the copy out of the KV cache.
                    self._cond.wait(_QUIET_BEFORE_SAVE_S)
                    idle = not self._stopping and not self._waiting and self.active == 0
            if idle and self.saved.save_idle(self.slots):
                continue  # one state saved; look again for work before the next
            with self._cond:
                while not self._stopping and not self._waiting and self.active == 0 and not self.chores:
                    self._cond.wait()
                if self._stopping:
                    break
                gone = [g for g in self._waiting if g.cancel.is_set()]
                for g in gone:
                    self._waiting.remove(g)
                admitted = self._admit()
            try:
                for g in gone:
                    self.served += 1
                    g.end("cancelled")
                for slot in admitted:
                    assert slot.gen is not None
                    slot.gen.begin()
                self._step()
            except Exception as e:
                # A bug here must not leave clients waiting forever: fail what runs, forget
                # the KV of those slots (it may not match their token lists), keep serving.
                log.exception("batch loop step failed")
                for slot in self.slots:
                    if slot.gen is not None:
                        forget(self._mem, slot)
                        self._finish(slot, error=f"internal error: {e}")
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        self.chores.fail_all()
        for slot in self.slots:
            if slot.gen is not None:
                self._finish(slot, "cancelled")
        for g in waiting:
            g.end("cancelled")

    def _admit(self) -> list[Slot]:
        """Move waiting requests into idle slots, in arrival order (called under the lock)."""
        admitted: list[Slot] = []
        while self._waiting:
            idle = [s for s in self.slots if s.gen is None]
            if not idle:
                break
            gen = self._waiting[0]
            prompt = gen.prepared.tokens
            # cache_prompt false: reuse no cached prefix (the least recently used slot).
            cache_prompt = gen.prepared.sampling.cache_prompt
            picked = pick_slot(idle, prompt[:-1] if cache_prompt else [])
            assert picked is not None
            slot, reuse = picked
            self._waiting.popleft()
            self._assign(slot, gen, reuse)
            admitted.append(slot)
        return admitted

    def _assign(self, slot: Slot, gen: Generation, reuse: int) -> None:
        prompt = gen.prepared.tokens
        reuse, restored = self.saved.restore_into(slot, gen, reuse)
        if reuse < len(slot.tokens):
            if llama_lib.llama_memory_seq_rm(self._mem, slot.seq, reuse, -1):
                del slot.tokens[reuse:]
            else:  # partial removal unsupported (recurrent models): start over
                forget(self._mem, slot)
                reuse = 0
        if reuse and not restored:
            self.stats.hits += 1
            self.stats.tokens_reused += reuse
        slot.gen = gen
        slot.drafter.reset()
        slot.prefilled = reuse
        slot.next_token = prompt[-1] if reuse == len(prompt) - 1 else None
        gen.prompt_cached = gen.prompt_evaluated = reuse
        self._admissions += 1
        slot.admitted = self._admissions
        if self.active == 0:
            self._busy_since = time.monotonic()
        self.active += 1

    def _finish(
        self, slot: Slot, reason: str | None = None, error: str | None = None, status: int = 500
    ) -> None:
        gen = slot.gen
        assert gen is not None
        slot.gen = slot.next_token = None
        self._clock += 1
        slot.last_used = self._clock
        self.active -= 1
        self.served += 1
        gen.end(reason, error, status)

    def _step(self) -> None:
        for slot in self.slots:
            if slot.gen is not None and slot.gen.cancel.is_set():
                self._finish(slot, "cancelled")  # the client is gone: free the slot now
            elif slot.next_token is not None and len(slot.tokens) >= self.n_ctx:
                self._finish(slot, "length")  # the slot is full (the max_tokens clamp prevents it)
        busy = {s.seq: s for s in self.slots if s.gen is not None}
        drafts: dict[int, list[int]] = {}
        work: list[SlotWork] = []
        spare = self.n_batch - sum(1 for s in busy.values() if s.next_token is not None)
        # No drafts while a prompt is read beside the streams: its reader waits for every row.
        threshold = 1.0 if len(busy) > self.n_batch - spare else self.draft_threshold \
            if self.draft_threshold is not None else self.cost.draft_threshold(self.n_batch - spare)
        for s in busy.values():
            gen = s.gen
            assert gen is not None
            if s.next_token is None:
                work.append(SlotWork(s.seq, s.admitted, len(gen.prepared.tokens) - 1 - s.prefilled, False))
                continue
            most = min(spare, self.n_ctx - len(s.tokens) - 1, gen.prepared.max_tokens - gen.completion_tokens - 1)
            draft = drafts[s.seq] = s.drafter.propose(s.tokens, s.next_token, most, threshold)
            spare -= len(draft)
            work.append(SlotWork(s.seq, s.admitted, 0, gen.completion_tokens > 0, 1 + len(draft)))
        plan = plan_step(work, self.cost, self.n_batch, self.gap_s, self.prefill_chunk, self.merge_last)
        if plan.decode or plan.chunks:
            decoding = [(busy[k], drafts[k]) for k in plan.decode]
            self._decode(decoding, [(busy[k], take) for k, take in plan.chunks], [busy[k] for k in plan.merged])

    def _end_newest(self, why: str) -> None:
        slot = max((s for s in self.slots if s.gen is not None), key=lambda s: s.admitted)
        gen = slot.gen
        assert gen is not None
        log.warning("%s (%d requests running): ending the newest request after %d tokens",
                    why, self.active, gen.completion_tokens)
        if gen.completion_tokens:
            self._finish(slot, "length")
        else:
            self._finish(slot, error=f"{why}; retry the request", status=503)

    def _decode(self, decoding: list[tuple[Slot, list[int]]], chunks: list[tuple[Slot, int]], merged: list[Slot]) -> None:
        t0 = time.perf_counter()
        batch = self._batch
        batch.clear()
        for s, draft in decoding:
            assert s.next_token is not None
            batch.add(s.seq, (s.next_token, *draft), len(s.tokens), True)
        rows = batch.n
        for s, take in chunks:
            assert s.gen is not None
            batch.add(s.seq, s.gen.prepared.tokens[s.prefilled : s.prefilled + take], len(s.tokens), False)
        last = {s.seq: batch.add(s.seq, [s.gen.prepared.tokens[-1]], len(s.gen.prepared.tokens) - 1, True)
                for s in merged if s.gen is not None}
        t1 = time.perf_counter()
        rc = batch.decode(self._ctx)
        self.steps.decode_s += time.perf_counter() - t1
        if rc == 1:
            # No free cells although every slot stays within its own: nothing was stored.
            # End the newest request and plan again rather than retry forever.
            self._end_newest("llama.cpp found no room in the KV cache")
            return
        if rc != 0:
            # Some ubatches may have landed in the KV cache: trim every slot involved back
            # to what its token list says, and fail their requests.
            for s in [*(s for s, _ in decoding), *(s for s, _ in chunks)]:  # merged: in chunks
                llama_lib.llama_memory_seq_rm(self._mem, s.seq, len(s.tokens), -1)
                self._finish(s, error=f"llama_decode failed (code {rc})")
            return
        now = self._progress_at = time.monotonic()
        for s, take in chunks:
            gen = s.gen
            assert gen is not None
            prompt = gen.prepared.tokens
            s.tokens.extend(prompt[s.prefilled : s.prefilled + take])
            s.prefilled += take
            gen.prompt_evaluated = s.prefilled
            gen.last_token_at = now
            if s.prefilled == len(prompt) - 1:
                s.next_token = prompt[-1]  # decoded alone next step when nobody else runs
        row = 0
        for s, draft in decoding:
            self._take(s, row, draft)
            row += 1 + len(draft)
        for s in merged:
            self._take(s, last[s.seq], [])
        rows += len(last)
        self.steps.count(rows, [take for _, take in chunks], time.perf_counter() - t0)
        self.cost.observe(rows, batch.n - rows, time.perf_counter() - t0)

    def _take(self, s: Slot, row: int, draft: list[int]) -> None:
        """Sample slot ``s``'s rows in order, keeping drafted tokens while each is what the
        request's chain sampled (drafts.py says why that keeps its output's distribution),
        and remove the rest of the draft from the KV cache."""
        gen = s.gen
        assert gen is not None and s.next_token is not None
        s.tokens.append(s.next_token)
        gen.prompt_evaluated = gen.prompt_tokens
        kept, error = 0, None
        try:
            token = gen.next_token(self._ctx, row)
            while token is not None and kept < len(draft) and token == draft[kept]:
                s.tokens.append(token)
                kept += 1
                token = gen.next_token(self._ctx, row + kept)
        except Exception as e:
            log.exception("generation failed")
            token, error = None, f"internal error: {e}"
        if kept < len(draft):
            llama_lib.llama_memory_seq_rm(self._mem, s.seq, len(s.tokens), -1)
        s.drafter.verified(len(draft), kept)
        if token is None:
            self._finish(s, error=error)
        else:
            s.next_token = token

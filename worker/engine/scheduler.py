"""What one batch step takes: decided from the step's measured cost, not from a constant.

Rules for this module (PURE: no clock, no llama.cpp, no threads; the batch loop measures
and passes the seconds in, tests pass tables):
- A step's time is modelled from what it holds: decode rows (one per generating slot, plus
  its drafted tokens) and prompt tokens. ``StepCost`` learns both online from the loop's
  own steps: a decode-only step's time per row count, and a prompt token's marginal cost
  from steps that read prompts. The device decides (a prompt token costs ~3 ms on two CPU
  cores and ~0.02 ms on a GPU), where a fixed chunk suited one of them.
- Running streams (slots that have produced a token) keep their inter-token gap within
  ``gap_s``: a step takes as many prompt tokens as the cost model says fit beside their
  rows (at least ``floor``, so a newcomer always moves), in one batch across every slot
  still reading its prompt, oldest first.
- A burst is read together: when no stream runs, slots whose prompt is read wait for the
  other prompts of the burst before generating, while what is left to read is no more than
  ``HOLD_TOKENS`` (llama-server's default n_batch: what it reads in one batch). A stream
  that started early would get one token per long prompt step until the others are read
  (a past result: 4 x 512-token prompts generated at 0.27x llama-server's rate); held, the
  four start together and generate at full speed, their first tokens no later than
  llama-server's.
- Where prompt tokens are dear against a step's decode rows (a CPU), a step beside running
  streams that finishes the oldest waiting prompt reads that prompt alone
  (``StepCost.dear_prompts``): its first token does not wait for the other prompts' tokens,
  which costs each of them one more step's decode rows. Where prompt tokens are cheap (a
  GPU) the prompts are read together.
- A prompt's last token goes in the step that reads the rest of it (``merged``: its first
  token is sampled a step sooner) only where the caller measured that a row's logits do
  not depend on the batch's shape (``merge_last``), and not when the burst rule would hold
  the slot anyway. Elsewhere it is decoded as the slot's first row in a step of its own,
  which keeps greedy output independent of what was cached (batch.py says why).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Prompt tokens left to read below which a burst's read slots wait for the rest.
HOLD_TOKENS = 2048
# Weight of a new measurement in the running averages (the last ~10 steps count).
_ALPHA = 0.2
# Before any step with a prompt was measured: a prompt token's cost guessed high (two CPU
# cores), so the first steps beside running streams take small chunks, not a stall.
_PROMPT_TOKEN_S_GUESS = 0.005


@dataclass
class StepCost:
    """Running estimates of a step's time (seconds); written by the loop thread only."""

    decode_s: dict[int, float] = field(default_factory=dict)  # rows -> a decode-only step
    prompt_token_s: float | None = None  # marginal cost of one prompt token in a step
    row_ratio: float | None = None  # b/a of a decode step, measured at load (power of two)

    def observe(self, rows: int, prompt: int, seconds: float) -> None:
        """One step held ``rows`` decode rows and ``prompt`` prompt tokens and took ``seconds``."""
        if prompt == 0:
            if rows > 0:
                old = self.decode_s.get(rows)
                self.decode_s[rows] = seconds if old is None else old + _ALPHA * (seconds - old)
            return
        per_token = max(0.0, seconds - self.rows_s(rows)) / prompt
        old_p = self.prompt_token_s
        self.prompt_token_s = per_token if old_p is None else old_p + _ALPHA * (per_token - old_p)

    def rows_s(self, rows: int) -> float:
        """A decode-only step of ``rows`` rows: measured, else scaled from the nearest measured."""
        if rows <= 0 or not self.decode_s:
            return 0.0
        got = self.decode_s.get(rows)
        if got is not None:
            return got
        near = min(self.decode_s, key=lambda r: abs(r - rows))
        return self.decode_s[near] * rows / near if rows < near else self.decode_s[near]

    def draft_threshold(self, rows: int) -> float:
        """The acceptance probability a drafted token must have to pay for its row: with a
        step of r rows costing a + b*r, a row costs b and the step's own tokens cost
        (a + b*rows) / rows each, so a draft token accepted with probability p pays when
        p > b*rows / (a + b*rows). The ratio b/a comes from ``calibrated`` (measured once at
        load, rounded up to a power of two) and never from the moment's timings: a request
        served alone then gets the same drafts, so the same batches, on every run. 2/3 for
        one stream and 8/9 for four on two CPU cores with flash attention (a row costs about
        half a step: a draft must be likely), a few hundredths on a GPU (rows almost free)."""
        q = self.row_ratio
        if q is None:
            return 0.5
        rows = max(1, rows)
        return q * rows / (1 + q * rows)

    def calibrated(self, one_row_s: float, two_rows_s: float, many_rows_s: float, many: int) -> None:
        """Decode steps of 1, 2 and ``many`` rows took these seconds (at load). A row's cost
        is the dearer of the first extra row's and the average extra row's (on a CPU the step
        from one row to two can be the dearest: another kernel path). The ratio is rounded UP
        to a power of two: a draft that does not pay slows every stream of its step, while
        one not made only misses its gain (two CPU cores, SmolLM2, flash attention: 1 row
        5.4 ms, 2 rows 7.8, 8 rows 27; b/a 1.27, kept as 2)."""
        b = max(0.0, two_rows_s - one_row_s, (many_rows_s - one_row_s) / (many - 1))
        a = max(one_row_s - b, one_row_s / 100)
        self.row_ratio = 2.0 ** math.ceil(math.log2(max(b / a, 1 / 256)) - 1e-9)

    def dear_prompts(self, tokens: int, prompts: int, rows: int) -> bool:
        """Whether ``prompts`` prompts (``tokens`` in all) that would finish in a step beside
        an oldest one that finishes too should wait for the next step (of ``rows`` decode
        rows), so that the oldest gets its first token without waiting for their tokens:
        when reading them costs more than the next step's decode rows cost each of them.
        Two CPU cores: 3 prompts of 10 tokens cost 80 ms, a step of 2 rows 8 ms (one after
        another: TTFTs 28/59/93/129 ms, not 28/107/107/107); a GPU: a prompt token costs a
        few hundredths of a millisecond and they stay together. Not before a prompt token's
        cost was measured."""
        per_token = self.prompt_token_s
        return per_token is not None and per_token * tokens > prompts * self.rows_s(rows)

    def prompt_budget(self, rows: int, gap_s: float, floor: int, room: int) -> int:
        """Prompt tokens a step may take beside ``rows`` decode rows so that it lasts at most
        ``gap_s`` (at least ``floor``, at most ``room``)."""
        if room <= 0:
            return 0
        if rows == 0:
            return room  # nobody waits for this step: read as much as a batch holds
        per_token = self.prompt_token_s if self.prompt_token_s is not None else _PROMPT_TOKEN_S_GUESS
        fit = int((gap_s - self.rows_s(rows)) / max(per_token, 1e-9))
        return max(min(floor, room), min(fit, room))


@dataclass(frozen=True)
class SlotWork:
    """What the scheduler needs of a busy slot."""

    key: int  # the caller's id for the slot
    admitted: int  # admission order (oldest first)
    to_read: int  # prompt tokens still to read before its last one (0: ready to decode)
    started: bool  # it has produced a token (a running stream)
    rows: int = 1  # decode rows it wants this step (1 + drafted tokens), when decoding


@dataclass(frozen=True)
class StepPlan:
    decode: tuple[int, ...]  # keys of slots that decode this step
    chunks: tuple[tuple[int, int], ...]  # (key, prompt tokens) read this step, oldest first
    held: tuple[int, ...]  # read slots that wait for the rest of their burst
    merged: tuple[int, ...] = ()  # slots whose chunk ends their prompt and carries its last token


def plan_step(
    work: list[SlotWork], cost: StepCost, n_batch: int, gap_s: float, floor: int, merge_last: bool = False
) -> StepPlan:
    """The step's decode rows and prompt chunks (see the module's rules)."""
    reading = sorted((w for w in work if w.to_read > 0), key=lambda w: w.admitted)
    ready = [w for w in work if w.to_read == 0]
    running = any(w.started for w in ready)
    left = sum(w.to_read for w in reading)
    hold = bool(reading) and not running and left <= HOLD_TOKENS
    decode = [] if hold else ready
    rows = sum(w.rows for w in decode)
    budget = cost.prompt_budget(rows, gap_s, floor, n_batch - rows) if running else n_batch - rows
    chunks: list[tuple[int, int]] = []
    for w in reading:
        if budget <= 0:
            break
        take = min(budget, w.to_read)
        chunks.append((w.key, take))
        budget -= take
    if running and len(chunks) > 1 and chunks[0][1] == reading[0].to_read and cost.dear_prompts(
            sum(take for _, take in chunks[1:]), len(chunks) - 1, rows + 1):
        chunks = chunks[:1]  # the oldest prompt alone: its first token a step sooner
    merged: list[int] = []
    if merge_last:
        after = left - sum(take for _, take in chunks)  # prompt tokens still to read after this step
        # Read slots wait for the rest of a burst next step unless a stream runs by then.
        held_next = 0 < after <= HOLD_TOKENS and not running and not decode
        done = [k for (k, take), w in zip(chunks, reading) if take == w.to_read]
        merged = [] if held_next else done[:budget]
    return StepPlan(
        decode=tuple(w.key for w in decode),
        chunks=tuple(chunks),
        held=tuple(w.key for w in ready) if hold else (),
        merged=tuple(merged),
    )


@dataclass
class StepStats:
    """What the batch steps did (for /health and the benches); written by the loop thread."""

    steps: int = 0
    rows: int = 0  # decode rows (drafted tokens included)
    prompt_steps: int = 0  # steps that read prompt tokens
    shared_prompt_steps: int = 0  # steps that read the prompts of two slots or more together
    prompt_tokens: int = 0
    step_s: float = 0.0  # whole steps: batch building, llama_decode, sampling, output
    decode_s: float = 0.0  # inside llama_decode alone

    def count(self, rows: int, chunks: list[int], seconds: float) -> None:
        self.steps += 1
        self.rows += rows
        if chunks:
            self.prompt_steps += 1
            self.shared_prompt_steps += len(chunks) > 1
            self.prompt_tokens += sum(chunks)
        self.step_s += seconds

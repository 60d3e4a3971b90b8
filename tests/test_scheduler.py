"""The batch step's scheduler and the context drafter: pure decisions, tested as tables."""

from __future__ import annotations

import pytest

from worker.engine.drafts import Drafter, DraftStats, bucket
from worker.engine.scheduler import HOLD_TOKENS, SlotWork, StepCost, plan_step


def _cost(decode: dict[int, float], per_token: float) -> StepCost:
    return StepCost(decode_s=dict(decode), prompt_token_s=per_token)


CPU = _cost({1: 0.010, 4: 0.028}, 0.0035)  # two CPU cores, SmolLM2 (bench.scheduler)
GPU = _cost({1: 0.004, 4: 0.005}, 0.00002)


@pytest.mark.parametrize(
    ("cost", "rows", "gap_s", "floor", "room", "want"),
    [
        (CPU, 4, 1.0, 16, 508, 277),  # (1.0 - 0.028) / 0.0035
        (CPU, 4, 0.1, 16, 508, 20),
        (CPU, 4, 0.02, 16, 508, 16),  # the rows alone exceed the gap: the floor
        (CPU, 4, 0.02, 16, 8, 8),  # never more than the batch has room for
        (GPU, 4, 0.05, 16, 508, 508),  # a GPU reads a whole batch within the gap
        (CPU, 0, 0.05, 16, 512, 512),  # nobody generates: as much as the batch holds
        (CPU, 2, 1.0, 16, 0, 0),
        (StepCost(), 4, 0.5, 16, 508, 100),  # nothing measured yet: a prompt token guessed at 5 ms
    ],
)
def test_prompt_budget_fits_the_gap(cost: StepCost, rows: int, gap_s: float, floor: int, room: int,
                                    want: int) -> None:
    assert cost.prompt_budget(rows, gap_s, floor, room) == want


def test_cost_is_learned_from_steps() -> None:
    cost = StepCost()
    cost.observe(2, 0, 0.020)
    assert cost.rows_s(2) == pytest.approx(0.020)
    assert cost.rows_s(1) == pytest.approx(0.010)  # scaled down from the nearest measured
    assert cost.rows_s(8) == pytest.approx(0.020)  # never scaled up: the nearest measured
    cost.observe(2, 100, 0.320)  # 0.3 s for 100 prompt tokens beside 2 rows
    assert cost.prompt_token_s == pytest.approx(0.003)
    for _ in range(30):  # the device got slower: the estimate follows
        cost.observe(2, 100, 0.620)
    assert cost.prompt_token_s == pytest.approx(0.006, rel=0.01)
    cost.observe(0, 50, 0.1)  # a prompt-only step
    assert cost.prompt_token_s < 0.006


def _w(key: int, to_read: int, started: bool = False, rows: int = 1, admitted: int | None = None) -> SlotWork:
    return SlotWork(key, key if admitted is None else admitted, to_read, started, rows)


@pytest.mark.parametrize(
    ("work", "want_decode", "want_chunks", "want_held"),
    [
        # A lone request: its prompt in one step, then its last token alone.
        ([_w(0, 300)], (), ((0, 300),), ()),
        ([_w(0, 0)], (0,), (), ()),
        # A burst of four from idle: read together in full batches, oldest first; a slot
        # whose prompt is read waits for the others, then all four start together.
        ([_w(0, 511), _w(1, 511), _w(2, 511), _w(3, 511)], (), ((0, 511), (1, 1)), ()),
        ([_w(0, 0), _w(1, 510), _w(2, 511), _w(3, 511)], (), ((1, 510), (2, 2)), (0,)),
        ([_w(0, 0), _w(1, 0), _w(2, 0), _w(3, 0)], (0, 1, 2, 3), (), ()),
        # More to read than llama-server reads in one batch: a read slot starts at once.
        ([_w(0, 0), _w(1, HOLD_TOKENS + 1)], (0,), ((1, 511),), ()),
        # A newcomer among running streams: a chunk the gap allows beside their rows.
        ([_w(0, 0, True), _w(1, 0, True), _w(2, 0, True), _w(3, 500)], (0, 1, 2), ((3, 277),), ()),
        # Drafted rows count: fewer prompt tokens fit.
        ([_w(0, 0, True, rows=4), _w(1, 900)], (0,), ((1, 277),), ()),
        # A fresh slot beside running streams does not wait (only a burst from idle does).
        ([_w(0, 0, True), _w(1, 0), _w(2, 100)], (0, 1), ((2, 100),), ()),
        # Oldest prompt first, whatever the slot order.
        ([_w(0, 600, admitted=5), _w(1, 600, admitted=2)], (), ((1, 512),), ()),
    ],
)
def test_plan_step(work: list[SlotWork], want_decode: tuple[int, ...], want_chunks: tuple[tuple[int, int], ...],
                   want_held: tuple[int, ...]) -> None:
    cost = _cost({3: 0.028, 4: 0.028, 2: 0.02}, 0.0035)
    plan = plan_step(work, cost, 512, 1.0, 16)
    assert (plan.decode, plan.chunks, plan.held) == (want_decode, want_chunks, want_held)
    assert sum(w.rows for w in work if w.key in plan.decode) + sum(t for _, t in plan.chunks) <= 512
    assert plan.merged == ()  # merge_last off: every last prompt token is a step of its own


@pytest.mark.parametrize(
    ("work", "want_chunks", "want_merged"),
    [
        # One request alone: its prompt and its last token in one step.
        ([_w(0, 300)], ((0, 300),), (0,)),
        # A prompt longer than a batch: its last token goes with its last chunk only.
        ([_w(0, 600)], ((0, 512),), ()),
        # ... and none when the chunk fills the batch (no room for the token).
        ([_w(0, 512)], ((0, 512),), ()),
        # A burst: the first read slot would be held for the others, so it is not merged;
        # the chunk that ends the burst carries its last token.
        ([_w(0, 300), _w(1, 300)], ((0, 300), (1, 212)), ()),
        ([_w(0, 0), _w(1, 88)], ((1, 88),), (1,)),
        # Beside running streams: a newcomer whose prompt fits starts at once.
        ([_w(0, 0, True), _w(1, 100)], ((1, 100),), (1,)),
    ],
)
def test_last_prompt_token_merged(work: list[SlotWork], want_chunks: tuple[tuple[int, int], ...],
                                  want_merged: tuple[int, ...]) -> None:
    cost = _cost({1: 0.02, 2: 0.02}, 0.0035)
    plan = plan_step(work, cost, 512, 1.0, 16, merge_last=True)
    assert (plan.chunks, plan.merged) == (want_chunks, want_merged)
    rows = sum(w.rows for w in work if w.key in plan.decode)
    assert rows + sum(t for _, t in plan.chunks) + len(plan.merged) <= 512


# --- drafts ----------------------------------------------------------------------------------


def test_draft_copies_what_followed_the_last_ngram() -> None:
    d = Drafter(8, DraftStats())
    ctx = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 20, 21, 2]
    assert d.propose(ctx, 3, 8, 0.0) == [4, 5, 6, 7, 8, 9, 10, 11]  # "2 3" occurred: copy from there
    assert d.propose([5, 6, 7], 8, 8, 0.0) == []  # nothing repeats
    d.reset()
    assert d.propose([5, 6, 7, 5, 6], 7, 2, 0.0) == [5, 6]  # at most what the caller has room for


def test_longest_ngram_wins_and_latest_occurrence() -> None:
    d = Drafter(8, DraftStats())
    # "9 3" occurred followed by 100; "1 9 3" occurred (earlier) followed by 200.
    ctx = [1, 9, 3, 200, 7, 9, 3, 100, 1, 9]
    assert d.propose(ctx, 3, 1, 0.0) == [200]
    d.reset()
    ctx2 = [5, 3, 100, 5, 3, 101, 8, 5]  # "5 3" twice: the later one
    assert d.propose(ctx2, 3, 1, 0.0) == [101]


def test_index_is_incremental() -> None:
    d = Drafter(8, DraftStats())
    tokens = [1, 2, 3, 4]
    assert d.propose(tokens, 9, 4, 0.0) == []
    tokens += [9, 1, 2]  # the slot's sequence grows between steps
    assert d.propose(tokens, 3, 4, 0.0) == [4, 9, 1, 2]


@pytest.mark.parametrize(
    ("alpha", "threshold", "want"),
    [
        (0.5, 0.5, 0),  # a short match's prior where a row costs a step: no draft
        (0.5, 0.33, 1),  # a row costs a third of a step (ratio 1/2): one token
        (2 / 3, 0.6, 1),
        (2 / 3, 0.89, 0),  # four streams on two CPU cores (ratio 2): rows cost as much as tokens
        (0.5, 0.03, 5),  # a GPU: rows almost free (0.5^5 > 0.03)
        (2 / 3, 0.03, 8),  # ... and the setting's limit
        (0.95, 0.6, 8),  # a long match: long drafts pay even on a CPU (0.95^8 = 0.66)
        (0.9, 0.86, 1),  # alpha 0.9 beats four CPU streams' threshold by one token
        (0.1, 0.03, 1),  # alpha 0.1: one token still pays on a GPU
    ],
)
def test_draft_length_is_what_pays_for_its_rows(alpha: float, threshold: float, want: int) -> None:
    assert Drafter(8, DraftStats()).length(alpha, threshold) == want


# A context whose end ("... 7 8 9" + 10) repeats an earlier run: a match of ``n`` tokens.
def matched(n: int) -> tuple[list[int], int]:
    run = list(range(100, 100 + n))
    return [1, 2, *run, 50, 51, 52, 53, 3, 4, *run[:-1]], run[-1]


def test_a_long_match_drafts_where_a_short_one_does_not() -> None:
    assert [bucket(n) for n in (2, 3, 4, 7, 8, 15, 16, 31, 32, 64)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    d = Drafter(8, DraftStats())
    for n, want in ((3, 0), (6, 0), (10, 1), (20, 3), (40, 7)):
        d.reset()
        ctx, last = matched(n)
        # 2/3: one CPU stream's threshold; the priors 0.5 (< 8 tokens), 0.8, 0.9, 0.95
        assert len(d.propose(ctx, last, 8, 2 / 3)) == want, n
    d.reset()
    ctx, last = matched(10)
    assert d.propose(ctx, last, 8, 0.0) == [50, 51, 52, 53, 3, 4, 100, 101]  # what followed the earlier run


def test_acceptance_is_learned_per_match_and_drafting_pauses_then_retries() -> None:
    stats = DraftStats()
    d = Drafter(16, stats)
    ctx, last = matched(10)  # bucket 2 (8-15 tokens): prior 0.8
    first = len(d.propose(ctx, last, 16, 2 / 3))
    for _ in range(6):
        d.propose(ctx, last, 16, 2 / 3)
        d.verified(4, 4)  # everything accepted: alpha grows, drafts get longer
    assert d.alpha(2) > 0.95 and len(d.propose(ctx, last, 16, 2 / 3)) > first
    assert (stats.drafted, stats.accepted, stats.drafts) == (24, 24, 6)
    assert stats.alpha(2) > 0.8  # the worker learned it too
    for _ in range(8):
        d.propose(ctx, last, 16, 2 / 3)
        d.verified(2, 0)  # rejected: this request's alpha falls below what pays
    assert d.propose(ctx, last, 16, 2 / 3) == []
    other = Drafter(16, stats)  # another request of the same worker still drafts
    assert other.propose(ctx, last, 16, 2 / 3) != []
    short, short_last = matched(3)
    assert other.propose(short, short_last, 16, 2 / 3) == []  # the short match's bucket learned nothing
    for _ in range(64):  # the cooldown: the worker's estimates again
        d.propose(ctx, last, 16, 2 / 3)
    assert d.alpha(2) == pytest.approx(stats.alpha(2))
    assert Drafter(0, DraftStats()).propose(ctx, last, 16, 0.0) == []  # draft_max = 0: never


@pytest.mark.parametrize(
    ("one", "two", "eight", "ratio", "t1", "t4"),
    [
        # Two CPU cores, SmolLM2, flash attention off: 1 row 5.1 ms, 8 rows 39 ms: a row costs
        # as much as a step, a draft pays only if almost sure.
        (0.0051, 0.0090, 0.0391, 32.0, 0.970, 0.992),
        # ... flash attention on (the default): 1 row 5.4 ms, 2 rows 7.8, 8 rows 27: b/a 1.27,
        # rounded up: long matches pay, short ones do not.
        (0.00543, 0.00783, 0.02674, 2.0, 0.667, 0.889),
        # The same whose 8-row average looks cheap: the first extra row still decides.
        (0.0051, 0.0090, 0.0240, 4.0, 0.8, 0.94),
        (0.0040, 0.0041, 0.0047, 1 / 32, 0.03, 0.11),  # a GPU: rows almost free
        (0.0040, 0.0040, 0.0040, 1 / 256, 0.004, 0.015),  # not measurably dearer: the floor
        (0.0051, 0.0090, 0.0389, 32.0, 0.970, 0.992),  # a little noise: the same ratio (a power of two)
        (0.0100, 0.0160, 0.0540, 2.0, 0.667, 0.889),  # a big model on a CPU: rows cost less than steps
    ],
)
def test_draft_threshold_from_the_rows_measured_at_load(one: float, two: float, eight: float, ratio: float,
                                                       t1: float, t4: float) -> None:
    cost = StepCost()
    assert cost.draft_threshold(4) == 0.5  # nothing measured
    cost.calibrated(one, two, eight, 8)
    assert cost.row_ratio == ratio
    assert cost.draft_threshold(1) == pytest.approx(t1, abs=0.005)
    assert cost.draft_threshold(4) == pytest.approx(t4, abs=0.005)
    cost.observe(1, 0, 5.0)  # the moment's timings never move it (reproducible drafts)
    assert cost.draft_threshold(1) == pytest.approx(t1, abs=0.005)


def test_dear_prompts_finishing_together_beside_streams_are_read_one_per_step() -> None:
    # One stream runs; three prompts of 10 tokens wait (the "four" workload's arrivals).
    work = [SlotWork(0, 1, 0, True), SlotWork(1, 2, 10, False), SlotWork(2, 3, 10, False), SlotWork(3, 4, 10, False)]
    cpu = StepCost(decode_s={1: 0.005, 2: 0.008, 4: 0.013}, prompt_token_s=0.0026)
    plan = plan_step(work, cpu, 512, 1.0, 64, merge_last=True)
    assert (plan.decode, plan.chunks, plan.merged) == ((0,), ((1, 10),), (1,))  # the oldest alone
    gpu = StepCost(decode_s={1: 0.004, 2: 0.0041, 4: 0.0043}, prompt_token_s=0.00002)
    plan = plan_step(work, gpu, 512, 1.0, 64, merge_last=True)
    assert plan.chunks == ((1, 10), (2, 10), (3, 10)) and plan.merged == (1, 2, 3)  # cheap: together
    unmeasured = StepCost(decode_s={1: 0.005})
    assert len(plan_step(work, unmeasured, 512, 1.0, 64, merge_last=True).chunks) == 3
    # Nobody runs yet: the burst rule decides (all read together, started together).
    idle = [SlotWork(1, 2, 10, False), SlotWork(2, 3, 10, False), SlotWork(3, 4, 10, False)]
    assert len(plan_step(idle, cpu, 512, 1.0, 64, merge_last=True).chunks) == 3
    # A long prompt behind a short one: the short one's first token does not wait for 372
    # tokens of it; the long one starts a step later.
    long = [SlotWork(0, 1, 0, True), SlotWork(1, 2, 10, False), SlotWork(2, 3, 900, False)]
    assert plan_step(long, cpu, 512, 1.0, 64, merge_last=True).chunks == ((1, 10),)
    # The oldest is the long one: read as far as the gap allows, then the next; no cut.
    first_long = [SlotWork(0, 1, 0, True), SlotWork(2, 2, 900, False), SlotWork(1, 3, 10, False)]
    assert plan_step(first_long, cpu, 512, 1.0, 64, merge_last=True).chunks == ((2, 382),)

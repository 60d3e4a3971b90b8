"""Drafts from the context and the burst scheduler in the engine, on the real SmolLM2 model.

Drafts must never change what a request produces: greedy text is the same with and without
them, and a sampled stream keeps its distribution (drafts.py says why the verification
gives that; with a fixed seed it even gives the same draws). The engines here use flash
attention: on the CPU its logits do not depend on how many rows a batch has (bit for bit),
so any difference would be the verification's fault. Without it, llama.cpp's one-row and
several-row paths differ in the last bits, as batching requests together does, and a
near tie may go the other way; that is llama.cpp's arithmetic, not the drafts'. A burst's prompts are read
together, and its streams start in the same step: checked by the step counters and the
order of the sinks' events, never by the clock.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterator

import pytest

from tests.conftest import wait_until
from tests.test_worker_batching import Recorder, wait_all
from tests.test_worker_batching import load as load_engine
from worker.engine import Engine, Sampling

pytestmark = pytest.mark.model

CODE = '''def total_price(items, tax_rate):
    subtotal = 0
    for item in items:
        subtotal += item.price * item.quantity
    tax = subtotal * tax_rate
    return subtotal + tax
'''
PROMPTS = [
    # Something to copy: the answer repeats the prompt's text.
    "Rewrite this function with the name total_price changed to order_total:\n\n" + CODE
    + "\nHere is the rewritten function:\n\n",
    "Repeat after me exactly: the quick brown fox jumps over the lazy dog, the quick brown fox",
    # Nothing in particular to copy.
    "Write a short poem about the ocean at night.",
    "The capital of France is",
]


def load(draft_max: int, **overrides: object) -> Engine:
    return load_engine(**{"n_batch": 256, "cache_ram_mib": 0, "draft_max": draft_max, "flash_attn": "on",
                          **overrides})


@pytest.fixture(scope="module")
def engines() -> Iterator[tuple[Engine, Engine]]:
    with_drafts, without = load(8), load(0)
    # Draft as a GPU would (rows almost free), whatever rows cost on this CPU: the drafts'
    # length must not depend on this machine's speed, or the test would test nothing here.
    assert with_drafts.loop is not None
    with_drafts.loop.draft_threshold = 0.0
    yield with_drafts, without
    with_drafts.close()
    without.close()


def run(engine: Engine, prompt: str, sampling: Sampling) -> str:
    gen = engine.generation(engine.prepare_completion(prompt, sampling), threading.Event())
    return "".join(gen)


def test_drafts_never_change_greedy_text(engines: tuple[Engine, Engine]) -> None:
    with_drafts, without = engines
    assert with_drafts.loop is not None
    before = with_drafts.loop.drafts.accepted
    for prompt in PROMPTS:
        sampling = Sampling(max_tokens=80, temperature=0.0)
        assert run(with_drafts, prompt, sampling) == run(without, prompt, sampling), prompt
    # The copy prompts were drafted and the drafts accepted (else this tests nothing).
    assert with_drafts.loop.drafts.accepted - before >= 20


def test_drafts_keep_a_fixed_seed_stream_and_the_distribution(engines: tuple[Engine, Engine]) -> None:
    with_drafts, without = engines
    assert with_drafts.loop is not None
    prompt = PROMPTS[1]
    drafted = with_drafts.loop.drafts.drafted
    firsts: dict[bool, collections.Counter[str]] = {True: collections.Counter(), False: collections.Counter()}
    same = 0
    seeds = range(40)
    for seed in seeds:
        sampling = Sampling(max_tokens=12, temperature=1.0, top_k=40, top_p=0.95, seed=seed)
        a, b = run(with_drafts, prompt, sampling), run(without, prompt, sampling)
        same += a == b
        firsts[True][a[:12]] += 1
        firsts[False][b[:12]] += 1
    assert with_drafts.loop.drafts.drafted > drafted  # sampled streams were drafted too
    # The same seed draws the same numbers with and without drafts: the same streams.
    assert same == len(seeds), (same, firsts)
    # And the distribution of the opening text is the same: total variation within a bound.
    keys = set(firsts[True]) | set(firsts[False])
    tv = sum(abs(firsts[True][k] - firsts[False][k]) for k in keys) / (2 * len(seeds))
    assert tv <= 0.15, firsts


def test_a_burst_is_read_together_and_its_streams_start_together() -> None:
    # n_batch 64 and prompts of ~40 tokens: the burst needs several prompt steps.
    eng = load(0, n_batch=64)
    try:
        loop = eng.loop
        assert loop is not None
        rec = Recorder()
        preps = [eng.prepare_completion(f"Burst request number {i}: describe a colour, a shape and a sound "
                                        "in one sentence each, please.",
                                        Sampling(max_tokens=6, temperature=0.0, ignore_eos=True))
                 for i in range(4)]
        total = sum(len(p.tokens) - 1 for p in preps)
        steps0, prompt0, shared0 = loop.steps.steps, loop.steps.prompt_steps, loop.steps.shared_prompt_steps
        # Submitted together while the loop waits for its lock: one admission for all four.
        gens = [eng.generation(p, threading.Event()) for p in preps]
        sinks = [rec.sink(i) for i in range(4)]
        with loop._cond:
            for g, s in zip(gens, sinks):
                g.sink = s
                loop._waiting.append(g)
            loop._cond.notify()
        wait_all(sinks)
        assert all(g.error is None and g.completion_tokens == 6 for g in gens)
        # Read in full batches across the four prompts (not one prompt after another with
        # small chunks between tokens): as few prompt steps as the batch size allows.
        assert loop.steps.prompt_steps - prompt0 == -(-total // 64)
        assert loop.steps.shared_prompt_steps - shared0 >= 1
        # No token before every prompt was read: the four first pieces come before any second.
        pieces = [w for w, kind, _ in rec.events if kind == "piece"]
        assert sorted(pieces[:4]) == [0, 1, 2, 3], pieces
        assert loop.steps.steps - steps0 >= -(-total // 64) + 6
        wait_until(lambda: loop.active == 0, 30, "the loop to go idle")
    finally:
        eng.close()

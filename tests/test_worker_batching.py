"""Continuous batching in the engine (worker/engine/batch.py) on the real SmolLM2 model.

The engine is driven in-process. Sinks record, on the batch loop thread, what each
request emitted in one shared list, so the tests compare ORDER (which request produced a
token between two others' tokens), never clock time. Outputs that must be exact are
forced with logit bias (llama.cpp does not promise identical logits when sequences
share a batch); greedy determinism is checked for requests served alone.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from supervisor.launch import default_spec
from tests.conftest import default_model, wait_until
from worker.engine import Engine, Generation, LlamaLog, Prepared, Sampling

pytestmark = pytest.mark.model

NO_EOS = {"0": -100.0, "2": -100.0}  # SmolLM2's <|endoftext|> and <|im_end|>
PROMPT = "The three primary colors are"
N_BATCH = 64
CHUNK = 16


def load(**overrides: object) -> Engine:
    spec = default_spec(str(default_model()), "/nonexistent/unused.sock", **{
        "n_ctx": 1024,
        "n_batch": N_BATCH,
        "n_threads": 2,
        "parallel": 4,
        "prefill_chunk": CHUNK,
        # A gap no step keeps: the scheduler takes its floor (CHUNK) beside running streams,
        # so chunk sizes do not depend on this machine's speed (test_scheduler.py tests
        # the cost-driven choice).
        "token_gap_ms": 1,
        "cache_disk_mib": 0,  # the disk tier has tests of its own (test_disk_cache.py)
        **overrides,
    })
    log = LlamaLog(io.StringIO())
    log.install()
    eng = Engine(spec, log)
    eng.load(lambda _value: None)
    return eng


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    eng = load()
    yield eng
    eng.close()


@dataclass
class Recorder:
    """Every sink event of every request, in the order the batch loop produced them."""

    events: list[tuple[int, str, str]] = field(default_factory=list)
    probe: Callable[[], int] | None = None  # sampled at every piece (loop thread)
    probes: list[tuple[int, int]] = field(default_factory=list)

    def sink(self, who: int) -> _Sink:
        return _Sink(self, who)


@dataclass
class _Sink:
    rec: Recorder
    who: int
    ended_event: threading.Event = field(default_factory=threading.Event)

    def started(self) -> None:
        self.rec.events.append((self.who, "started", ""))

    def piece(self, text: str) -> None:
        self.rec.events.append((self.who, "piece", text))
        if self.rec.probe is not None:
            self.rec.probes.append((self.who, self.rec.probe()))

    def ended(self) -> None:
        self.rec.events.append((self.who, "ended", ""))
        self.ended_event.set()


def forced(engine: Engine, prompt: str, word: str, n: int) -> Prepared:
    """A request whose output is ``word`` n times whatever shares its batch."""
    (token,) = engine.prepare_completion(word, Sampling(max_tokens=1)).tokens[-1:]
    bias = {**NO_EOS, str(token): 100.0}
    return engine.prepare_completion(prompt, Sampling(max_tokens=n, temperature=0.0, logit_bias=bias))


def start(engine: Engine, rec: Recorder, who: int, prepared: Prepared) -> tuple[Generation, _Sink]:
    gen = engine.generation(prepared, threading.Event())
    sink = rec.sink(who)
    engine.start(gen, sink)
    return gen, sink


def text_of(rec: Recorder, who: int) -> str:
    return "".join(t for w, kind, t in rec.events if w == who and kind == "piece")


def wait_all(sinks: list[_Sink], timeout: float = 300) -> None:
    wait_until(lambda: all(s.ended_event.is_set() for s in sinks), timeout, "the generations to end")


def greedy(engine: Engine, prompt: str, n: int = 24) -> str:
    return "".join(engine.generation(
        engine.prepare_completion(prompt, Sampling(max_tokens=n, temperature=0.0)), threading.Event()
    ))


# --- many at once ---------------------------------------------------------------------------


def test_four_concurrent_streams_are_correct_and_interleaved(engine: Engine) -> None:
    rec = Recorder()
    words = [" red", " blue", " green", " cat"]
    runs = [start(engine, rec, i, forced(engine, f"Request {i}: say a word.", w, 20)) for i, w in enumerate(words)]
    wait_all([s for _, s in runs])

    for i, (gen, _) in enumerate(runs):
        assert text_of(rec, i) == words[i] * 20
        assert (gen.finish_reason, gen.completion_tokens, gen.error) == ("length", 20, None)
    # Interleaved, not one after another: every stream produced a token before any
    # other stream's last token.
    pieces = [(w, n) for n, (w, kind, _) in enumerate(rec.events) if kind == "piece"]
    first = {i: min(n for w, n in pieces if w == i) for i in range(4)}
    last = {i: max(n for w, n in pieces if w == i) for i in range(4)}
    assert max(first.values()) < min(last.values())
    assert engine.loop is not None and engine.loop.active == 0


def test_dropped_stream_frees_its_slot_while_the_others_continue(engine: Engine) -> None:
    rec = Recorder()
    runs = [start(engine, rec, i, forced(engine, f"Stream {i}.", " yes", 60)) for i in range(3)]
    victim, victim_sink = runs[1]
    wait_until(lambda: victim.completion_tokens >= 5, 120, "the victim to produce tokens")
    victim.cancel.set()
    at_cancel = victim.completion_tokens
    wait_until(victim_sink.ended_event.is_set, 30, "the dropped stream to end")
    assert victim.finish_reason == "cancelled"
    # Stopped within one step (a step gives a slot its token plus what it drafted).
    assert victim.completion_tokens <= at_cancel + 1 + engine.spec.draft_max
    others = [runs[0], runs[2]]
    # The slot is free while the others still run.
    assert engine.loop is not None
    assert any(not s.ended_event.is_set() for _, s in others)
    wait_all([s for _, s in others])
    for gen, _ in others:
        assert (gen.finish_reason, gen.completion_tokens) == ("length", 60)
    assert text_of(rec, 0) == text_of(rec, 2) == " yes" * 60


def test_long_prompt_does_not_stall_running_streams_beyond_one_chunk(engine: Engine) -> None:
    rec = Recorder()
    runs = [start(engine, rec, i, forced(engine, f"Runner {i}.", " go", 120)) for i in range(3)]
    wait_until(lambda: all(g.completion_tokens >= 2 for g, _ in runs), 120, "the runners to start")
    long_prompt = "Alpha beta gamma delta epsilon zeta eta theta. " * 20
    newcomer_prep = engine.prepare_completion(long_prompt, Sampling(max_tokens=2, temperature=0.0))
    assert len(newcomer_prep.tokens) > 6 * CHUNK
    newcomer = engine.generation(newcomer_prep, threading.Event())
    rec.probe = lambda: newcomer.prompt_evaluated
    newcomer_sink = rec.sink(9)
    engine.start(newcomer, newcomer_sink)
    wait_all([newcomer_sink, *(s for _, s in runs)])

    assert newcomer.completion_tokens == 2 and newcomer.error is None
    # Between two consecutive tokens of a runner, the newcomer's prompt advanced by at
    # most one chunk; and the runners kept producing while it was read.
    during = 0
    for who in range(3):
        seen = [p for w, p in rec.probes if w == who]
        steps = [b - a for a, b in zip(seen, seen[1:])]
        assert max(steps) <= CHUNK, steps
        during += sum(1 for p in seen if 0 < p < len(newcomer_prep.tokens) - 1)
    assert during >= 3 * (len(newcomer_prep.tokens) // CHUNK - 1)
    for gen, _ in runs:
        assert (gen.finish_reason, gen.completion_tokens) == ("length", 120)


def test_second_turn_is_served_from_the_slot_cache(engine: Engine) -> None:
    assert engine.loop is not None
    stats = engine.loop.stats
    turn1 = "A conversation about the sea. User: tell me about waves. Assistant:"
    answer = greedy(engine, turn1, 12)
    # Other conversations in between take other slots; the first one's KV stays.
    greedy(engine, "Something else entirely: the history of bread.", 4)
    greedy(engine, "And a third topic: how bees dance.", 4)
    hits, reused = stats.hits, stats.tokens_reused
    turn2 = turn1 + answer + " User: and tides? Assistant:"
    gen = engine.generation(engine.prepare_completion(turn2, Sampling(max_tokens=4, temperature=0.0)),
                            threading.Event())
    list(gen)
    n_turn1 = len(engine.prepare_completion(turn1, Sampling(max_tokens=1)).tokens)
    assert gen.prompt_cached >= n_turn1 - 1  # the junction may tokenize differently
    assert stats.hits == hits + 1
    assert stats.tokens_reused - reused == gen.prompt_cached


def test_a_prompt_and_its_first_token_take_one_step(engine: Engine) -> None:
    """flash_attn "auto" (the default) is on on the CPU, where the last prompt token's
    logits were measured at load not to depend on its batch: it is read with the prompt
    (batch.py), so a request alone takes one step per token, not one more."""
    assert engine.loop is not None
    steps = engine.loop.steps
    before = steps.steps
    gen = engine.generation(engine.prepare_completion("Ducks in a row: one, two, three, four,",
                                                      Sampling(max_tokens=3, temperature=0.0)), threading.Event())
    list(gen)
    assert engine.loop.merge_last  # measured before the first request
    assert (gen.completion_tokens, steps.steps - before) == (3, 3)
    # The drafts' row cost was measured before the worker said it was loaded.
    assert engine.loop.calibrated.is_set() and engine.loop.cost.row_ratio is not None


def test_greedy_alone_is_the_same_with_parallel_1_and_4(engine: Engine) -> None:
    prompt = "Here is a short story about a lighthouse keeper. The keeper"
    with_four = greedy(engine, prompt)
    one = load(parallel=1)
    try:
        assert greedy(one, prompt) == with_four
    finally:
        one.close()


# --- edges ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small() -> Iterator[Engine]:
    """2 slots of 256 KV cells; n_batch 8 = 1 decoding token + a 7-token chunk exactly."""
    eng = load(n_ctx=256, n_batch=8, parallel=2, prefill_chunk=8)
    yield eng
    eng.close()


@pytest.mark.parametrize("n", [7, 8, 9, 17])
def test_prompts_around_n_batch(small: Engine, n: int) -> None:
    base = small.prepare_completion("one two three four five six seven eight nine ten", Sampling(max_tokens=1)).tokens
    prompt = (base * 3)[:n]
    gen = small.generation(small.prepare_completion(prompt, Sampling(max_tokens=3, temperature=0.0)),
                           threading.Event())
    list(gen)
    assert (gen.prompt_tokens, gen.completion_tokens, gen.finish_reason) == (n, 3, "length")


def test_full_slots_end_with_length_and_do_not_disturb_each_other(small: Engine) -> None:
    rec = Recorder()
    # Each asks for more than its slot holds: max_tokens is clamped to the room left in
    # the slot's own 256 cells, and both run to exactly that.
    older, older_sink = start(small, rec, 0, forced(small, "First.", " a", 10_000))
    wait_until(lambda: older.completion_tokens >= 3, 60, "the first request to run")
    newer, newer_sink = start(small, rec, 1, forced(small, "Second.", " b", 10_000))
    wait_all([older_sink, newer_sink])

    for gen in (older, newer):
        assert gen.prepared.max_tokens == small.n_ctx - gen.prompt_tokens
        assert (gen.finish_reason, gen.completion_tokens, gen.error) == ("length", gen.prepared.max_tokens, None)
    assert text_of(rec, 1) == " b" * newer.completion_tokens
    again = small.generation(
        small.prepare_completion("Still alive?", Sampling(max_tokens=2, logit_bias=NO_EOS)), threading.Event()
    )
    list(again)
    assert again.completion_tokens == 2


# --- the host-RAM cache -----------------------------------------------------------------------


def test_ram_cache_bookkeeping_budget_recency_and_prefixes() -> None:
    from worker.engine.ramcache import RamCache

    cache = RamCache(budget_bytes=100)
    assert cache.put([1, 2, 3], b"x" * 40)
    assert cache.put([1, 2, 3, 4, 5], b"y" * 40)  # holds all of [1, 2, 3]: replaces it
    assert (cache.stats.entries, cache.stats.bytes) == (1, 40)
    assert cache.put([9, 8], b"z" * 40)
    found = cache.best([1, 2, 3, 4, 7])
    assert found is not None and found[0] == 4 and found[1].tokens == [1, 2, 3, 4, 5]
    cache.used(found[1], 4)  # now [9, 8] is the least recently used
    assert cache.put([5, 5, 5], b"w" * 40)  # 120 > 100 bytes: the LRU entry goes
    assert cache.best([9, 8]) is None
    assert (cache.stats.entries, cache.stats.bytes, cache.stats.hits, cache.stats.tokens_saved) == (2, 80, 1, 4)
    assert not cache.put([7], b"v" * 101)  # bigger than the whole budget


def test_a_conversation_evicted_from_its_slot_is_restored_from_ram() -> None:
    eng = load(parallel=1, cache_ram_mib=64)
    try:
        assert eng.loop is not None and eng.loop.ram is not None
        ram = eng.loop.ram.stats
        conversation = "A long talk about lighthouses, their keepers and the sea. " * 4 + "Tell me more:"
        cold = greedy(eng, conversation, 12)
        greedy(eng, "Another user asks about baking bread at home.", 4)  # takes the only slot
        # The loop hands the state to the prompt-cache thread, which puts it in RAM.
        io_ = eng.loop.io
        assert io_ is not None
        wait_until(io_.idle, 30, "the prompt-cache thread to keep the state")
        assert ram.entries == 1
        gen = eng.generation(eng.prepare_completion(conversation, Sampling(max_tokens=12, temperature=0.0)),
                             threading.Event())
        warm = "".join(gen)
        assert (ram.hits, ram.tokens_saved) == (1, gen.prompt_cached)
        assert gen.prompt_cached == gen.prompt_tokens - 1
        assert warm == cold  # a restored KV decodes exactly like a computed one
    finally:
        eng.close()

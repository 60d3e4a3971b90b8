"""The generation loop (worker/engine/) on the real SmolLM2 model, in-process.

The engine is driven directly (no HTTP): each test checks one property of the loop on
llama.cpp's C API (stop strings, UTF-8 across tokens, sampler chain, prefix cache,
cancellation, token counts). The model is loaded once for the module with a small
n_batch so a long prompt is processed in many chunks.
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator

import pytest

from supervisor.launch import default_spec
from tests.conftest import default_model
from worker.engine import (
    ChatMessage,
    Engine,
    Generation,
    LlamaLog,
    Prepared,
    Sampling,
    _held_back,
    _stop_at,
)

pytestmark = pytest.mark.model

N_BATCH = 64
GREEDY = Sampling(max_tokens=24, temperature=0.0)
PROMPT = "The three primary colors are"


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    spec = default_spec(
        str(default_model()),
        "/nonexistent/unused.sock",
        n_ctx=1024,
        n_batch=N_BATCH,
        n_threads=2,
    )
    log = LlamaLog(io.StringIO())
    log.install()
    eng = Engine(spec, log)
    eng.load(lambda _value: None)
    yield eng
    eng.close()


def run(engine: Engine, prepared: Prepared, cancel: threading.Event | None = None) -> tuple[list[str], Generation]:
    gen = engine.generation(prepared, cancel or threading.Event())
    return list(gen), gen


def complete(engine: Engine, prompt: str | list[int], sampling: Sampling = GREEDY) -> tuple[list[str], Generation]:
    return run(engine, engine.prepare_completion(prompt, sampling))


def with_sampling(s: Sampling, **changes: object) -> Sampling:
    return Sampling(**{**s.__dict__, **changes})  # type: ignore[arg-type]


def tokens_of(engine: Engine, text: str) -> list[int]:
    return engine.prepare_completion(text, GREEDY).tokens


# --- pure helpers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, stops, expected",
    [
        ("hello world", ("wor",), 6),
        ("hello world", ("xyz",), None),
        ("abcabc", ("c", "b"), 1),
        ("", ("a",), None),
    ],
)
def test_stop_at(text: str, stops: tuple[str, ...], expected: int | None) -> None:
    assert _stop_at(text, stops) == expected


@pytest.mark.parametrize(
    "text, stops, expected",
    [
        ("hello wo", ("world",), 2),  # "wo" may still become "world"
        ("hello", ("world",), 0),
        ("abc<|im", ("<|im_end|>", "<|"), 4),
        ("x<", ("<|im_end|>",), 1),
        ("", ("ab",), 0),
    ],
)
def test_held_back(text: str, stops: tuple[str, ...], expected: int) -> None:
    prefix_chars = frozenset(c for s in stops for c in s[:-1])
    assert _held_back(text, stops, prefix_chars) == expected


# --- the loop on the real model -------------------------------------------------------------


def test_stop_string_split_across_tokens(engine: Engine) -> None:
    pieces, gen = complete(engine, PROMPT)
    assert gen.finish_reason == "length"
    full = "".join(pieces)
    # Without stop strings every piece is one token's text: pick a boundary where both
    # neighbours have two characters and stop on the four around it.
    i = next(
        i for i in range(len(pieces) - 1)
        if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2
        and full.find(pieces[i][-2:] + pieces[i + 1][:2]) == len("".join(pieces[: i + 1])) - 2
    )
    stop = pieces[i][-2:] + pieces[i + 1][:2]

    pieces2, gen2 = complete(engine, PROMPT, with_sampling(GREEDY, stop=(stop,)))

    assert "".join(pieces2) == full[: full.index(stop)]
    assert gen2.finish_reason == "stop"
    assert gen2.completion_tokens == i + 2  # the token that completed the stop string counts
    assert all(stop not in p for p in pieces2)


def test_multibyte_characters_split_across_tokens_stream_whole(engine: Engine) -> None:
    from llama_cpp.llama_grammar import LlamaGrammar  # the engine's own grammar type

    text = "é🦙日本語Ω"
    # SmolLM2 has no token for these characters' full UTF-8 sequences (🦙 is 3 tokens:
    # f0 9f | a6 | 99), so any tokenization the grammar allows splits characters.
    prepared = engine.prepare_completion(PROMPT, Sampling(max_tokens=40, temperature=0.0))
    prepared.grammar = LlamaGrammar.from_string(f'root ::= "{text}"', verbose=False)

    pieces, gen = run(engine, prepared)

    assert "".join(pieces) == text
    assert gen.finish_reason == "stop"
    assert all("\ufffd" not in p for p in pieces)
    assert gen.completion_tokens > len(pieces)  # some tokens produced no text on their own


def test_unfinished_character_at_the_length_limit_becomes_replacement(engine: Engine) -> None:
    from llama_cpp.llama_grammar import LlamaGrammar

    prepared = engine.prepare_completion(PROMPT, Sampling(max_tokens=1, temperature=0.0))
    prepared.max_tokens = 1
    prepared.grammar = LlamaGrammar.from_string('root ::= "🦙"', verbose=False)

    pieces, gen = run(engine, prepared)

    assert "".join(pieces) == "\ufffd"
    assert (gen.finish_reason, gen.completion_tokens) == ("length", 1)


def test_logit_bias_forces_and_bans_tokens(engine: Engine) -> None:
    pieces, _ = complete(engine, PROMPT, with_sampling(GREEDY, max_tokens=1))
    first = tokens_of(engine, pieces[0])[-1]
    (banana,) = tokens_of(engine, " banana")[-1:]

    banned, _ = complete(engine, PROMPT, with_sampling(GREEDY, max_tokens=1, logit_bias={str(first): -100.0}))
    forced, gen = complete(
        engine, PROMPT, with_sampling(GREEDY, max_tokens=3, logit_bias={str(banana): 100.0})
    )

    assert banned[0] != pieces[0]
    assert "".join(forced) == " banana" * 3
    assert gen.completion_tokens == 3


def test_json_schema_grammar_output(engine: Engine) -> None:
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
        "required": ["name", "age"],
    }
    sampling = Sampling(max_tokens=200, temperature=0.0, json_schema=schema)
    prepared = engine.prepare_chat([ChatMessage("user", "Describe a person as JSON.")], sampling)

    pieces, gen = run(engine, prepared)

    value = json.loads("".join(pieces))
    assert set(value) == {"name", "age"} and isinstance(value["age"], int)
    assert gen.finish_reason == "stop"


def test_greedy_output_is_the_same_with_and_without_cached_prefix(engine: Engine) -> None:
    shared = "Here is a short story about a lighthouse keeper who finds a message in a bottle. " * 4
    prompt = shared + "The message said"
    other = "Completely unrelated text about cooking pasta at home."

    complete(engine, other)  # the cache now shares nothing but BOS with prompt
    cold, cold_gen = complete(engine, prompt)
    complete(engine, shared + "Then the keeper")  # the cache now holds the shared prefix
    warm, warm_gen = complete(engine, prompt)
    complete(engine, prompt)  # and now the whole prompt but its last token
    hot, hot_gen = complete(engine, prompt)

    assert cold_gen.prompt_cached <= 1
    assert warm_gen.prompt_cached >= len(tokens_of(engine, shared)) - 2
    assert hot_gen.prompt_cached == hot_gen.prompt_tokens - 1
    assert "".join(cold) == "".join(warm) == "".join(hot)


class _CancelAfterFirstChunk(threading.Event):
    """A cancel event that a client "sets" as soon as one new prompt chunk is in the cache."""

    gen: Generation | None = None

    def is_set(self) -> bool:
        if self.gen is not None and self.gen.prompt_evaluated > self.gen.prompt_cached:
            self.set()
        return super().is_set()


def test_cancel_during_a_long_prompt_stops_between_chunks(engine: Engine) -> None:
    complete(engine, "Unrelated.")
    prompt = "One two three four five six seven eight nine ten. " * 30
    prepared = engine.prepare_completion(prompt, GREEDY)
    assert len(prepared.tokens) > 4 * N_BATCH
    cancel = _CancelAfterFirstChunk()
    gen = engine.generation(prepared, cancel)
    cancel.gen = gen

    pieces = list(gen)

    assert pieces == []
    assert gen.finish_reason == "cancelled"
    assert gen.completion_tokens == 0
    # One chunk, then the cancel check stopped the rest of the prompt.
    assert gen.prompt_evaluated == gen.prompt_cached + N_BATCH

    # The chunk that made it into the cache is reused by the next request.
    pieces2, gen2 = complete(engine, prompt, with_sampling(GREEDY, max_tokens=4))
    assert gen2.prompt_cached == gen.prompt_evaluated
    assert gen2.finish_reason == "length" and gen2.completion_tokens == 4


def test_cancel_between_tokens(engine: Engine) -> None:
    cancel = threading.Event()
    gen = engine.generation(engine.prepare_completion(PROMPT, with_sampling(GREEDY, max_tokens=200)), cancel)
    pieces = []
    at_cancel = 0
    for piece in gen:
        pieces.append(piece)
        if len(pieces) == 3:
            cancel.set()
            at_cancel = gen.completion_tokens
    assert gen.finish_reason == "cancelled"
    # The batch loop runs ahead of this reader (it no longer waits for each piece to be
    # taken): it stops at its next step, so at most the token of the step in flight
    # follows the cancel.
    assert 3 <= at_cancel <= gen.completion_tokens <= at_cancel + 1
    assert len(pieces) == gen.completion_tokens  # one piece per token for this prompt


def test_usage_counts_are_exact(engine: Engine) -> None:
    prompt_tokens = tokens_of(engine, PROMPT)
    eos = 2  # SmolLM2's <|im_end|> (an end-of-generation token)

    _, by_length = complete(engine, PROMPT, with_sampling(GREEDY, max_tokens=7))
    at_once, by_eos = complete(engine, PROMPT, with_sampling(GREEDY, logit_bias={str(eos): 100.0}))
    _, from_ids = complete(engine, prompt_tokens, with_sampling(GREEDY, max_tokens=2))

    assert (by_length.prompt_tokens, by_length.completion_tokens, by_length.finish_reason) == (
        len(prompt_tokens), 7, "length"
    )
    # The end-of-generation token is sampled but is not part of the completion.
    assert (at_once, by_eos.completion_tokens, by_eos.finish_reason) == ([], 0, "stop")
    assert (from_ids.prompt_tokens, from_ids.completion_tokens) == (len(prompt_tokens), 2)


def test_max_tokens_bounded_by_context(engine: Engine) -> None:
    n_ctx = 1024
    prompt = list(tokens_of(engine, "word " * 10))
    prompt += [prompt[-1]] * (n_ctx - 3 - len(prompt))
    sampling = Sampling(max_tokens=None, temperature=0.0, logit_bias={"2": -100.0, "0": -100.0})
    pieces, gen = run(engine, engine.prepare_completion(prompt, sampling))
    # Exactly the room left in the context, without a decode past its end.
    assert (gen.finish_reason, gen.completion_tokens) == ("length", 3)

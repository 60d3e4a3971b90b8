"""What the generation loop costs per token outside llama.cpp's decode: our engine against
llama-cpp-python's ``create_completion``, in one process, in one run.

    .venv/bin/python -m bench.loop_cost [--gen-tokens 64,256,1024] [--rounds 5] [--threads N]

Both loops call ``llama_cpp.llama_cpp.llama_decode`` once per generated token. This wraps
that function (and ``llama_sampler_sample``) with a timer, so for every streamed request it
splits the time between the first and the last text piece into: time inside decode, time
inside the sampler chain, and the rest (detokenizing, stop strings, Python). Decode time
follows the machine's momentary speed; the loop's own cost does not, so on a noisy machine
this is the number that tells two loops apart when end-to-end tokens/s cannot.

The two loops run alternately (ours, theirs, theirs, ours, ...) on two models loaded from the
same file, with the same settings, prompt, temperature 0 and end-of-generation tokens biased
away, so both generate exactly max_tokens tokens.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import llama_cpp
import llama_cpp.llama_cpp as llama_lib

from supervisor.launch import default_spec
from worker.engine import Engine, LlamaLog, Sampling

PROMPT = "Here is a long, detailed story about a fox who wanted to learn to fly. Once upon a time,"


def load_engine(model_arg: str | None, **spec: Any) -> tuple[Engine, str]:
    """Our engine, loaded in this process (``--model``, else the embedded SmolLM2)."""
    if model_arg:
        model = os.path.abspath(model_arg)
    else:
        from supervisor.default_model import default_model_path

        model = str(default_model_path())
    log = LlamaLog(io.StringIO())
    log.install()
    engine = Engine(default_spec(model, "/unused", **spec), log)
    engine.load(lambda _v: None)
    return engine, model


class Timers:
    """Wraps llama_decode and llama_sampler_sample; sums the seconds spent in each."""

    def __init__(self) -> None:
        self.decode_s = 0.0
        self.sample_s = 0.0
        self.decodes = 0
        self._decode = llama_lib.llama_decode
        self._sample = llama_lib.llama_sampler_sample

    def install(self) -> None:
        decode, sample = self._decode, self._sample
        clock = time.perf_counter

        def timed_decode(ctx: Any, batch: Any) -> int:
            t0 = clock()
            rc = decode(ctx, batch)
            self.decode_s += clock() - t0
            self.decodes += 1
            return int(rc)

        def timed_sample(smpl: Any, ctx: Any, idx: int) -> int:
            t0 = clock()
            token = sample(smpl, ctx, idx)
            self.sample_s += clock() - t0
            return int(token)

        # Both loops look these up on the module at call time (llama_cpp._internals and
        # worker.engine use this same module object), so one assignment covers both.
        llama_lib.llama_decode = timed_decode
        llama_lib.llama_sampler_sample = timed_sample

    def reset(self) -> None:
        self.decode_s = self.sample_s = 0.0
        self.decodes = 0


def measure(pieces: Iterator[str], timers: Timers) -> dict[str, float]:
    """Iterate a stream of text pieces; per-token split of the first-to-last-piece time.

    Tokens are counted as decodes between the two pieces (a token that ends inside a UTF-8
    character gives an empty piece, which is skipped but still cost a decode).
    """
    pieces_seen = 0
    t_first = 0.0
    last = (0.0, 0.0, 0.0, 0)
    for piece in pieces:
        if not piece:
            continue
        now = time.perf_counter()
        if pieces_seen == 0:
            t_first = now
            timers.reset()  # the prompt's decode and the first sample are not the loop
        pieces_seen += 1
        last = (now, timers.decode_s, timers.sample_s, timers.decodes)
    t_last, decode, sample, steps = last
    if steps < 1:
        raise RuntimeError("fewer than two tokens: nothing to time")
    span = t_last - t_first
    return {
        "tokens": steps + 1,
        "tok_s": steps / span,
        "total_us": span / steps * 1e6,
        "decode_us": decode / steps * 1e6,
        "sample_us": sample / steps * 1e6,
        "rest_us": (span - decode - sample) / steps * 1e6,
        "outside_decode_us": (span - decode) / steps * 1e6,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loop_cost", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="GGUF model (default: the embedded SmolLM2-135M)")
    p.add_argument("--gen-tokens", default="64,256,1024", help="comma-separated generation lengths")
    p.add_argument("--rounds", type=int, default=5, help="requests per loop and length (default 5)")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    p.add_argument("--ctx-size", type=int, default=4096)
    a = p.parse_args(argv)
    lengths = [int(x) for x in a.gen_tokens.split(",") if x.strip()]
    engine, model = load_engine(a.model, n_ctx=a.ctx_size, n_threads=a.threads)
    llama = llama_cpp.Llama(
        model, n_ctx=a.ctx_size, n_batch=512, n_threads=a.threads, n_threads_batch=a.threads, verbose=False
    )
    vocab = llama._model.vocab
    eog = [t for t in range(llama.n_vocab()) if llama_lib.llama_vocab_is_eog(vocab, t)]
    timers = Timers()
    timers.install()

    def ours(n: int) -> Iterator[str]:
        prep = engine.prepare_completion(
            PROMPT, Sampling(max_tokens=n, temperature=0.0, logit_bias={str(t): -100.0 for t in eog})
        )
        return iter(engine.generation(prep, threading.Event()))

    def theirs(n: int) -> Iterator[str]:
        stream: Any = llama.create_completion(
            PROMPT, max_tokens=n, temperature=0.0, stream=True, logit_bias={t: -100.0 for t in eog}
        )
        return (chunk["choices"][0]["text"] for chunk in stream)

    loops: dict[str, Callable[[int], Iterator[str]]] = {"ours": ours, "create_completion": theirs}
    for fn in loops.values():  # warm-up
        measure(fn(8), timers)
    results: dict[int, dict[str, list[dict[str, float]]]] = {}
    for n in lengths:
        results[n] = {k: [] for k in loops}
        for r in range(a.rounds):
            order = list(loops) if r % 2 == 0 else list(reversed(loops))
            for k in order:
                res = measure(loops[k](n), timers)
                if res["tokens"] != n:
                    raise RuntimeError(f"{k}: {res['tokens']} pieces for max_tokens={n}")
                results[n][k].append(res)
        print(f"[loop_cost] {n} tokens done", file=sys.stderr, flush=True)

    def med(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(row[key] for row in rows)

    print(
        f"Per-token cost of the generation loop ({os.path.basename(model)}, {a.threads} thread(s), "
        f"n_ctx {a.ctx_size}, temperature 0; medians of {a.rounds} requests per cell, microseconds per token)"
    )
    print(
        f"{'tokens':>6} {'loop':>18} {'tok/s':>7} {'total':>8} {'decode':>8} {'sampler':>8} {'rest':>7}"
        f" {'outside decode':>15}"
    )
    for n, per in results.items():
        for k, rows in per.items():
            print(
                f"{n:>6} {k:>18} {med(rows, 'tok_s'):>7.1f} {med(rows, 'total_us'):>8.0f} {med(rows, 'decode_us'):>8.0f}"
                f" {med(rows, 'sample_us'):>8.0f} {med(rows, 'rest_us'):>7.0f} {med(rows, 'outside_decode_us'):>15.0f}"
            )
        o, t = med(per["ours"], "outside_decode_us"), med(per["create_completion"], "outside_decode_us")
        share_o = o / med(per["ours"], "total_us")
        share_t = t / med(per["create_completion"], "total_us")
        print(
            f"{'':>6} {'ours/theirs':>18} outside decode {o / t:.2f} x; share of each token: ours {share_o:.1%},"
            f" create_completion {share_t:.1%}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

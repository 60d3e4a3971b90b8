"""What logprobs cost: generation tokens/s without logprobs, with ``logprobs`` only and
with ``top_logprobs: 5``, on the engine in one process (issue 15).

    .venv/bin/python -m bench.logprobs [--gen-tokens 128] [--rounds 5] [--threads N] [--model GGUF]

The three kinds run interleaved (the order rotating each round) with the same prompt,
temperature 0 and ``ignore_eos``, so each generates exactly ``--gen-tokens`` tokens;
tokens/s is measured from the first to the last piece. "off" is the path every request
that does not ask takes: it reads no logits row, so it is the speed from before logprobs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time

from bench.loop_cost import load_engine
from worker.engine import Engine, Sampling

PROMPT = "Here is a long, detailed story about a fox who wanted to learn to fly. Once upon a time,"
KINDS = {"off": None, "logprobs": 0, "top_logprobs=5": 5}


def tokens_per_s(engine: Engine, n: int, logprobs: int | None) -> float:
    prep = engine.prepare_completion(
        PROMPT, Sampling(max_tokens=n, temperature=0.0, ignore_eos=True, logprobs=logprobs)
    )
    gen = engine.generation(prep, threading.Event())
    first = last = 0.0
    for _ in gen:
        last = time.perf_counter()
        if not first:
            first = last
    return (gen.completion_tokens - 1) / (last - first) if last > first else 0.0


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.logprobs", description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args(argv)
    engine, model = load_engine(a.model, n_ctx=1024, n_threads=a.threads, parallel=1)
    try:
        tokens_per_s(engine, 8, 5)  # warm-up
        results: dict[str, list[float]] = {k: [] for k in KINDS}
        order = list(KINDS)
        for r in range(a.rounds):
            for k in order[r % 3 :] + order[: r % 3]:
                results[k].append(tokens_per_s(engine, a.gen_tokens, KINDS[k]))
        base = statistics.median(results["off"])
        report = {
            k: {"median_tok_s": round(statistics.median(v), 1),
                "vs_off": round(statistics.median(v) / base, 3) if base else None}
            for k, v in results.items()
        }
        print(json.dumps({"model": os.path.basename(model), "gen_tokens": a.gen_tokens,
                          "rounds": a.rounds, "threads": a.threads, "results": report}, indent=2))
    finally:
        engine.close()


if __name__ == "__main__":
    main()

"""How long saving one conversation's state pauses the batch loop (every slot waits), before
and after the prompt-cache thread took the bookkeeping off the loop (issue 27).

Before: the loop copied the state out of the KV cache into a ctypes buffer, copied that
into ``bytes`` and sliced it (two more copies), then ran ``RamCache.put`` (a prefix
comparison against every entry, evictions) itself. After: llama.cpp writes the state
straight into a ``bytearray`` (one copy) and the loop hands it over; the rest runs on
the prompt-cache thread. Both on the same slot of the same context, in rotating order.

    .venv/bin/python -m bench.cache_pause [--tokens 600] [--entries 40] [--rounds 20]
"""

from __future__ import annotations

import argparse
import ctypes
import io
import statistics
import sys
import threading
import time

import llama_cpp.llama_cpp as llama_lib

from bench.procs import REPO
from supervisor.default_model import default_model_path
from supervisor.launch import default_spec
from worker.engine import Engine, LlamaLog, Sampling
from worker.engine.ramcache import RamCache, snapshot


def before(ctx: object, seq: int, ram: RamCache, tokens: list[int]) -> None:
    size = int(llama_lib.llama_state_seq_get_size(ctx, seq))
    buf = (ctypes.c_uint8 * size)()
    n = int(llama_lib.llama_state_seq_get_data(ctx, buf, size, seq))
    data = bytes(buf)[:n]
    ram.put(tokens, data)


def after(ctx: object, seq: int) -> None:
    snapshot(ctx, seq)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=600)
    p.add_argument("--entries", type=int, default=40, help="RAM cache entries already there")
    p.add_argument("--rounds", type=int, default=20)
    args = p.parse_args(argv)
    spec = default_spec(str(default_model_path()), "/nonexistent.sock", n_ctx=2048, n_threads=2, parallel=1,
                        cache_ram_mib=0, cache_disk_mib=0)
    log = LlamaLog(io.StringIO())
    log.install()
    eng = Engine(spec, log)
    eng.load(lambda _v: None)
    try:
        assert eng.loop is not None
        prompt = list(range(1000, 1000 + args.tokens))
        "".join(eng.generation(eng.prepare_completion(prompt, Sampling(max_tokens=1, temperature=0.0)),
                               threading.Event()))
        ctx, slot = eng.loop._ctx, eng.loop.slots[0]
        tokens = list(slot.tokens)
        size = int(llama_lib.llama_state_seq_get_size(ctx, 0))
        # A RAM cache as a busy server has it: many conversations, none a prefix of this one.
        ram = RamCache(budget_bytes=(args.entries + 2) * size)
        for i in range(args.entries):
            ram.put([7, i, *tokens[2:]], b"\0" * size)
        times: dict[str, list[float]] = {"before": [], "after": []}
        for r in range(args.rounds):
            for name in (("before", "after") if r % 2 == 0 else ("after", "before")):
                t0 = time.perf_counter()
                if name == "before":
                    before(ctx, 0, ram, tokens)
                else:
                    after(ctx, 0)
                times[name].append(time.perf_counter() - t0)
    finally:
        eng.close()
    b, a = statistics.median(times["before"]), statistics.median(times["after"])
    print(f"loop pause to save one {len(tokens)}-token state ({size / 2**20:.1f} MiB, SmolLM2-135M, "
          f"{args.entries} RAM entries), median of {args.rounds}:\n")
    print("| | pause | max |")
    print("|---|---|---|")
    print(f"| before (copy x3 + RamCache.put on the loop) | {b * 1000:.2f} ms | {max(times['before']) * 1000:.2f} ms |")
    print(f"| after (one copy; the rest on the prompt-cache thread) | {a * 1000:.2f} ms | "
          f"{max(times['after']) * 1000:.2f} ms |")
    print(f"\nafter / before: {a / b:.2f}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())

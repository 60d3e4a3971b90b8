"""Replicas against threads (issue 28): aggregate tok/s of 8 clients, paired, one run.

Two vram-llm servers on the same model and the same CPU cores:
- ``2 replicas x 1 thread``: ``replicas = 2``, ``threads = 1``, 4 slots each;
- ``1 worker x 2 threads``: ``replicas = 1``, ``threads = 2``, 8 slots;
- ``1 worker x 1 thread``: a control (half the cores): how much of the difference is two
  threads stalling each other on a CPU shared with other work.
Each round sends 8 streamed completions at once to each server in turn (the order rotates:
this VM drifts 10-15% between runs), 64 tokens each, end-of-generation banned, greedy;
the report gives per-server medians and the median of the per-round ratios. Aggregate
tok/s is every token over the wall time of the round; TTFT p50 and the slowest request's
wall time say what the clients saw.

On a GPU box the question is another one (docs/benchmarks.md): decode is bandwidth-bound,
so a replica per GPU multiplies the aggregate while a layer split over the same GPUs does
not; here, with no GPU, it is whether two one-thread processes beat one two-thread process.

    python -m bench.replicas [--rounds 3] [--clients 8] [--tokens 64] [--json-out F]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.batching import _session, _stream
from bench.client import Target, pct
from bench.procs import Procs, http_get_json, run_and_report
from bench.scheduler import NO_EOS, start_vram_llm
from supervisor.default_model import default_model_path

SERVERS = {
    "2 replicas x 1 thread": {"threads": 1, "replicas": 2, "parallel": 4},
    "1 worker x 2 threads": {"threads": 2, "replicas": 1, "parallel": 8},
    # A control: on a busy shared CPU, llama.cpp's threads wait for each other at every
    # operation, and a descheduled one stalls the step; one thread alone shows that cost.
    "1 worker x 1 thread": {"threads": 1, "replicas": 1, "parallel": 8},
}


async def clients(target: Target, rnd: int, n: int, tokens: int) -> dict[str, float]:
    async with _session(n + 2) as s:
        t0 = time.perf_counter()
        runs = await asyncio.gather(*(_stream(s, target.base + "/v1/completions", {
            "model": "x", "prompt": f"Story {rnd}-{i}: once upon a time", "max_tokens": tokens, "temperature": 0,
            "stream": True, "logit_bias": NO_EOS}) for i in range(n)))
        wall = time.perf_counter() - t0
    if not all(r["ok"] for r in runs):
        raise RuntimeError(f"{target.name}: {[r.get('error') for r in runs]}")
    return {"agg_tok_s": sum(r["tokens"] for r in runs) / wall,
            "ttft_ms_p50": pct([r["ttft_s"] * 1000 for r in runs], 50), "wall_s": wall}


async def all_ready(target: Target, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        code, st = await asyncio.to_thread(http_get_json, target.base + "/status")
        if code == 200 and all(r["state"] == "ready" for r in st.get("replicas") or [st]):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{target.name}: replicas not ready after {timeout_s:g}s: {st}")
        await asyncio.sleep(0.2)


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {"settings": {"clients": args.clients, "tokens": args.tokens, "rounds": args.rounds,
                                        "ctx_size": args.ctx_size, "loadavg_at_start": os.getloadavg()},
                           "rounds": []}
    with tempfile.TemporaryDirectory(prefix="vram-llm-bench-") as tmp, Procs(Path(tmp)) as procs:
        targets = []
        for i, (name, keys) in enumerate(SERVERS.items()):
            rest = {k: v for k, v in keys.items() if k != "threads"}
            base = start_vram_llm(procs, f"s{i}", args.model, keys["threads"], args.ctx_size, cache_disk_mib=0, **rest)
            targets.append(Target(name, base))
        for t in targets:
            await all_ready(t, 120.0)  # an extra replica loads once the first is ready
            await clients(t, 0, args.clients, 4)  # warm-up: first requests pay one-time costs
        for rnd in range(args.rounds):
            order = targets[rnd % len(targets):] + targets[: rnd % len(targets)]
            row = {}
            for t in order:
                print(f"round {rnd}: {t.name}", flush=True)
                row[t.name] = await clients(t, rnd + 1, args.clients, args.tokens)
            res["rounds"].append(row)
    return res


def report(res: dict[str, Any]) -> str:
    rounds = res["rounds"]
    names = list(SERVERS)
    ref = names[1]
    out = [f"{'metric':12s} " + " ".join(f"{n:>22s}" for n in names) + f"  {names[0] + ' / ' + ref:>46s}"]
    # The ratio is the paired one (same round); the control is reported by its median only.
    for m in ("agg_tok_s", "ttft_ms_p50", "wall_s"):
        meds = [statistics.median(r[n][m] for r in rounds) for n in names]
        ratio = statistics.median(r[names[0]][m] / r[ref][m] for r in rounds if r[ref][m])
        out.append(f"{m:12s} " + " ".join(f"{v:22.2f}" for v in meds) + f"  {ratio:46.2f}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(default_model_path()))
    ap.add_argument("--ctx-size", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json-out")
    args = ap.parse_args(argv)
    return run_and_report("bench.replicas", args, lambda _model: asyncio.run(_run(args)), report)


if __name__ == "__main__":
    raise SystemExit(main())

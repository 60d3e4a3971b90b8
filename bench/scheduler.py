"""The scheduler and drafts bench (issue 23): vram-llm against llama-server, paired, one run.

Workloads, each run for every target in a round whose order rotates, so the report's
ratios are medians of per-round pairs (this VM drifts 10-15% between runs):
- ``single``: one streamed completion of 96 tokens: generation tok/s and TTFT;
- ``four``: four clients at once, 64 tokens each: aggregate tok/s and TTFT p50;
- ``turns``: three conversations with long system prompts take turns: turn-2 TTFT p50;
- ``burst``: four ~512-token prompts at once, 64 tokens each (llama-benchy's shape):
  generation tok/s summed over requests (each from its first token to its last), TTFT
  mean, prompt tok/s;
- ``newcomer``: three streams run, a ~512-token prompt arrives: its TTFT and the running
  streams' inter-token p95 from its arrival to its first token (the pause it causes);
- ``copy``: rewrite a ~300-token function with one name changed, one client: tok/s;
- ``nocopy``: a story with nothing to copy, one client: tok/s.
End-of-generation is banned on both servers (logit bias; llama-server's ignore_eos), greedy.
Targets: vram-llm with its defaults; vram-llm with a fixed 64-token chunk and no drafts
(``token_gap_ms`` 1, ``draft_max`` 0: the earlier policy but for the burst rule, which has
no switch); llama-server ``-np 4`` (``LLAMA_SERVER``), same model, threads, context per slot.

    python -m bench.scheduler [--rounds 3] [--llama-server PATH] [--json-out F]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.batching import SYSTEM, TOPICS, _session, _stream, start_llama_server_np
from bench.client import Target, pct
from bench.procs import Procs, free_port, http_get_json, run_and_report, toml_value, wait_http_ok
from supervisor.default_model import default_model_path

NO_EOS = {"0": -100.0, "2": -100.0}  # SmolLM2's <|endoftext|> and <|im_end|>
_WORDS = ("river stone market lantern winter copper garden signal harbor violet engine paper "
          "orchard thunder mirror basket falcon candle meadow silver anchor pepper tunnel marble "
          "cotton saddle ribbon glacier compass velvet walnut prairie beacon cellar").split()
CODE = '''def total_price(items, tax_rate, discount=None):
    """Return the total price of the items, with tax and an optional discount."""
    subtotal = 0
    for item in items:
        if item.quantity <= 0:
            raise ValueError(f"bad quantity for {item.name}: {item.quantity}")
        subtotal += item.price * item.quantity
    if discount is not None:
        if not 0 <= discount <= 1:
            raise ValueError("discount must be between 0 and 1")
        subtotal = subtotal * (1 - discount)
    tax = subtotal * tax_rate
    total = subtotal + tax
    return round(total, 2)


def print_receipt(items, tax_rate, discount=None):
    for item in items:
        print(f"{item.name:20s} {item.quantity:3d} x {item.price:8.2f}")
    print(f"{'total':20s} {total_price(items, tax_rate, discount):14.2f}")
'''


def words(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) for _ in range(n))


async def _one(target: Target, prompt: str, tokens: int, extra: dict[str, Any]) -> dict[str, Any]:
    async with _session(2) as s:
        r = await _stream(s, target.base + "/v1/completions", {
            "model": "x", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True, **extra})
    if not r["ok"]:
        raise RuntimeError(f"{target.name}: {r['error']}")
    return r


def _rate(r: dict[str, Any]) -> float:
    """Generation tok/s from the first token to the last (llama-benchy's definition)."""
    span = r["last"] - r["first"]
    return (r["tokens"] - 1) / span if span > 0 else 0.0


async def single(target: Target, rnd: int, extra: dict[str, Any]) -> dict[str, float]:
    r = await _one(target, f"Story {rnd}: once upon a time", 96, extra)
    return {"tok_s": _rate(r), "ttft_ms": r["ttft_s"] * 1000}


async def four(target: Target, rnd: int, extra: dict[str, Any]) -> dict[str, float]:
    async with _session(6) as s:
        t0 = time.perf_counter()
        runs = await asyncio.gather(*(_stream(s, target.base + "/v1/completions", {
            "model": "x", "prompt": f"Story {rnd}-{i}: once upon a time", "max_tokens": 64, "temperature": 0,
            "stream": True, **extra}) for i in range(4)))
        wall = time.perf_counter() - t0
    if not all(r["ok"] for r in runs):
        raise RuntimeError(f"{target.name}: {[r.get('error') for r in runs]}")
    return {"agg_tok_s": sum(r["tokens"] for r in runs) / wall, "ttft_ms_p50": pct([r["ttft_s"] * 1000 for r in runs], 50)}


async def turns(target: Target, rnd: int, extra: dict[str, Any]) -> dict[str, float]:
    """Three conversations (~600-token system prompts, new ones each round) take turns."""
    history = [[{"role": "system", "content": f"Round {rnd}, desk {i}, {topic}. " + SYSTEM * 12}]
               for i, topic in enumerate(TOPICS)]
    ttft2: list[float] = []
    async with _session(4) as s:
        for turn in (1, 2):
            for i, topic in enumerate(TOPICS):
                msgs = history[i] + [{"role": "user", "content": f"Question {turn} about {topic}?"}]
                r = await _stream(s, target.base + "/v1/chat/completions", {
                    "model": "x", "messages": msgs, "max_tokens": 16, "temperature": 0, "stream": True, **extra})
                if not r["ok"]:
                    raise RuntimeError(f"{target.name}: {r['error']}")
                if turn == 2:
                    ttft2.append(r["ttft_s"] * 1000)
                history[i] = msgs + [{"role": "assistant", "content": r["text"]}]
    return {"turn2_ttft_ms": statistics.median(ttft2)}


async def burst(target: Target, rnd: int, extra: dict[str, Any]) -> dict[str, float]:
    prompts = [f"Text {rnd}.{i}: " + words(rnd * 10 + i, 500) for i in range(4)]
    async with _session(6) as s:
        t0 = time.perf_counter()
        runs = await asyncio.gather(*(_stream(s, target.base + "/v1/completions", {
            "model": "x", "prompt": p, "max_tokens": 64, "temperature": 0, "stream": True, **extra}) for p in prompts))
    if not all(r["ok"] for r in runs):
        raise RuntimeError(f"{target.name}: {[r.get('error') for r in runs]}")
    last_first = max(r["first"] for r in runs) - t0
    return {"gen_tok_s": sum(_rate(r) for r in runs), "ttft_ms": statistics.mean(r["ttft_s"] * 1000 for r in runs),
            "prompt_tok_s": 4 * 512 / last_first}


async def newcomer(target: Target, rnd: int, extra: dict[str, Any]) -> dict[str, float]:
    async with _session(6) as s:
        url = target.base + "/v1/completions"
        running = [asyncio.ensure_future(_stream(s, url, {
            "model": "x", "prompt": f"Runner {rnd}-{i}: once upon a time", "max_tokens": 160, "temperature": 0,
            "stream": True, **extra})) for i in range(3)]
        await asyncio.sleep(1.5)  # the three are generating (a bench, not a test: no assertion on it)
        t_arrive = time.perf_counter()
        late = await _stream(s, url, {"model": "x", "prompt": f"Newcomer {rnd}: " + words(900 + rnd, 500),
                                      "max_tokens": 16, "temperature": 0, "stream": True, **extra})
        runs = await asyncio.gather(*running)
    if not late["ok"] or not all(r["ok"] for r in runs):
        raise RuntimeError(f"{target.name}: {late.get('error')} {[r.get('error') for r in runs]}")
    t_first = t_arrive + late["ttft_s"]
    # The runners' gaps while the newcomer was read (from its arrival to its first token).
    gaps: list[float] = []
    for r in runs:
        stamps = [r["first"], *(r["first"] + sum(r["gaps_s"][: k + 1]) for k in range(len(r["gaps_s"])))]
        gaps += [b - a for a, b in zip(stamps, stamps[1:]) if b > t_arrive and a < t_first]
    return {"ttft_ms": late["ttft_s"] * 1000, "itl_ms_p95": pct([g * 1000 for g in gaps], 95) if gaps else 0.0,
            "itl_ms_max": max(gaps, default=0.0) * 1000}


async def copy(target: Target, rnd: int, extra: dict[str, Any]) -> dict[str, float]:
    prompt = (f"Request {rnd}. Rewrite this code with the function total_price renamed to order_total. Change "
              f"nothing else.\n\n{CODE}\nThe same code with total_price renamed to order_total:\n\n")
    r = await _one(target, prompt, 256, extra)
    return {"tok_s": _rate(r), "wall_s": r["last"] - r["first"] + r["ttft_s"]}


async def nocopy(target: Target, rnd: int, extra: dict[str, Any]) -> dict[str, float]:
    r = await _one(target, f"Story {rnd + 50}: a dragon who learned to bake bread. Once upon a time", 128, extra)
    return {"tok_s": _rate(r)}


WORKLOADS = {"single": single, "four": four, "turns": turns, "burst": burst, "newcomer": newcomer, "copy": copy,
             "nocopy": nocopy}


def start_vram_llm(procs: Procs, name: str, model: str, threads: int, n_ctx: int, **model_keys: Any) -> str:
    port = free_port()
    runtime = procs.tmp / f"run-{name}"
    runtime.mkdir()
    sections: dict[str, dict[str, Any]] = {
        "model": {"path": model, "threads": threads, "ctx_size": n_ctx, **model_keys},
        "server": {"host": "127.0.0.1", "port": port, "runtime_dir": str(runtime),
                   "cache_dir": str(procs.tmp / f"cache-{name}")},
        "admission": {"queue_size": 64, "wait_timeout_s": 300.0},
    }
    lines = [x for sec, kv in sections.items() for x in (f"[{sec}]", *(f"{k} = {toml_value(v)}" for k, v in kv.items()))]
    cfg = procs.tmp / f"{name}.toml"
    cfg.write_text("\n".join(lines) + "\n")
    level = os.environ.get("BENCH_LOG_LEVEL", "WARNING")
    s = procs.start(name, [sys.executable, "-m", "supervisor", "serve", "--config", str(cfg), "--log-level", level])
    base = f"http://127.0.0.1:{port}"
    wait_http_ok(procs, s, base + "/health", 300.0)
    procs.note_children()
    return base


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {"settings": {"threads": args.threads, "ctx_size": args.ctx_size, "rounds": args.rounds,
                                        "loadavg_at_start": os.getloadavg()}, "rounds": []}
    with tempfile.TemporaryDirectory(prefix="vram-llm-bench-") as tmp, Procs(Path(tmp)) as procs:
        ours = {"logit_bias": NO_EOS}
        targets: list[tuple[Target, dict[str, Any]]] = [
            (Target("vram-llm", start_vram_llm(procs, "vram-llm", args.model, args.threads, args.ctx_size)), ours),
            (Target("fixed chunk", start_vram_llm(procs, "fixed", args.model, args.threads, args.ctx_size,
                                                  token_gap_ms=1, prefill_chunk=64, draft_max=0)), ours),
        ]
        if args.llama_server:
            ls = start_llama_server_np(procs, args.llama_server, args.model, args.threads, args.ctx_size)
            targets.append((Target("llama-server", ls), {"ignore_eos": True}))
        for target, extra in targets:  # warm-up: first requests pay one-time costs
            await _one(target, "Warm up: once upon a time", 8, extra)
        for rnd in range(args.rounds):
            row: dict[str, Any] = {}
            for wname in args.workloads:
                order = targets[rnd % len(targets):] + targets[: rnd % len(targets)]
                row[wname] = {}
                for target, extra in order:
                    print(f"round {rnd}: {wname}: {target.name}", flush=True)
                    row[wname][target.name] = await WORKLOADS[wname](target, rnd + 1, extra)
            res["rounds"].append(row)
        for target, _ in targets:  # what each vram-llm worker did: drafts and steps
            if target.name != "llama-server":
                code, st = http_get_json(target.base + "/status")
                w = (st.get("worker") or {}) if code == 200 else {}
                res.setdefault("workers", {})[target.name] = {k: w.get(k) for k in (
                    "draft_tokens", "draft_tokens_accepted", "steps", "step_seconds", "decode_seconds")}
                print(target.name, res["workers"][target.name], flush=True)
    return res


# (workload, metric, higher is better)
METRICS = [("single", "tok_s", True), ("single", "ttft_ms", False), ("four", "agg_tok_s", True),
           ("four", "ttft_ms_p50", False), ("turns", "turn2_ttft_ms", False), ("burst", "gen_tok_s", True),
           ("burst", "ttft_ms", False), ("burst", "prompt_tok_s", True), ("newcomer", "ttft_ms", False),
           ("newcomer", "itl_ms_p95", False), ("newcomer", "itl_ms_max", False), ("copy", "tok_s", True),
           ("nocopy", "tok_s", True)]


def report(res: dict[str, Any]) -> str:
    rounds = res["rounds"]
    names = list(rounds[0][next(iter(rounds[0]))])
    ref = "llama-server" if "llama-server" in names else names[-1]
    out = [f"{'workload':9s} {'metric':14s} " + " ".join(f"{n:>13s}" for n in names)
           + "  " + " ".join(f"{n + '/' + ref:>26s}" for n in names if n != ref)]
    for w, m, _higher in METRICS:
        if w not in rounds[0]:
            continue
        meds = [statistics.median(r[w][n][m] for r in rounds) for n in names]
        ratios = []
        for n in names:
            if n == ref:
                continue
            pairs = [r[w][n][m] / r[w][ref][m] for r in rounds if r[w][ref][m]]
            ratios.append(f"{statistics.median(pairs):26.2f}" if pairs else f"{'-':>26s}")
        out.append(f"{w:9s} {m:14s} " + " ".join(f"{v:13.1f}" for v in meds) + "  " + " ".join(ratios))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scheduler", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(default_model_path()))
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2)))
    ap.add_argument("--ctx-size", type=int, default=2048, help="context per slot on every server")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"))
    ap.add_argument("--json-out")
    args = ap.parse_args(argv)
    args.workloads = args.workloads.split(",")
    return run_and_report("bench.scheduler", args, lambda _model: asyncio.run(_run(args)), report)


if __name__ == "__main__":
    raise SystemExit(main())

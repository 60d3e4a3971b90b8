"""Concurrency bench: vram-llm's batching worker against llama-server ``-np 4`` in one run.

For 1, 2, 4 and 8 concurrent clients (each one streamed completion of ``--tokens``
tokens, end-of-generation banned on both servers): aggregate streamed tokens/s, TTFT
p50/p95 and inter-token p95. Then three conversations with ~600-token system prompts
take turns; the second turns' TTFT shows the prompt cache. Same model, threads and
per-slot context on both servers. Usage:
``python -m bench.batching --llama-server PATH [--tokens 64] [--json-out F]``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec

from bench.client import Target, pct
from bench.procs import Procs, free_port, run_and_report, start_supervisor, wait_http_ok
from supervisor.default_model import default_model_path

_dec = msgspec.json.Decoder()
PARALLEL = 4
SYSTEM = (
    "You are a careful assistant for a shipping company. You answer questions about parcels, "
    "routes, customs forms, delivery windows, damaged goods and refunds. You always cite the "
    "relevant rule number, you never invent tracking numbers, and you keep answers short. "
)
TOPICS = ("a parcel stuck in customs", "a refund for a broken vase", "a delivery window change")


def _session(limit: int) -> aiohttp.ClientSession:
    # A new connection per request: llama-server closes a connection after a streamed
    # answer, and reusing it from the pool fails the next request ("Can not write
    # request body"). Both servers get the same (local, sub-millisecond) connect.
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, force_close=True), timeout=aiohttp.ClientTimeout(total=600)
    )


async def _stream(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """One streamed request: time to first text and every later text chunk's arrival."""
    t0 = time.perf_counter()
    stamps: list[float] = []
    text: list[str] = []
    async with session.post(url, json=body) as resp:
        if resp.status != 200:
            return {"ok": False, "error": f"HTTP {resp.status}: {(await resp.text())[:200]}"}
        async for line in resp.content:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            msg = _dec.decode(data)
            if "error" in msg:
                return {"ok": False, "error": str(msg["error"])}
            for ch in msg.get("choices") or ():
                piece = ch.get("text") or (ch.get("delta") or {}).get("content")
                if piece:
                    stamps.append(time.perf_counter())
                    text.append(piece)
    if not stamps:
        return {"ok": False, "error": "no text"}
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"ok": True, "tokens": len(stamps), "ttft_s": stamps[0] - t0, "gaps_s": gaps,
            "first": stamps[0], "last": stamps[-1], "text": "".join(text)}


async def concurrency(target: Target, clients: int, tokens: int, rounds: int, extra: dict[str, Any]) -> dict[str, Any]:
    ttft: list[float] = []
    gaps: list[float] = []
    rates: list[float] = []
    failed = 0
    async with _session(clients + 2) as s:
        for r in range(rounds):
            bodies = [{"model": "x", "prompt": f"Story {r}-{i}: once upon a time", "max_tokens": tokens,
                       "temperature": 0, "stream": True, **extra} for i in range(clients)]
            t0 = time.perf_counter()
            runs = await asyncio.gather(*(_stream(s, target.base + "/v1/completions", b) for b in bodies))
            wall = time.perf_counter() - t0
            ok = [x for x in runs if x["ok"]]
            failed += len(runs) - len(ok)
            rates.append(sum(x["tokens"] for x in ok) / wall)
            ttft += [x["ttft_s"] * 1000 for x in ok]
            gaps += [g * 1000 for x in ok for g in x["gaps_s"]]
    return {"clients": clients, "agg_tok_s": sum(rates) / len(rates), "ttft_ms_p50": pct(ttft, 50),
            "ttft_ms_p95": pct(ttft, 95), "itl_ms_p95": pct(gaps, 95), "failed": failed}


async def conversations(target: Target, system_repeat: int, extra: dict[str, Any]) -> dict[str, Any]:
    """Three conversations with long system prompts take turns; TTFT of turns 1 and 2."""
    system = SYSTEM * system_repeat
    # Each conversation's system prompt differs from its first words: no shared prefix, so
    # turn 1 is read from scratch and only turn 2 can reuse a cached prompt.
    history = [[{"role": "system", "content": f"Desk {i} of {len(TOPICS)}, {topic}. " + system}]
               for i, topic in enumerate(TOPICS)]
    out: dict[str, list[float]] = {"turn1_ms": [], "turn2_ms": []}
    async with _session(4) as s:
        for turn, key in ((0, "turn1_ms"), (1, "turn2_ms")):
            for i, topic in enumerate(TOPICS):
                msgs = history[i] + [{"role": "user", "content": f"Question {turn + 1} about {topic}?"}]
                r = await _stream(s, target.base + "/v1/chat/completions", {
                    "model": "x", "messages": msgs, "max_tokens": 16, "temperature": 0, "stream": True, **extra,
                })
                if not r["ok"]:
                    raise RuntimeError(f"{target.name}: {r['error']}")
                out[key].append(r["ttft_s"] * 1000)
                history[i] = msgs + [{"role": "assistant", "content": r["text"]}]
    return {k: {"p50": pct(v, 50), "max": max(v)} for k, v in out.items()}


def start_llama_server_np(procs: Procs, binary: str, model: str, threads: int, n_ctx: int) -> str:
    port = free_port()
    s = procs.start("llama-server", [
        binary, "-m", model, "--host", "127.0.0.1", "--port", str(port),
        # -c is the total for all slots: the same n_ctx per slot as the worker.
        "-c", str(n_ctx * PARALLEL), "-np", str(PARALLEL), "-t", str(threads), "-tb", str(threads),
        "-fa", "auto",  # llama-server's default, and the worker's
    ])
    base = f"http://127.0.0.1:{port}"
    wait_http_ok(procs, s, base + "/health", 300.0)
    return base


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    res: dict[str, Any] = {"settings": {"threads": args.threads, "ctx_size": args.ctx_size, "tokens": args.tokens,
                                        "rounds": args.rounds, "loadavg_at_start": os.getloadavg()}}
    with tempfile.TemporaryDirectory(prefix="vram-llm-bench-") as tmp, Procs(Path(tmp)) as procs:
        sup = start_supervisor(procs, args.model, args.threads, args.ctx_size)
        targets: list[tuple[Target, dict[str, Any]]] = [
            (Target("vram-llm", sup.base), {"logit_bias": {"0": -100.0, "2": -100.0}})
        ]
        if args.llama_server:
            ls = start_llama_server_np(procs, args.llama_server, args.model, args.threads, args.ctx_size)
            targets.append((Target("llama-server -np 4", ls), {"ignore_eos": True}))
        for target, extra in targets:
            rows = []
            for c in args.clients:
                print(f"{target.name}: {c} clients", flush=True)
                rows.append(await concurrency(target, c, args.tokens, args.rounds, extra))
            res[target.name] = {"concurrency": rows}
            print(f"{target.name}: conversations", flush=True)
            res[target.name]["conversations"] = await conversations(target, args.system_repeat, extra)
    return res


def report(res: dict[str, Any]) -> str:
    out = ["clients  server               agg tok/s  TTFT p50  TTFT p95  ITL p95 (ms)"]
    names = [k for k in res if k != "settings"]
    for i in range(len(res[names[0]]["concurrency"])):
        for n in names:
            r = res[n]["concurrency"][i]
            out.append(f"{r['clients']:7d}  {n:19s}  {r['agg_tok_s']:9.1f}  {r['ttft_ms_p50']:8.0f}  "
                       f"{r['ttft_ms_p95']:8.0f}  {r['itl_ms_p95']:7.0f}" + (f"  failed {r['failed']}" if r["failed"] else ""))
    out.append("conversations (3 x ~600-token system prompt): TTFT p50 ms, turn 1 -> turn 2")
    for n in names:
        c = res[n]["conversations"]
        out.append(f"  {n:19s}  {c['turn1_ms']['p50']:8.0f} -> {c['turn2_ms']['p50']:8.0f}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.batching", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(default_model_path()))
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--ctx-size", type=int, default=2048, help="context per slot on both servers")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--system-repeat", type=int, default=12, help="system prompt = 50-token text x this")
    ap.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"))
    ap.add_argument("--json-out")
    args = ap.parse_args(argv)
    args.clients = [int(x) for x in args.clients.split(",")]
    return run_and_report("bench.batching", args, lambda _model: asyncio.run(_run(args)), report)


if __name__ == "__main__":
    raise SystemExit(main())

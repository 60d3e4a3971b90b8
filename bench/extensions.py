"""A llama-bench-style client against vram-llm and llama-server in one run (issue 16).

    .venv/bin/python -m bench.extensions [--llama-server PATH] [--gen-tokens 128]
        [--rounds 3] [--threads N] [--model GGUF] [--smoke] [--json-out PATH]

Benchmarking clients written for llama-server and vLLM send raw bodies full of their
servers' extensions (``ignore_eos``, ``min_tokens``, ``return_token_ids``, ``cache_prompt``,
``n_predict``, ``samplers``...). This sends exactly such bodies, the same ones to
``vram-llm serve`` and to llama-server, one request at a time, interleaved request by
request (the order rotating), and reports per request kind: how many requests succeeded,
whether each generated exactly the tokens asked for, tokens/s over the streamed part and
time to first token, and the paired ratio vram-llm / llama-server per request (same body,
back to back: the machine's drift cancels out of each pair).

Two kinds of request, both streamed ``/v1/completions`` with ``ignore_eos`` and
``min_tokens`` = ``max_tokens`` (and ``n_predict``, llama-server's name), so every server
generates exactly N tokens, and ``return_token_ids`` (vram-llm's ids are checked against
usage). Each measured request comes right after a 1-token request with the same prompt:
- ``warm``: ``cache_prompt: true``: the prompt is in the KV cache, time to first token is
  one token's evaluation;
- ``cold``: ``cache_prompt: false``: the whole prompt is evaluated again, time to first
  token is the prompt processing.

Without ``--llama-server`` (or env LLAMA_SERVER) only vram-llm runs. Everything started
is stopped (bench/procs.py).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

from bench.client import Target, median, pct, stream_completion
from bench.procs import Procs, add_server_args, start_llama_server, start_supervisor

PROMPTS = [
    "The history of the lighthouse begins in the ancient world, when",
    "Here is a long, detailed story about a fox who wanted to learn to fly. Once upon a time,",
    "Write a step-by-step explanation of how a steam engine works.\n\nStep 1:",
    "Q: What are the main causes of ocean tides, and how do the Sun and the Moon interact?\nA:",
]
KINDS = ("warm", "cold")


def body_of(kind: str, prompt: str, n: int) -> dict[str, Any]:
    """The raw body a llama-server/vLLM benchmarking client sends (same for both servers).

    ``dry_multiplier`` is llama-server's (its DRY sampler, 0 = off) and unknown to vram-llm:
    it is ignored and named in X-Ignored-Params. (``timings_per_token`` was the example
    until issue 25 made it known.)"""
    return {
        "model": "default",
        "prompt": prompt,
        "max_tokens": n,
        "n_predict": n,
        "min_tokens": n,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
        "cache_prompt": kind != "cold",
        "samplers": ["top_k", "top_p", "min_p", "temperature"],
        "id_slot": -1,
        "n_keep": 0,
        "dry_multiplier": 0.0,
    }


async def one(session: aiohttp.ClientSession, base: str, body: dict[str, Any]) -> dict[str, Any]:
    """One request; sent again once if a kept-alive connection was closed under it before
    the request went out (llama-server closes some after a stream), as clients do."""
    reconnects = 0
    while True:
        try:
            r = await stream_completion(session, base, body)
            return {**r, "reconnects": reconnects}
        except aiohttp.ClientOSError as e:
            if reconnects == 0 and "Can not write request body" in str(e):
                reconnects += 1
                continue
            return {"ok": False, "error": f"{e.__class__.__name__}: {e}"}
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            return {"ok": False, "error": f"{e.__class__.__name__}: {e}"}


def _rate(r: dict[str, Any]) -> float | None:
    if not r.get("ok") or r["decode_s"] <= 0 or (r["tokens"] or 0) < 2:
        return None
    return float((r["tokens"] - 1) / r["decode_s"])


def summarize(runs: dict[str, list[dict[str, Any]]], n: int) -> dict[str, Any]:
    cols: dict[str, Any] = {}
    for c, rs in runs.items():
        ok = [r for r in rs if r.get("ok")]
        rates = [x for x in (_rate(r) for r in ok) if x is not None]
        cols[c] = {
            "requests": len(rs),
            "failed": len(rs) - len(ok),
            "errors": sorted({r["error"] for r in rs if not r.get("ok")})[:3],
            "wrong_length": sum(1 for r in ok if r["tokens"] != n),
            "ids_match_usage": sum(1 for r in ok if r["token_ids"] == r["tokens"]),
            "tok_s_median": median(rates),
            "ttft_ms_p50": pct([r["ttft_s"] * 1000 for r in ok], 50),
            "ignored_header": next((r["ignored"] for r in ok if r.get("ignored")), None),
            "reconnects": sum(r.get("reconnects", 0) for r in rs),
        }
    paired = None
    if "llama-server" in runs:
        ratios = [
            a / b for a, b in (
                (_rate(x), _rate(y)) for x, y in zip(runs["vram-llm"], runs["llama-server"])
            ) if a is not None and b is not None
        ]
        paired = {"median": median(ratios), "p25": pct(ratios, 25), "p75": pct(ratios, 75),
                  "pairs": len(ratios)}
    return {"columns": cols, "paired_vram_over_llama_server": paired}


def render(res: dict[str, Any]) -> str:
    m, s = res["machine"], res["settings"]
    out = [
        f"bench.extensions  {m['date']}  {m['cores']} cores, load average {m['loadavg'][0]}",
        f"model {Path(s['model']).name}, threads {s['threads']}, {s['gen_tokens']} tokens, "
        f"{s['prompts']} prompts x {s['rounds']} rounds per kind, one request at a time",
        "",
        f"{'kind':<5} {'server':<13} {'ok':>6} {'exact N':>8} {'ids=usage':>10} {'tok/s p50':>10} "
        f"{'TTFT ms p50':>12}  vram/llama-server (paired)",
    ]
    for kind, r in res["kinds"].items():
        for c, v in r["columns"].items():
            ok = v["requests"] - v["failed"]
            paired = ""
            p = r["paired_vram_over_llama_server"]
            if c == "vram-llm" and p is not None:
                paired = f"{p['median']:.3f} [{p['p25']:.3f} - {p['p75']:.3f}] n={p['pairs']}"
            ids = "-" if c != "vram-llm" else f"{v['ids_match_usage']}/{ok}"
            out.append(
                f"{kind:<5} {c:<13} {ok:>3}/{v['requests']:<2} {ok - v['wrong_length']:>5}/{ok:<2} "
                f"{ids:>10} {v['tok_s_median']:>10.1f} {v['ttft_ms_p50']:>12.1f}  {paired}"
            )
            if v["errors"]:
                out.append(f"      errors: {v['errors']}")
            if v["reconnects"]:
                out.append(f"      {v['reconnects']} request(s) sent again on a fresh connection "
                           "(the kept-alive one was closed before the request went out)")
    hdr = res["kinds"]["warm"]["columns"]["vram-llm"]["ignored_header"]
    out.append(f"\nvram-llm's X-Ignored-Params on these bodies: {hdr}")
    return "\n".join(out)


async def _run(a: argparse.Namespace, model: str) -> dict[str, Any]:
    res: dict[str, Any] = {
        "machine": {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg": [round(x, 2) for x in os.getloadavg()],
        },
        "settings": {"model": model, "threads": a.threads, "gen_tokens": a.gen_tokens,
                     "rounds": a.rounds, "prompts": len(a.prompts), "ctx_size": a.ctx_size},
        "kinds": {},
    }
    with tempfile.TemporaryDirectory(prefix="vram-llm-bench-ext-") as tmp, Procs(Path(tmp)) as procs:
        targets = [Target("vram-llm", start_supervisor(procs, model, a.threads, a.ctx_size).base)]
        if a.llama_server:
            _s, base = start_llama_server(procs, a.llama_server, model, a.threads, a.ctx_size, a.n_gpu_layers)
            targets.append(Target("llama-server", base))
        sessions = {t.name: t.session(limit=1, timeout_s=600.0) for t in targets}
        try:
            for t in targets:  # warm-up: page cache, first-call allocations
                await one(sessions[t.name], t.base, body_of("warm", a.prompts[0], 4))
            for kind in KINDS:
                runs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
                k = 0
                for _ in range(a.rounds):
                    for prompt in a.prompts:
                        body = body_of(kind, prompt, a.gen_tokens)
                        order = targets[k % len(targets):] + targets[: k % len(targets)]
                        k += 1
                        for t in order:
                            await one(sessions[t.name], t.base, body_of(kind, prompt, 1))
                            runs[t.name].append(await one(sessions[t.name], t.base, body))
                res["kinds"][kind] = summarize(runs, a.gen_tokens)
        finally:
            for sess in sessions.values():
                await sess.close()
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.extensions", description=__doc__.splitlines()[0])
    add_server_args(p)
    p.add_argument("--n-gpu-layers", type=int, default=0, help="llama-server's -ngl (vram-llm plans its own)")
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="2 prompts, 8 tokens, 1 round")
    p.add_argument("--json-out", metavar="PATH")
    a = p.parse_args(argv)
    a.prompts = PROMPTS[:2] if a.smoke else PROMPTS
    if a.smoke:
        a.gen_tokens, a.rounds = 8, 1
    from supervisor.default_model import default_model_path

    model = str(Path(a.model).resolve()) if a.model else str(default_model_path())
    try:
        res = asyncio.run(_run(a, model))
    except (RuntimeError, TimeoutError, OSError) as e:
        print(f"bench.extensions: failed: {e}", file=sys.stderr)
        return 1
    print(render(res))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(res, indent=2))
    cols = [c for r in res["kinds"].values() for c in r["columns"].values()]
    return 0 if all(c["failed"] == 0 and c["wrong_length"] == 0 for c in cols) else 2


if __name__ == "__main__":
    sys.exit(main())

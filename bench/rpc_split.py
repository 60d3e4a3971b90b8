"""What a remote hop costs per token: SmolLM2 served locally vs split over loopback RPC (issue 29).

Three layouts of the same model, each a real `vram-llm serve` with the real worker:
  local   the CPU holds every layer (no rpc-server)
  1 hop   one rpc-server holds every layer (the CPU keeps only the input layer)
  3-way   the CPU, then two rpc-servers (each capped at 430 MiB, as tests/test_rpc_real.py)
The rpc-servers are ``python -m worker.engine.rpc_server`` on 127.0.0.1 (CPU backend). Every
llama.cpp runs ONE thread (the worker's and each server's), so a layer costs the same
wherever it runs and the difference is the hop: serialising the graph, the activations over
TCP and back, once per device boundary per token. Loopback has no wire latency: a real
network adds its round-trip per boundary per token.

Each layout: one warm-up request, then ``--rounds`` streamed completions of ``--tokens``
tokens (end-of-generation banned); reported: decode tokens/s (after the first token) and the
time to the first token. Layouts run one after the other (an rpc-server serves one client).

    .venv/bin/python -m bench.rpc_split [--rounds 3] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.rpc_servers import RpcServer, rpc_unsupported  # noqa: E402
from tests.supervisor_harness import Supervisor  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def stream_once(s: Supervisor, tokens: int) -> tuple[float, float, int]:
    """(time to first token, decode tokens/s after it, tokens) of one streamed completion."""
    body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True, "ignore_eos": True}
    req = urllib.request.Request(
        s.base + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    t0 = time.perf_counter()
    stamps: list[float] = []
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if line.startswith(b"data: {") and b'"text"' in line:
                stamps.append(time.perf_counter())
    if len(stamps) < 2:
        raise AssertionError(f"only {len(stamps)} chunks")
    return stamps[0] - t0, (len(stamps) - 1) / (stamps[-1] - stamps[0]), len(stamps)


def run_layout(tmp: Path, name: str, servers: list[RpcServer], cap: int, rounds: int, tokens: int) -> dict[str, Any]:
    extra = "".join(
        f'[[rpc]]\nendpoint = "{srv.endpoint}"\nmax_mib = {cap}\n' for srv in servers
    )
    d = tmp / name.replace(" ", "-")
    d.mkdir()
    s = Supervisor(d, {"model": {"ctx_size": 2048, "parallel": 1, "threads": 1, "cache_ram_mib": 0,
                                 "cache_disk_mib": 0}}, extra_toml=extra)
    try:
        st = s.wait_ready(300)
        plan = st["plan"]
        where = ", ".join(
            f"{g['uuid']} layers {g['first_layer']}-{g['last_layer']}" for g in plan["gpus"] if g["first_layer"] is not None
        ) or "CPU"
        stream_once(s, 8)  # warm-up
        ttft, tps = [], []
        for _ in range(rounds):
            a, b, _n = stream_once(s, tokens)
            ttft.append(a)
            tps.append(b)
        assert s.stop() == 0
    finally:
        s.kill_hard()
    return {"layout": name, "where": where, "decode_tok_s": statistics.median(tps),
            "ttft_s": statistics.median(ttft), "rounds": rounds, "tokens": tokens}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--json-out", default=None)
    args = p.parse_args(argv)
    why = rpc_unsupported()
    if why:
        print(f"skipped: {why}")
        return 0
    load0 = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="vram-llm-rpc-bench-") as t:
        tmp = Path(t)
        rows.append(run_layout(tmp, "local", [], 0, args.rounds, args.tokens))
        a, b = RpcServer(tmp), RpcServer(tmp)
        try:
            a.wait_serving()
            b.wait_serving()
            rows.append(run_layout(tmp, "1 hop", [a], 0, args.rounds, args.tokens))
            rows.append(run_layout(tmp, "3-way", [a, b], 430, args.rounds, args.tokens))
        finally:
            a.kill()
            b.kill()
    base = rows[0]["decode_tok_s"]
    print(f"load average {load0:.2f} -> {os.getloadavg()[0]:.2f}; {args.rounds} rounds of {args.tokens} tokens")
    print(f"{'layout':<7} {'decode tok/s':>12} {'vs local':>8} {'ms/token':>8} {'TTFT s':>7}  where")
    for r in rows:
        print(f"{r['layout']:<7} {r['decode_tok_s']:12.1f} {r['decode_tok_s'] / base:8.2f} "
              f"{1000 / r['decode_tok_s']:8.1f} {r['ttft_s']:7.2f}  {r['where']}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Turn-2 time to first token after the worker was killed: the prompt cache's disk tier
against no disk tier, no restart at all, and llama-server restarted at the same point (a
benchmark, not a test; issue 27).

Three conversations, each with its own ~600-token system prompt, get a first turn; then
the server process that holds their KV is killed with SIGKILL (vram-llm: its worker, which
the supervisor replaces; llama-server: the server, started again), and each conversation
sends its second turn. Reported: the median turn-2 TTFT per setup and the ratios the
issue asks for. Every setup runs in each round, the order rotating round by round.

    .venv/bin/python -m bench.disk_cache [--rounds 3] [--llama-server PATH] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.procs import REPO, Procs, add_server_args, free_port, http_get_json, poll
from tests.supervisor_harness import Supervisor

TOPICS = ("lighthouses and their keepers", "the history of bread baking", "tides, moons and harbours")


def system_prompt(i: int) -> str:
    """~600 tokens of a conversation's own system prompt (distinct from the first word)."""
    rule = (f"You are conversation {i}'s assistant on {TOPICS[i % len(TOPICS)]}. Keep every answer short, exact, "
            "kind and plain; cite the year when you know it, say so when you do not, and never invent a name. ")
    return (rule * 12).strip()


def ttft(base: str, messages: list[dict[str, str]], model: str | None = None) -> tuple[float, str]:
    """Seconds to the first streamed content token, and the whole answer."""
    body: dict[str, Any] = {"messages": messages, "max_tokens": 16, "temperature": 0, "stream": True}
    if model:
        body["model"] = model
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first: float | None = None
    text = []
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0].get("delta", {}).get("content")
            if delta:
                first = first if first is not None else time.perf_counter() - t0
                text.append(delta)
    assert first is not None, "no content token"
    return first, "".join(text)


class VramLlm:
    def __init__(self, tmp: Path, threads: int, ctx: int, disk: bool, model: str | None) -> None:
        self.tmp = tmp
        self.disk = disk
        self.s = Supervisor(tmp, {
            "model": {"threads": threads, "ctx_size": ctx, "cache_disk_mib": 1024 if disk else 0,
                      **({"path": model} if model else {})},
            "server": {"cache_dir": str(tmp / "cache")},
        })
        poll(lambda: self.s.get("/health")[0] == 200, 300, "vram-llm ready")
        self.base = self.s.base

    def _disk(self) -> dict[str, Any]:
        return (self.s.status().get("worker") or {}).get("disk_cache") or {}  # type: ignore[no-any-return]

    def saved(self, n: int) -> bool:
        return int(self._disk().get("entries", 0)) >= n

    def hits(self) -> int:
        return int(self._disk().get("hits", 0))

    def kill(self) -> None:
        pid = self.s.status()["worker"]["pid"]
        os.kill(pid, signal.SIGKILL)
        poll(lambda: (self.s.status().get("worker") or {}).get("pid") not in (None, pid)
             and self.s.get("/health")[0] == 200, 300, "a new worker ready")

    def close(self) -> None:
        self.s.stop()


class LlamaServer:
    def __init__(self, procs: Procs, binary: str, model: str, threads: int, ctx: int) -> None:
        self.procs, self.binary, self.model, self.threads, self.ctx = procs, binary, model, threads, ctx
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self._start()

    def _start(self) -> None:
        self.p = self.procs.start("llama-server", [
            self.binary, "-m", self.model, "--host", "127.0.0.1", "--port", str(self.port), "-t", str(self.threads),
            "-c", str(self.ctx * 4), "-np", "4"])
        poll(lambda: http_get_json(self.base + "/health")[0] == 200, 300, "llama-server ready")

    def kill(self) -> None:
        os.killpg(self.p.proc.pid, signal.SIGKILL)
        self.p.proc.wait(30)
        self._start()


def one_round(target: Any, restart: bool) -> list[float]:
    convs = [[{"role": "system", "content": system_prompt(i)}, {"role": "user", "content": "What matters most?"}]
             for i in range(3)]
    for c in convs:
        _, answer = ttft(target.base, c)
        c += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And after that?"}]
    if isinstance(target, VramLlm) and target.disk and restart:
        poll(lambda: target.saved(3), 120, "the three conversations saved")
    if restart:
        target.kill()
    out = [ttft(target.base, c)[0] for c in convs]
    if isinstance(target, VramLlm) and target.disk and restart:
        poll(lambda: target.hits() >= 3, 30, "/status to show the three turns served from disk")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_server_args(p)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    from supervisor.default_model import default_model_path

    model = args.model or str(default_model_path())
    setups = ["disk tier, worker killed", "no disk tier, worker killed", "no restart"]
    if args.llama_server:
        setups.append("llama-server restarted")
    times: dict[str, list[float]] = {k: [] for k in setups}
    with tempfile.TemporaryDirectory(prefix="bench-disk-") as tmp, Procs(Path(tmp)) as procs:
        for r in range(args.rounds):
            for k in setups[r % len(setups):] + setups[: r % len(setups)]:
                d = Path(tmp) / f"r{r}-{setups.index(k)}"
                d.mkdir()
                if k.startswith("llama-server"):
                    target: Any = LlamaServer(procs, args.llama_server, model, args.threads, args.ctx_size)
                    try:
                        times[k] += one_round(target, restart=True)
                    finally:
                        procs.stop(target.p)
                    continue
                target = VramLlm(d, args.threads, args.ctx_size, disk=not k.startswith("no disk"), model=args.model)
                try:
                    times[k] += one_round(target, restart=k != "no restart")
                finally:
                    target.close()
                print(f"round {r + 1}: {k}: {[round(t, 3) for t in times[k][-3:]]}", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["disk tier, worker killed"]
    print(f"turn-2 time to first token, median of {args.rounds} x 3 conversations "
          f"(~600-token system prompts, {args.threads} threads)\n")
    print("| setup | turn-2 TTFT | vs. disk tier |")
    print("|---|---|---|")
    for k in setups:
        print(f"| {k} | {med[k] * 1000:.0f} ms | {med[k] / base:.2f}x |")
    print(f"\ndisk tier after a kill / no restart: {base / med['no restart']:.2f}x (target <= 1.5x)")
    if args.llama_server:
        print(f"llama-server restarted / disk tier: {med['llama-server restarted'] / base:.1f}x (target >= 5x)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())

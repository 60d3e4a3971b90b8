"""One client alone: this checkout's worker against an older checkout's worker, paired.

Issue 11 asks that batching costs a lone client nothing: streamed tokens/s of one request
at a time >= 0.98 x the previous (one-at-a-time) worker, and TTFT no worse. Both workers run
side by side on the same model and threads; each prompt goes to both back to back, in an
order that alternates per request, and the report is the median of the per-request ratios
(this VM drifts by 10-15% between runs; pairs cancel that out).

    git worktree add /tmp/oldtree <old commit>
    .venv/bin/python -m bench.old_vs_new --old-tree /tmp/oldtree [--tokens 128] [--rounds 4]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from supervisor.default_model import default_model_path

PROMPTS = [
    "The history of the printing press begins",
    "Write a short story about a lighthouse keeper who",
    "Explain how a refrigerator works:",
    "A list of ten European capitals and one fact about each:",
]
EOS_BIAS = {"2": -100.0, "0": -100.0}  # SmolLM2's end-of-generation tokens: run to max_tokens


def start(tree: Path, workdir: Path, name: str, threads: int) -> tuple[subprocess.Popen[bytes], str]:
    sock = str(workdir / f"{name}.sock")
    spec = {"model_path": str(default_model_path()), "socket_path": sock, "n_ctx": 2048, "n_threads": threads}
    spec_path = workdir / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "worker", "--spec", str(spec_path)], cwd=str(tree), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return proc, sock


def wait_ready(sock: str, proc: subprocess.Popen[bytes], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"worker exited with {proc.returncode}")
        try:
            with httpx.Client(transport=httpx.HTTPTransport(uds=sock), timeout=5) as c:
                if c.get("http://w/health").status_code == 200:
                    return
        except (httpx.HTTPError, OSError):
            pass
        time.sleep(0.2)
    raise TimeoutError("worker not ready")


def one(sock: str, prompt: str, tokens: int) -> tuple[float, float]:
    """(TTFT s, tokens/s from the first to the last token) of one streamed completion."""
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True, "logit_bias": EOS_BIAS}
    t0 = time.perf_counter()
    stamps: list[float] = []
    with httpx.Client(transport=httpx.HTTPTransport(uds=sock), timeout=300) as c:
        with c.stream("POST", "http://w/v1/completions", json=body) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith("data: {") and '"text":""' not in line:
                    stamps.append(time.perf_counter())
    if len(stamps) < 2:
        raise RuntimeError(f"only {len(stamps)} tokens")
    return stamps[0] - t0, (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old-tree", required=True, type=Path, help="a checkout of the older worker")
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="vram-llm-oldnew-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        new, new_sock = start(Path(__file__).resolve().parent.parent, workdir, "new", args.threads)
        procs.append(new)
        old, old_sock = start(args.old_tree.resolve(), workdir, "old", args.threads)
        procs.append(old)
        wait_ready(new_sock, new)
        wait_ready(old_sock, old)
        for sock in (new_sock, old_sock):  # warm-up
            one(sock, PROMPTS[0], 8)
        tps: list[float] = []
        ttft_ms: list[float] = []
        i = 0
        for _ in range(args.rounds):
            for prompt in PROMPTS:
                order = [("new", new_sock), ("old", old_sock)]
                if i % 2:
                    order.reverse()
                res = {name: one(sock, prompt, args.tokens) for name, sock in order}
                tps.append(res["new"][1] / res["old"][1])
                ttft_ms.append((res["new"][0] - res["old"][0]) * 1000)
                i += 1
        q = statistics.quantiles
        print(f"one client, {args.tokens} tokens, {len(tps)} pairs, threads {args.threads}, "
              f"load average {os.getloadavg()[0]:.1f}")
        print(f"  tokens/s new/old: median {statistics.median(tps):.3f} [p25 {q(tps)[0]:.3f} - p75 {q(tps)[2]:.3f}]")
        print(f"  TTFT new - old:   median {statistics.median(ttft_ms):+.1f} ms "
              f"[p25 {q(ttft_ms)[0]:+.1f} - p75 {q(ttft_ms)[2]:+.1f}]")
        return 0
    finally:
        for pr in procs:
            if pr.poll() is None:
                os.killpg(pr.pid, signal.SIGTERM)
        for pr in procs:
            try:
                pr.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(pr.pid, signal.SIGKILL)
                pr.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

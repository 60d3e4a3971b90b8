"""`python -m bench`: the supervisor against the direct paths, and a chaos run, in one go.

Starts what it needs (the supervisor, a bare worker on its own socket, llama_cpp.Llama in a
child process, optionally llama-server and nginx), measures, stops all of it, prints one
table and writes the same numbers as JSON. See docs/benchmarks.md for what each number means.

Rules:
- Everything started is stopped in a finally block (bench/procs.py); a process left behind
  is reported as an orphan and killed.
- Load goes only to 127.0.0.1 and Unix sockets, bounded in count; every request has a
  client timeout.
- One thread count for every column (--threads); generation columns run one request at a
  time, interleaved, so they never compete for the CPU with each other.
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
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil

from bench import report
from bench.chaos import run_chaos
from bench.client import (
    Target,
    chat_concurrency,
    completion_body,
    median,
    paired_ratios,
    pct,
    small_requests,
    stream_completion,
    summarize_gen,
)
from bench.procs import (
    InProc,
    Procs,
    Supervisor,
    http_get_json,
    start_llama_server,
    start_nginx,
    start_supervisor,
    start_worker,
)

PROMPTS = [
    "The history of the lighthouse begins in the ancient world, when",
    "Here is a long, detailed story about a fox who wanted to learn to fly. Once upon a time,",
    "Write a step-by-step explanation of how a steam engine works.\n\nStep 1:",
    "Q: What are the main causes of ocean tides, and how do the Sun and the Moon interact?\nA:",
]



def rotated(columns: dict[str, Any], k: int) -> list[tuple[str, Any]]:
    """The columns in an order that rotates with k: no column always runs right after the
    same other one (llama.cpp's threads keep spinning for a moment after a generation, which
    would slow whichever column always came next)."""
    items = list(columns.items())
    k %= len(items)
    return items[k:] + items[:k]

def default_threads() -> int:
    # Leave one core to the bench client, the supervisor and the worker's event loop:
    # on a 2-core machine two llama.cpp threads would be preempted by them on every token.
    return max(1, (os.cpu_count() or 2) - 1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", help="GGUF model (default: the embedded SmolLM2-135M)")
    p.add_argument("--threads", type=int, default=default_threads(), help="llama.cpp threads for every column (default: cores - 1)")
    p.add_argument("--ctx-size", type=int, default=4096, help="n_ctx for every column (default 4096)")
    p.add_argument("--gen-tokens", help="comma-separated generation lengths (default 128; --longer: 64,256,1024)")
    p.add_argument("--repeats", help="rounds over the prompt set per length (default 2); a list gives one per "
                   "--gen-tokens length, e.g. 8,4,2: short generations are cheap and noisier")
    p.add_argument("--longer", action="store_true", help="more lengths, rounds, requests, restarts")
    p.add_argument("--smoke", action="store_true", help="a tiny run that only proves the harness works (< 1 min)")
    p.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"), metavar="PATH",
                   help="llama-server binary for a 4th generation column (env LLAMA_SERVER)")
    p.add_argument("--no-nginx", action="store_true", help="skip the nginx column even if nginx is installed")
    p.add_argument("--chaos-kills", type=int, help="worker kills in the chaos run (default 20; --smoke 2; 0 skips)")
    p.add_argument("--restarts", type=int, help="kill/restart repeats for the restart cost (default 5)")
    p.add_argument("--small-requests", type=int, help="GETs per point of the small-request sweep (default 2000)")
    p.add_argument("--gpu", action="store_true",
                   help="GPU host: offload all layers in the direct, in-process and llama-server columns (the supervisor plans its own split)")
    p.add_argument("--n-gpu-layers", type=int, help="layers offloaded by the direct columns (default 0; --gpu: -1 = all)")
    p.add_argument("--json-out", metavar="PATH", help="write all numbers as JSON here")
    p.add_argument("--only", choices=["generation"],
                   help="run one part only: 'generation' = streaming throughput and time to first token")
    a = p.parse_args(argv)
    if a.gen_tokens:
        a.lengths = [int(x) for x in a.gen_tokens.split(",") if x.strip()]
    else:
        a.lengths = [8] if a.smoke else [64, 256, 1024] if a.longer else [128]
    default_repeats = 1 if a.smoke else 3 if a.longer else 2
    try:
        per_length = [int(x) for x in a.repeats.split(",") if x.strip()] if a.repeats else [default_repeats]
    except ValueError:
        p.error(f"--repeats: not a count or a comma-separated list of counts: {a.repeats!r}")
    if len(per_length) == 1:
        per_length *= len(a.lengths)
    if len(per_length) != len(a.lengths) or min(per_length) < 1:
        p.error(f"--repeats: one count >= 1, or one per length ({len(a.lengths)})")
    a.repeats = dict(zip(a.lengths, per_length))
    a.prompts = PROMPTS[:2] if a.smoke else PROMPTS
    a.chaos_kills = a.chaos_kills if a.chaos_kills is not None else (2 if a.smoke else 20)
    a.restarts = a.restarts or (2 if a.smoke else 10 if a.longer else 5)
    a.small_n = a.small_requests or (100 if a.smoke else 5000 if a.longer else 2000)
    a.n_gpu_layers = a.n_gpu_layers if a.n_gpu_layers is not None else (-1 if a.gpu else 0)
    return a


class RssSampler:
    """Samples the supervisor's RSS (and notes its children) every 50 ms while running."""

    def __init__(self, procs: Procs, pid: int) -> None:
        self.procs = procs
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def rss(self) -> int:
        return int(self.proc.memory_info().rss)

    def __enter__(self) -> RssSampler:  # noqa: PYI034 (typing.Self is 3.11+)
        self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.peak = max(self.peak, self.rss())
            except psutil.Error:
                return
            self.procs.note_children()

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    try:
        from supervisor.default_model import default_model_path

        model = str(Path(args.model).resolve()) if args.model else str(default_model_path())
        results = asyncio.run(_run(args, model))
    except KeyboardInterrupt:
        print("bench: interrupted; everything it started was stopped", file=sys.stderr)
        return 130
    except (RuntimeError, TimeoutError, OSError) as e:
        print(f"bench: failed: {e}", file=sys.stderr)
        return 1
    print(report.render(results))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2, default=str))
        print(f"\nJSON written to {args.json_out}")
    return 0 if report.passed_hard_checks(results) else 2


async def _run(args: argparse.Namespace, model: str) -> dict[str, Any]:
    res: dict[str, Any] = {
        "machine": {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "host": platform.node(),
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        },
        "settings": {
            "model": model,
            "model_mib": round(os.path.getsize(model) / 2**20, 1),
            "threads": args.threads,
            "ctx_size": args.ctx_size,
            "lengths": args.lengths,
            "repeats": {str(n): k for n, k in args.repeats.items()},
            "prompts": len(args.prompts),
            "n_gpu_layers_direct": args.n_gpu_layers,
            "smoke": args.smoke,
        },
    }
    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory(prefix="vram-llm-bench-") as tmp_s, Procs(Path(tmp_s)) as procs:
        tmp = Path(tmp_s)
        log = _progress
        log("loading the model in-process")
        inproc = InProc(procs, model, args.threads, args.ctx_size, args.n_gpu_layers)
        info = await loop.run_in_executor(None, inproc.call, {"op": "info"})
        eog_bias = {str(t): -100.0 for t in info["eog_ids"]}
        res["settings"]["eog_suppressed"] = info["eog_ids"]
        log("starting vram-llm serve")
        sup = start_supervisor(procs, model, args.threads, args.ctx_size)
        res["supervisor_rss_mib_idle"] = round(psutil.Process(sup.pid).memory_info().rss / 2**20, 1)
        log("starting the bare worker")
        _direct, direct_sock = start_worker(procs, model, args.threads, args.ctx_size, args.n_gpu_layers)
        t_sup = Target("supervisor", sup.base)
        t_direct = Target("direct", "http://worker", direct_sock)
        llama_server: Target | None = None
        if args.llama_server:
            log(f"starting {args.llama_server}")
            _ls, ls_base = start_llama_server(procs, args.llama_server, model, args.threads, args.ctx_size, args.n_gpu_layers)
            llama_server = Target("llama-server", ls_base)
        nginx: Target | None = None
        if not args.no_nginx:
            ng = start_nginx(procs, direct_sock)
            if ng is not None:
                nginx = Target("nginx", ng[1])
        res["columns"] = {"llama_server": llama_server is not None, "nginx": nginx is not None}

        # 1. Generation throughput: columns interleaved request by request.
        sessions = {t.name: t.session(limit=4) for t in (t_sup, t_direct, llama_server) if t is not None}
        try:
            columns: dict[str, Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]] = {
                "proxied": lambda b: stream_completion(sessions["supervisor"], t_sup.base, b),
                "direct": lambda b: stream_completion(sessions["direct"], t_direct.base, b),
                "in-process": lambda b: loop.run_in_executor(None, inproc.call, {"op": "gen", **b}),
            }
            if llama_server is not None:
                ls = llama_server
                columns["llama-server"] = lambda b: stream_completion(
                    sessions["llama-server"], ls.base, {**b, "ignore_eos": True}
                )
            gen: dict[str, Any] = {}
            gen_paired: dict[str, Any] = {}
            for n in args.lengths:
                log(f"generation: {n} tokens x {len(args.prompts)} prompts x {args.repeats[n]} rounds x {len(columns)} columns")
                runs: dict[str, list[dict[str, Any]]] = {c: [] for c in columns}
                for fn in columns.values():  # warm-up (page cache, first-call allocations)
                    await fn(completion_body(args.prompts[0], 4, eog_bias, True))
                for rnd in range(args.repeats[n]):
                    for i, prompt in enumerate(args.prompts):
                        body = completion_body(prompt, n, eog_bias, True)
                        for c, fn in rotated(columns, rnd * len(args.prompts) + i):
                            r = await fn(body)
                            runs[c].append(r)
                gen[str(n)] = {c: summarize_gen(rs) for c, rs in runs.items()}
                gen_paired[str(n)] = paired_ratios(runs, "proxied")
                for c, rs in runs.items():
                    bad = [r for r in rs if r.get("ok") and r["tokens"] != n]
                    gen[str(n)][c]["wrong_length"] = len(bad)
            res["generation"] = gen
            res["generation_paired"] = gen_paired

            # 2. Time to first token: short requests, interleaved, paired by prompt.
            rounds = 1 if args.smoke else 5
            log(f"time to first token: {len(args.prompts)} prompts x {rounds} rounds x {len(columns)} columns")
            ttft: dict[str, list[float]] = {c: [] for c in columns}
            for rnd in range(rounds):
                for i, prompt in enumerate(args.prompts):
                    body = completion_body(prompt, 2, eog_bias, True)
                    for c, fn in rotated(columns, rnd * len(args.prompts) + i):
                        r = await fn(body)
                        ttft[c].append(r["ttft_s"] * 1000 if r.get("ok") else float("nan"))
            paired = sorted(p - d for p, d in zip(ttft["proxied"], ttft["direct"]))
            res["ttft"] = {
                "requests_per_column": len(ttft["proxied"]),
                "columns": {c: {"p50_ms": pct(v, 50), "p95_ms": pct(v, 95)} for c, v in ttft.items()},
                "overhead_ms_p50": pct(paired, 50),
                "overhead_ms_p95": pct(paired, 95),
                "samples_ms": ttft,
            }
        finally:
            for s in sessions.values():
                await s.close()

        if args.only is None:
            # 3. Small requests through the supervisor vs direct (vs nginx).
            sampler = RssSampler(procs, sup.pid)
            with sampler:
                small: list[dict[str, Any]] = []
                for conc in (1, 8, 64):
                    log(f"small requests: GET /v1/models x {args.small_n}, concurrency {conc}")
                    for t in (t_sup, t_direct, nginx):
                        if t is not None:
                            small.append({"target": t.name, **await small_requests(t, conc, args.small_n)})
                res["small_requests"] = small
                # 4. Concurrency: 8 clients at once vs one client.
                log("concurrency: 1 client vs 8 clients")
                per_client = 1 if args.smoke else 3
                max_tokens = 8 if args.smoke else 32
                one = await chat_concurrency(t_sup, 1, per_client, max_tokens, eog_bias)
                eight = await chat_concurrency(t_sup, 4 if args.smoke else 8, per_client, max_tokens, eog_bias)
                res["concurrency"] = {"one": one, "many": eight}
            res["supervisor_rss_mib_peak"] = round(sampler.peak / 2**20, 1)

            # 5. Restart cost.
            log(f"restart cost: {args.restarts} kill -9 of the worker")
            restart_s: list[float] = []
            for _ in range(args.restarts):
                restart_s.append(await loop.run_in_executor(None, _kill_and_time, procs, sup))
            load = await loop.run_in_executor(None, inproc.call, {"op": "load", "repeat": args.restarts})
            res["restart"] = {
                "restart_s": restart_s,
                "median_s": median(restart_s),
                "max_s": max(restart_s),
                "inproc_load_s": load["load_s"],
                "inproc_load_median_s": median(load["load_s"]),
                "inproc_load_max_s": max(load["load_s"]),
                "backoff_s": 0.01,
            }
            procs.stop(inproc.s)  # frees its memory and CPU for the rest

            # 6. Planning time.
            log("planning time")
            from bench import plan_time

            plan_rows = [("this model", *plan_time.time_plan(Path(model)))]
            if not args.smoke:
                from tests.gguf_factory import write_model

                for name, shape in plan_time.SHAPES.items():
                    p = write_model(tmp / f"{name.replace(' ', '_')}.gguf", shape)
                    plan_rows.append((name, *plan_time.time_plan(p)))
                    p.unlink()
            res["planning"] = [
                {"model": n, "file_gib": size / 2**30, "header_ms": r, "plan_ms": pl} for n, r, pl, size in plan_rows
            ]

            # 7. Chaos.
            if args.chaos_kills > 0:
                log(f"chaos: {args.chaos_kills} kill -9 under mixed load")

                def healthy(old: int) -> bool:
                    st = sup.status()
                    w = st.get("worker")
                    if st["state"] == "ready" and w and int(w["pid"]) != old:
                        procs.seen_children.add(int(w["pid"]))
                        procs.children_of.setdefault("supervisor", set()).add(int(w["pid"]))
                        return http_get_json(sup.base + "/health", 2.0)[0] == 200
                    return False

                res["chaos"] = await run_chaos(t_sup, sup.worker_pid, healthy, args.chaos_kills, 2 if args.smoke else 4, eog_bias)
            else:
                res["chaos"] = None

        # Shutdown: the supervisor must stop its worker; nothing may outlive it.
        alive = sup.started.proc.poll() is None and http_get_json(sup.base + "/health", 2.0)[0] == 200
        procs.note_children()
        workers = set(procs.children_of.get("supervisor", set()))
        code = procs.stop(sup.started)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and any(psutil.pid_exists(p) and _not_zombie(p) for p in workers):
            await asyncio.sleep(0.05)
        orphans = [p for p in workers if psutil.pid_exists(p) and _not_zombie(p)]
        leftovers = [str(p) for p in sup.runtime.iterdir()] if sup.runtime.exists() else []
        res["shutdown"] = {
            "supervisor_alive_before_stop": alive,
            "supervisor_exit_code": code,
            "workers_seen": len(workers),
            "orphans": len(orphans),
            "runtime_dir_leftovers": leftovers,
        }
    res["shutdown"]["bench_orphans"] = procs.orphans
    res["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return res


def _not_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill_and_time(procs: Procs, sup: Supervisor) -> float:
    """kill -9 the worker; seconds until /health is 200 with a new worker."""
    old = sup.worker_pid()
    if old is None:
        raise RuntimeError("the supervisor has no worker to kill")
    t0 = time.perf_counter()
    os.kill(old, 9)
    deadline = time.monotonic() + 120.0
    while time.monotonic() < deadline:
        try:
            st = sup.status()
            w = st.get("worker")
            if st["state"] == "ready" and w and int(w["pid"]) != old and http_get_json(sup.base + "/health", 2.0)[0] == 200:
                procs.seen_children.add(int(w["pid"]))
                procs.children_of.setdefault("supervisor", set()).add(int(w["pid"]))
                return time.perf_counter() - t0
        except (OSError, RuntimeError):
            pass
        time.sleep(0.005)
    raise RuntimeError("the worker did not come back within 120 s of kill -9")


def _progress(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

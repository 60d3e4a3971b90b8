"""The in-process column: llama_cpp.Llama driven directly, in a child process of the bench.

This is the floor of what any server built on llama-cpp-python can do, so it imports
llama_cpp itself (the benchmark needs the bare library, not our engine; bench/loop_cost.py
is the other bench module that does). It runs as its own process (``python -m bench.inproc``) so the
bench process stays free of llama.cpp threads and can kill it as a process group.

Protocol: one JSON object per line on stdin, one JSON answer per line on stdout.
    {"op": "info"}                                -> {"load_s", "eog_ids", "n_threads"}
    {"op": "load", "repeat": k}                   -> {"load_s": [...]}  (k fresh loads)
    {"op": "gen", "prompt", "max_tokens", "logit_bias"} -> timings of one streamed completion
    {"op": "quit"}
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import llama_cpp
import llama_cpp.llama_cpp as llama_lib


def _load(args: argparse.Namespace) -> tuple[llama_cpp.Llama, float]:
    t0 = time.perf_counter()
    llama = llama_cpp.Llama(
        args.model,
        n_ctx=args.n_ctx,
        n_batch=args.n_batch,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_gpu_layers=args.n_gpu_layers,
        verbose=False,
    )
    return llama, time.perf_counter() - t0


def _eog_ids(llama: llama_cpp.Llama) -> list[int]:
    vocab = llama._model.vocab
    return [t for t in range(llama.n_vocab()) if llama_lib.llama_vocab_is_eog(vocab, t)]


def _gen(llama: llama_cpp.Llama, req: dict[str, Any]) -> dict[str, Any]:
    bias = {int(k): float(v) for k, v in (req.get("logit_bias") or {}).items()}
    t_send = time.perf_counter()
    t_first: float | None = None
    t_last = t_send
    n = 0
    finish: str | None = None
    stream: Any = llama.create_completion(
        req["prompt"],
        max_tokens=req["max_tokens"],
        temperature=0.0,
        stream=True,
        logit_bias=bias or None,
    )
    for chunk in stream:
        if chunk["choices"][0]["text"]:
            now = time.perf_counter()
            t_first = now if t_first is None else t_first
            t_last = now
        finish = chunk["choices"][0].get("finish_reason") or finish
        n += 1 if chunk["choices"][0]["text"] else 0
    t_end = time.perf_counter()
    if finish == "length":
        n = int(req["max_tokens"])  # exact: a chunk can hold no text (half a UTF-8 char)
    return {
        "ok": True,
        "tokens": n,
        "finish_reason": finish,
        "ttft_s": (t_first or t_end) - t_send,
        "decode_s": t_last - (t_first or t_last),
        "total_s": t_end - t_send,
    }


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.inproc")
    p.add_argument("--model", required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--n-ctx", type=int, default=4096)
    p.add_argument("--n-batch", type=int, default=512)
    p.add_argument("--n-gpu-layers", type=int, default=0)
    args = p.parse_args()
    llama, load_s = _load(args)
    out = sys.stdout
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        if op == "info":
            ans: dict[str, Any] = {"load_s": load_s, "eog_ids": _eog_ids(llama), "n_threads": llama.n_threads}
        elif op == "load":
            times = []
            for _ in range(int(req["repeat"])):
                llama.close()
                llama, t = _load(args)
                times.append(t)
            ans = {"load_s": times}
        elif op == "gen":
            ans = _gen(llama, req)
        elif op == "quit":
            break
        else:
            ans = {"error": f"unknown op {op!r}"}
        out.write(json.dumps(ans) + "\n")
        out.flush()
    llama.close()


if __name__ == "__main__":
    main()

"""llama-server's own endpoints, vram-llm beside llama-server, field by field (issue 25).

    .venv/bin/python -m bench.llama_native [--llama-server PATH] [--model GGUF] [--ours-only] [--json-out PATH]

Sends the same requests to ``vram-llm serve`` and to llama-server on the same model:
``POST /completion`` (plain, streamed, with ``n_probs``, with a grammar, with a bad grammar),
``GET /props``, ``POST /v1/chat/completions/input_tokens``, ``POST /slots/0?action=...``
(save, restore, erase), and ``POST /rerank`` on a reranker GGUF both load
(tests/gguf_factory.py ``write_reranker``: random weights, so the scores are garbage; the
shape is not). It compares what a client parses: the status and every key path of the
answer (nested objects' keys as ``a.b``, a list's items as ``a[]``; for a stream, the
first and the last event). Values are not compared (two servers, two samplers), except a
greedy (temperature 0) /completion's text.

Without ``--llama-server`` (or env LLAMA_SERVER) there is nothing to compare: it says so
and exits 0, starting nothing; ``--ours-only`` then prints vram-llm's shapes alone.
Everything started is stopped (bench/procs.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bench.procs import Procs, add_server_args, run_and_report, start_llama_server, start_supervisor

PROMPT = "The capital of France is"
Case = tuple[str, str, str, dict[str, Any] | None]
CASES: list[Case] = [
    ("completion", "POST", "/completion", {"prompt": PROMPT, "n_predict": 8, "temperature": 0, "return_tokens": True}),
    ("completion stream", "POST", "/completion", {"prompt": PROMPT, "n_predict": 8, "temperature": 0, "stream": True}),
    ("completion stream timings", "POST", "/completion", {"prompt": PROMPT, "n_predict": 4, "stream": True,
                                                          "timings_per_token": True, "return_progress": True}),
    ("completion n_probs", "POST", "/completion", {"prompt": PROMPT, "n_predict": 3, "temperature": 0, "n_probs": 2}),
    ("completion grammar", "POST", "/completion", {"prompt": "Is the sky blue?", "n_predict": 4,
                                                   "grammar": 'root ::= "yes" | "no"'}),
    ("completion bad grammar", "POST", "/completion", {"prompt": PROMPT, "n_predict": 4, "grammar": "root ::= ("}),
    ("completion json_schema", "POST", "/completion", {"prompt": "JSON:", "n_predict": 24, "temperature": 0,
                                                       "json_schema": {"type": "object", "properties": {"n": {"type": "integer"}},
                                                                       "required": ["n"]}}),
    ("chat prefill", "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"},
                                                                   {"role": "assistant", "content": "Hello! I am"}],
                                                      "max_tokens": 4, "temperature": 0}),
    ("props", "GET", "/props", None),
    ("input_tokens", "POST", "/v1/chat/completions/input_tokens", {"messages": [{"role": "user", "content": "Hi"}]}),
    ("slot save", "POST", "/slots/0?action=save", {"filename": "bench-slot.bin"}),
    ("slot restore", "POST", "/slots/0?action=restore", {"filename": "bench-slot.bin"}),
    ("slot erase", "POST", "/slots/0?action=erase", {}),
    ("slot bad filename", "POST", "/slots/0?action=save", {"filename": "../escape.bin"}),
]
RERANK_CASES: list[Case] = [
    ("rerank", "POST", "/rerank", {"query": "capital of France", "documents": ["Paris is.", "Bananas.", "Rome."]}),
    ("rerank top_n", "POST", "/v1/rerank", {"query": "capital of France", "documents": ["Paris is.", "Bananas."],
                                            "top_n": 1}),
]


def key_paths(obj: Any, prefix: str = "") -> list[str]:
    """Every key path of a JSON value: ``a``, ``a.b``, a list's items as ``a[]`` (the union
    over its items)."""
    out: set[str] = set()
    if isinstance(obj, dict):
        for k, v in obj.items():
            path = f"{prefix}.{k}" if prefix else str(k)
            out.add(path)
            out.update(key_paths(v, path))
    elif isinstance(obj, list):
        for item in obj:
            out.update(key_paths(item, f"{prefix}[]"))
    return sorted(out)


def send(base: str, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
    """What a client parses of one answer: the status and the key paths (a stream: of its
    first and its last event, and whether it ends with [DONE])."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            status, raw = r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read().decode("utf-8", "replace")
    if body is not None and body.get("stream") and status == 200:
        lines = [x[6:] for x in raw.splitlines() if x.startswith("data: ")]
        events = [json.loads(x) for x in lines if x != "[DONE]"]
        return {"http": status, "first": key_paths(events[0]) if events else [],
                "last": key_paths(events[-1]) if events else [], "done": bool(lines) and lines[-1] == "[DONE]"}
    try:
        obj = json.loads(raw)
    except ValueError:
        return {"http": status, "body": raw[:200]}
    out: dict[str, Any] = {"http": status, "keys": key_paths(obj)}
    if isinstance(obj, dict) and body is not None and body.get("temperature") == 0 and "content" in obj:
        out["content"] = obj["content"]  # greedy: the same model should write the same text
    return out


def diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Where two parsed answers differ: the status, and the key paths only one side has."""
    lines = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if x == y:
            continue
        if isinstance(x, list) and isinstance(y, list):
            lines.append(f"{k}: only vram-llm {sorted(set(x) - set(y))}, only llama-server {sorted(set(y) - set(x))}")
        else:
            lines.append(f"{k}: vram-llm {x!r} / llama-server {y!r}")
    return lines


def run(a: argparse.Namespace, model: str, ours_only: bool) -> dict[str, Any]:
    from tests.gguf_factory import write_reranker

    res: dict[str, Any] = {"model": model, "cases": []}
    with tempfile.TemporaryDirectory(prefix="vram-llm-bench-native-") as tmp:
        reranker = str(write_reranker(Path(tmp) / "reranker.gguf"))
        slots = Path(tmp) / "llama-server-slots"
        slots.mkdir()
        for gguf, cases, ours_settings, theirs_extra in (
            (model, CASES, {"parallel": 1}, ("--slot-save-path", f"{slots}/")),
            (reranker, RERANK_CASES, {"parallel": 1, "reranking": True}, ("--reranking",)),
        ):
            with tempfile.TemporaryDirectory(dir=tmp) as sub, Procs(Path(sub)) as procs:
                ours = start_supervisor(procs, gguf, a.threads, min(a.ctx_size, 1024), model_settings=ours_settings).base
                theirs = None
                if not ours_only:
                    _s, theirs = start_llama_server(procs, a.llama_server, gguf, a.threads, min(a.ctx_size, 1024), 0,
                                                    theirs_extra)
                for name, method, path, body in cases:
                    v = send(ours, method, path, body)
                    ls = send(theirs, method, path, body) if theirs is not None else None
                    res["cases"].append({"case": name, "vram-llm": v, "llama-server": ls,
                                         "differences": diff(v, ls) if ls is not None else []})
    return res


def render(res: dict[str, Any]) -> str:
    out = [f"llama-server's endpoints: vram-llm beside llama-server ({Path(res['model']).name})", ""]
    for c in res["cases"]:
        v, ls = c["vram-llm"], c["llama-server"]
        if ls is None:  # --ours-only: the top-level fields
            paths = v.get("keys") or v.get("last") or []
            out.append(f"{c['case']}: vram-llm {v['http']}: " + ", ".join(k for k in paths if "." not in k and "[" not in k))
            continue
        out.append(f"{c['case']}: vram-llm {v['http']}, llama-server {ls['http']}"
                   + (" - same shape" if not c["differences"] else ""))
        out.extend(f"    {line}" for line in c["differences"])
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.llama_native", description=__doc__.splitlines()[0])
    add_server_args(p)
    p.add_argument("--ours-only", action="store_true", help="no llama-server: print vram-llm's shapes alone")
    p.add_argument("--json-out", metavar="PATH")
    a = p.parse_args(argv)
    if not a.llama_server and not a.ours_only:
        print("bench.llama_native: skipped: no llama-server binary to compare with (--llama-server PATH or env "
              "LLAMA_SERVER; --ours-only prints vram-llm's shapes alone)")
        return 0
    return run_and_report("bench.llama_native", a, lambda model: run(a, model, not a.llama_server), render)

if __name__ == "__main__":
    sys.exit(main())

"""The Responses and Anthropic Messages dialects, vram-llm beside llama-server (issue 24).

    .venv/bin/python -m bench.dialects [--llama-server PATH] [--model GGUF] [--json-out PATH]

Sends the same requests to ``vram-llm serve`` and to llama-server on the same model:
``POST /v1/responses`` and ``POST /v1/messages``, each plain, streamed, and with a function
tool forced (``tool_choice`` required / any), and compares what a client parses: the status,
the answer's top-level fields and output item / content block types, and for a stream the
sequence of event types (a run of deltas counted as one). It measures no speed: it says
where the two servers' shapes differ, field by field.

Without ``--llama-server`` (or env LLAMA_SERVER) there is nothing to compare: it says so
and exits 0, starting nothing. Everything started is stopped (bench/procs.py).
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

PARAMS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
ASK = "What is the weather in Paris?"
CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("responses plain", "/v1/responses", {"input": "Name a fruit.", "max_output_tokens": 16, "temperature": 0}),
    ("responses stream", "/v1/responses", {"input": "Name a fruit.", "max_output_tokens": 16, "temperature": 0, "stream": True}),
    ("responses tool", "/v1/responses", {"input": ASK, "max_output_tokens": 64, "temperature": 0, "tool_choice": "required",
                                         "tools": [{"type": "function", "name": "get_weather", "parameters": PARAMS}]}),
    ("responses tool stream", "/v1/responses", {"input": ASK, "max_output_tokens": 64, "temperature": 0, "stream": True,
                                                "tool_choice": "required",
                                                "tools": [{"type": "function", "name": "get_weather", "parameters": PARAMS}]}),
    ("messages plain", "/v1/messages", {"messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 16, "temperature": 0}),
    ("messages stream", "/v1/messages", {"messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 16,
                                         "temperature": 0, "stream": True}),
    ("messages tool", "/v1/messages", {"messages": [{"role": "user", "content": ASK}], "max_tokens": 64, "temperature": 0,
                                       "tool_choice": {"type": "any"},
                                       "tools": [{"name": "get_weather", "input_schema": PARAMS}]}),
    ("messages tool stream", "/v1/messages", {"messages": [{"role": "user", "content": ASK}], "max_tokens": 64, "temperature": 0,
                                              "stream": True, "tool_choice": {"type": "any"},
                                              "tools": [{"name": "get_weather", "input_schema": PARAMS}]}),
    ("messages count_tokens", "/v1/messages/count_tokens", {"messages": [{"role": "user", "content": ASK}]}),
]


def send(base: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """What a client parses of one answer: status, keys, item types, or the event sequence."""
    req = urllib.request.Request(base + path, data=json.dumps({"model": "m", **body}).encode(),
                                 headers={"Content-Type": "application/json", "x-api-key": "unused"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            status, raw = r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read().decode("utf-8", "replace")
    if body.get("stream") and status == 200:
        kinds: list[str] = []
        for line in raw.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                kind = json.loads(line[6:]).get("type", "?")
                if not kinds or kinds[-1] != kind or not kind.endswith("delta"):
                    kinds.append(kind)
        return {"http": status, "events": kinds}
    try:
        obj = json.loads(raw)
    except ValueError:
        return {"http": status, "body": raw[:200]}
    out: dict[str, Any] = {"http": status, "keys": sorted(obj) if isinstance(obj, dict) else type(obj).__name__}
    if isinstance(obj, dict):
        items = obj.get("output") or obj.get("content")
        if isinstance(items, list):
            out["items"] = [i.get("type") for i in items if isinstance(i, dict)]
        for k in ("status", "stop_reason", "usage"):
            if k in obj:
                out[k] = sorted(obj[k]) if isinstance(obj[k], dict) else obj[k]
    return out


def diff(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Where two parsed answers differ, one line per field."""
    lines = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            if isinstance(a.get(k), list) and isinstance(b.get(k), list) and k in ("keys", "usage"):
                only_a = sorted(set(a[k]) - set(b[k]))
                only_b = sorted(set(b[k]) - set(a[k]))
                lines.append(f"{k}: only vram-llm {only_a}, only llama-server {only_b}")
            else:
                lines.append(f"{k}: vram-llm {a.get(k)!r} / llama-server {b.get(k)!r}")
    return lines


def run(a: argparse.Namespace, model: str) -> dict[str, Any]:
    res: dict[str, Any] = {"model": model, "cases": []}
    with tempfile.TemporaryDirectory(prefix="vram-llm-bench-dialects-") as tmp, Procs(Path(tmp)) as procs:
        ours = start_supervisor(procs, model, a.threads, a.ctx_size).base
        _s, theirs = start_llama_server(procs, a.llama_server, model, a.threads, a.ctx_size, 0)
        for name, path, body in CASES:
            v, ls = send(ours, path, body), send(theirs, path, body)
            res["cases"].append({"case": name, "vram-llm": v, "llama-server": ls, "differences": diff(v, ls)})
    return res


def render(res: dict[str, Any]) -> str:
    out = [f"Responses and Messages: vram-llm beside llama-server ({Path(res['model']).name})", ""]
    for c in res["cases"]:
        v, ls = c["vram-llm"], c["llama-server"]
        out.append(f"{c['case']}: vram-llm {v['http']}, llama-server {ls['http']}"
                   + (" - same shape" if not c["differences"] else ""))
        out.extend(f"    {line}" for line in c["differences"])
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.dialects", description=__doc__.splitlines()[0])
    add_server_args(p)
    p.add_argument("--json-out", metavar="PATH")
    a = p.parse_args(argv)
    if not a.llama_server:
        print("bench.dialects: skipped: no llama-server binary to compare with (--llama-server PATH or env LLAMA_SERVER)")
        return 0
    return run_and_report("bench.dialects", a, lambda model: run(a, model), render)

if __name__ == "__main__":
    sys.exit(main())

"""`vram-llm status`: read the supervisor's /status and print it for a person.

Exit code 0 only when the worker is ready, so `vram-llm status && ...` works in shell
checks; 1 when the supervisor answers but the worker is not ready; 2 when the supervisor
cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from supervisor.auth import client_key
from supervisor.config import Config


def status_url(config: Config) -> str:
    host = config.server.host
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.server.port}/status"


def fetch_status(url: str, timeout_s: float = 5.0, api_key: str | None = None) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    req = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310 (our own URL)
        data: dict[str, Any] = json.loads(resp.read())
        return data


def _dur(s: float | None) -> str:
    if s is None:
        return "-"
    s = int(s)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def _same_failure(reason: str) -> str:
    # Each attempt of a crash loop has a new worker pid; the failure is the same one.
    return re.sub(r"\bpid \d+", "pid", reason)


def collapse_history(hist: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any], int]]:
    """Runs of consecutive identical failures as (first, last, count), oldest first, so a
    crash loop reads as one line with a count instead of one line per attempt."""
    runs: list[tuple[dict[str, Any], dict[str, Any], int]] = []
    for r in hist:
        if runs:
            first, last, n = runs[-1]
            if (last["kind"], _same_failure(last["reason"])) == (r["kind"], _same_failure(r["reason"])):
                runs[-1] = (first, r, n + 1)
                continue
        runs.append((r, r, 1))
    return runs


def render(st: dict[str, Any], url: str) -> str:
    out: list[str] = []
    sup = st.get("supervisor") or {}
    out.append(f"vram-llm at {url.removesuffix('/status')}  (supervisor pid {sup.get('pid')}, up {_dur(sup.get('uptime_s'))})")
    out.append(f"model:   {sup.get('model')}")
    out.append(f"state:   {st['state'].upper()}  - {st.get('reason', '')}")
    w = st.get("worker")
    if w:
        line = f"worker:  pid {w['pid']}, generation {w['generation']}, up {_dur(w.get('uptime_s'))}"
        if w.get("rss_mib") is not None:
            line += f", RSS {w['rss_mib']:.0f} MiB, CPU {w.get('cpu_percent', 0):.0f}%"
        out.append(line)
        if w.get("active") is not None:
            out.append(f"         generating {w.get('active', 0)}, queued in worker {w.get('queued', 0)}, served {w.get('requests_served', 0)}")
        if w.get("cache_hits") is not None:
            ram = w.get("ram_cache") or {}
            out.append(
                f"         prompt cache: {w['cache_hits']} hits, {w.get('cache_tokens_reused', 0)} tokens reused; "
                f"RAM: {ram.get('entries', 0)} snapshots, {ram.get('bytes', 0) / 2**20:.0f} MiB, "
                f"{ram.get('hits', 0)} hits, {ram.get('tokens_saved', 0)} tokens saved"
            )
    else:
        out.append("worker:  none running")
    req = st.get("requests") or {}
    out.append(
        f"requests: {req.get('in_flight', 0)} in flight, {req.get('waiting_for_worker', 0)} waiting for the worker, "
        f"{req.get('served', 0)} served"
    )
    plan = st.get("plan") or {}
    if plan:
        out.append(
            f"plan:    n_gpu_layers={plan.get('n_gpu_layers')} split_mode={plan.get('split_mode')} "
            f"main_gpu={plan.get('main_gpu')} n_ctx={plan.get('n_ctx')} tensor_split={plan.get('tensor_split')}"
        )
        env = plan.get("env") or {}
        if env:
            out.append("         " + " ".join(f"{k}={v}" for k, v in sorted(env.items())))
    if st.get("oom_adjustment"):
        out.append(f"OOM ladder: {st['oom_adjustment']}")
    planned = {g.get("uuid"): g for g in (plan.get("gpus") or [])}
    gpus = st.get("gpus_now") or []
    if gpus:
        rows = [["GPU", "UUID", "NAME", "TOTAL MiB", "FREE NOW", "PLANNED MiB", "LAYERS", "WORKER USES"]]
        for g in gpus:
            p = planned.get(g.get("uuid"), {})
            rows.append(
                [
                    str(g.get("index")),
                    str(g.get("uuid")),
                    str(g.get("name")),
                    str(g.get("total_mib")),
                    str(g.get("free_mib")),
                    str(p.get("planned_mib", "-")),
                    str(p.get("layers", "-")),
                    "-" if g.get("worker_mib") is None else str(g.get("worker_mib")),
                ]
            )
        out.append("gpus:")
        out.extend("  " + line for line in _table(rows))
    else:
        out.append("gpus:    none visible (CPU only)")
    hist = st.get("restart_history") or []
    line = f"restarts: {st.get('restarts', 0)}"
    if st.get("failure_streak"):
        line += f", {st['failure_streak']} in the current streak"
    if st.get("crash_loop"):
        line += " (crash loop: retrying at the capped interval)"
    out.append(line)
    for first, last, n in collapse_history(hist)[-10:]:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(first["at"]))
        if n == 1:
            out.append(f"  {at}  {first['kind']:<10} {first['reason']}")
        else:
            until = time.strftime("%H:%M:%S", time.localtime(last["at"]))
            out.append(f"  {at}  {first['kind']:<10} {n} times until {until}, last: {last['reason']}")
    le = st.get("last_exit")
    if le:
        out.append(f"last exit: {le.get('detail')}")
    tail = st.get("stderr_tail") or []
    if tail and st["state"] != "ready":
        out.append("last worker output:")
        out.extend("  " + line for line in tail[-10:])
    return "\n".join(out)


def run(config: Config, args: argparse.Namespace) -> int:
    url = status_url(config)
    try:
        st = fetch_status(url, api_key=client_key(config, getattr(args, "server__api_keys", None)))
    except urllib.error.HTTPError as e:
        hint = ": give an admin key with --api-key or VRAM_LLM_API_KEY" if e.code in (401, 403) else ""
        print(f"vram-llm: the supervisor at {url} answered HTTP {e.code}{hint}", file=sys.stderr)
        return 2
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        print(f"vram-llm: cannot reach the supervisor at {url}: {reason}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        print(json.dumps(st, indent=2))
    else:
        print(render(st, url))
    return 0 if st.get("state") == "ready" else 1

"""`vram-llm status`: read the supervisor's /status and print it for a person.

Exit code 0 exactly when /health would answer 200 (the supervisor's own verdict, the
``health`` field of /status: every pinned model ready, every model loaded at start ready
once), so `vram-llm status && ...` works in shell checks; 1 when the supervisor answers but is not
healthy; 2 when the supervisor cannot be reached.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, TypeVar

import msgspec

from supervisor.auth import client_key
from supervisor.config import Config, base_url, listen_hosts
from supervisor.status import RestartRecord, Status, decode_status


def status_url(config: Config) -> str:
    """The first address the server listens on; a wildcard one is asked on its loopback
    ("::" binds IPv6 only: asyncio's sockets are IPV6_V6ONLY)."""
    host = listen_hosts(config)[0]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"{base_url(host, config.server.port)}/status"


def fetch_status(url: str, timeout_s: float = 5.0, api_key: str | None = None) -> Status:
    """The supervisor's /status, decoded into the structs the endpoint encodes."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    req = urllib.request.Request(url, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout_s) as resp:  # noqa: S310 (our own URL)
        return decode_status(resp.read())


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


_Record = TypeVar("_Record", RestartRecord, dict[str, Any])


def _kind_reason(r: RestartRecord | dict[str, Any]) -> tuple[str, str]:
    return (r.kind, r.reason) if isinstance(r, RestartRecord) else (r["kind"], r["reason"])


def collapse_history(hist: list[_Record]) -> list[tuple[_Record, _Record, int]]:
    """Runs of consecutive identical failures as (first, last, count), oldest first, so a
    crash loop reads as one line with a count instead of one line per attempt."""
    runs: list[tuple[_Record, _Record, int]] = []
    for r in hist:
        if runs:
            first, last, n = runs[-1]
            (lk, lr), (rk, rr) = _kind_reason(last), _kind_reason(r)
            if (lk, _same_failure(lr)) == (rk, _same_failure(rr)):
                runs[-1] = (first, r, n + 1)
                continue
        runs.append((r, r, 1))
    return runs


def _mib_of(d: dict[str, int]) -> str:
    return str(sum(d.values())) if d else "-"


def _models_table(st: Status) -> list[str]:
    """Several models: one row per model, then which model holds what on each GPU."""
    index = {g.uuid: g.index for g in st.gpus_now}
    rows = [["MODEL", "STATE", "GPUS", "PLANNED MiB", "MEASURED MiB", "IN FLIGHT", "LAST USED", "RESTARTS",
             "SWAPS IN", "PINNED"]]
    for m in st.models:
        gpus = sorted(index.get(u, -1) for u in set(m.planned_mib) | set(m.measured_mib))
        rows.append([
            m.id, m.state, ",".join(map(str, gpus)) or "-", _mib_of(m.planned_mib), _mib_of(m.measured_mib),
            str(m.in_flight), "-" if m.idle_s is None else f"{_dur(m.idle_s)} ago", str(m.restarts),
            str(m.swaps_in), "yes" if m.pinned else "",
        ])
    out = [f"models:  {len(st.models)}, {st.swaps} eviction(s) to make room so far"]
    out.extend("  " + line for line in _table(rows))
    holders: dict[str, list[str]] = {}
    for m in st.models:
        for u, mib in (m.measured_mib or m.planned_mib).items():
            holders.setdefault(u, []).append(f"{m.id} {mib} MiB")
    if st.gpus_now:
        out.append("gpu holders:")
        for g in st.gpus_now:
            out.append(f"  GPU {g.index}: {g.free_mib} MiB free; " + (", ".join(holders.get(g.uuid, [])) or "no model"))
    return out


def _replicas_table(st: Status) -> list[str]:
    """Every model with several replicas: a row per replica."""
    index = {g.uuid: g.index for g in st.gpus_now}
    models = [(m.id, m.replicas) for m in st.models] if st.models else [("", st.replicas)]
    out: list[str] = []
    for mid, reps in models:
        if not reps:
            continue
        rows = [["REPLICA", "STATE", "PID", "GPUS", "PLANNED MiB", "SLOTS", "GENERATING", "WAITING", "SERVED",
                 "CACHE HITS", "RESTARTS"]]
        for r in reps:
            gpus = sorted(index.get(u, -1) for u in r.planned_mib)
            rows.append([str(r.replica), r.state, str(r.pid or "-"), ",".join(map(str, gpus)) or "-",
                         _mib_of(r.planned_mib), str(r.slots), str(r.generating), str(r.waiting), str(r.served),
                         "-" if r.cache_hits is None else str(r.cache_hits), str(r.restarts)])
        out.append(f"replicas{' of ' + mid if mid else ''}: {len(reps)}")
        out.extend("  " + line for line in _table(rows))
    return out


def render(doc: Status | dict[str, Any], url: str) -> str:
    st = doc if isinstance(doc, Status) else msgspec.convert(doc, Status)
    out: list[str] = []
    sup = st.supervisor
    out.append(
        f"vram-llm at {url.removesuffix('/status')}  (supervisor pid {sup.pid if sup else None}, "
        f"up {_dur(sup.uptime_s if sup else None)})"
    )
    several = f"  (the first of {len(st.models)} models; each is listed below)" if st.models else ""
    out.append(f"model:   {sup.model if sup else None}{several}")
    out.append(f"state:   {st.state.upper()}  - {st.reason}")
    if st.models and st.health is not None:
        out.append(f"health:  {'ok' if st.health.ok else 'not ready: ' + st.health.reason}")
    w = st.worker
    if w:
        line = f"worker:  pid {w.pid}, generation {w.generation}, up {_dur(w.uptime_s)}"
        if w.rss_mib is not None:
            line += f", RSS {w.rss_mib:.0f} MiB, CPU {w.cpu_percent or 0:.0f}%"
        out.append(line)
        if w.active is not None:
            out.append(f"         generating {w.active}, queued in worker {w.queued or 0}, served {w.requests_served or 0}")
        if w.cache_hits is not None:
            ram = w.ram_cache
            out.append(
                f"         prompt cache: {w.cache_hits} hits, {w.cache_tokens_reused or 0} tokens reused"
                + (
                    f"; RAM: {ram.entries} snapshots, {ram.bytes / 2**20:.0f} MiB, "
                    f"{ram.hits} hits, {ram.tokens_saved} tokens saved"
                    if ram is not None else ""
                )
            )
        disk = w.disk_cache
        if disk is not None:
            out.append(
                f"         on disk: {disk.entries} states, {disk.bytes / 2**20:.0f} MiB, {disk.hits} hits, "
                f"{disk.tokens_saved} tokens saved" + (f", {disk.errors} errors" if disk.errors else "")
                + f" ({disk.dir})"
            )
        if w.steps:
            drafted, accepted = w.draft_tokens or 0, w.draft_tokens_accepted or 0
            out.append(
                f"         batch steps: {w.steps}, {1000 * (w.step_seconds or 0) / w.steps:.1f} ms each "
                f"({1000 * (w.decode_seconds or 0) / w.steps:.1f} in llama_decode); drafts: {accepted} of "
                f"{drafted} tokens accepted"
                + (" (learned by match length: " + ", ".join(
                    f"{n}+ {a:.0%}" for n, a in w.draft_acceptance.items()) + ")" if w.draft_acceptance and drafted else "")
            )
    else:
        out.append("worker:  none running")
    req = st.requests
    out.append(
        f"requests: {req.in_flight} in flight, {req.waiting_for_worker} waiting for the worker, "
        f"{req.served} served"
    )
    plan = st.plan
    if plan is not None:
        out.append(
            f"plan:    n_gpu_layers={plan.n_gpu_layers} split_mode={plan.split_mode} "
            f"main_gpu={plan.main_gpu} n_ctx={plan.n_ctx} tensor_split={plan.tensor_split}"
        )
        if plan.env:
            out.append("         " + " ".join(f"{k}={v}" for k, v in sorted(plan.env.items())))
    if st.oom_adjustment:
        out.append(f"OOM ladder: {st.oom_adjustment}")
    planned = {g.uuid: g for g in (plan.gpus if plan is not None else [])}
    if st.gpus_now:
        rows = [["GPU", "UUID", "NAME", "TOTAL MiB", "FREE NOW", "PLANNED MiB", "LAYERS", "WORKER USES"]]
        for g in st.gpus_now:
            p = planned.get(g.uuid)
            rows.append(
                [
                    str(g.index),
                    g.uuid,
                    g.name,
                    str(g.total_mib),
                    str(g.free_mib),
                    "-" if p is None else str(p.planned_mib),
                    "-" if p is None else str(p.layers),
                    "-" if g.worker_mib is None else str(g.worker_mib),
                ]
            )
        out.append("gpus:")
        out.extend("  " + line for line in _table(rows))
    else:
        out.append("gpus:    none visible (CPU only)")
    if st.models:
        out.extend(_models_table(st))
    out.extend(_replicas_table(st))
    line = f"restarts: {st.restarts}"
    if st.failure_streak:
        line += f", {st.failure_streak} in the current streak"
    if st.crash_loop:
        line += " (crash loop: retrying at the capped interval)"
    out.append(line)
    for first, last, n in collapse_history(st.restart_history)[-10:]:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(first.at))
        if n == 1:
            out.append(f"  {at}  {first.kind:<10} {first.reason}")
        else:
            until = time.strftime("%H:%M:%S", time.localtime(last.at))
            out.append(f"  {at}  {first.kind:<10} {n} times until {until}, last: {last.reason}")
    if st.last_exit:
        out.append(f"last exit: {st.last_exit.detail}")
    if st.stderr_tail and st.state != "ready":
        out.append("last worker output:")
        out.extend("  " + line for line in st.stderr_tail[-10:])
    return "\n".join(out)


def model_command(config: Config, args: argparse.Namespace, action: str) -> int:
    """`vram-llm load ID` / `vram-llm unload ID`: POST /models/ID/load|unload (admin)."""
    url = status_url(config).removesuffix("/status") + f"/models/{urllib.parse.quote(args.id, safe='')}/{action}"
    key = client_key(config, getattr(args, "server__api_keys", None))
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    req = urllib.request.Request(url, data=b"", headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10.0) as resp:  # noqa: S310 (our own URL)
            resp.read()
    except urllib.error.HTTPError as e:
        detail = ""
        with contextlib.suppress(ValueError, KeyError, TypeError):
            detail = ": " + json.loads(e.read())["error"]["message"]
        hint = ": give an admin key with --api-key or VRAM_LLM_API_KEY" if e.code in (401, 403) else ""
        print(f"vram-llm: the supervisor at {url} answered HTTP {e.code}{detail or hint}", file=sys.stderr)
        return 2 if e.code != 404 else 1
    except (urllib.error.URLError, OSError) as e:
        print(f"vram-llm: cannot reach the supervisor at {url}: {getattr(e, 'reason', e)}", file=sys.stderr)
        return 2
    print(f"{action} of model {args.id} requested (see `vram-llm status`)")
    return 0


def run(config: Config, args: argparse.Namespace) -> int:
    url = status_url(config)
    try:
        st = fetch_status(url, api_key=client_key(config, getattr(args, "server__api_keys", None)))
    except urllib.error.HTTPError as e:
        hint = ": give an admin key with --api-key or VRAM_LLM_API_KEY" if e.code in (401, 403) else ""
        print(f"vram-llm: the supervisor at {url} answered HTTP {e.code}{hint}", file=sys.stderr)
        return 2
    except (urllib.error.URLError, OSError, ValueError, msgspec.DecodeError) as e:
        reason = getattr(e, "reason", e)
        print(f"vram-llm: cannot reach the supervisor at {url}: {reason}", file=sys.stderr)
        return 2
    if getattr(args, "json", False):
        print(json.dumps(msgspec.to_builtins(st), indent=2))
    else:
        print(render(st, url))
    return exit_code(st)


def exit_code(st: Status) -> int:
    """0 when /health answers 200 now; 1 otherwise. A supervisor too old to say (no
    ``health`` field) is judged by its first model's state."""
    ok = st.health.ok if st.health is not None else st.state == "ready"
    return 0 if ok else 1

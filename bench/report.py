"""Render the bench results (the JSON dict) as the plain-text table docs/benchmarks.md shows."""

from __future__ import annotations

import math
from typing import Any

# Targets from issue 5.
TARGET_VS_DIRECT = 0.97
TARGET_VS_INPROC = 0.95
TARGET_TTFT_OVERHEAD_MS = 5.0
TARGET_SMALL_OVERHEAD_MS = 1.0
# Targets from issue 6 (the generation loop): proxied against the bare library and llama-server.
TARGET_LOOP_VS_INPROC = 1.0
TARGET_LOOP_VS_LLAMA_SERVER = 0.95


def _f(v: float | None, fmt: str = ".1f") -> str:
    return "-" if v is None or math.isnan(v) else format(v, fmt)


def _mark(ok: bool) -> str:
    return "ok" if ok else "BELOW TARGET"


def _rounds(repeats: Any) -> str:
    """'2', or '8 / 4 / 2' when the lengths had different counts (older JSON: an int)."""
    if isinstance(repeats, dict):
        counts = list(repeats.values())
        return str(counts[0]) if len(set(counts)) == 1 else " / ".join(map(str, counts))
    return str(repeats)


def render(r: dict[str, Any]) -> str:
    out: list[str] = []
    m, s = r["machine"], r["settings"]
    out.append(
        f"vram-llm bench  {m['date']}  {m['cores']} cores ({m['cpu']}), Python {m['python']}, "
        f"load average at start {m['loadavg_at_start'][0]}, at end {m.get('loadavg_at_end', ['?'])[0]}"
    )
    out.append(
        f"model {s['model'].rsplit('/', 1)[-1]} ({s['model_mib']} MiB), threads {s['threads']}, n_ctx {s['ctx_size']}, "
        f"temperature 0, EOS suppressed, {s['prompts']} prompts x {_rounds(s['repeats'])} rounds per length"
    )

    out.append("\n1. Streaming generation (tokens/s from first to last token; in brackets: whole request)")
    cols = ["proxied", "direct", "in-process"] + (["llama-server"] if r["columns"]["llama_server"] else [])
    head = f"{'tokens':>7} " + " ".join(f"{c:>18}" for c in cols) + f" {'prox/direct':>12} {'prox/in-proc':>13}"
    if "llama-server" in cols:
        head += f" {'prox/llama-srv':>15}"
    out.append(head)
    for n, g in r["generation"].items():
        row = f"{n:>7} " + " ".join(f"{_f(g[c]['tok_s_stream']):>8} ({_f(g[c]['tok_s_total']):>6})  " for c in cols)
        p = g["proxied"]["tok_s_stream"]
        rd, ri = p / g["direct"]["tok_s_stream"], p / g["in-process"]["tok_s_stream"]
        row += f" {rd:>12.3f} {ri:>13.3f}"
        if "llama-server" in cols:
            row += f" {p / g['llama-server']['tok_s_stream']:>15.3f}"
        out.append(row)
        bad = {c: (g[c]["failed"], g[c]["wrong_length"]) for c in cols if g[c]["failed"] or g[c]["wrong_length"]}
        if bad:
            out.append(f"        failed / wrong length: {bad}")
        out.append(
            f"        proxied/direct {_mark(rd >= TARGET_VS_DIRECT)} (>= {TARGET_VS_DIRECT}), "
            f"proxied/in-process {_mark(ri >= TARGET_VS_INPROC)} (>= {TARGET_VS_INPROC})"
        )
    paired = r.get("generation_paired")
    if paired:
        out.append(
            "\n   Paired ratios: proxied over each column, request by request (same prompt, same round,"
            " run back to back); median [p25 - p75] of the pairs"
        )
        others = [c for c in cols if c != "proxied"]
        out.append(f"{'tokens':>7} " + " ".join(f"{'prox/' + c:>26}" for c in others))
        for n, pr in paired.items():
            out.append(
                f"{n:>7} "
                + " ".join(
                    f"{_f(pr[c]['median'], '.3f'):>9} [{_f(pr[c]['p25'], '.3f')} - {_f(pr[c]['p75'], '.3f')}] n={pr[c]['pairs']:<3}"
                    for c in others
                )
            )
        marks = []
        for n, pr in paired.items():
            m = f"{n}: in-process {_mark(pr['in-process']['median'] >= TARGET_LOOP_VS_INPROC)}"
            if "llama-server" in pr:
                m += f", llama-server {_mark(pr['llama-server']['median'] >= TARGET_LOOP_VS_LLAMA_SERVER)}"
            marks.append(m)
        out.append(
            f"        generation loop (paired medians; >= {TARGET_LOOP_VS_INPROC} x in-process,"
            f" >= {TARGET_LOOP_VS_LLAMA_SERVER} x llama-server): " + "; ".join(marks)
        )

    t = r["ttft"]
    tcols = list(t["columns"])
    out.append(
        f"\n2. Time to first token, ms (p50 / p95; {t['requests_per_column']} short requests per column, interleaved)"
    )
    out.append(" ".join(f"{c:>17}" for c in tcols) + f" {'overhead p50 / p95 (paired proxied - direct)':>46}")
    ov = t["overhead_ms_p50"]
    out.append(
        " ".join(f"{_f(t['columns'][c]['p50_ms']):>8} / {_f(t['columns'][c]['p95_ms']):>6}" for c in tcols)
        + f" {ov:>30.2f} / {t['overhead_ms_p95']:.2f} ms  {_mark(ov < TARGET_TTFT_OVERHEAD_MS)} (< {TARGET_TTFT_OVERHEAD_MS} ms)"
    )

    if "small_requests" not in r:
        out.append("\n(--only generation: sections 3 to 8 not run)")
        _shutdown(r, out)
        out.append(f"\nhard checks: {'PASS' if passed_hard_checks(r) else 'FAIL'} (no failed or wrong-length generation, no orphans)")
        return "\n".join(out)
    out.append("\n3. Small requests: GET /v1/models, latency ms p50 / p99, requests/s")
    by_c: dict[int, dict[str, dict[str, Any]]] = {}
    for row in r["small_requests"]:
        by_c.setdefault(row["concurrency"], {})[row["target"]] = row
    targets = ["supervisor", "direct"] + (["nginx"] if r["columns"]["nginx"] else [])
    out.append(f"{'conc':>5} " + " ".join(f"{t:>24}" for t in targets) + f" {'overhead p50':>13}")
    for c, rows in sorted(by_c.items()):
        line = f"{c:>5} " + " ".join(
            f"{_f(rows[t]['p50_ms'], '.2f'):>6} / {_f(rows[t]['p99_ms'], '.2f'):>6} {_f(rows[t]['req_s'], '.0f'):>7}/s"
            for t in targets
        )
        ov = rows["supervisor"]["p50_ms"] - rows["direct"]["p50_ms"]
        line += f" {ov:>10.3f} ms"
        if c == 1:
            line += f"  {_mark(ov < TARGET_SMALL_OVERHEAD_MS)} (< {TARGET_SMALL_OVERHEAD_MS} ms)"
        errs = sum(rows[t]["errors"] for t in targets)
        if errs:
            line += f"  ERRORS {errs}"
        out.append(line)
    if not r["columns"]["nginx"]:
        out.append("      (nginx not installed: no nginx column)")

    c = r["concurrency"]
    out.append("\n4. Concurrency through the supervisor (chat, non-streamed)")
    for k in ("one", "many"):
        x = c[k]
        out.append(
            f"  {x['clients']:>2} client(s) x {x['requests'] // x['clients']} requests: {x['ok']}/{x['requests']} ok, "
            f"{x['failed']} failed, {x['tok_s']:.1f} tokens/s total"
        )
    out.append(f"  many/one tokens/s: {c['many']['tok_s'] / c['one']['tok_s']:.2f}  (one generation at a time in the worker)")

    rs = r["restart"]
    out.append("\n5. Restart cost (kill -9 -> /health 200 with a new worker; back-off set to 0.01 s)")
    out.append(
        f"  restart median {rs['median_s']:.2f} s, max {rs['max_s']:.2f} s over {len(rs['restart_s'])}; "
        f"in-process model load median {rs['inproc_load_median_s']:.2f} s, max {rs['inproc_load_max_s']:.2f} s; "
        f"restart - load = {rs['median_s'] - rs['inproc_load_median_s']:.2f} s"
    )

    out.append("\n6. Planning time (header read + plan)")
    for p in r["planning"]:
        out.append(f"  {p['model']:<26} {p['file_gib']:>7.2f} GiB {p['header_ms'] + p['plan_ms']:>8.2f} ms")

    out.append("\n7. Supervisor memory (RSS)")
    out.append(f"  idle {r['supervisor_rss_mib_idle']} MiB, peak under small-request and concurrency load {r['supervisor_rss_mib_peak']} MiB")

    ch = r.get("chaos")
    out.append("\n8. Chaos (kill -9 of the worker under mixed streaming / non-streaming load)")
    if ch is None:
        out.append("  skipped (--chaos-kills 0)")
    else:
        out.append(f"  kills {ch['kills']}, requests {ch['requests']} ({ch['streamed']} streamed)")
        out.append(f"  arrived between kills: {ch['between_kills']}, failed: {ch['between_kills_failed']}  (must be 0)")
        out.append(
            f"    of which sent while the worker was down (kill -> new worker ready): {ch['sent_while_down']}, "
            f"failed: {ch['sent_while_down_failed']}"
        )
        if ch["failed_examples"]:
            out.append(f"    e.g. {ch['failed_examples']}")
        out.append(
            f"  in flight at a kill: {ch['in_flight_at_kill']} (ok {ch['in_flight_ok']}, error {ch['in_flight_error']}, "
            f"of which streamed {ch.get('in_flight_error_streamed', '?')})"
        )
        out.append(f"  hangs: {ch['hangs']}  (must be 0)")
    _shutdown(r, out)
    out.append(f"\nhard checks: {'PASS' if passed_hard_checks(r) else 'FAIL'} (no lost requests, hangs, orphans or failed requests)")
    return "\n".join(out)


def _shutdown(r: dict[str, Any], out: list[str]) -> None:
    sd = r["shutdown"]
    out.append(
        f"  supervisor alive at the end: {'yes' if sd['supervisor_alive_before_stop'] else 'NO'}; "
        f"exit code on SIGTERM {sd['supervisor_exit_code']}; workers seen {sd['workers_seen']}, "
        f"orphans after shutdown: {sd['orphans']}  (must be 0)"
    )
    if sd["runtime_dir_leftovers"] or sd["bench_orphans"]:
        out.append(f"  LEFT BEHIND: {sd['runtime_dir_leftovers']} {sd['bench_orphans']}")


def passed_hard_checks(r: dict[str, Any]) -> bool:
    """The checks that are pass/fail regardless of machine speed."""
    ch = r.get("chaos") or {"between_kills_failed": 0, "hangs": 0}
    sd = r["shutdown"]
    gen_ok = all(not x["failed"] and not x["wrong_length"] for g in r["generation"].values() for x in g.values())
    small_ok = all(row["errors"] == 0 for row in r.get("small_requests", []))
    conc_ok = "concurrency" not in r or all(r["concurrency"][k]["failed"] == 0 for k in ("one", "many"))
    return (
        gen_ok and small_ok and conc_ok
        and ch["between_kills_failed"] == 0 and ch["hangs"] == 0
        and sd["supervisor_alive_before_stop"] and sd["orphans"] == 0
        and not sd["runtime_dir_leftovers"] and not sd["bench_orphans"]
    )

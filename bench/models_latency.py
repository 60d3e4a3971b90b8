"""GET /v1/models latency: vram-llm's supervisor against llama-server (issue 12).

    .venv/bin/python -m bench.models_latency [--llama-server PATH] [--requests 3000]
        [--model GGUF] [--threads N] [--smoke] [--json-out PATH]

Since issue 12 the supervisor answers ``GET /v1/models`` itself, with one model as with
several (it knows every model and where it is), instead of proxying it to the worker.
This measures that answer against llama-server's on the same model: one kept-alive HTTP/1.1
connection per server (``http.client``, the lightest client the standard library has),
requests sent one at a time, paired: each round sends one request to every server, back to
back, the order rotating from one round to the next, so the machine's drift cancels out of
each pair. Reported: p50/p90/p99 per server and the median (with quartiles) of the paired
ratios vram-llm / llama-server (below 1: vram-llm is faster).

vram-llm runs the real worker on the model (``python -m supervisor serve``, log level
WARNING as in every bench: no access-log line per request; ``--access-log`` runs it at INFO,
one line per request as a default install writes). Without ``--llama-server`` (or env
LLAMA_SERVER) only vram-llm runs. Two floors (``--no-floor`` drops them), each answering
vram-llm's own body from a constant: the ``aiohttp floor`` is a bare aiohttp app on uvloop,
as the supervisor runs them (no middleware, no lookup); the ``protocol floor`` is a bare
``asyncio.Protocol`` on uvloop writing one constant answer (the same headers as vram-llm's)
per read: the least any Python server on this stack can do, which supervisor/fastpath.py
approaches. Everything started is stopped (bench/procs.py).
"""

from __future__ import annotations

import argparse
import datetime
import http.client
import json
import os
import platform
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

from bench.client import median, pct
from bench.procs import Procs, add_server_args, free_port, start_llama_server, start_supervisor, wait_http_ok

PATH = "/v1/models"


class Conn:
    """One kept-alive connection; ``get()`` is one timed request (ms), its body kept."""

    def __init__(self, name: str, base: str) -> None:
        u = urllib.parse.urlsplit(base)
        self.name = name
        self._conn = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=30)
        self.body = b""
        self.errors = 0
        self.reconnects = 0

    def get(self) -> float:
        t0 = time.perf_counter()
        try:
            self._conn.request("GET", PATH)
            r = self._conn.getresponse()
            self.body = r.read()
            ok = r.status == 200
        except (OSError, http.client.HTTPException):
            self._conn.close()  # the next request opens a new connection
            self.reconnects += 1
            ok = False
        ms = (time.perf_counter() - t0) * 1000
        if not ok:
            self.errors += 1
        return ms

    def close(self) -> None:
        self._conn.close()


def serve_floor(port: int, body_path: str) -> None:
    """The ``aiohttp floor`` server (run in its own process): one route, a constant body."""
    import asyncio

    import uvloop
    from aiohttp import web

    body = Path(body_path).read_bytes()

    async def models(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    async def main() -> None:
        app = web.Application()
        app.router.add_get(PATH, models)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()  # until SIGTERM (Procs.stop)

    uvloop.run(main())


def serve_protocol_floor(port: int, body_path: str) -> None:
    """The ``protocol floor`` server (run in its own process): one constant answer per read."""
    import asyncio

    import uvloop

    body = Path(body_path).read_bytes()
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
        b"Date: Wed, 02 Dec 2026 00:00:00 GMT\r\nServer: Python/3.11 aiohttp/3.14.5\r\n"
        b"X-Request-Id: 0123456789abcdef0123456789abcdef\r\n\r\n%s" % (len(body), body)
    )

    class Constant(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport: Any = transport

        def data_received(self, data: bytes) -> None:
            self.transport.write(answer)

    async def main() -> None:
        await asyncio.get_running_loop().create_server(Constant, "127.0.0.1", port)
        await asyncio.Event().wait()  # until SIGTERM (Procs.stop)

    uvloop.run(main())


def start_floor(procs: Procs, body: bytes, kind: str = "aiohttp") -> str:
    port = free_port()
    body_path = procs.tmp / "floor-body.json"
    body_path.write_bytes(body)
    flag = "--serve-floor" if kind == "aiohttp" else "--serve-protocol-floor"
    s = procs.start(f"{kind}-floor", [sys.executable, "-m", "bench.models_latency", flag, str(port), str(body_path)])
    base = f"http://127.0.0.1:{port}"
    wait_http_ok(procs, s, base + PATH, 60.0)
    return base


def run(conns: list[Conn], n: int, warmup: int) -> dict[str, list[float]]:
    for _ in range(warmup):
        for c in conns:
            c.get()
    for c in conns:
        c.errors = c.reconnects = 0
    lat: dict[str, list[float]] = {c.name: [] for c in conns}
    for i in range(n):
        k = i % len(conns)
        for c in conns[k:] + conns[:k]:
            lat[c.name].append(c.get())
    return lat


def summarize(lat: dict[str, list[float]], conns: list[Conn]) -> dict[str, Any]:
    cols = {
        c.name: {
            "requests": len(lat[c.name]),
            "errors": c.errors,
            "reconnects": c.reconnects,
            "p50_ms": pct(lat[c.name], 50),
            "p90_ms": pct(lat[c.name], 90),
            "p99_ms": pct(lat[c.name], 99),
            "body_bytes": len(c.body),
        }
        for c in conns
    }
    paired = None
    if "llama-server" in lat:
        ratios = [a / b for a, b in zip(lat["vram-llm"], lat["llama-server"]) if b > 0]
        paired = {"median": median(ratios), "p25": pct(ratios, 25), "p75": pct(ratios, 75), "pairs": len(ratios)}
    return {"columns": cols, "paired_vram_over_llama_server": paired}


def render(res: dict[str, Any]) -> str:
    m, s = res["machine"], res["settings"]
    out = [
        f"bench.models_latency  {m['date']}  {m['cores']} cores, load average {m['loadavg'][0]} -> "
        f"{m['loadavg_end'][0]}",
        f"model {Path(s['model']).name}; GET {PATH} x {s['requests']} per server (after {s['warmup']} warm-up), "
        f"one kept-alive connection each, paired, order rotating; vram-llm log level {s['log_level']}",
        "",
        "| server | p50 ms | p90 ms | p99 ms | errors | body bytes |",
        "|---|---|---|---|---|---|",
    ]
    for name, v in res["columns"].items():
        out.append(
            f"| {name} | {v['p50_ms']:.3f} | {v['p90_ms']:.3f} | {v['p99_ms']:.3f} | {v['errors']} | {v['body_bytes']} |"
        )
    p = res["paired_vram_over_llama_server"]
    if p is not None:
        out.append(
            f"\npaired latency ratio vram-llm / llama-server: median {p['median']:.3f} "
            f"[p25 {p['p25']:.3f} - p75 {p['p75']:.3f}], {p['pairs']} pairs"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.models_latency", description=__doc__.splitlines()[0])
    add_server_args(ap)
    ap.add_argument("--requests", type=int, default=3000, help="measured requests per server")
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--access-log", action="store_true", help="run vram-llm at log level INFO (one line per request)")
    ap.add_argument("--no-floor", action="store_true", help="no 'aiohttp floor' and 'protocol floor' columns")
    ap.add_argument("--smoke", action="store_true", help="100 requests, 20 warm-up")
    ap.add_argument("--json-out", metavar="PATH")
    ap.add_argument("--serve-floor", nargs=2, metavar=("PORT", "BODY"), help=argparse.SUPPRESS)
    ap.add_argument("--serve-protocol-floor", nargs=2, metavar=("PORT", "BODY"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.serve_floor:
        serve_floor(int(a.serve_floor[0]), a.serve_floor[1])
        return 0
    if a.serve_protocol_floor:
        serve_protocol_floor(int(a.serve_protocol_floor[0]), a.serve_protocol_floor[1])
        return 0
    if a.smoke:
        a.requests, a.warmup = 100, 20
    from supervisor.default_model import default_model_path

    model = str(Path(a.model).resolve()) if a.model else str(default_model_path())
    log_level = "INFO" if a.access_log else "WARNING"
    res: dict[str, Any] = {
        "machine": {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "cores": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg": [round(x, 2) for x in os.getloadavg()],
        },
        "settings": {"model": model, "requests": a.requests, "warmup": a.warmup, "log_level": log_level},
    }
    conns: list[Conn] = []
    try:
        with tempfile.TemporaryDirectory(prefix="vram-llm-bench-models-") as tmp, Procs(Path(tmp)) as procs:
            sup = start_supervisor(procs, model, a.threads, a.ctx_size, log_level=log_level)
            conns.append(Conn("vram-llm", sup.base))
            if not a.no_floor:
                conns[0].get()
                conns.append(Conn("aiohttp floor", start_floor(procs, conns[0].body)))
                conns.append(Conn("protocol floor", start_floor(procs, conns[0].body, "protocol")))
            if a.llama_server:
                _s, base = start_llama_server(procs, a.llama_server, model, a.threads, a.ctx_size, 0)
                conns.append(Conn("llama-server", base))
            lat = run(conns, a.requests, a.warmup)
            res.update(summarize(lat, conns))
            res["cards"] = {c.name: json.loads(c.body or b"null") for c in conns}
    except (RuntimeError, TimeoutError, OSError) as e:
        print(f"bench.models_latency: failed: {e}", file=sys.stderr)
        return 1
    finally:
        for c in conns:
            c.close()
    res["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print(render(res))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(res, indent=2))
    return 0 if all(v["errors"] == 0 for v in res["columns"].values()) else 2


if __name__ == "__main__":
    sys.exit(main())

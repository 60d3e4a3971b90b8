"""The bench's HTTP client side: streamed completions, small-request sweeps, concurrency.

One aiohttp ClientSession per target (TCP for the supervisor, nginx and llama-server; a
Unix socket for the bare worker), kept for the whole phase. Every request has a client
timeout, so nothing the bench sends can hang it.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec

_dec = msgspec.json.Decoder()


@dataclass(frozen=True)
class Target:
    name: str
    base: str  # "http://127.0.0.1:PORT" or "http://worker" for a Unix socket
    unix: str | None = None

    def session(self, limit: int = 100, timeout_s: float = 300.0) -> aiohttp.ClientSession:
        conn: aiohttp.BaseConnector
        if self.unix:
            conn = aiohttp.UnixConnector(path=self.unix, limit=limit)
        else:
            conn = aiohttp.TCPConnector(limit=limit)
        return aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout_s))


def completion_body(prompt: str, max_tokens: int, eog_bias: dict[str, float], stream: bool, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "default",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "logit_bias": eog_bias,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    body.update(extra or {})
    return body


async def stream_completion(
    session: aiohttp.ClientSession, base: str, body: dict[str, Any]
) -> dict[str, Any]:
    """One streamed /v1/completions. Tokens: usage.completion_tokens of the final chunk if
    the server sends it, else the number of chunks with text (one token per chunk).
    Also: how many token ids the chunks listed (return_token_ids; None if none did) and the
    X-Ignored-Params header."""
    t_send = time.perf_counter()
    t_first: float | None = None
    t_last = t_send
    chunks = 0
    usage_tokens: int | None = None
    error: str | None = None
    n_ids: int | None = None
    async with session.post(base + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            return {"ok": False, "error": f"HTTP {resp.status}: {(await resp.text())[:200]}"}
        ignored = resp.headers.get("X-Ignored-Params")
        async for line in resp.content:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            msg = _dec.decode(data)
            if "error" in msg:
                error = str(msg["error"])
                break
            if msg.get("usage"):
                usage_tokens = int(msg["usage"]["completion_tokens"])
            for ch in msg.get("choices") or ():
                if "token_ids" in ch:
                    n_ids = (n_ids or 0) + len(ch["token_ids"])
                if ch.get("text"):
                    now = time.perf_counter()
                    if t_first is None:
                        t_first = now
                    t_last = now
                    chunks += 1
    t_end = time.perf_counter()
    if error is not None:
        return {"ok": False, "error": error}
    return {
        "ok": True,
        "tokens": usage_tokens if usage_tokens is not None else chunks,
        "ttft_s": (t_first or t_end) - t_send,
        "decode_s": t_last - (t_first or t_last),
        "total_s": t_end - t_send,
        "token_ids": n_ids,
        "ignored": ignored,
    }


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))
    return s[k]


def summarize_gen(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Tokens/s over the streamed part (first to last token) and over the whole request."""
    ok = [r for r in runs if r.get("ok")]
    tokens = sum(r["tokens"] for r in ok)
    decode_tokens = sum(r["tokens"] - 1 for r in ok)
    decode_s = sum(r["decode_s"] for r in ok)
    total_s = sum(r["total_s"] for r in ok)
    ttft = [r["ttft_s"] * 1000 for r in ok]
    return {
        "requests": len(runs),
        "failed": len(runs) - len(ok),
        "tokens": tokens,
        "tok_s_stream": decode_tokens / decode_s if decode_s else float("nan"),
        "tok_s_total": tokens / total_s if total_s else float("nan"),
        "ttft_ms_p50": pct(ttft, 50),
        "ttft_ms_p95": pct(ttft, 95),
        "ttft_ms": ttft,
    }


def paired_ratios(runs: dict[str, list[dict[str, Any]]], subject: str) -> dict[str, Any]:
    """subject's streaming rate over every other column's, request by request.

    runs[c][i] is the same prompt in the same round for every column, run one right after
    the other, so each ratio compares two requests a few seconds apart: the machine's own
    drift (other load, thermal or host throttling) cancels out of it, which it does not
    from the ratio of whole-column rates. The median of these ratios is the number to read.
    """
    def rate(r: dict[str, Any]) -> float | None:
        if not r.get("ok") or r["decode_s"] <= 0 or r["tokens"] < 2:
            return None
        return (r["tokens"] - 1) / r["decode_s"]

    out: dict[str, Any] = {}
    for c, rs in runs.items():
        if c == subject:
            continue
        ratios = []
        for a, b in zip(runs[subject], rs):
            ra, rb = rate(a), rate(b)
            if ra is not None and rb is not None:
                ratios.append(ra / rb)
        out[c] = {
            "median": median(ratios),
            "p25": pct(ratios, 25),
            "p75": pct(ratios, 75),
            "pairs": len(ratios),
            "ratios": ratios,
        }
    return out


async def small_requests(target: Target, concurrency: int, n: int, path: str = "/v1/models") -> dict[str, Any]:
    """n GETs of path with `concurrency` connections kept alive; latency p50/p99 and req/s."""
    lat: list[float] = []
    errors = 0
    async with target.session(limit=concurrency, timeout_s=30.0) as session:
        # Warm the connection pool so connect time is not in the numbers.
        async def one() -> None:
            nonlocal errors
            t0 = time.perf_counter()
            try:
                async with session.get(target.base + path) as r:
                    await r.read()
                    if r.status != 200:
                        errors += 1
            except (aiohttp.ClientError, asyncio.TimeoutError):
                errors += 1
            lat.append((time.perf_counter() - t0) * 1000)

        await asyncio.gather(*(one() for _ in range(concurrency)))
        lat.clear()
        errors = 0
        todo = iter(range(n))

        async def loop() -> None:
            for _ in todo:
                await one()

        t0 = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    return {
        "concurrency": concurrency,
        "requests": n,
        "errors": errors,
        "p50_ms": pct(lat, 50),
        "p99_ms": pct(lat, 99),
        "req_s": n / wall,
    }


async def chat_concurrency(target: Target, clients: int, per_client: int, max_tokens: int, eog_bias: dict[str, float]) -> dict[str, Any]:
    """`clients` clients each sending `per_client` chat requests at once (non-streamed)."""
    ok = failed = tokens = 0
    async with target.session(limit=clients, timeout_s=600.0) as session:
        async def client(i: int) -> None:
            nonlocal ok, failed, tokens
            for j in range(per_client):
                body = {
                    "model": "default",
                    "messages": [{"role": "user", "content": f"Client {i}, question {j}: describe a lighthouse."}],
                    "max_tokens": max_tokens,
                    "temperature": 0,
                    "logit_bias": eog_bias,
                }
                try:
                    async with session.post(target.base + "/v1/chat/completions", json=body) as r:
                        data = await r.json(loads=_dec.decode)
                        if r.status == 200:
                            ok += 1
                            tokens += int(data["usage"]["completion_tokens"])
                        else:
                            failed += 1
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    failed += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        wall = time.perf_counter() - t0
    return {"clients": clients, "requests": clients * per_client, "ok": ok, "failed": failed,
            "tokens": tokens, "tok_s": tokens / wall, "wall_s": wall}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")

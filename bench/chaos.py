"""Chaos: steady mixed load through the supervisor while its worker is kill -9'd K times.

Definitions (docs/benchmarks.md repeats them):
- A kill is the interval [just before os.kill(SIGKILL), just after] on the bench's clock.
- A request *arrived between kills* when no kill interval falls inside [sent, answered]
  (it was sent after the previous kill and finished before the next one; it may have
  waited for the restart). Every such request must succeed: 0 lost.
- A request *in flight at a kill* overlaps a kill interval. It may succeed (it had not
  reached the worker yet, or it was resent) or end with an error (an HTTP error, or an
  SSE error event / cut stream), but it must end.
- A *hang* is a request that hit its client timeout. Must be 0.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import aiohttp

from bench.client import Target, _dec

CLIENT_TIMEOUT_S = 60.0


@dataclass
class Result:
    kind: str
    sent: float
    done: float
    outcome: str  # "ok", "error", "hang"
    detail: str = ""


async def _one(session: aiohttp.ClientSession, base: str, i: int, eog_bias: dict[str, float]) -> Result:
    stream = i % 2 == 0
    body: dict[str, Any] = {
        "model": "default",
        "messages": [{"role": "user", "content": f"Request {i}: tell me about rivers."}],
        "max_tokens": 16 if stream else 6,
        "temperature": 0,
        "stream": stream,
        "logit_bias": eog_bias,
    }
    sent = time.monotonic()
    kind = "stream" if stream else "plain"

    async def send() -> Result:
        async with session.post(base + "/v1/chat/completions", json=body) as r:
            if r.status != 200:
                return Result(kind, sent, time.monotonic(), "error", f"HTTP {r.status}")
            if not stream:
                data = await r.json(loads=_dec.decode)
                ok = bool(data.get("choices"))
                return Result(kind, sent, time.monotonic(), "ok" if ok else "error", "" if ok else "no choices")
            async for line in r.content:
                if line.startswith(b"data: "):
                    payload = line[6:].strip()
                    if payload == b"[DONE]":
                        return Result(kind, sent, time.monotonic(), "ok")
                    if b'"error"' in payload and "error" in _dec.decode(payload):
                        return Result(kind, sent, time.monotonic(), "error", "SSE error event")
            return Result(kind, sent, time.monotonic(), "error", "stream cut")

    try:
        return await asyncio.wait_for(send(), CLIENT_TIMEOUT_S)
    except asyncio.TimeoutError:
        return Result(kind, sent, time.monotonic(), "hang", f"no answer in {CLIENT_TIMEOUT_S:.0f}s")
    except aiohttp.ClientError as e:
        return Result(kind, sent, time.monotonic(), "error", e.__class__.__name__)


async def run_chaos(
    target: Target,
    worker_pid: Any,
    healthy: Any,
    kills: int,
    clients: int,
    eog_bias: dict[str, float],
    seed: int = 1,
    gap_s: tuple[float, float] = (0.5, 3.0),
) -> dict[str, Any]:
    """worker_pid(): the current worker's pid; healthy(old_pid): ready with a new worker."""
    rng = random.Random(seed)
    results: list[Result] = []
    kill_windows: list[tuple[float, float]] = []
    down_windows: list[tuple[float, float]] = []  # kill -> replacement ready
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    counter = iter(range(10**9))

    async def client() -> None:
        async with target.session(limit=2, timeout_s=CLIENT_TIMEOUT_S + 5) as session:
            while not stop.is_set():
                results.append(await _one(session, target.base, next(counter), eog_bias))

    async def killer() -> None:
        for _ in range(kills):
            await asyncio.sleep(rng.uniform(*gap_s))
            pid = await loop.run_in_executor(None, worker_pid)
            if pid is None:
                continue
            t0 = time.monotonic()
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            kill_windows.append((t0, time.monotonic()))
            # Next kill only once the replacement is ready, so every kill hits a live worker.
            deadline = time.monotonic() + 120.0
            while not await loop.run_in_executor(None, healthy, pid):
                if time.monotonic() > deadline:
                    raise RuntimeError("the worker did not come back within 120 s of a kill")
                await asyncio.sleep(0.02)
            down_windows.append((t0, time.monotonic()))
        await asyncio.sleep(gap_s[1])  # let requests after the last kill complete normally
        stop.set()

    tasks = [asyncio.ensure_future(client()) for _ in range(clients)]
    try:
        await killer()
        await asyncio.gather(*tasks)
    finally:
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def overlaps(r: Result) -> bool:
        return any(r.sent <= b and r.done >= a for a, b in kill_windows)

    between = [r for r in results if not overlaps(r)]
    inflight = [r for r in results if overlaps(r)]
    sent_down = [r for r in between if any(a <= r.sent <= b for a, b in down_windows)]
    return {
        "kills": len(kill_windows),
        "requests": len(results),
        "between_kills": len(between),
        "between_kills_failed": sum(r.outcome != "ok" for r in between),
        "sent_while_down": len(sent_down),
        "sent_while_down_failed": sum(r.outcome != "ok" for r in sent_down),
        "failed_examples": [f"{r.kind}: {r.detail}" for r in between if r.outcome != "ok"][:5],
        "in_flight_at_kill": len(inflight),
        "in_flight_ok": sum(r.outcome == "ok" for r in inflight),
        "in_flight_error": sum(r.outcome == "error" for r in inflight),
        "in_flight_error_streamed": sum(r.outcome == "error" and r.kind == "stream" for r in inflight),
        "in_flight_error_details": dict(Counter(f"{r.kind}: {r.detail}" for r in inflight if r.outcome == "error")),
        "hangs": sum(r.outcome == "hang" for r in results),
        "streamed": sum(r.kind == "stream" for r in results),
    }

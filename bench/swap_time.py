"""Swap time: a request for a model that is not loaded -> its first token, against the
model's plain load time (a benchmark, not a test).

Two ids of the embedded SmolLM2 on a simulated GPU with room for one (the fleet subtracts
the planned footprint of the workers it runs), served by the real worker. Each round
streams one completion from the model that is not loaded: the supervisor unloads the other
one, loads this one and answers. Reported per round: time to first token, and the load
time of the worker that answered (its uptime when ready, from /status).

    .venv/bin/python bench/swap_time.py [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from supervisor.default_model import default_model_path  # noqa: E402
from tests.supervisor_harness import Supervisor, poll  # noqa: E402

ROOM_FOR_ONE_MIB = 2618  # SmolLM2 at ctx 4096 plans to ~1 GiB; 1 GiB is the reserve


def first_token_s(s: Supervisor, model: str) -> float:
    body = {"model": model, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 8, "stream": True}
    req = urllib.request.Request(
        s.base + "/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=300) as r:
        for line in r:
            if line.startswith(b"data: ") and b'"content"' in line:
                took = time.perf_counter() - t0
                r.read()
                return took
    raise AssertionError("no token")


def load_s(s: Supervisor, model: str) -> float:
    """The answering worker's load time: how long it took to become ready (its reason)."""
    _, st = s.get("/status")
    return _ready_after(st, model)


def _ready_after(st: dict[str, Any], model: str) -> float:
    for m in st["models"]:
        if m["id"] == model and "ready after" in m["reason"]:
            return float(m["reason"].split("ready after ")[1].rstrip("s"))
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    args = ap.parse_args()
    path = str(default_model_path())
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        sim = tmp / "gpus.json"
        sim.write_text(json.dumps([{"index": 0, "uuid": "GPU-bench", "name": "sim", "total_mib": 8192,
                                    "free_mib": ROOM_FOR_ONE_MIB}]))
        toml = "".join(f'[[models]]\nid = "{m}"\npath = "{path}"\n\n' for m in ("a", "b"))
        s = Supervisor(tmp, {"gpu": {"simulate_gpus": str(sim)}}, extra_toml=toml)
        try:
            poll(lambda: any(m["id"] == "a" and m["loaded"] for m in s.status()["models"]), 300, "a loaded")
            rows = []
            for i in range(args.rounds):
                model = "b" if i % 2 == 0 else "a"
                ttft = first_token_s(s, model)
                rows.append((model, ttft, load_s(s, model)))
            print(f"{'round':>5} {'model':>5} {'first token s':>14} {'load s':>7}")
            for i, (m, t, ld) in enumerate(rows):
                print(f"{i:>5} {m:>5} {t:>14.2f} {ld:>7.2f}")
            print(f"median first token after a swap: {statistics.median(r[1] for r in rows):.2f}s; "
                  f"median plain load: {statistics.median(r[2] for r in rows):.2f}s; "
                  f"swaps counted: {s.status()['swaps']}")
        finally:
            s.stop()


if __name__ == "__main__":
    main()

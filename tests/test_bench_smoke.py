"""A short smoke run of the benchmark harness: it runs, prints a complete table, and leaves
nothing behind. The numbers are not checked (benchmarks are not pass/fail); only that every
section is there and the hard checks (no lost request, hang or orphan) hold."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.model


def run_module(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """python -m ARGS from the repository root; fails the test unless it exits 0."""
    proc = subprocess.run(
        [sys.executable, "-m", *args], check=False, cwd=str(REPO), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_bench_smoke_prints_a_complete_table(tmp_path: Path) -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    out_json = tmp_path / "bench.json"
    proc = run_module("bench", "--smoke", "--no-nginx", "--json-out", str(out_json))
    for section in (
        "1. Streaming generation",
        "2. Time to first token",
        "3. Small requests",
        "4. Concurrency",
        "5. Restart cost",
        "6. Planning time",
        "7. Supervisor memory",
        "8. Chaos",
        "hard checks: PASS",
    ):
        assert section in proc.stdout, proc.stdout
    res = json.loads(out_json.read_text())
    assert res["chaos"]["between_kills_failed"] == 0
    assert res["chaos"]["hangs"] == 0
    assert res["shutdown"]["orphans"] == 0
    assert {row["target"] for row in res["small_requests"]} == {"supervisor", "direct"}
    after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert after <= before


def test_bench_only_generation_prints_paired_ratios(tmp_path: Path) -> None:
    out_json = tmp_path / "bench.json"
    proc = run_module(
        "bench", "--smoke", "--no-nginx", "--only", "generation",
        "--gen-tokens", "4,8", "--repeats", "2,1", "--json-out", str(out_json),
    )
    assert "Paired ratios" in proc.stdout and "3. Small requests" not in proc.stdout, proc.stdout
    res = json.loads(out_json.read_text())
    # 2 prompts x 2 rounds at 4 tokens, 2 x 1 at 8: one pair per request of each column.
    assert res["generation_paired"]["4"]["in-process"]["pairs"] == 4
    assert res["generation_paired"]["8"]["direct"]["pairs"] == 2
    assert res["shutdown"]["orphans"] == 0


def test_loop_cost_runs() -> None:
    proc = run_module("bench.loop_cost", "--gen-tokens", "8", "--rounds", "1", timeout=120)
    assert "ours/theirs" in proc.stdout and "create_completion" in proc.stdout, proc.stdout


def test_batching_bench_runs(tmp_path: Path) -> None:
    out_json = tmp_path / "batching.json"
    proc = run_module("bench.batching", "--llama-server", "", "--threads", "1", "--tokens", "4", "--rounds", "1",
                      "--clients", "1,2", "--system-repeat", "1", "--json-out", str(out_json), timeout=240)
    assert "conversations" in proc.stdout, proc.stdout
    rows = json.loads(out_json.read_text())["vram-llm"]["concurrency"]
    assert [r["clients"] for r in rows] == [1, 2] and all(r["failed"] == 0 for r in rows)


def test_extensions_bench_runs(tmp_path: Path) -> None:
    out_json = tmp_path / "ext.json"
    proc = run_module("bench.extensions", "--smoke", "--json-out", str(out_json))
    assert "vram/llama-server" in proc.stdout, proc.stdout
    res = json.loads(out_json.read_text())
    for kind in ("warm", "cold"):
        col = res["kinds"][kind]["columns"]["vram-llm"]
        assert (col["failed"], col["wrong_length"], col["ids_match_usage"]) == (0, 0, 2)
    assert res["kinds"]["warm"]["columns"]["vram-llm"]["ignored_header"] == "dry_multiplier"


def test_placement_time_runs() -> None:
    proc = run_module("bench.placement_time", timeout=120)
    assert "evict several" in proc.stdout and "only busy ones in the way" in proc.stdout, proc.stdout


def test_replicas_bench_runs(tmp_path: Path) -> None:
    out_json = tmp_path / "replicas.json"
    proc = run_module("bench.replicas", "--rounds", "1", "--clients", "2", "--tokens", "4", "--ctx-size", "512",
                      "--json-out", str(out_json), timeout=240)
    assert "agg_tok_s" in proc.stdout, proc.stdout
    assert set(json.loads(out_json.read_text())["rounds"][0]) == {
        "2 replicas x 1 thread", "1 worker x 2 threads", "1 worker x 1 thread"}


def test_swap_time_runs() -> None:
    proc = run_module("bench.swap_time", "--rounds", "2", timeout=240)
    assert "median first token after a swap" in proc.stdout and "swaps counted: 2" in proc.stdout, proc.stdout


def test_rpc_split_bench_runs() -> None:
    # issue 29: local vs split over loopback RPC (prints "skipped: ..." without the RPC build).
    proc = run_module("bench.rpc_split", "--rounds", "1", "--tokens", "8", timeout=300)
    out = proc.stdout
    assert out.startswith("skipped: ") or all(f"\n{r} " in out for r in ("local", "1 hop", "3-way")), out


def test_logprobs_bench_runs() -> None:
    proc = run_module("bench.logprobs", "--gen-tokens", "8", "--rounds", "1", "--threads", "1")
    res = json.loads(proc.stdout)["results"]
    assert set(res) == {"off", "logprobs", "top_logprobs=5"} and all(r["median_tok_s"] > 0 for r in res.values())


def test_models_latency_bench_runs(tmp_path: Path) -> None:
    out_json = tmp_path / "models.json"
    proc = run_module("bench.models_latency", "--smoke", "--llama-server", "", "--threads", "1",
                      "--json-out", str(out_json))
    assert "| vram-llm |" in proc.stdout and "| aiohttp floor |" in proc.stdout, proc.stdout
    res = json.loads(out_json.read_text())
    assert {c: v["errors"] for c, v in res["columns"].items()} == {"vram-llm": 0, "aiohttp floor": 0, "protocol floor": 0}
    assert len({v["body_bytes"] for v in res["columns"].values()}) == 1  # the floors answer vram-llm's body
    [card] = res["cards"]["vram-llm"]["data"]
    assert card["state"] == "ready" and card["loaded"] is True


def _skips_without_llama_server(module: str) -> dict[str, str]:
    """There is no llama-server binary on CI: a comparison says so and starts nothing. The
    environment without LLAMA_SERVER, for the caller's further runs."""
    env = {k: v for k, v in __import__("os").environ.items() if k != "LLAMA_SERVER"}
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    proc = subprocess.run([sys.executable, "-m", module], cwd=str(REPO), capture_output=True, text=True,
                          timeout=120, env=env, check=False)
    assert proc.returncode == 0 and "skipped" in proc.stdout, proc.stdout + proc.stderr
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before
    return env


def test_bench_dialects_skips_cleanly_without_llama_server() -> None:
    _skips_without_llama_server("bench.dialects")


def test_bench_llama_native_skips_without_llama_server_and_runs_ours_only() -> None:
    env = _skips_without_llama_server("bench.llama_native")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    proc = subprocess.run([sys.executable, "-m", "bench.llama_native", "--ours-only", "--threads", "2"], cwd=str(REPO),
                          capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for line in ("completion: vram-llm 200", "props: vram-llm 200", "slot restore: vram-llm 200",
                 "completion bad grammar: vram-llm 400", "rerank: vram-llm 200: model, object, results, usage"):
        assert line in proc.stdout, proc.stdout
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before

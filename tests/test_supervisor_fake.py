"""Process tests: the real supervisor (`vram-llm serve`) with the misbehaving fake worker.

The supervisor reads the real default model's header for planning; the fake worker never
loads it. Every wait polls a state with a deadline; every test stops the supervisor with
SIGTERM and checks that no worker and no socket is left (Supervisor.stop()).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from tests.supervisor_harness import REPO, Supervisor, notify_listener, poll, scrape, total

SIM_2GPU = [
    {"index": 0, "uuid": "GPU-aaaaaaaa-0000-0000-0000-000000000000", "name": "Small", "total_mib": 12288, "free_mib": 11000},
    {"index": 1, "uuid": "GPU-bbbbbbbb-0000-0000-0000-000000000000", "name": "Big", "total_mib": 24576, "free_mib": 23000},
]

FAST = {
    "worker": {"health_interval_s": 0.2, "health_timeout_s": 1.0, "stop_timeout_s": 3.0},
    "restart": {"backoff_initial_s": 0.05, "backoff_max_s": 0.4, "oom_settle_timeout_s": 1.0},
    "admission": {"wait_timeout_s": 30.0},
    "shutdown": {"grace_s": 3.0},
}


def merged(*dicts: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for d in dicts:
        for k, v in d.items():
            out.setdefault(k, {}).update(v)
    return out


@pytest.fixture
def sim_gpus(tmp_path: Path) -> Path:
    p = tmp_path / "gpus.json"
    p.write_text(json.dumps(SIM_2GPU))
    return p


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    d = tmp_path / "fake-state"
    d.mkdir()
    return d


@pytest.fixture
def start_supervisor(tmp_path: Path) -> Iterator[Any]:
    started: list[Supervisor] = []

    def start(sections: dict[str, dict[str, Any]] | None = None, env: dict[str, str] | None = None) -> Supervisor:
        s = Supervisor(tmp_path, merged(FAST, sections or {}), env=env, fake_worker=True)
        started.append(s)
        return s

    yield start
    for s in started:
        if s.proc.poll() is None:
            try:
                assert s.stop() == 0
            finally:
                s.kill_hard()


def starts(state_dir: Path) -> list[dict[str, Any]]:
    p = state_dir / "starts.jsonl"
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def chat(s: Supervisor, **extra: Any) -> tuple[int, Any]:
    body = {"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **extra}
    return s.post("/v1/chat/completions", body)


def http(s: Supervisor, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any, Any]:
    """(status, headers, JSON body) of a GET, or a POST when there is a body."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(s.base + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.headers, json.loads(e.read() or b"null")


def test_serve_applies_the_plan_to_the_worker(start_supervisor: Any, sim_gpus: Path, state_dir: Path) -> None:
    s = start_supervisor({"gpu": {"simulate_gpus": str(sim_gpus)}}, {"FAKE_WORKER_STATE_DIR": str(state_dir)})
    st = s.wait_ready(60)
    plan = st["plan"]
    start = starts(state_dir)[-1]
    assert start["spec"]["n_gpu_layers"] == plan["n_gpu_layers"]
    assert start["spec"]["tensor_split"] == pytest.approx(plan["tensor_split"])
    assert start["spec"]["split_mode"] == plan["split_mode"]
    assert start["spec"]["main_gpu"] == plan["main_gpu"]
    assert start["env"]["CUDA_VISIBLE_DEVICES"] == plan["env"]["CUDA_VISIBLE_DEVICES"]
    assert start["env"]["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    # The bigger free GPU (NVML index 1) is CUDA device 0 in the worker.
    assert plan["env"]["CUDA_VISIBLE_DEVICES"].split(",")[0] == SIM_2GPU[1]["uuid"]
    code, body = chat(s)
    assert code == 200 and body["choices"][0]["message"]["content"]
    assert s.get("/health") == (200, {"status": "ok"})


def test_v1_models_is_the_supervisors_answer_while_loading_and_ready(
    start_supervisor: Any, sim_gpus: Path
) -> None:
    """One model: /v1/models is answered by the supervisor, with the worker's card (its id:
    the alias; OpenAI's fields) plus where the model is, while the worker loads too, and
    without asking the worker (it answers while the worker is stopped)."""
    s = start_supervisor(
        {"gpu": {"simulate_gpus": str(sim_gpus)}, "model": {"alias": "my-model"}}, {"FAKE_WORKER_LOAD_S": "2"}
    )
    s.wait_state("loading", 30)
    code, body = s.get("/v1/models", timeout=5)
    assert code == 200 and body["object"] == "list", body
    [card] = body["data"]
    assert card["id"] == "my-model" and card["state"] in ("loading", "ready"), card
    assert card["loaded"] is (card["state"] == "ready")
    st = s.wait_ready(60)
    code, body = s.get("/v1/models")
    [card] = body["data"]
    assert set(card) == {"id", "object", "created", "owned_by", "loaded", "state", "gpus", "mib", "pinned"}
    assert (card["id"], card["object"], card["owned_by"]) == ("my-model", "model", "vram-llm")
    assert card["state"] == "ready" and card["loaded"] is True and card["pinned"] is False
    used = [g for g in st["plan"]["gpus"] if g["cuda_index"] is not None and not g["excluded_reason"]]
    assert card["gpus"] == sorted(g["uuid"] for g in used) and card["mib"] == sum(g["planned_mib"] for g in used) > 0
    assert s.get("/v1/models/my-model") == (200, card)
    code, body = s.get("/v1/models/nope")
    assert code == 404 and body["error"]["code"] == "model_not_found"
    os.kill(st["worker"]["pid"], signal.SIGSTOP)
    try:
        assert s.get("/v1/models", timeout=5)[1]["data"] == [card]
    finally:
        os.kill(st["worker"]["pid"], signal.SIGCONT)
    assert chat(s)[0] == 200


def test_kill9_while_idle_restarts_and_counts(start_supervisor: Any) -> None:
    s = start_supervisor()
    st = s.wait_ready(60)
    pid = st["worker"]["pid"]
    os.kill(pid, signal.SIGKILL)
    st = s.wait_state("ready", 60, lambda st: st["worker"]["pid"] != pid)
    assert st["restarts"] == 1
    assert st["restart_history"][0]["kind"] == "crash"
    assert "SIGKILL" in st["last_exit"]["description"]
    code, _ = chat(s)
    assert code == 200
    m = scrape(s)
    assert total(m, "vram_llm_worker_restarts_total", kind="crash") == 1
    assert total(m, "vram_llm_worker_state", state="ready") == 1
    # `vram-llm status` shows it, and exits 0 because the worker is ready.
    out = subprocess.run(
        [sys.executable, "-m", "supervisor", "status", "--config", str(s.config_path)],
        capture_output=True, text=True, timeout=30, cwd=REPO,
    )
    assert out.returncode == 0, out.stderr
    assert "READY" in out.stdout and "restarts: 1" in out.stdout
    js = subprocess.run(
        [sys.executable, "-m", "supervisor", "status", "--json", "--config", str(s.config_path)],
        capture_output=True, text=True, timeout=30, cwd=REPO,
    )
    assert js.returncode == 0 and json.loads(js.stdout)["restarts"] == 1


def test_requests_sent_during_a_restart_all_succeed(start_supervisor: Any) -> None:
    s = start_supervisor(env={"FAKE_WORKER_LOAD_S": "1.0"})
    st = s.wait_ready(60)
    os.kill(st["worker"]["pid"], signal.SIGKILL)
    results: list[int] = []

    def one() -> None:
        results.append(chat(s)[0])

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [200] * 6


def _stream_until_killed(s: Supervisor, pid: int) -> list[bytes]:
    req = urllib.request.Request(
        s.base + "/v1/chat/completions",
        data=json.dumps(
            {"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 500, "stream": True}
        ).encode(),
        headers={"Content-Type": "application/json"},
    )
    events: list[bytes] = []
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.headers["X-Accel-Buffering"] == "no"
        for line in r:
            if line.startswith(b"data: "):
                events.append(line[6:].strip())
                if len(events) == 3:
                    os.kill(pid, signal.SIGKILL)
    return events


def test_kill_mid_stream_gives_an_error_event_not_a_hang(start_supervisor: Any) -> None:
    s = start_supervisor(env={"FAKE_WORKER_TOKEN_INTERVAL_S": "0.05"})
    st = s.wait_ready(60)
    events = _stream_until_killed(s, st["worker"]["pid"])
    assert len(events) >= 4
    last = json.loads(events[-1])
    assert last["error"]["code"] == "worker_failed"
    s.wait_state("ready", 60, lambda st2: st2["worker"]["pid"] != st["worker"]["pid"])
    assert chat(s)[0] == 200


def test_oom_at_load_replans_smaller(start_supervisor: Any, sim_gpus: Path, state_dir: Path) -> None:
    s = start_supervisor(
        {"gpu": {"simulate_gpus": str(sim_gpus)}},
        {"FAKE_WORKER_STATE_DIR": str(state_dir), "FAKE_WORKER_OOM_ABOVE_LAYERS": "10"},
    )
    st = s.wait_ready(90)
    runs = starts(state_dir)
    layers = [r["spec"]["n_gpu_layers"] for r in runs]
    assert layers[0] == -1  # the first plan offloads everything
    assert 0 <= layers[-1] <= 10  # the one that loaded fits under the fake card's limit
    as_count = [30 if n == -1 else n for n in layers]
    assert as_count == sorted(as_count, reverse=True)  # never bigger again
    assert all(h["kind"] == "oom" for h in st["restart_history"])
    assert st["oom_adjustment"]


def test_crash_loop_ends_in_failed_with_backoff_when_told_to_give_up(start_supervisor: Any, state_dir: Path) -> None:
    # restart.give_up = true keeps the old behaviour: `failed` until SIGHUP.
    s = start_supervisor(
        {"restart": {"max_failures": 3, "backoff_initial_s": 0.2, "backoff_max_s": 1.0, "give_up": True}},
        {"FAKE_WORKER_CRASH_AT_LOAD": "1", "FAKE_WORKER_STATE_DIR": str(state_dir)},
    )
    st = s.wait_state("failed", 60)
    assert st["restarts"] == 4  # 3 allowed + the one that made it give up
    assert "gave up" in st["reason"]
    assert len(starts(state_dir)) == 4
    gaps = [b["at"] - a["at"] for a, b in zip(st["restart_history"], st["restart_history"][1:])]
    assert gaps[0] >= 0.2 and gaps[1] >= 0.4 and gaps[2] >= 0.8  # exponential backoff
    code, body = s.get("/health")
    assert code == 503 and body["status"] == "failed" and "gave up" in body["reason"]
    code, body = chat(s)
    assert code == 503 and body["error"]["code"] == "worker_unavailable"
    # `vram-llm status` exits non-zero when the worker is not ready.
    out = subprocess.run(
        [sys.executable, "-m", "supervisor", "status", "--config", str(s.config_path)],
        capture_output=True, text=True, timeout=30, cwd=REPO,
    )
    assert out.returncode == 1 and "FAILED" in out.stdout
    # It stays failed (no further start) until a SIGHUP, which starts it again.
    assert s.status()["state"] == "failed" and len(starts(state_dir)) == 4
    s.proc.send_signal(signal.SIGHUP)
    poll(lambda: len(starts(state_dir)) > 4, 30, "a start after SIGHUP")


def test_crash_loop_keeps_retrying_at_the_cap_and_recovers_without_sighup(
    start_supervisor: Any, state_dir: Path, tmp_path: Path
) -> None:
    healthy = tmp_path / "healthy"
    cap = 1.5
    s = start_supervisor(
        {"restart": {"max_failures": 2, "backoff_initial_s": 0.1, "backoff_max_s": cap, "stable_after_s": 2.0}},
        {"FAKE_WORKER_HEALTHY_FILE": str(healthy), "FAKE_WORKER_STATE_DIR": str(state_dir), "FAKE_WORKER_LOAD_S": "0.2"},
    )

    def looping() -> dict[str, Any] | None:
        st = s.status()
        assert st["state"] != "failed", st["reason"]  # a verdict: ends the wait at once
        return st if st["crash_loop"] and st["restarts"] >= 5 else None

    # Well past the budget of 2 failures, and still trying, at the configured cap.
    st = poll(looping, 60, "a crash loop past restart.max_failures")
    assert st["state"] == "backoff"
    assert st["reason"].startswith("crash loop: ")
    assert st["backoff_delay_s"] == cap
    assert 0 <= st["next_attempt_in_s"] <= cap
    assert st["failure_streak"] == st["restarts"]  # all inside the 10-minute window
    at = [h["at"] for h in st["restart_history"]]
    gaps = [b - a for a, b in itertools.pairwise(at)]
    assert gaps[0] >= 0.1 and gaps[1] >= 0.2  # backoff below the budget, as before
    assert all(g >= cap for g in gaps[2:])  # the capped interval once the budget is spent
    # Every request gets 503 with Retry-After: the seconds until the next attempt.
    code, headers, body = http(s, "/v1/chat/completions", {"model": "x", "messages": [{"role": "user", "content": "hi"}]})
    assert code == 503 and body["error"]["code"] == "worker_unavailable"
    assert 1 <= int(headers["Retry-After"]) <= math.ceil(cap)
    code, headers, body = poll(lambda: (r := http(s, "/health"))[2]["status"] == "backoff" and r, 30, "/health in backoff")
    assert code == 503 and body["reason"].startswith("crash loop: ")
    assert 1 <= int(headers["Retry-After"]) <= math.ceil(cap)
    m = scrape(s)
    assert {"vram_llm_worker_failure_streak", "vram_llm_worker_crash_loop"} <= {n for n, _ in m}
    # The cause goes away: the next attempt serves, no SIGHUP needed.
    healthy.touch()
    n = len(starts(state_dir))
    st = s.wait_state("ready", 60)
    assert len(starts(state_dir)) <= n + 1  # the first attempt after the fix
    assert chat(s)[0] == 200
    # Up for stable_after_s: the streak is over.
    st = poll(lambda: (st := s.status())["failure_streak"] == 0 and st, 30, "the streak to reset")
    assert st["crash_loop"] is False and st["restarts"] >= 5
    m = scrape(s)
    assert {n: v for (n, _), v in m.items() if n in ("vram_llm_worker_failure_streak", "vram_llm_worker_crash_loop")} == {
        "vram_llm_worker_failure_streak": 0, "vram_llm_worker_crash_loop": 0}


def test_bad_model_exit_is_not_retried(start_supervisor: Any, state_dir: Path) -> None:
    s = start_supervisor(env={"FAKE_WORKER_EXIT_CODE": "4", "FAKE_WORKER_STATE_DIR": str(state_dir)})
    st = s.wait_state("failed", 60)
    assert len(starts(state_dir)) == 1
    assert st["restart_history"][0]["kind"] == "permanent"


def test_worker_ignoring_sigterm_is_killed_after_the_deadline(start_supervisor: Any) -> None:
    s = start_supervisor({"worker": {"stop_timeout_s": 1.0}}, {"FAKE_WORKER_IGNORE_SIGTERM": "1"})
    st = s.wait_ready(60)
    pid = st["worker"]["pid"]
    assert s.stop() == 0  # stop() also checks that the worker is gone
    assert not os.path.exists(f"/proc/{pid}") or open(f"/proc/{pid}/stat").read().split()[2] == "Z"


def test_hung_worker_is_detected_and_replaced(start_supervisor: Any) -> None:
    s = start_supervisor(
        {"worker": {"health_interval_s": 0.2, "health_timeout_s": 0.3, "health_failures": 2}},
        {"FAKE_WORKER_HANG_AFTER_READY_S": "0.5", "FAKE_WORKER_IGNORE_SIGTERM": "1"},
    )
    st = s.wait_ready(60)
    first = st["worker"]["pid"]
    st = s.wait_state("ready", 60, lambda st: st["restarts"] >= 1 and st["worker"]["pid"] != first)
    assert st["restart_history"][0]["kind"] == "hang"


def test_generation_without_tokens_is_a_hang(start_supervisor: Any) -> None:
    s = start_supervisor({"worker": {"token_stall_timeout_s": 0.5}}, {"FAKE_WORKER_STALL_GENERATION": "1"})
    st = s.wait_ready(60)
    first = st["worker"]["pid"]
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(chat(s)[0]))
    t.start()
    st = s.wait_state("ready", 60, lambda st: st["restarts"] >= 1 and st["worker"]["pid"] != first)
    assert st["restart_history"][0]["kind"] == "hang"
    t.join(60)
    assert result and result[0] != 200  # the stalled request got an error, not a hang


def test_queue_full_and_wait_timeout(start_supervisor: Any) -> None:
    s = start_supervisor(
        {"admission": {"queue_size": 1, "wait_timeout_s": 2.0}}, {"FAKE_WORKER_LOAD_S": "30"}
    )
    s.wait_state("loading", 30)
    first: list[tuple[int, Any]] = []
    t = threading.Thread(target=lambda: first.append(chat(s)))
    t.start()
    poll(lambda: s.status()["requests"]["waiting_for_worker"] == 1, 10, "one waiting request")
    code, body = chat(s)
    assert code == 429 and body["error"]["code"] == "queue_full"
    t.join(30)
    assert first[0][0] == 503 and first[0][1]["error"]["code"] == "worker_unavailable"


def test_sighup_rereads_the_config_and_restarts_the_worker(start_supervisor: Any) -> None:
    s = start_supervisor({"model": {"ctx_size": 1024}})
    st = s.wait_ready(60)
    assert st["plan"]["n_ctx"] == 1024
    s.config_path.write_text(s.config_path.read_text().replace("ctx_size = 1024", "ctx_size = 2048"))
    s.proc.send_signal(signal.SIGHUP)
    st = s.wait_state("ready", 60, lambda st2: st2["worker"]["generation"] > st["worker"]["generation"])
    assert st["plan"]["n_ctx"] == 2048
    assert chat(s)[0] == 200


def test_sighup_with_a_broken_config_keeps_serving(start_supervisor: Any) -> None:
    s = start_supervisor()
    st = s.wait_ready(60)
    s.config_path.write_text(s.config_path.read_text() + "\n[nonsense]\nkey = 1\n")
    s.proc.send_signal(signal.SIGHUP)
    st = s.wait_state("ready", 60, lambda st2: st2["worker"]["generation"] > st["worker"]["generation"])
    assert chat(s)[0] == 200


def test_sd_notify_messages(start_supervisor: Any, tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    with notify_listener(path) as msgs:
        s = start_supervisor(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
        s.wait_ready(60)
        poll(lambda: any("READY=1" in m for m in msgs), 10, "READY=1")
        assert any(m.startswith("STATUS=") for m in msgs)
        poll(lambda: sum("WATCHDOG=1" in m for m in msgs) >= 2, 10, "watchdog pings")
        assert s.stop() == 0
        poll(lambda: any("STOPPING=1" in m for m in msgs), 10, "STOPPING=1")


def test_sigterm_exits_zero_and_leaves_nothing(start_supervisor: Any) -> None:
    s = start_supervisor()
    s.wait_ready(60)
    t0 = time.monotonic()
    assert s.stop() == 0
    assert time.monotonic() - t0 < 20


def test_sigterm_lets_in_flight_streams_finish(start_supervisor: Any) -> None:
    s = start_supervisor(env={"FAKE_WORKER_TOKEN_INTERVAL_S": "0.05"})
    s.wait_ready(60)
    req = urllib.request.Request(
        s.base + "/v1/completions",
        data=json.dumps({"model": "x", "prompt": "hi", "max_tokens": 30, "stream": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    events: list[bytes] = []
    with urllib.request.urlopen(req, timeout=30) as r:
        for line in r:
            if line.startswith(b"data: "):
                events.append(line[6:].strip())
                if len(events) == 2:
                    s.proc.send_signal(signal.SIGTERM)  # mid-stream: the stream must still finish
    assert events[-1] == b"[DONE]"
    assert sum(1 for e in events if e != b"[DONE]" and json.loads(e)["choices"][0].get("text")) == 30
    assert s.stop() == 0


def test_a_load_that_stops_progressing_is_a_failed_start(start_supervisor: Any) -> None:
    s = start_supervisor(
        {"worker": {"load_stall_timeout_s": 1.0}, "restart": {"max_failures": 1, "give_up": True}},
        {"FAKE_WORKER_STALL_LOAD_AT": "0.5", "FAKE_WORKER_LOAD_S": "2"},
    )
    st = s.wait_state("failed", 60)
    assert [h["kind"] for h in st["restart_history"]] == ["load_stall", "load_stall"]


def test_a_slow_load_that_progresses_is_not_killed(start_supervisor: Any) -> None:
    # Progress resets the stall timer: a 3 s load under a 1 s stall limit still succeeds.
    s = start_supervisor({"worker": {"load_stall_timeout_s": 1.0}}, {"FAKE_WORKER_LOAD_S": "3"})
    st = s.wait_ready(60)
    assert st["restarts"] == 0


# --- issue 13: no answer cut short, no request parked for nothing, no connection held forever


def _post_raw(s: Supervisor, path: str, body: dict[str, Any], timeout: float = 60.0) -> tuple[int, dict[str, str], bytes]:
    """POST and return (status, headers, raw body): the error paths need the headers."""
    req = urllib.request.Request(
        s.base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _sse_events(raw: bytes) -> list[bytes]:
    return [line[6:].strip() for line in raw.splitlines() if line.startswith(b"data: ")]


def test_sighup_lets_generations_in_progress_finish(start_supervisor: Any) -> None:
    # 100 tokens take 5 s: longer than the fake worker takes to stop on SIGTERM.
    s = start_supervisor({"shutdown": {"grace_s": 30.0}}, {"FAKE_WORKER_TOKEN_INTERVAL_S": "0.05"})
    st = s.wait_ready(60)
    results: dict[str, tuple[int, dict[str, str], bytes]] = {}
    body = {"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100}
    plain = threading.Thread(target=lambda: results.__setitem__("plain", _post_raw(s, "/v1/chat/completions", body)))
    plain.start()
    poll(lambda: s.status()["worker"].get("active") == 1, 10, "the generation to start")
    s.proc.send_signal(signal.SIGHUP)
    # A request sent during the reload waits for the next worker and is served by it.
    after = threading.Thread(target=lambda: results.__setitem__("after", _post_raw(s, "/v1/chat/completions", {**body, "max_tokens": 2})))
    after.start()
    plain.join(60)
    after.join(60)
    code, _, raw = results["plain"]
    assert code == 200, raw
    answer = json.loads(raw)
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 100 and answer["choices"][0]["message"]["content"].count("tok") == 100
    # Finished by the old worker, not cut there and sent again to the new one.
    assert answer["id"].startswith(f"chatcmpl-fake-{st['worker']['pid']}-")
    assert results["after"][0] == 200
    st2 = s.wait_state("ready", 60, lambda st2: st2["worker"]["generation"] > st["worker"]["generation"])
    assert st2["restarts"] == 0  # a reload, not a failure


def _long_stream_cut_by(s: Supervisor, sig: int) -> None:
    """A stream longer than shutdown.grace_s (0.5 s here), then ``sig``: when the grace is
    over the client gets an error event (the worker is gone mid-stream), never a finish."""
    out: list[tuple[int, dict[str, str], bytes]] = []
    body = {"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 400, "stream": True}
    t = threading.Thread(target=lambda: out.append(_post_raw(s, "/v1/chat/completions", body)))
    t.start()
    poll(lambda: s.status()["worker"].get("active") == 1, 10, "the generation to start")
    s.proc.send_signal(sig)
    t.join(60)
    events = _sse_events(out[0][2])
    assert events[-1] != b"[DONE]" and "error" in json.loads(events[-1])
    assert not any(json.loads(e)["choices"][0].get("finish_reason") for e in events if b'"choices"' in e)


def test_sighup_drain_is_bounded_by_the_grace_period(start_supervisor: Any) -> None:
    s = start_supervisor({"shutdown": {"grace_s": 0.5}}, {"FAKE_WORKER_TOKEN_INTERVAL_S": "0.05"})
    st = s.wait_ready(60)
    _long_stream_cut_by(s, signal.SIGHUP)
    s.wait_state("ready", 60, lambda st2: st2["worker"]["generation"] > st["worker"]["generation"])


def test_sigterm_past_the_grace_period_ends_streams_with_an_error(start_supervisor: Any) -> None:
    s = start_supervisor({"shutdown": {"grace_s": 0.5}}, {"FAKE_WORKER_TOKEN_INTERVAL_S": "0.05"})
    s.wait_ready(60)
    _long_stream_cut_by(s, signal.SIGTERM)
    assert s.stop() == 0


def test_paused_worker_with_a_full_backlog_is_retried_not_abandoned(start_supervisor: Any) -> None:
    s = start_supervisor(
        {"worker": {"health_interval_s": 1.0, "health_timeout_s": 3.0}, "admission": {"wait_timeout_s": 60.0}},
        {"FAKE_WORKER_BACKLOG": "1"},
    )
    st = s.wait_ready(60)
    pid = st["worker"]["pid"]
    codes: list[int] = []
    done_at: list[float] = []

    def one(i: int) -> None:
        # A read takes no generation slot: it goes to the worker's socket at once (the
        # supervisor answers /v1/models itself, so the fake worker's read route it is).
        code = s.get("/v1/fake/read", timeout=60)[0] if i % 2 else chat(s)[0]
        codes.append(code)
        done_at.append(time.monotonic())

    os.kill(pid, signal.SIGSTOP)
    try:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(20)]
        for t in threads:
            t.start()
        # Connections beyond the backlog are refused while the worker is paused.
        poll(lambda: "did not take the request" in s.log(), 20, "a refused connection")
    finally:
        resumed = time.monotonic()
        os.kill(pid, signal.SIGCONT)
    for t in threads:
        t.join(60)
    assert codes == [200] * 20
    assert max(done_at) - resumed < 10  # answered soon after the resume, not after wait_timeout_s
    assert s.status()["worker"]["pid"] == pid  # the same worker served them all
    assert "waiting for the next worker" not in s.log()


def test_admission_bounds_every_waiting_request(start_supervisor: Any) -> None:
    s = start_supervisor({"admission": {"queue_size": 64, "wait_timeout_s": 30.0}}, {"FAKE_WORKER_TOKEN_INTERVAL_S": "0.005"})
    s.wait_ready(60)
    results: list[tuple[int, dict[str, str]]] = []
    seen_waiting: list[int] = []
    seen_queued: list[int] = []
    stop = threading.Event()

    def one() -> None:
        code, headers, _ = _post_raw(s, "/v1/chat/completions", {"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
        results.append((code, headers))

    def watch() -> None:
        while not stop.is_set():
            st = s.status()
            seen_waiting.append(st["requests"]["waiting_for_worker"])
            seen_queued.append(st["worker"].get("queued", 0))
            time.sleep(0.02)

    w = threading.Thread(target=watch)
    w.start()
    threads = [threading.Thread(target=one) for _ in range(150)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    stop.set()
    w.join(10)
    codes = [c for c, _ in results]
    assert len(codes) == 150 and set(codes) <= {200, 429, 503}, sorted(set(codes))
    assert codes.count(200) >= 65  # the one generating and the 64 waiting at least
    assert all("Retry-After" in h for c, h in results if c != 200)
    assert max(seen_waiting) <= 64
    assert max(seen_queued) <= 1  # nothing piles up inside the worker


def test_slow_and_idle_clients_are_disconnected(start_supervisor: Any) -> None:
    s = start_supervisor({"server": {"header_timeout_s": 1.0, "body_timeout_s": 1.0, "keepalive_timeout_s": 1.0}})
    s.wait_ready(60)
    silent = [socket.create_connection(("127.0.0.1", s.port), timeout=10) for _ in range(3)]
    slow = [socket.create_connection(("127.0.0.1", s.port), timeout=10) for _ in range(3)]
    kept = socket.create_connection(("127.0.0.1", s.port), timeout=10)
    body_stall = socket.create_connection(("127.0.0.1", s.port), timeout=10)
    try:
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert kept.recv(4096).startswith(b"HTTP/1.1 200")
        body_stall.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{\"model\":"
        )
        request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200
        closed: set[int] = set()

        def all_closed() -> bool:
            for i, c in enumerate(slow):
                if i in closed:
                    continue
                try:
                    c.sendall(request[: 1])  # slowloris: one more header byte
                except OSError:
                    closed.add(i)
            return len(closed) == len(slow)

        poll(all_closed, 15, "slowloris connections to be closed", interval=0.3)
        for c in [*silent, kept]:
            c.settimeout(15)
            assert c.recv(4096) == b""  # closed by the server
        body_stall.settimeout(15)
        assert body_stall.recv(4096).startswith(b"HTTP/1.1 408")
        assert s.get("/health") == (200, {"status": "ok"})
    finally:
        for c in [*silent, *slow, kept, body_stall]:
            c.close()


def test_connection_cap_keeps_health_answering(start_supervisor: Any) -> None:
    s = start_supervisor({"server": {"max_connections": 5}})
    s.wait_ready(60)
    idle = [socket.create_connection(("127.0.0.1", s.port), timeout=10) for _ in range(8)]
    try:
        for _ in range(3):
            assert s.get("/health") == (200, {"status": "ok"})
        poll(lambda: "connection limit reached" in s.log(), 10, "the connection limit log line")
    finally:
        for c in idle:
            c.close()


def test_idle_flood_under_a_low_descriptor_limit_keeps_health_answering(start_supervisor: Any) -> None:
    # The supervisor inherits a soft limit of 128 descriptors: its connection cap drops to
    # fit, so a flood of idle connections cannot exhaust them and take /health down.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (128, hard))
    try:
        s = start_supervisor()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    s.wait_ready(60)
    flood = []
    try:
        for _ in range(150):
            flood.append(socket.create_connection(("127.0.0.1", s.port), timeout=10))
        assert s.get("/health") == (200, {"status": "ok"})
        assert chat(s)[0] == 200
        poll(lambda: "connection limit reached" in s.log(), 10, "the connection limit log line")
        assert s.log().count("connection limit reached") <= 20  # rate-limited, not one per connection
    finally:
        for c in flood:
            c.close()


def _raw_exchange(s: Supervisor, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", s.port), timeout=10) as c:
        c.sendall(data)
        return c.recv(65536)


def test_malformed_requests_are_one_warning_line_each(start_supervisor: Any) -> None:
    s = start_supervisor()
    s.wait_ready(60)
    bad = [
        b"GET /health HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
        b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n",
    ]
    for data in bad:
        assert _raw_exchange(s, data).split(b"\r\n", 1)[0].endswith(b" 400 Bad Request")
    poll(lambda: s.log().count("malformed HTTP request") == len(bad), 10, "one line per malformed request")
    lines = s.log().splitlines()
    for i, line in enumerate(lines):
        if "malformed HTTP request" in line:
            assert " WARNING " in line
            assert i + 1 == len(lines) or lines[i + 1].startswith("20"), lines[i : i + 3]  # a single line
    assert "Traceback" not in s.log()
    assert "ERROR vram_llm.http" not in s.log()
    assert s.get("/health")[0] == 200


def test_oversized_body_is_refused_before_it_is_read(start_supervisor: Any) -> None:
    s = start_supervisor()
    s.wait_ready(60)
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 999999999\r\n"
    reply = _raw_exchange(s, head + b"Expect: 100-continue\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 413"), reply[:100]
    assert b"100 Continue" not in reply
    assert json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_too_large"
    assert _raw_exchange(s, head + b"\r\n{}").startswith(b"HTTP/1.1 413")
    # A body within the limit still gets 100 Continue and an answer.
    assert chat(s)[0] == 200

"""Replicas of a model with the REAL worker on SmolLM2 and a simulated inventory of two GPUs
(issue 28's "What it must show"): two replicas, each packed on a GPU of its own; eight
concurrent clients spread over both; ``kill -9`` of one replica's worker loses no request and
the other keeps serving; a conversation's second turn lands on the replica that holds its
prefix, read from that worker's prompt-cache counters.

One supervisor for the module (two SmolLM2 workers load in a few seconds each on two
shared cores); the tests run in file order and each leaves both replicas ready.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import short_tmpdir
from tests.supervisor_harness import Supervisor, poll, scrape, total

pytestmark = pytest.mark.model

SIM = Path(__file__).parent / "sim" / "two_equal.json"
MODEL = {"threads": 1, "ctx_size": 1024, "parallel": 2, "replicas": 2, "cache_disk_mib": 0}


@pytest.fixture(scope="module")
def sup() -> Iterator[Supervisor]:
    d = short_tmpdir()
    s = Supervisor(d, {"gpu": {"simulate_gpus": str(SIM)}, "model": MODEL,
                       "worker": {"health_interval_s": 0.5}})
    try:
        poll(lambda: len(ready_replicas(s)) == 2, 120, "both replicas ready")
        yield s
        assert s.stop() == 0
    finally:
        s.kill_hard()
        shutil.rmtree(d, ignore_errors=True)


def replicas(s: Supervisor) -> list[dict[str, Any]]:
    st = s.status()
    for r in st["replicas"]:
        if r.get("pid"):
            s.worker_pids.add(int(r["pid"]))
    return st["replicas"]  # type: ignore[no-any-return]


def ready_replicas(s: Supervisor) -> list[dict[str, Any]]:
    if s.proc.poll() is not None:
        raise AssertionError(f"supervisor exited:\n{s.log()[-4000:]}")
    code, st = s.get("/status")
    return [r for r in st.get("replicas", [])] if code == 200 and all(
        r["state"] == "ready" for r in st.get("replicas", [])) and st.get("replicas") else []


def chat(s: Supervisor, messages: list[dict[str, str]], max_tokens: int = 6, **extra: Any) -> tuple[int, Any]:
    return s.post("/v1/chat/completions", {"messages": messages, "max_tokens": max_tokens, "temperature": 0,
                                           **extra}, timeout=180)


def served(s: Supervisor) -> list[int]:
    return [r["served"] for r in replicas(s)]


def test_two_replicas_each_on_a_gpu_of_its_own(sup: Supervisor) -> None:
    reps = replicas(sup)
    assert [r["replica"] for r in reps] == [1, 2]
    gpus = [set(r["planned_mib"]) for r in reps]
    assert all(len(g) == 1 for g in gpus) and gpus[0] != gpus[1], reps
    code, body = sup.get("/v1/models")
    card = body["data"][0]
    assert code == 200 and [r["state"] for r in card["replicas"]] == ["ready", "ready"], card
    samples = scrape(sup)
    assert total(samples, "vram_llm_replicas") == 2
    assert total(samples, "vram_llm_replica_up", replica="1") == total(samples, "vram_llm_replica_up", replica="2") == 1


def test_eight_concurrent_clients_spread_over_both(sup: Supervisor) -> None:
    before = served(sup)
    results: list[int] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        code, _ = chat(sup, [{"role": "user", "content": f"Count to three, client {n}."}], ignore_eos=True)
        with lock:
            results.append(code)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not any(t.is_alive() for t in threads), "a client still waits after 240 s"
    assert results == [200] * 8
    after = served(sup)
    delta = [a - b for a, b in zip(after, before)]
    assert sum(delta) == 8 and min(delta) >= 2, delta


def test_kill_9_of_one_replica_loses_no_request_and_the_other_keeps_serving(sup: Supervisor) -> None:
    victim = replicas(sup)[1]["pid"]
    results: list[int] = []
    lock = threading.Lock()
    started = threading.Event()

    def client(n: int) -> None:
        for i in range(3):
            started.set()
            code, _ = chat(sup, [{"role": "user", "content": f"Say something, {n}.{i}."}], ignore_eos=True)
            with lock:
                results.append(code)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    assert started.wait(30)
    poll(lambda: replicas(sup)[1]["generating"] > 0, 60, "replica 2 answering")
    os.kill(victim, signal.SIGKILL)
    for t in threads:
        t.join(240)
    assert not any(t.is_alive() for t in threads), "a client still waits after 240 s"
    assert results == [200] * 24, results
    # Replica 2 restarts on its own; the model never stopped serving meanwhile.
    poll(lambda: (r := replicas(sup)[1])["state"] == "ready" and r["pid"] != victim and r["restarts"] >= 1,
         120, "replica 2 restarted")
    assert replicas(sup)[0]["restarts"] == 0


def test_a_conversations_second_turn_lands_on_the_replica_holding_its_prefix(sup: Supervisor) -> None:
    poll(lambda: len(ready_replicas(sup)) == 2, 120, "both replicas ready")
    # Replica 1 busy with one long answer: the first turn goes to replica 2 (more free slots).
    # Long enough to outlast the first turn on a fast box (160 tokens took 0.8 s and ended
    # before it: replica 1 then counted one served).
    long_done: list[int] = []
    hold = threading.Thread(target=lambda: long_done.append(
        chat(sup, [{"role": "user", "content": "Write a long story."}], max_tokens=1200, ignore_eos=True)[0]))
    hold.start()
    poll(lambda: replicas(sup)[0]["generating"] == 1, 60, "replica 1 answering the long request")
    turn1 = [{"role": "user", "content": "My name is Ada and I like to count sheep in the evening."}]
    before = served(sup)
    code, first = chat(sup, turn1)
    assert code == 200
    assert [a - b for a, b in zip(served(sup), before)] == [0, 1]
    hold.join(180)
    assert long_done == [200]
    # Both idle now: least busy alone would pick replica 1; the prefix is on replica 2.
    poll(lambda: all(r["generating"] == 0 for r in replicas(sup)), 30, "both replicas idle")
    reused = poll(lambda: (v := replicas(sup)[1]["cache_tokens_reused"]) is not None and (v,), 10,
                  "replica 2's cache counters", interval=0.2)[0]
    turn2 = [*turn1, {"role": "assistant", "content": first["choices"][0]["message"]["content"]},
             {"role": "user", "content": "What is my name?"}]
    before = served(sup)
    code, _ = chat(sup, turn2)
    assert code == 200
    assert [a - b for a, b in zip(served(sup), before)] == [0, 1]
    # Its worker reused the first turn's prompt from its cache (the counters come with the
    # next /health, every 0.5 s here).
    want = reused + first["usage"]["prompt_tokens"]
    poll(lambda: replicas(sup)[1]["cache_tokens_reused"] >= want, 10, "replica 2 to report the reuse")

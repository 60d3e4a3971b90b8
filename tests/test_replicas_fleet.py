"""Replicas in the fleet with the fake worker on one simulated GPU (issue 28): extra replicas
are capacity (evicted before any model, never evicting one to load), and a model's queue
bound applies across its replicas."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from tests.supervisor_harness import poll
from tests.test_fleet import ROOM_FOR_ONE, ROOM_FOR_TWO, chat, fleet, models_state, remember_pids

__all__ = ["fleet"]  # the fixture, imported to be used

ROOM_FOR_THREE = 5000  # three workers of SmolLM2 (1264 MiB planned each) and the reserve


def replica_states(s: Any, mid: str) -> list[str]:
    row = next(m for m in s.status()["models"] if m["id"] == mid)
    return [r["state"] for r in row["replicas"]]


class Clients:
    """Requests for a supervisor sent from threads, each with a prompt of its own (no
    conversation affinity decides where it goes): their status and when they were answered."""

    def __init__(self, s: Any) -> None:
        self.s = s
        self.done: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def send(self, name: str, model: str, max_tokens: int) -> None:
        def run() -> None:
            code, _ = chat(self.s, model, max_tokens=max_tokens, messages=[{"role": "user", "content": f"request {name}"}])
            with self._lock:
                self.done[name] = (code, time.monotonic())
        t = threading.Thread(target=run)
        t.start()
        self._threads.append(t)

    def codes(self) -> dict[str, int]:
        for t in self._threads:
            t.join(120)
        return {k: v[0] for k, v in self.done.items()}


def replica_rows(s: Any, mid: str, field: str) -> list[int]:
    return [r[field] for r in next(m for m in s.status()["models"] if m["id"] == mid)["replicas"]]


def test_an_extra_replica_is_evicted_before_another_model(fleet: Any) -> None:
    s = fleet(ROOM_FOR_TWO, [{"id": "a", "replicas": 2}, {"id": "b"}])
    poll(lambda: replica_states(s, "a") == ["ready", "ready"], 60, "both replicas of a ready")
    remember_pids(s)
    code, body = chat(s, "b")
    assert code == 200 and body["model"] == "b", body
    remember_pids(s)
    # b took the memory of a's second replica; a itself still serves.
    assert replica_states(s, "a") == ["ready", "unloaded"]
    assert models_state(s) == {"a": "ready", "b": "ready"} and s.status()["swaps"] == 1
    code, body = chat(s, "a")
    assert code == 200 and body["model"] == "a"


def test_an_extra_replica_never_evicts_a_model(fleet: Any) -> None:
    s = fleet(ROOM_FOR_TWO, [{"id": "b", "preload": True}, {"id": "a", "replicas": 2}])
    poll(lambda: models_state(s)["b"] == "ready", 60, "b ready")
    code, _ = chat(s, "a")  # a loads beside b; its second replica finds no room
    assert code == 200
    remember_pids(s)
    row = poll(lambda: (r := next(m for m in s.status()["models"] if m["id"] == "a"))["replicas"][1]["reason"]
               .startswith("not loaded") and r, 30, "a's second replica refused")
    assert "never evicts a model" in row["replicas"][1]["reason"], row
    assert models_state(s) == {"b": "ready", "a": "ready"} and s.status()["swaps"] == 0


def test_the_queue_bound_is_the_models_across_its_replicas(fleet: Any) -> None:
    # Room for both replicas, one slot each (the fake worker generates one at a time), and
    # two requests may wait for the model in all.
    s = fleet(ROOM_FOR_TWO, [{"id": "a", "replicas": 2}], env={"FAKE_WORKER_TOKEN_INTERVAL_S": "0.05"},
              sections={"admission": {"queue_size": 2, "wait_timeout_s": 60.0}})
    poll(lambda: [r["state"] for r in s.status()["replicas"]] == ["ready", "ready"], 60, "both replicas ready")
    results: list[int] = []
    lock = threading.Lock()

    def client() -> None:
        code, _ = chat(s, "a", max_tokens=40)
        with lock:
            results.append(code)

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    # Two generate (one per replica), two wait (one per replica: under each replica's own bound).
    poll(lambda: sum(r["waiting"] for r in s.status()["replicas"]) == 2, 30, "two requests waiting")
    code, body = chat(s, "a")
    assert code == 429 and body["error"]["code"] == "queue_full", body
    for t in threads:
        t.join(60)
    assert sorted(results) == [200] * 4


def test_sighup_removes_a_model_with_its_replicas_and_adds_one_with_its_own(fleet: Any) -> None:
    from tests.test_fleet_sighup import model_dirs, model_ids, sighup_with_models

    s = fleet(ROOM_FOR_THREE, [{"id": "a", "replicas": 2}, {"id": "b"}])
    poll(lambda: replica_states(s, "a") == ["ready", "ready"], 60, "both replicas of a ready")
    remember_pids(s)
    # a goes (b, the first now, loads as the first does at start), c comes with two replicas (loaded on demand, its second once its first is ready).
    sighup_with_models(s, [{"id": "b"}, {"id": "c", "replicas": 2}])
    poll(lambda: model_ids(s) == ["b", "c"], 30, "the new list")
    poll(lambda: "a" not in model_dirs(s), 30, "a's workers and sockets gone")
    assert chat(s, "a")[1]["error"]["code"] == "model_not_found"
    code, body = chat(s, "c")
    assert code == 200 and body["model"] == "c"
    remember_pids(s)
    poll(lambda: replica_states(s, "c") == ["ready", "ready"], 60, "both replicas of c ready")
    remember_pids(s)


def test_a_model_evicted_goes_with_its_replicas(fleet: Any, tmp_path: Path) -> None:
    # Two GPUs, room for one worker each: a's replicas take one each; b may use GPU 0 only,
    # so a's first replica must go, and its second with it (else a's next request would load
    # a back, evicting b).
    two = tmp_path / "two.json"
    two.write_text(json.dumps([{"index": i, "uuid": f"GPU-0000000{i}-0000-0000-0000-00000000aaaa", "name": "sim",
                                "total_mib": 8192, "free_mib": ROOM_FOR_ONE} for i in range(2)]))
    s = fleet(ROOM_FOR_ONE, [{"id": "a", "replicas": 2}, {"id": "b", "devices": [0]}],
              sections={"gpu": {"simulate_gpus": str(two)}})
    poll(lambda: replica_states(s, "a") == ["ready", "ready"], 60, "both replicas of a ready")
    remember_pids(s)
    code, body = chat(s, "b")
    assert code == 200 and body["model"] == "b", body
    remember_pids(s)
    assert replica_states(s, "a") == ["unloaded", "unloaded"]
    assert models_state(s) == {"a": "unloaded", "b": "ready"}


def test_a_busy_models_extra_replica_is_drained_for_room_and_requests_go_elsewhere(fleet: Any) -> None:
    # One slot per replica (the fake worker), 0.05 s a token. Both replicas of a answer
    # requests when b needs the room of one: only the extra replica is drained (a used to go
    # with it, and a request that came meanwhile could load the extra back alone, serving a
    # model listed as unloaded). Every request is answered, the ones that waited for the
    # drained replica by the first one, and a keeps serving beside b.
    s = fleet(ROOM_FOR_TWO, [{"id": "a", "replicas": 2}, {"id": "b"}], env={"FAKE_WORKER_TOKEN_INTERVAL_S": "0.05"},
              sections={"admission": {"queue_size": 8, "wait_timeout_s": 120.0}})
    poll(lambda: replica_states(s, "a") == ["ready", "ready"], 60, "both replicas of a ready")
    c = Clients(s)

    def rows(field: str) -> list[int]:
        return replica_rows(s, "a", field)

    c.send("r1", "a", 400)  # 20 s: the first replica stays busy through the drain
    poll(lambda: rows("generating") == [1, 0], 30, "a's first replica generating")
    c.send("r2", "a", 160)  # 8 s
    poll(lambda: rows("generating") == [1, 1], 30, "both replicas generating")
    c.send("r1b", "a", 160)  # both full: the first replica's queue
    poll(lambda: rows("waiting") == [1, 0], 30, "one waiting for the first replica")
    c.send("b", "b", 3)
    poll(lambda: "waiting (up to" in s.log(), 30, "the eviction to wait for a's extra replica")
    assert "for a#2 to finish its requests" in s.log()  # not "a, a#2"
    c.send("r3", "a", 160)  # the shorter queue: the extra replica's, before the hold
    poll(lambda: rows("served")[1] == 1, 30, "r2 answered: the extra replica is drained")
    c.send("r4", "a", 3)
    assert c.codes() == dict.fromkeys(("r1", "r2", "r1b", "b", "r3", "r4"), 200), c.done
    poll(lambda: models_state(s) == {"a": "ready", "b": "ready"}, 30, "a and b ready")
    assert replica_states(s, "a") == ["ready", "unloaded"]  # no room for the extra: it never evicts b
    served = rows("served")
    assert sum(served) == 5 and served[0] >= 3, served  # r1, r1b and r4 at least by the first


def test_a_replica_being_drained_gets_no_new_request(fleet: Any) -> None:
    # Two slots per replica, 0.05 s a token. b needs the room of a's extra replica while it
    # answers r2 (8 s) and r3 (20 s, sent once the drain began): the extra finishes both, then
    # goes. r4, sent during that, finds a's first replica full (x1, x2) and the drained one
    # with a free slot: it must wait for the first, not for the drained one to finish r3 and
    # go (then it was moved to the first replica, after r3's end).
    s = fleet(ROOM_FOR_TWO, [{"id": "a", "replicas": 2}, {"id": "b"}],
              env={"FAKE_WORKER_TOKEN_INTERVAL_S": "0.05", "FAKE_WORKER_SLOTS": "2"},
              sections={"admission": {"queue_size": 8, "wait_timeout_s": 120.0}})
    poll(lambda: replica_states(s, "a") == ["ready", "ready"], 60, "both replicas of a ready")
    c = Clients(s)

    def rows(field: str) -> list[int]:
        return replica_rows(s, "a", field)

    c.send("x1", "a", 240)  # 12 s, the first replica (the least busy: equal, the first)
    poll(lambda: rows("generating") == [1, 0], 30, "x1 on a's first replica")
    c.send("r2", "a", 160)  # 8 s, the extra replica (more free slots)
    poll(lambda: rows("generating") == [1, 1], 30, "r2 on the extra replica")
    c.send("x2", "a", 240)  # the first replica again (equal free slots)
    poll(lambda: rows("generating") == [2, 1], 30, "x2 on the first replica")
    c.send("b", "b", 3)
    poll(lambda: "for a#2 to finish its requests" in s.log(), 30, "the drain of a's extra replica")
    c.send("r3", "a", 400)  # 20 s, the extra replica (its free slot), before the hold
    poll(lambda: rows("generating") == [2, 2], 30, "r3 on the extra replica")
    poll(lambda: rows("served")[1] == 1, 30, "r2 answered: the extra replica is held for its eviction")
    c.send("r4", "a", 3)
    assert c.codes() == dict.fromkeys(("x1", "r2", "x2", "b", "r3", "r4"), 200), c.done
    assert c.done["r4"][1] < c.done["r3"][1]  # answered by the first replica, not after the drained one went
    assert rows("served") == [3, 2]

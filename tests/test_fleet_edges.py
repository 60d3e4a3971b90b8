"""Several models: the edges a review found (issue 12), with the fake worker on simulated GPUs.

- an unload already under way (an operator's, an idle TTL's) must not stall the next load
  that needs its memory, nor leave the model held back once it is loaded again;
- a GPU probe that fails fails that model's start, not the supervisor;
- /health stays 200 while the first model is swapped out (it loads again on demand) and
  follows pinned models, which are never unloaded.
"""

from __future__ import annotations

import json
import signal
import threading
import urllib.request
from typing import Any

from tests.supervisor_harness import poll
from tests.test_fleet import ROOM_FOR_ONE, ROOM_FOR_TWO, chat, fleet, models_state, remember_pids, status_models

__all__ = ["fleet"]  # the fixture, imported to be used


def stream(s: Any, model: str, max_tokens: int) -> urllib.request.Request:
    return urllib.request.Request(
        s.base + "/v1/chat/completions",
        data=json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens,
                         "stream": True}).encode(),
        headers={"Content-Type": "application/json"},
    )


def test_an_unload_under_way_does_not_stall_the_load_that_needs_its_memory(fleet: Any) -> None:
    s = fleet(ROOM_FOR_ONE, ["a", "b"], env={"FAKE_WORKER_TOKEN_INTERVAL_S": "0.03"},
              sections={"shutdown": {"grace_s": 8}, "admission": {"wait_timeout_s": 20}})
    poll(lambda: models_state(s)["a"] == "ready", 60, "a ready")
    got_b: list[tuple[int, Any]] = []
    with urllib.request.urlopen(stream(s, "a", 60), timeout=60) as r:
        r.readline()
        assert s.post("/models/a/unload", {}, timeout=10)[0] == 202
        poll(lambda: models_state(s)["a"] == "stopping", 10, "a draining its stream")
        t = threading.Thread(target=lambda: got_b.append(chat(s, "b")))
        t.start()
        body = r.read().decode()
    t.join(60)
    assert body.rstrip().endswith("data: [DONE]"), body[-200:]  # a's stream finished intact
    assert got_b and got_b[0][0] == 200 and got_b[0][1]["model"] == "b", got_b
    # a loads again (b goes) and answers: nothing holds its requests back.
    code, ans = chat(s, "a")
    assert code == 200 and ans["model"] == "a", ans
    remember_pids(s)


def test_a_gpu_probe_that_fails_fails_the_start_not_the_supervisor(fleet: Any, tmp_path: Any) -> None:
    s = fleet(ROOM_FOR_TWO, ["a", "b"])
    poll(lambda: models_state(s)["a"] == "ready", 60, "a ready")
    gpus = s.tmp / "gpus.json"
    good = gpus.read_text()
    gpus.write_text("[")  # the simulated inventory breaks (as NVML might fail)
    code, body = chat(s, "b")
    assert code == 503, body
    assert s.proc.poll() is None, "the supervisor must keep running"
    code, ans = chat(s, "a")  # the other model keeps serving
    assert code == 200 and ans["model"] == "a"
    gpus.write_text(good)
    s.proc.send_signal(signal.SIGHUP)  # a failed plan waits for a reload, as with one model
    poll(lambda: chat(s, "b")[0] == 200, 60, "b served once the inventory reads again")
    remember_pids(s)


def test_health_stays_ok_while_the_first_model_is_swapped_out(fleet: Any) -> None:
    s = fleet(ROOM_FOR_ONE, ["a", "b"])
    poll(lambda: s.get("/health")[0] == 200, 60, "/health 200 once a (loaded at start) is ready")
    code, ans = chat(s, "b")
    assert code == 200 and ans["model"] == "b"
    assert models_state(s)["a"] == "unloaded"
    assert s.get("/health")[0] == 200  # a loads again on demand: normal service
    assert s.status()["health"]["ok"] is True
    remember_pids(s)


def test_health_follows_a_pinned_model(fleet: Any, tmp_path: Any) -> None:
    healthy = tmp_path / "p-healthy"
    s = fleet(ROOM_FOR_TWO, [{"id": "a"}, {"id": "p", "pinned": True}],
              env={"FAKE_WORKER_HEALTHY_FILE": str(healthy), "FAKE_WORKER_FAIL_ONLY": "p"},
              sections={"restart": {"backoff_initial_s": 0.2, "backoff_max_s": 1.0}})
    poll(lambda: models_state(s)["a"] == "ready" and status_models(s)["p"]["restarts"] >= 1, 60,
         "a ready and the pinned p failing")
    code, body = s.get("/health")
    assert code == 503 and "model p (pinned)" in body["reason"], body
    healthy.touch()
    poll(lambda: s.get("/health")[0] == 200, 60, "/health 200 once p is up")
    remember_pids(s)

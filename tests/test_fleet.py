"""Several models under one supervisor: process tests with the fake worker on simulated GPUs.

The simulated inventory subtracts the planned footprint of every worker the supervisor runs
(supervisor/fleet.py AccountedProbe), so "room for one" forces swaps. The embedded SmolLM2
plans to ~1 GiB at ctx 4096; a GPU with 2.6 GiB free (1 GiB reserved) holds one, 4 GiB two.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.default_model import default_model_path
from tests.supervisor_harness import FAKE_WORKER, PER_MODEL_SERIES, REPO, Supervisor, models_by_series, poll, scrape, total

ROOM_FOR_ONE = 2618
ROOM_FOR_TWO = 4200


def sim(tmp: Path, free_mib: int) -> Path:
    p = tmp / "gpus.json"
    p.write_text(json.dumps([{"index": 0, "uuid": "GPU-00000000-0000-0000-0000-00000000aaaa", "name": "sim",
                              "total_mib": 8192, "free_mib": free_mib}]))
    return p


def models_toml(models: list[Any]) -> str:
    path = str(default_model_path())
    out = []
    for m in ({"id": x} if isinstance(x, str) else x for x in models):
        out.append("[[models]]")
        out.extend(f"{k} = {json.dumps(v)}" for k, v in {"path": path, **m}.items())
        out.append("")
    return "\n".join(out)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Any]:
    started: list[Supervisor] = []

    def start(free_mib: int, models: list[Any], env: dict[str, str] | None = None,
              sections: dict[str, dict[str, Any]] | None = None) -> Supervisor:
        d = tmp_path / f"s{len(started)}"
        d.mkdir()
        s = Supervisor(
            d,
            {"gpu": {"simulate_gpus": str(sim(d, free_mib))},
             "worker": {"command": [sys.executable, str(FAKE_WORKER)]}, **(sections or {})},
            env={"FAKE_WORKER_LOAD_S": "0.2", **(env or {})},
            extra_toml=models_toml(models),
        )
        started.append(s)
        poll(lambda: s.get("/health")[0] in (200, 503), 60, "the supervisor to listen")
        return s

    yield start
    for s in started:
        try:
            remember_pids(s)
            if s.proc.poll() is None:
                s.stop()
        finally:
            s.kill_hard()


def chat(s: Supervisor, model: str | None, **extra: Any) -> tuple[int, Any]:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **extra}
    if model is not None:
        body["model"] = model
    return s.post("/v1/chat/completions", body, timeout=120)


def models_state(s: Supervisor) -> dict[str, str]:
    code, body = s.get("/v1/models")
    assert code == 200, body
    return {m["id"]: m["state"] for m in body["data"]}


def status_models(s: Supervisor) -> dict[str, dict[str, Any]]:
    return {m["id"]: m for m in s.status()["models"]}


def remember_pids(s: Supervisor) -> None:
    """Every worker pid seen, so stop() can check none outlives the supervisor."""
    import psutil

    try:
        s.worker_pids.update(c.pid for c in psutil.Process(s.proc.pid).children(recursive=True))
    except psutil.Error:
        pass


def test_unknown_model_is_404_and_v1_models_lists_every_model(fleet: Any) -> None:
    s = fleet(ROOM_FOR_TWO, ["a", "b"])
    poll(lambda: models_state(s)["a"] == "ready", 60, "model a ready (the first loads at start)")
    assert models_state(s) == {"a": "ready", "b": "unloaded"}
    code, body = chat(s, "nope")
    assert code == 404 and body["error"]["code"] == "model_not_found"
    code, body = s.get("/v1/models")
    a = next(m for m in body["data"] if m["id"] == "a")
    assert a["object"] == "model" and a["loaded"] is True and a["gpus"] and a["mib"] > 0
    code, card = s.get("/v1/models/b")
    assert code == 200 and card["id"] == "b" and card["loaded"] is False
    code, body = s.get("/v1/models/nope")
    assert code == 404 and body["error"]["code"] == "model_not_found"
    # No "model": the first of the list answers.
    code, body = chat(s, None)
    assert code == 200 and body["model"] == "a"


def test_room_for_both_both_stay_loaded(fleet: Any) -> None:
    s = fleet(ROOM_FOR_TWO, ["a", "b"])
    for _ in range(3):
        for m in ("a", "b"):
            code, body = chat(s, m)
            assert code == 200 and body["model"] == m, body
    remember_pids(s)
    st = s.status()
    assert st["swaps"] == 0
    rows = status_models(s)
    assert rows["a"]["loaded"] and rows["b"]["loaded"]
    assert rows["a"]["restarts"] == 0 and rows["b"]["restarts"] == 0 and rows["a"]["swaps_in"] == 0
    # /metrics: every series but the per-GPU ones has a sample set for each model.
    m = scrape(s)
    have = models_by_series(m)
    assert {name: have.get(name) for name in PER_MODEL_SERIES} == {name: {"a", "b"} for name in PER_MODEL_SERIES}
    for mid in ("a", "b"):
        assert total(m, "vram_llm_worker_state", model=mid, state="ready") == 1
        assert total(m, "vram_llm_requests_served_total", model=mid) == 3
        assert total(m, "vram_llm_completion_tokens_total", model=mid) == 9


def test_room_for_one_alternating_clients_are_all_answered_by_swaps(fleet: Any) -> None:
    s = fleet(ROOM_FOR_ONE, ["a", "b"])
    results: list[tuple[str, int, Any]] = []
    lock = threading.Lock()

    def client(model: str) -> None:
        for _ in range(3):
            code, body = chat(s, model)
            with lock:
                results.append((model, code, body))

    threads = [threading.Thread(target=client, args=(m,)) for m in ("a", "a", "b", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    remember_pids(s)
    assert len(results) == 12
    assert all(code == 200 and body["model"] == m for m, code, body in results), results
    st = s.status()
    assert st["swaps"] >= 1
    rows = status_models(s)
    assert rows["a"]["restarts"] == 0 and rows["b"]["restarts"] == 0


def test_pinned_is_never_evicted(fleet: Any) -> None:
    s = fleet(ROOM_FOR_ONE, [{"id": "a", "pinned": True}, {"id": "b"}, {"id": "c", "when_no_room": "refuse"}])
    poll(lambda: models_state(s)["a"] == "ready", 60, "a ready")
    # "b" cannot have a's memory: it gets what is left (partial offload, the default)...
    code, body = chat(s, "b")
    assert code == 200 and body["model"] == "b"
    # ... and "c" says no, naming what holds the memory.
    code, body = chat(s, "c")
    assert code == 503 and "a (pinned" in body["error"]["message"], body
    assert models_state(s)["a"] == "ready" and s.status()["swaps"] == 0


def test_ttl_unloads_an_idle_model(fleet: Any) -> None:
    s = fleet(ROOM_FOR_TWO, [{"id": "a"}, {"id": "b", "ttl_s": 1.0}])
    code, _ = chat(s, "b")
    assert code == 200
    remember_pids(s)
    poll(lambda: models_state(s)["b"] == "unloaded", 30, "b unloaded after its ttl")
    assert models_state(s)["a"] == "ready"


def test_b_waits_for_a_stream_to_finish_then_loads(fleet: Any) -> None:
    s = fleet(ROOM_FOR_ONE, [{"id": "a"}, {"id": "b"}], env={"FAKE_WORKER_TOKEN_INTERVAL_S": "0.02"})
    poll(lambda: models_state(s)["a"] == "ready", 60, "a ready")
    req = urllib.request.Request(
        s.base + "/v1/chat/completions",
        data=json.dumps({"model": "a", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 60,
                         "stream": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    got_b: list[tuple[int, Any]] = []
    with urllib.request.urlopen(req, timeout=60) as r:
        first = r.readline()
        assert first.startswith(b"data: ")
        t = threading.Thread(target=lambda: got_b.append(chat(s, "b")))
        t.start()
        rest = r.read()
    events = [first] + [line for line in rest.split(b"\n") if line.startswith(b"data: ")]
    assert events[-1].strip() == b"data: [DONE]" and not any(b'"error"' in e for e in events)
    t.join(60)
    assert got_b and got_b[0][0] == 200 and got_b[0][1]["model"] == "b"
    remember_pids(s)
    assert models_state(s) == {"a": "unloaded", "b": "ready"}


def test_kill9_of_one_model_leaves_the_other_serving(fleet: Any) -> None:
    s = fleet(ROOM_FOR_TWO, [{"id": "a"}, {"id": "b", "preload": True}])
    poll(lambda: set(models_state(s).values()) == {"ready"}, 60, "both ready")
    remember_pids(s)
    results: dict[str, list[int]] = {"a": [], "b": []}

    def client(model: str) -> None:
        for _ in range(8):
            results[model].append(chat(s, model)[0])

    threads = [threading.Thread(target=client, args=(m,)) for m in ("a", "b")]
    for t in threads:
        t.start()
    pid_a = s.status()["worker"]["pid"]  # /status's top-level worker is the first model's
    os.kill(pid_a, signal.SIGKILL)
    for t in threads:
        t.join(120)
    assert results["b"] == [200] * 8
    assert all(c == 200 for c in results["a"])  # a restarted and its requests were resent or waited
    rows = status_models(s)
    assert rows["a"]["restarts"] == 1 and rows["b"]["restarts"] == 0


def cli(s: Supervisor, *args: str) -> "subprocess.CompletedProcess[str]":
    return subprocess.run(
        [sys.executable, "-m", "supervisor", *args, "--config", str(s.config_path)],
        capture_output=True, text=True, timeout=60, cwd=str(REPO),
    )


def test_load_and_unload_by_hand_and_status_shows_every_model(fleet: Any) -> None:
    s = fleet(ROOM_FOR_TWO, ["a", "b"])
    poll(lambda: models_state(s)["a"] == "ready", 60, "a ready")
    assert cli(s, "load", "b").returncode == 0
    poll(lambda: models_state(s)["b"] == "ready", 60, "b loaded by hand")
    remember_pids(s)
    assert cli(s, "unload", "a").returncode == 0
    poll(lambda: models_state(s)["a"] == "unloaded", 60, "a unloaded by hand")
    out = cli(s, "status")
    assert "models:" in out.stdout and "unloaded" in out.stdout, out.stdout + out.stderr
    st = json.loads(cli(s, "status", "--json").stdout)
    assert {m["id"]: m["state"] for m in st["models"]} == {"a": "unloaded", "b": "ready"}
    nope = cli(s, "load", "nope")
    assert nope.returncode == 1 and "does not exist" in nope.stderr


def test_plan_shows_each_model(capsys: pytest.CaptureFixture[str]) -> None:
    from supervisor.cli import main

    path = str(default_model_path())
    sim_file = str(REPO / "tests" / "sim" / "one_gpu.json")
    assert main(["plan", "--simulate-gpus", sim_file, "--model", f"a={path}", "--model", f"b={path}", "--json"]) == 0
    plans = json.loads(capsys.readouterr().out)
    assert list(plans) == ["a", "b"] and plans["a"]["n_gpu_layers"] == -1


def test_models_of_different_sizes_share_or_swap_by_their_plans(fleet: Any, tmp_path: Path) -> None:
    """Small GGUF headers written by tests/gguf_factory.py (the fake worker loads nothing):
    two small models share the GPU, the big one needs both gone, a small one then needs it gone."""
    from supervisor.config import build_config
    from supervisor.planning import make_plan
    from tests.gguf_factory import Shape, write_model

    small = Shape(n_layers=6, vocab=4096, name="small")
    big = Shape(n_layers=12, n_embd=1536, n_ff=4096, n_head=12, n_head_kv=4, vocab=4096, name="big")
    paths = {"s1": write_model(tmp_path / "s1.gguf", small), "s2": write_model(tmp_path / "s2.gguf", small),
             "big": write_model(tmp_path / "big.gguf", big)}
    roomy = sim(tmp_path, 8192)

    def need(p: Path) -> int:
        plan, _, _ = make_plan(build_config({"model": {"path": str(p)}, "gpu": {"simulate_gpus": str(roomy)}}))
        return sum(g.planned_mib for g in plan.gpus)

    s_mib, b_mib = need(paths["s1"]), need(paths["big"])
    usable = max(2 * s_mib, b_mib) + 50
    assert b_mib + s_mib > usable  # the big one cannot stay beside a small one
    s = fleet(usable + 1024, [{"id": m, "path": str(p)} for m, p in paths.items()])
    for m in ("s1", "s2"):
        assert chat(s, m)[0] == 200
    assert models_state(s) == {"s1": "ready", "s2": "ready", "big": "unloaded"} and s.status()["swaps"] == 0
    remember_pids(s)
    assert chat(s, "big")[0] == 200
    remember_pids(s)
    assert models_state(s) == {"s1": "unloaded", "s2": "unloaded", "big": "ready"} and s.status()["swaps"] == 2
    assert chat(s, "s2")[0] == 200
    remember_pids(s)
    assert models_state(s) == {"s1": "unloaded", "s2": "ready", "big": "unloaded"} and s.status()["swaps"] == 3


def test_status_exits_by_the_health_rule(fleet: Any, tmp_path: Path) -> None:
    """`vram-llm status` exits 0 exactly when /health is 200: a preloaded model that does not
    come up makes it 1 although the first model is ready; once it is up, 0."""
    healthy = tmp_path / "b-healthy"
    s = fleet(ROOM_FOR_TWO, [{"id": "a"}, {"id": "b", "preload": True}, {"id": "c"}],
              env={"FAKE_WORKER_HEALTHY_FILE": str(healthy), "FAKE_WORKER_FAIL_ONLY": "b"},
              sections={"restart": {"backoff_initial_s": 0.2, "backoff_max_s": 1.0}})
    poll(lambda: status_models(s)["a"]["state"] == "ready" and status_models(s)["b"]["restarts"] >= 1, 60,
         "a ready and b failing")
    code, health = s.get("/health")
    assert code == 503 and "model b" in health["reason"]
    out = cli(s, "status")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "health:  not ready: model b" in out.stdout
    st = json.loads(cli(s, "status", "--json").stdout)
    assert st["health"]["ok"] is False and st["state"] == "ready"  # the first model alone would say 0
    healthy.touch()
    poll(lambda: s.get("/health")[0] == 200, 60, "/health 200 once b is up")
    remember_pids(s)
    out = cli(s, "status")
    assert out.returncode == 0 and "health:  ok" in out.stdout, out.stdout + out.stderr
    assert s.status()["health"] == {"ok": True, "status": "ok"}


def test_health_waits_for_every_preloaded_model(fleet: Any) -> None:
    s = fleet(ROOM_FOR_TWO, [{"id": "a"}, {"id": "b", "preload": True}, {"id": "c"}], env={"FAKE_WORKER_LOAD_S": "1.0"})
    code, body = s.get("/health")
    assert code == 503 and body["status"] == "loading" and "model " in body["reason"]
    poll(lambda: s.get("/health")[0] == 200, 60, "/health 200 once a and b are ready")
    remember_pids(s)
    assert models_state(s) == {"a": "ready", "b": "ready", "c": "unloaded"}


def test_openai_sdk_sees_every_model_and_picks_by_id(fleet: Any) -> None:
    openai = pytest.importorskip("openai")
    s = fleet(ROOM_FOR_ONE, ["a", "b"])
    client = openai.OpenAI(base_url=s.base + "/v1", api_key="unused", max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == ["a", "b"]
    for m in ("b", "a", "b"):
        r = client.chat.completions.create(model=m, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
        assert r.model == m
    remember_pids(s)
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert e.value.code == "model_not_found"


def test_shutdown_while_a_load_waits_for_room_exits_promptly(fleet: Any) -> None:
    s = fleet(ROOM_FOR_ONE, ["a", "b"], env={"FAKE_WORKER_TOKEN_INTERVAL_S": "0.05"},
              sections={"shutdown": {"grace_s": 1.0}})
    poll(lambda: models_state(s)["a"] == "ready", 60, "a ready")
    remember_pids(s)
    req = urllib.request.Request(
        s.base + "/v1/completions",
        data=json.dumps({"model": "a", "prompt": "hi", "max_tokens": 2000, "stream": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        r.readline()
        b = threading.Thread(target=lambda: chat(s, "b"), daemon=True)
        b.start()
        poll(lambda: "waiting (up to" in s.log(), 30, "b's load waiting for a to go idle")
        # stop() fails if the supervisor takes more than 30 s or leaves a worker behind.
        assert s.stop(timeout=30) == 0


def test_load_and_unload_need_an_admin_key(fleet: Any, tmp_path: Path) -> None:
    inf, admin = "inf-key-0123456789abcdef", "adm-key-0123456789abcdef"
    keys = tmp_path / "keys"
    keys.write_text(f"app:{inf}\nops:{admin} admin\n")
    s = fleet(ROOM_FOR_TWO, ["a", "b"], sections={"server": {"api_keys_file": str(keys)}})

    def post(path: str, key: str | None) -> int:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        req = urllib.request.Request(s.base + path, data=b"", headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)

    assert post("/models/b/load", None) == 401
    assert post("/models/b/load", inf) == 403
    assert post("/models/b/load", admin) == 202
    assert post("/models/nope/load", admin) == 404
    s.api_key = admin
    poll(lambda: models_state(s)["b"] == "ready", 60, "b loaded by an admin")
    remember_pids(s)


def test_a_restart_does_not_count_its_own_old_footprint(fleet: Any) -> None:
    # Room for exactly one: the re-plan after kill -9 must see the memory its dead worker had.
    s = fleet(ROOM_FOR_ONE, ["a", "b"])
    st = s.wait_ready(60)
    assert st["plan"]["n_gpu_layers"] == -1
    os.kill(st["worker"]["pid"], signal.SIGKILL)
    st = s.wait_state("ready", 60, lambda st: st["restarts"] == 1)
    assert st["plan"]["n_gpu_layers"] == -1 and st["swaps"] == 0


def test_llama_server_root_paths_are_routed_by_model(fleet: Any) -> None:
    # issue 25: /completion, /props, /chat/completions... go to the model the body names, or
    # for a request without a body the query's ?model= (llama-server's router mode).
    s = fleet(ROOM_FOR_TWO, ["a", "b"])
    poll(lambda: models_state(s)["a"] == "ready", 60, "model a ready")

    def native(model: str) -> float:
        return total(scrape(s), "vram_llm_http_requests_total", model=model, path="native")

    def send(method: str, path: str, body: dict[str, Any] | None = None) -> int:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(s.base + path, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:  # the fake worker has no /completion, /props: its 404
            return e.code

    before = {m: native(m) for m in ("a", "b")}
    send("POST", "/completion", {"model": "b", "prompt": "hi"})
    send("GET", "/props?model=b")
    send("GET", "/props")  # no model: the first
    poll(lambda: native("b") - before["b"] == 2 and native("a") - before["a"] == 1, 10, "the requests counted by model")
    code, body = s.post("/completion", {"model": "nope", "prompt": "hi"})
    assert code == 404 and body["error"]["code"] == "model_not_found"
    assert s.get("/props?model=nope")[0] == 404
    code, body = s.post("/chat/completions", {"model": "b", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert code == 200 and body["model"] == "b"

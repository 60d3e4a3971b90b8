"""What balancers and schedulers read (issue 26): the vLLM and llama-server gauges, /slots,
the SIGTERM drain and the /metrics access choice.

Tiers: the pure load rule as a table; the access rule; a process test of the drain on the
fake worker; the gauges and /slots on the real worker (SmolLM2, 4 slots).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from supervisor.auth import KeyStore, parse_key_line, required_scope
from supervisor.metrics import Load, load_of
from supervisor.states import WorkerState
from tests.conftest import short_tmpdir
from tests.supervisor_harness import Supervisor, poll, scrape, total
from tests.test_fleet import ROOM_FOR_TWO, fleet, models_state, remember_pids
from tests.test_fleet_sighup import sighup_with_models
from worker.protocol import Health

S = WorkerState
__all__ = ["fleet"]  # the fixture, imported to be used


def _health(active_tokens: int, tokens: int, capacity: int) -> Health:
    return Health(status="ok", pid=1, kv_tokens_active=active_tokens, kv_tokens=tokens, kv_capacity=capacity)


@pytest.mark.parametrize(
    ("state", "generating", "waiting", "health", "expected"),
    [
        # A ready worker: running from admission (fresh), KV from its last /health.
        (S.READY, 4, 1, _health(512, 1024, 2048), Load(4, 1, 0.25, 0.5, 1024, 2048)),
        # An idle worker with cached prompts: nothing runs, so no KV in use for the picker;
        # llama-server's ratio counts the cached cells (its meaning).
        (S.READY, 0, 0, _health(0, 900, 1000), Load(0, 0, 0.0, 0.9, 900, 1000)),
        # Unloaded, loading, backing off, failed: no KV figure from the last worker; the
        # requests waiting for the model are its queue.
        (S.UNLOADED, 0, 3, _health(512, 1024, 2048), Load(0, 3, 0.0, 0.0, 0, 0)),
        (S.LOADING, 0, 2, None, Load(0, 2, 0.0, 0.0, 0, 0)),
        (S.BACKOFF, 0, 1, _health(2048, 2048, 2048), Load(0, 1, 0.0, 0.0, 0, 0)),
        (S.FAILED, 0, 0, _health(1, 1, 2), Load(0, 0, 0.0, 0.0, 0, 0)),
        # A reload's old worker still finishing two answers: they run.
        (S.STOPPING, 2, 1, _health(100, 100, 1000), Load(2, 1, 0.0, 0.0, 0, 0)),
        # A worker that has not said its capacity yet.
        (S.READY, 1, 0, _health(0, 0, 0), Load(1, 0, 0.0, 0.0, 0, 0)),
    ],
)
def test_load_of(state: WorkerState, generating: int, waiting: int, health: Health | None, expected: Load) -> None:
    assert load_of(state, generating, waiting, health) == expected


def test_metrics_open_opens_metrics_only() -> None:
    assert required_scope("/metrics") == "admin"
    assert required_scope("/metrics", metrics_open=True) is None
    assert required_scope("/status", metrics_open=True) == "admin"
    assert required_scope("/slots") == "inference"
    admin = parse_key_line("ops:" + "a" * 24 + " admin", "x")
    app = parse_key_line("app:" + "b" * 24, "y")
    closed, opened = KeyStore((admin, app)), KeyStore((admin, app), metrics_open=True)
    assert closed.check("/metrics", None)[0] == 401
    assert closed.check("/metrics", "b" * 24)[0] == 403
    assert opened.check("/metrics", None)[0] == 200
    assert opened.check("/status", None)[0] == 401
    assert opened.check("/slots", None)[0] == 401
    assert opened.check("/slots", "b" * 24)[0] == 200


# --- the drain, on the fake worker ------------------------------------------------------------

FAST = {"worker": {"health_interval_s": 0.2, "health_timeout_s": 2.0, "stop_timeout_s": 5.0}}


def _post(base: str, body: dict[str, Any], timeout: float = 120.0) -> tuple[int, Any]:
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")


def test_sigterm_health_503_at_once_while_the_request_in_flight_finishes(tmp_path: Path) -> None:
    """SIGTERM with a long answer in flight: /health reads 503 "draining" before the answer
    ends (the port stays open), a new request is refused 503 shutting_down (drain_s 0), the
    answer in flight completes whole, and the supervisor exits 0."""
    tokens = 40
    s = Supervisor(tmp_path, {**FAST, "shutdown": {"grace_s": 120.0, "drain_s": 0.0}}, fake_worker=True,
                   env={"FAKE_WORKER_TOKEN_INTERVAL_S": "0.2"})
    try:
        s.wait_ready(60)
        result: list[tuple[int, Any]] = []
        t = threading.Thread(target=lambda: result.append(_post(s.base, {
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": tokens})), daemon=True)
        t.start()
        poll(lambda: s.status()["requests"]["in_flight"] == 1, 60, "the long request in flight")
        s.proc.send_signal(signal.SIGTERM)

        def draining() -> dict[str, Any] | None:
            code, body = s.get("/health")
            return body if code == 503 else None

        body = poll(draining, 30, "/health 503 after SIGTERM")
        assert body["status"] == "draining", body
        assert t.is_alive(), "the answer ended before /health said draining: make it longer"
        code, refused = _post(s.base, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert code == 503 and refused["error"]["code"] == "shutting_down", refused
        t.join(120)
        assert not t.is_alive()
        code, ans = result[0]
        assert code == 200, ans
        assert ans["usage"]["completion_tokens"] == tokens
        assert s.stop(60) == 0
    finally:
        s.kill_hard()


def test_drain_s_serves_new_requests_for_a_while(tmp_path: Path) -> None:
    """drain_s > 0: after SIGTERM /health is 503 at once, and a request sent meanwhile (a
    balancer that has not looked at /health yet) is still answered."""
    s = Supervisor(tmp_path, {**FAST, "shutdown": {"grace_s": 60.0, "drain_s": 4.0}}, fake_worker=True)
    try:
        s.wait_ready(60)
        s.proc.send_signal(signal.SIGTERM)
        poll(lambda: s.get("/health")[0] == 503, 30, "/health 503 after SIGTERM")
        code, ans = _post(s.base, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        # On a slow box the 4 s may be over by now: then the answer is the refusal.
        assert code == 200 or (code == 503 and ans["error"]["code"] == "shutting_down"), ans
        assert s.stop(60) == 0
    finally:
        s.kill_hard()


def test_metrics_open_and_slots_need_the_inference_key(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("ops:" + "a" * 24 + " admin\napp:" + "b" * 24 + "\n")
    keys.chmod(0o600)
    s = Supervisor(tmp_path, {**FAST, "server": {"api_keys_file": str(keys), "metrics_open": True}},
                   fake_worker=True)
    try:
        poll(lambda: s.get("/health")[0] == 200, 60, "ready")
        with urllib.request.urlopen(s.base + "/metrics", timeout=10) as r:
            text = r.read().decode()
        assert r.status == 200 and "vllm:num_requests_waiting{" in text
        assert s.get("/status")[0] == 401
        assert s.get("/slots")[0] == 401
        s.api_key = "b" * 24
        code, slots = s.get("/slots")
        assert code == 200 and slots[0]["is_processing"] is False, slots
        s.api_key = "a" * 24
        assert s.stop() == 0
    finally:
        s.kill_hard()


# --- the gauges and /slots on the real worker ---------------------------------------------------


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    d = short_tmpdir()  # the real worker's socket path must fit in 107 bytes
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _gauges(m: dict[Any, float], model: str) -> tuple[float, float, float]:
    return (total(m, "vllm:num_requests_running", model_name=model),
            total(m, "vllm:num_requests_waiting", model_name=model),
            total(m, "vllm:kv_cache_usage_perc", model_name=model))


@pytest.mark.model
def test_scheduler_gauges_and_slots_with_four_streams(short_tmp: Path) -> None:
    """Two models (SmolLM2 under two ids), 4 slots: 5 long answers to "a" show running 4,
    waiting >= 1, a KV fraction in (0, 1]; /slots shows 4 slots busy (fail_on_no_slot: 503);
    then everything reads 0 again, and after unloading "a" no KV figure is left."""
    from supervisor.default_model import default_model_path

    sims = short_tmp / "gpus.json"
    sims.write_text(json.dumps([{"index": 0, "uuid": "GPU-00000000-0000-0000-0000-00000000aaaa", "name": "sim",
                                 "total_mib": 8192, "free_mib": 8000}]))
    models = "".join(f'[[models]]\nid = "{m}"\npath = "{default_model_path()}"\nparallel = 4\nctx_size = 512\n'
                     f"threads = 1\n\n" for m in ("a", "b"))
    s = Supervisor(short_tmp, {"worker": {"health_interval_s": 0.2, "health_timeout_s": 5.0},
                               "gpu": {"simulate_gpus": str(sims)}}, extra_toml=models)
    try:
        poll(lambda: s.get("/health")[0] == 200, 180, "model a ready")
        results: list[tuple[int, Any]] = []
        body = {"model": "a", "messages": [{"role": "user", "content": "Tell a long story."}],
                "max_tokens": 200, "ignore_eos": True, "temperature": 0}
        threads = [threading.Thread(target=lambda: results.append(_post(s.base, body, 600)), daemon=True)
                   for _ in range(5)]
        for t in threads:
            t.start()

        def busy() -> dict[Any, float] | None:
            m = scrape(s)
            running, waiting, kv = _gauges(m, "a")
            return m if running == 4 and waiting >= 1 and 0 < kv <= 1 else None

        m = poll(busy, 120, "running 4, waiting >= 1, KV in (0, 1] for model a")
        assert total(m, "llamacpp:requests_processing", model_name="a") == 4
        assert total(m, "vllm:num_requests_running", model_name="b") == 0
        assert total(m, "vllm:cache_config_info", model_name="a", block_size="1", num_gpu_blocks="2048") == 1

        code, slots = s.get("/slots?model=a")
        assert code == 200 and len(slots) == 4, slots
        for i, slot in enumerate(slots):
            assert slot["id"] == i and slot["n_ctx"] == 512 and slot["speculative"] is True  # drafts on by default
            assert isinstance(slot["id_task"], int)
            if slot["is_processing"]:
                assert slot["params"]["n_predict"] == 200 and slot["params"]["temperature"] == 0
                (nt,) = slot["next_token"]
                assert set(nt) == {"has_next_token", "has_new_line", "n_remain", "n_decoded"}
        assert s.get("/slots?model=a&fail_on_no_slot=1")[0] == 503
        # A model that is not loaded: 503, and asking does not load it.
        assert s.get("/slots?model=b")[0] == 503
        assert s.get("/slots?model=nope")[0] == 404

        for t in threads:
            t.join(600)
        assert sorted(c for c, _ in results) == [200] * 5, results
        poll(lambda: _gauges(scrape(s), "a") == (0, 0, 0), 60, "model a idle")
        code, slots = s.get("/slots?fail_on_no_slot=1")  # no ?model=: the first
        assert code == 200 and not any(x["is_processing"] for x in slots), slots
        assert {x["id"]: x["id_task"] > 0 for x in slots} == {0: True, 1: True, 2: True, 3: True}
        # Counted when each request's log line is written, which may come just after its answer.
        m = poll(lambda: (m := scrape(s)) and total(m, "llamacpp:tokens_predicted_total", model_name="a") == 1000
                 and m, 30, "1000 tokens counted")
        assert total(m, "llamacpp:kv_cache_usage_ratio", model_name="a") > 0  # cached prompts stay
        # The batch loop's steps and drafts, from the worker's /health (polled: it lags a little).
        m = poll(lambda: (m := scrape(s)) and total(m, "llamacpp:n_decode_total", model_name="a") > 0 and m, 30,
                 "the steps counted")
        drafted = total(m, "llamacpp:spec_decode_num_draft_tokens_total", model_name="a")
        accepted = total(m, "llamacpp:spec_decode_num_accepted_tokens_total", model_name="a")
        assert 0 <= accepted <= drafted == total(m, "vram_llm_draft_tokens_total", model="a")
        assert total(m, "vram_llm_batch_steps_total", model="a") == total(m, "llamacpp:n_decode_total", model_name="a")
        assert {mm["id"]: mm["state"] for mm in s.status()["models"]}["b"] == "unloaded"

        code, _ = s.post("/models/a/unload", {})
        assert code == 202
        poll(lambda: {mm["id"]: mm["state"] for mm in s.status()["models"]}["a"] == "unloaded", 60, "a unloaded")
        m = scrape(s)
        assert _gauges(m, "a") == (0, 0, 0)
        assert total(m, "llamacpp:kv_cache_usage_ratio", model_name="a") == 0
        assert total(m, "vllm:cache_config_info", model_name="a") == 0
        assert s.stop(60) == 0
    finally:
        s.kill_hard()


# --- a reload that changes the first model ------------------------------------------------------


def test_sighup_that_changes_the_first_model_turns_health_503_until_it_is_ready(fleet: Any) -> None:
    """Several models: requests without "model" go to the first; a SIGHUP that makes an
    unloaded model first takes this box out of rotation (/health 503 naming it) until
    that model is ready, then back in."""
    s = fleet(ROOM_FOR_TWO, ["a", "b"], env={"FAKE_WORKER_LOAD_S": "3"})
    poll(lambda: s.get("/health")[0] == 200, 60, "a ready")
    assert models_state(s)["b"] == "unloaded"
    sighup_with_models(s, ["b", "a"])

    def out_of_rotation() -> dict[str, Any] | None:
        code, body = s.get("/health")
        return body if code == 503 else None

    body = poll(out_of_rotation, 30, "/health 503 while the new first model loads")
    assert "model b" in body["reason"], body
    poll(lambda: s.get("/health")[0] == 200, 60, "/health 200 once b is ready")
    assert models_state(s)["b"] == "ready"
    remember_pids(s)


# --- /slots against the real llama-server, where its binary is given -----------------------------

LLAMA_SERVER = os.environ.get("LLAMA_SERVER", "")


def _json_type(v: Any) -> str:
    return "number" if isinstance(v, (int, float)) and not isinstance(v, bool) else type(v).__name__


def _same_shape(ours: dict[str, Any], theirs: dict[str, Any], where: str) -> None:
    """Every field we send is one llama-server sends, with the same JSON type."""
    for k, v in ours.items():
        assert k in theirs, f"{where}.{k}: llama-server has no such field ({sorted(theirs)})"
        assert _json_type(v) == _json_type(theirs[k]) or theirs[k] is None, (where, k, v, theirs[k])


@pytest.mark.model
def test_slots_shape_matches_llama_server(short_tmp: Path) -> None:
    """GET /slots of vram-llm and of llama-server (LLAMA_SERVER=path), both with 2 slots of
    512 tokens on SmolLM2, one of them generating: our fields are theirs, typed alike."""
    if not (LLAMA_SERVER and os.access(LLAMA_SERVER, os.X_OK)):
        pytest.skip("set LLAMA_SERVER to a llama-server binary to compare /slots with it")
    from supervisor.default_model import default_model_path
    from tests.balancers import stopped_process
    from tests.supervisor_harness import free_port

    port = free_port()
    log = open(short_tmp / "llama-server.log", "wb")
    s = Supervisor(short_tmp, {"model": {"parallel": 2, "ctx_size": 512, "threads": 1},
                               "worker": {"health_interval_s": 0.2}})
    ls: subprocess.Popen[bytes] | None = None
    try:
        ls = subprocess.Popen([LLAMA_SERVER, "-m", str(default_model_path()), "--host", "127.0.0.1",
                               "--port", str(port), "-np", "2", "-c", "1024", "-t", "1"],
                              stdout=log, stderr=subprocess.STDOUT)
        ls_base = f"http://127.0.0.1:{port}"
        poll(lambda: urllib.request.urlopen(ls_base + "/health", timeout=5).status == 200, 120, "llama-server ready")
        s.wait_ready(180)
        body = {"messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 400,
                "ignore_eos": True}
        threads = [threading.Thread(target=lambda b=base: _post(b, body, 600), daemon=True)
                   for base in (ls_base, s.base)]
        for t in threads:
            t.start()

        def busy(base: str) -> list[dict[str, Any]] | None:
            with urllib.request.urlopen(base + "/slots", timeout=10) as r:
                got = json.loads(r.read())
            return got if any(x["is_processing"] for x in got) else None

        theirs = poll(lambda: busy(ls_base), 120, "a llama-server slot processing")
        ours = poll(lambda: busy(s.base), 120, "a vram-llm slot processing")
        assert len(ours) == len(theirs) == 2
        t_busy = next(x for x in theirs if x["is_processing"])
        o_busy = next(x for x in ours if x["is_processing"])
        _same_shape(o_busy, t_busy, "slot")
        _same_shape(o_busy["params"], t_busy["params"], "params")
        assert isinstance(t_busy["next_token"], list) and len(t_busy["next_token"]) == 1
        _same_shape(o_busy["next_token"][0], t_busy["next_token"][0], "next_token[0]")
        assert o_busy["n_ctx"] == t_busy["n_ctx"] == 512
        for t in threads:
            t.join(600)
        assert s.stop(60) == 0
    finally:
        if ls is not None:
            stopped_process(ls)
        log.close()
        s.kill_hard()

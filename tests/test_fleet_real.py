"""Several models under one supervisor with the REAL worker on simulated GPUs (issue 12's
"What it must show", with real models): the embedded SmolLM2 under two ids, and random-weight
llama models of two sizes written by tests/gguf_factory.py ``write_loadable`` (~0.1 s loads).

The harness is tests/test_fleet.py's: its ``fleet`` fixture with the ``[worker]`` section
replaced, so the default command (``python -m worker``) runs instead of the fake. The
simulated inventory subtracts each live worker's planned footprint (supervisor/fleet.py
AccountedProbe): the free MiB given to the GPU decides "room for one" or "room for both".
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.conftest import LoadableModel, short_tmpdir
from tests.supervisor_harness import Supervisor, poll
from tests.test_fleet import ROOM_FOR_TWO, chat, fleet, models_state, remember_pids, sim, status_models

pytestmark = pytest.mark.model

__all__ = ["fleet"]  # the fixture, imported to be used


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """Overrides pytest's (which ``fleet`` takes its directories from) with a short one: the
    real worker refuses a socket path over the 107 bytes a Unix socket allows, and pytest's
    paths plus the runtime dir's ``vram-llm-XXXXXXXX/<model id>/worker-N.sock`` pass that."""
    d = short_tmpdir()
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


REAL_WORKER = {"worker": {"health_interval_s": 1.0}}  # no "command": the real worker
SETTINGS = {"threads": 1, "ctx_size": 1024}  # 2 shared CPU cores; a small KV cache
SMALL = {"n_layers": 2, "n_embd": 64}
BIG = {"n_layers": 4, "n_embd": 128}


def planned_mib(path: Path, tmp: Path) -> int:
    """What the planner reserves for ``path`` with SETTINGS on a roomy simulated GPU."""
    from supervisor.config import build_config
    from supervisor.planning import make_plan

    cfg = build_config({"model": {"path": str(path), **SETTINGS}, "gpu": {"simulate_gpus": str(sim(tmp, 8192))}})
    plan, _, _ = make_plan(cfg)
    return sum(g.planned_mib for g in plan.gpus)


def worker_pids(s: Supervisor) -> set[int]:
    """The supervisor's live `python -m worker` children."""
    out = set()
    for c in psutil.Process(s.proc.pid).children(recursive=True):
        try:
            if c.cmdline()[1:3] == ["-m", "worker"]:
                out.add(c.pid)
        except psutil.Error:
            pass
    return out


def clients_at_once(s: Supervisor, per_model: dict[str, int], rounds: int,
                    alternate: bool = False) -> list[tuple[str, int, Any]]:
    """``per_model[m]`` clients starting on each model, each sending ``rounds`` chats (to its
    model, or with ``alternate`` to each model in turn from its own); every result."""
    results: list[tuple[str, int, Any]] = []
    lock = threading.Lock()
    models = list(per_model)

    def client(first: int) -> None:
        for i in range(rounds):
            model = models[(first + i) % len(models)] if alternate else models[first]
            code, body = chat(s, model, ignore_eos=True)
            with lock:
                results.append((model, code, body))

    threads = [threading.Thread(target=client, args=(i,)) for i, m in enumerate(models) for _ in range(per_model[m])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(240)
    assert not any(t.is_alive() for t in threads), "a client still waits after 240 s"
    return results


def test_room_for_one_real_models_of_two_sizes_swap_and_answer_every_client(
    fleet: Any, loadable_model: LoadableModel, tmp_path: Path
) -> None:
    small, big = loadable_model(**SMALL), loadable_model(**BIG)
    s_mib, b_mib = planned_mib(small, tmp_path), planned_mib(big, tmp_path)
    assert s_mib < b_mib
    usable = b_mib + 10  # either fits, not both
    assert s_mib + b_mib > usable
    s = fleet(usable + 1024, [{"id": "small", "path": str(small), **SETTINGS},
                              {"id": "big", "path": str(big), **SETTINGS}], sections=REAL_WORKER)
    results = clients_at_once(s, {"small": 2, "big": 2}, rounds=4, alternate=True)
    remember_pids(s)
    assert len(results) == 16
    assert all(code == 200 and body["model"] == m and body["usage"]["completion_tokens"] == 3
               for m, code, body in results), results
    assert s.status()["swaps"] >= 1
    rows = status_models(s)
    assert rows["small"]["restarts"] == 0 and rows["big"]["restarts"] == 0
    assert rows["small"]["swaps_in"] + rows["big"]["swaps_in"] >= 1
    # Never both at once: one is unloaded now.
    assert sorted(models_state(s).values()) == ["ready", "unloaded"]


def test_room_for_both_smollm2_under_two_ids_stays_loaded_without_restarts(fleet: Any) -> None:
    openai = pytest.importorskip("openai")
    s = fleet(ROOM_FOR_TWO, [{"id": "smol-a", **SETTINGS}, {"id": "smol-b", **SETTINGS}], sections=REAL_WORKER)
    client = openai.OpenAI(base_url=s.base + "/v1", api_key="unused", max_retries=0, timeout=120)
    try:
        for m in ("smol-a", "smol-b"):  # the first loads
            r = client.chat.completions.create(model=m, messages=[{"role": "user", "content": "Say hi."}],
                                               max_tokens=4)
            assert r.model == m and r.usage is not None and 0 < r.usage.completion_tokens <= 4
        pids = poll(lambda: len(worker_pids(s)) == 2 and worker_pids(s), 10, "two workers")
        remember_pids(s)
        results = clients_at_once(s, {"smol-a": 2, "smol-b": 2}, rounds=2)
        assert len(results) == 8 and all(code == 200 and body["model"] == m for m, code, body in results), results
        for m in ("smol-b", "smol-a"):
            r = client.chat.completions.create(model=m, messages=[{"role": "user", "content": "Say hi."}],
                                               max_tokens=4)
            assert r.model == m
    finally:
        client.close()
    assert worker_pids(s) == pids
    assert models_state(s) == {"smol-a": "ready", "smol-b": "ready"} and s.status()["swaps"] == 0
    rows = status_models(s)
    assert all(rows[m]["restarts"] == 0 and rows[m]["swaps_in"] == 0 for m in rows), rows


def test_room_for_both_real_models_of_two_sizes_share_the_gpu(
    fleet: Any, loadable_model: LoadableModel, tmp_path: Path
) -> None:
    small, big = loadable_model(**SMALL), loadable_model(**BIG)
    room = planned_mib(small, tmp_path) + planned_mib(big, tmp_path) + 10
    s = fleet(room + 1024, [{"id": "small", "path": str(small), **SETTINGS},
                            {"id": "big", "path": str(big), **SETTINGS, "preload": True}], sections=REAL_WORKER)
    poll(lambda: set(models_state(s).values()) == {"ready"}, 60, "both loaded at start")
    pids = worker_pids(s)
    remember_pids(s)
    assert len(pids) == 2
    results = clients_at_once(s, {"small": 2, "big": 2}, rounds=3)
    assert all(code == 200 and body["model"] == m for m, code, body in results), results
    assert worker_pids(s) == pids and s.status()["swaps"] == 0
    code, body = s.get("/v1/models")
    assert code == 200 and {m["id"]: m["loaded"] for m in body["data"]} == {"small": True, "big": True}
    mib = {m["id"]: m["mib"] for m in body["data"]}
    assert mib["small"] < mib["big"], json.dumps(body)


def test_a_long_model_id_still_gets_a_socket_the_worker_accepts(fleet: Any, loadable_model: LoadableModel) -> None:
    # A --models-dir file stem can be long; the socket path (runtime dir, model dir, socket
    # name) must stay within the 107 bytes of a Unix socket: the model dir name is bounded.
    from supervisor.fleet import MODEL_DIR_MAX, model_dir_name

    long_id = "Meta-Llama-3.1-70B-Instruct-abliterated-GGUF-Q4_K_M-imatrix-2026-12-02"
    assert len(model_dir_name(long_id)) <= MODEL_DIR_MAX and model_dir_name("short") == "short"
    assert model_dir_name(long_id) != model_dir_name(long_id + "x")
    small = loadable_model(**SMALL)
    s = fleet(8192, [{"id": "a", "path": str(small), **SETTINGS},
                     {"id": long_id, "path": str(small), **SETTINGS}], sections=REAL_WORKER)
    code, body = chat(s, long_id)
    assert code == 200 and body["model"] == long_id, body

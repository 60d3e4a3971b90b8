"""The fleet in-process: real placement and planning on a simulated GPU, fake workers
(tests/lifecycle_fakes.py) and a virtual clock. Requests are played against each model's
admission, so a request can be made to arrive at exactly the wrong moment of an eviction.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest
from lifecycle_fakes import FakeSpawner, run_virtual, sync_to_thread

from supervisor.config import Config, build_config, resolved_models
from supervisor.default_model import default_model_path
from supervisor.fleet import Fleet
from supervisor.gpus import make_probe
from supervisor.states import WorkerState
from supervisor.worker_process import WorkerHandle

S = WorkerState
ROOM_FOR_ONE = 2618  # MiB free: one SmolLM2 worker fits, not two (as in test_fleet.py)


@pytest.fixture(autouse=True)
def _no_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    # A thread's wake-up is not a timer: on the virtual clock, work runs inline.
    monkeypatch.setattr(asyncio, "to_thread", sync_to_thread)


def make_fleet(tmp: Path, free_mib: int, ids: list[str]) -> tuple[Fleet, dict[str, FakeSpawner]]:
    sims = tmp / "gpus.json"
    sims.write_text(json.dumps([{"index": 0, "uuid": "GPU-00000000-0000-0000-0000-00000000aaaa", "name": "sim",
                                 "total_mib": 8192, "free_mib": free_mib}]))
    path = str(default_model_path())
    cfg = build_config({
        "gpu": {"simulate_gpus": str(sims)},
        "worker": {"health_interval_s": 1.0, "stop_timeout_s": 5.0},
        "admission": {"wait_timeout_s": 60.0},
        "shutdown": {"grace_s": 20.0},
        "models": [{"id": m, "path": path} for m in ids],
    })
    spawners: dict[str, FakeSpawner] = {}

    def spawner(mid: str, config: Callable[[], Config], mdir: Path) -> FakeSpawner:
        spawners[mid] = FakeSpawner()
        return spawners[mid]

    run = tmp / "run"
    run.mkdir()
    return Fleet(cfg, resolved_models(cfg), run, make_probe(cfg), spawner=spawner), spawners


async def until(pred: Callable[[], bool], what: str, within_s: float = 300.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not pred():
        assert loop.time() < deadline, what
        await asyncio.sleep(0.05)


async def request(fleet: Fleet, mid: str, out: list[tuple[str, int]], hold: asyncio.Event | None = None) -> None:
    """One request as the router and proxy make it: enter, acquire, (answer), release, leave."""
    adm = fleet.managers[mid].admission
    fleet.load(mid)
    adm.enter()
    h: WorkerHandle | None = None
    try:
        h = await adm.acquire(60.0)
        out.append((mid, h.gen))
        if hold is not None:
            await hold.wait()
    finally:
        if h is not None:
            adm.release(h)
        adm.leave()


def test_a_request_arriving_during_an_eviction_waits_and_is_served(tmp_path: Path) -> None:
    async def main() -> None:
        fleet, spawners = make_fleet(tmp_path, ROOM_FOR_ONE, ["a", "b"])
        task = asyncio.create_task(fleet.run())
        a = fleet.managers["a"]
        await until(lambda: a.state is S.READY, "a ready")
        # The unload of "a" will be in progress (its worker stopping) when a request for "a" comes.
        gate = asyncio.Event()
        spawners["a"].last.stop_gate = gate
        served: list[tuple[str, int]] = []
        for_b = asyncio.create_task(request(fleet, "b", served))
        await until(lambda: a.state is S.STOPPING, "a being unloaded for b")
        for_a = asyncio.create_task(request(fleet, "a", served))
        await asyncio.sleep(1.0)
        assert not for_a.done() and a.state is S.STOPPING  # held back, not sent to a stopping worker
        gate.set()
        await asyncio.wait_for(asyncio.gather(for_b, for_a), 300)
        # Both answered: b by its first worker, a by a worker loaded again after b was idle.
        assert served == [("b", 1), ("a", 2)]
        assert fleet.swaps == 2 and a.view.swaps_in == 1
        assert fleet.managers["b"].state is S.UNLOADED and a.state is S.READY
        fleet.request_shutdown()
        await task

    run_virtual(main)


def test_a_busy_model_is_drained_not_cut(tmp_path: Path) -> None:
    async def main() -> None:
        fleet, spawners = make_fleet(tmp_path, ROOM_FOR_ONE, ["a", "b"])
        task = asyncio.create_task(fleet.run())
        a = fleet.managers["a"]
        await until(lambda: a.state is S.READY, "a ready")
        served: list[tuple[str, int]] = []
        done_a = asyncio.Event()
        for_a = asyncio.create_task(request(fleet, "a", served, hold=done_a))  # a long answer of a's
        await until(lambda: served == [("a", 1)], "a answering")
        for_b = asyncio.create_task(request(fleet, "b", served))
        await asyncio.sleep(10.0)
        # b waits for a's request to finish: a is neither stopped nor taking new requests.
        assert not for_b.done() and a.state is S.READY and not spawners["a"].last.exited.done()
        held = asyncio.create_task(request(fleet, "a", served))
        await asyncio.sleep(1.0)
        assert not held.done()  # new requests for a are held while it drains for the eviction
        done_a.set()
        await asyncio.wait_for(asyncio.gather(for_a, for_b, held), 300)
        assert served[:2] == [("a", 1), ("b", 1)] and served[2] == ("a", 2)
        assert spawners["a"].procs[0].stopped and fleet.swaps == 2
        fleet.request_shutdown()
        await task

    run_virtual(main)


def test_an_operator_unload_is_answered_once_the_worker_is_gone(tmp_path: Path) -> None:
    async def main() -> None:
        fleet, spawners = make_fleet(tmp_path, ROOM_FOR_ONE, ["a", "b"])
        task = asyncio.create_task(fleet.run())
        a = fleet.managers["a"]
        await until(lambda: a.state is S.READY, "a ready")
        await a.unload()
        assert a.state is S.UNLOADED and spawners["a"].last.stopped
        assert fleet.taken_mib(True) == {}  # an unloaded model holds nothing, for the next placement
        fleet.request_shutdown()
        await task

    run_virtual(main)

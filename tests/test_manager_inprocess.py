"""The worker manager in-process: a fake process adapter, a fake preparer and a virtual
clock (tests/lifecycle_fakes.py). No subprocess, no socket, no real sleep: backoffs, stalls
and grace periods of minutes take milliseconds, and every assertion is on the published
view, the admission counters or the answer of a command, never on a log line.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from lifecycle_fakes import FakePreparer, FakeSpawner, fast_config, run_virtual

from supervisor.admission import NotReady
from supervisor.config import Config
from supervisor.launches import NoRoom, PlanFailed
from supervisor.restart import FailureKind
from supervisor.states import TRANSITIONS, WorkerState
from supervisor.worker_process import WorkerHandle, WorkerManager
from worker.protocol import ExitCode

S = WorkerState
Edge = tuple[WorkerState, WorkerState]


class Rig:
    """A manager on fakes, with every move it made."""

    def __init__(self, cfg: Config | None = None, *, unloaded: bool = False, ttl_s: float = 0.0) -> None:
        self.cfg = cfg or fast_config()
        self.spawner = FakeSpawner()
        self.prep = FakePreparer()
        self.edges: list[Edge] = []
        self._last = S.UNLOADED if unloaded else S.STOPPED
        self.mgr = WorkerManager(
            config=lambda: self.cfg, prepare=self.prep, runtime_dir=Path("/nonexistent"), spawner=self.spawner,
            on_state=self._on_state, unloaded=unloaded, ttl_s=lambda: ttl_s, name="model test",
        )
        self.task: asyncio.Task[None] | None = None

    def _on_state(self, state: WorkerState, reason: str) -> None:
        self.edges.append((self._last, state))
        self._last = state

    def start(self) -> Rig:
        self.task = asyncio.create_task(self.mgr.run())
        return self

    @property
    def state(self) -> WorkerState:
        return self.mgr.view.state

    async def until(self, pred: Callable[[], bool], within_s: float = 600.0) -> None:
        """Poll on the virtual clock (costs no real time) until ``pred``; fail after ``within_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within_s
        while not pred():
            if self.task is not None and self.task.done():
                self.task.result()  # the manager failed: show why
            assert loop.time() < deadline, f"not within {within_s}s; state {self.state}: {self.mgr.view.reason}"
            await asyncio.sleep(0.05)

    async def reach(self, state: WorkerState, within_s: float = 600.0) -> None:
        await self.until(lambda: self.state is state, within_s)

    async def ready(self) -> Rig:
        """Started, and its first worker ready."""
        self.start()
        await self.reach(S.READY)
        return self

    async def take(self, timeout_s: float = 5.0) -> WorkerHandle:
        """A request arrives and is given the worker (as the proxy does)."""
        self.mgr.admission.enter()
        return await self.mgr.admission.acquire(timeout_s)

    def done(self, h: WorkerHandle) -> None:
        """That request is answered."""
        self.mgr.admission.release(h)
        self.mgr.admission.leave()

    async def shutdown(self) -> None:
        await self.mgr.shutdown()
        assert self.task is not None
        await self.task


def run(scenario: Callable[[], Awaitable[Rig]]) -> list[Edge]:
    async def main() -> list[Edge]:
        rig = await scenario()
        if rig.task is not None and not rig.task.done():
            await rig.shutdown()
        return rig.edges

    return run_virtual(main)


# ---- scenarios: each drives one path and checks what it shows ---------------------------


async def start_ready_shutdown() -> Rig:
    r = Rig()
    r.spawner.modes.append("loading")
    r.start()
    await r.reach(S.LOADING)
    r.spawner.last.progress = 0.5
    r.spawner.last.mode = "ok"
    await r.reach(S.READY)
    assert r.mgr.view.handle is not None and r.mgr.view.handle.pid == r.spawner.last.pid
    await r.shutdown()
    assert r.state is S.STOPPED and r.spawner.last.stopped and r.mgr.view.proc is None
    return r


async def fast_ready_then_crash_and_restart() -> Rig:
    r = await Rig().ready()
    first = r.spawner.last
    first.exit(-signal.SIGSEGV)
    await r.reach(S.BACKOFF)
    assert r.mgr.view.history.last_exit is not None and r.mgr.view.history.last_exit.kind == "crash"
    assert r.mgr.failure_streak() == 1 and r.mgr.counters.restarts_by_kind == {"crash": 1}
    await r.reach(S.READY)
    assert r.spawner.last is not first and r.mgr.view.gen == 2
    return r


async def plan_fails_at_start() -> Rig:
    r = Rig()
    r.prep.raises.append(PlanFailed("the model file vanished"))
    r.start()
    await r.reach(S.FAILED)
    assert "the model file vanished" in r.mgr.view.reason and not r.spawner.procs
    # FAILED -> STOPPED -> STARTING: a reload tries again.
    await r.mgr.reload()
    await r.reach(S.READY)
    return r


async def no_room_at_start_then_load() -> Rig:
    r = Rig()
    r.prep.raises.append(NoRoom("no GPU has room", 30))
    r.start()
    await r.reach(S.UNLOADED)
    assert r.mgr.view.reason == "not loaded: no GPU has room"
    await r.mgr.load()
    assert r.state is S.READY and r.mgr.view.swaps_in == 1
    return r


async def unloaded_load_refused_then_plan_fails_then_retired() -> Rig:
    r = Rig(unloaded=True).start()
    r.prep.raises.append(NoRoom("still no room", 30))
    with pytest.raises(NoRoom):
        await r.mgr.load()
    assert r.state is S.UNLOADED  # a refused load stays unloaded, saying why
    r.prep.raises.append(PlanFailed("bad file"))
    await r.mgr.load()
    assert r.state is S.FAILED
    await r.mgr.unload()  # FAILED -> UNLOADED
    assert r.state is S.UNLOADED
    await r.mgr.retire("model 'test' was removed from the configuration")  # UNLOADED -> RETIRED
    assert r.state is S.RETIRED
    await r.mgr.load()  # nothing loads a retired model
    assert r.state is S.RETIRED and not r.spawner.procs
    return r


async def exits_while_starting() -> Rig:
    r = Rig()
    r.spawner.modes.append("silent")
    r.start()
    await r.reach(S.STARTING)
    await r.until(lambda: bool(r.spawner.procs))
    r.spawner.last.exit(1)
    await r.reach(S.BACKOFF)
    return r


async def spawn_fails_then_gives_up() -> Rig:
    r = Rig(fast_config(give_up=True, max_failures=1))
    r.spawner.fail_next = OSError("no such file: python")
    r.start()
    await r.reach(S.BACKOFF)  # STARTING -> BACKOFF
    assert r.mgr.view.history.restarts_by_kind == (("start_error", 1),)
    r.spawner.fail_next = OSError("no such file: python")
    await r.reach(S.FAILED)  # STARTING -> FAILED: the budget of one is spent and give_up is on
    await r.mgr.retire("removed")  # FAILED -> RETIRED
    assert r.state is S.RETIRED
    return r


async def load_stalls() -> Rig:
    r = Rig()
    r.spawner.modes.append("loading")
    r.start()
    await r.reach(S.LOADING)
    await r.reach(S.BACKOFF, within_s=120)  # no progress for load_stall_timeout_s (30s)
    assert r.mgr.view.history.last_exit is not None and r.mgr.view.history.last_exit.kind == "load_stall"
    assert r.spawner.procs[0].killed_by_us
    return r


async def backoff_cut_short_by_shutdown() -> Rig:
    r = await Rig().ready()
    r.spawner.last.exit(1)
    await r.reach(S.BACKOFF)
    await r.shutdown()  # BACKOFF -> STOPPED
    assert r.state is S.STOPPED
    return r


async def backoff_then_plan_fails() -> Rig:
    r = await Rig().ready()
    r.prep.raises.append(PlanFailed("the model file vanished"))
    r.spawner.last.exit(1)
    await r.reach(S.FAILED)  # BACKOFF -> FAILED when the restart cannot be planned
    await r.mgr.unload()
    return r


async def backoff_unloaded_and_retired() -> Rig:
    r = await Rig().ready()
    r.spawner.last.exit(1)
    await r.reach(S.BACKOFF)
    await r.mgr.unload()  # BACKOFF -> UNLOADED
    assert r.state is S.UNLOADED
    await r.mgr.load()
    r.spawner.last.exit(1)
    await r.reach(S.BACKOFF)
    await r.mgr.retire("removed")  # BACKOFF -> RETIRED
    assert r.state is S.RETIRED
    return r


async def permanent_exit() -> Rig:
    r = await Rig().ready()
    r.spawner.last.exit(ExitCode.BAD_MODEL)
    await r.reach(S.FAILED)  # STOPPING -> FAILED: never retried
    assert r.mgr.view.history.last_exit is not None and r.mgr.view.history.last_exit.kind == "permanent"
    await r.mgr.reload()  # FAILED -> STOPPED -> STARTING
    await r.reach(S.READY)
    return r


async def ready_unloaded_and_retired() -> Rig:
    r = await Rig().ready()
    await r.mgr.unload()  # READY -> STOPPING -> UNLOADED, answered once the worker is gone
    assert r.state is S.UNLOADED and r.spawner.last.stopped
    await r.mgr.load()
    assert r.state is S.READY
    await r.mgr.retire("removed")  # READY -> STOPPING -> RETIRED
    assert r.state is S.RETIRED and r.spawner.last.stopped
    return r


SCENARIOS = [
    start_ready_shutdown,
    fast_ready_then_crash_and_restart,
    plan_fails_at_start,
    no_room_at_start_then_load,
    unloaded_load_refused_then_plan_fails_then_retired,
    exits_while_starting,
    spawn_fails_then_gives_up,
    load_stalls,
    backoff_cut_short_by_shutdown,
    backoff_then_plan_fails,
    backoff_unloaded_and_retired,
    permanent_exit,
    ready_unloaded_and_retired,
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda f: f.__name__)
def test_scenario(scenario: Callable[[], Awaitable[Rig]]) -> None:
    edges = run(scenario)
    for old, new in edges:
        assert new in TRANSITIONS[old]


def test_every_edge_of_the_table_is_taken() -> None:
    """Together the scenarios take every edge of states.py's table: an edge no code path
    takes is a bug in the table (STYLE.md)."""
    taken = set(itertools.chain.from_iterable(run(s) for s in SCENARIOS))
    table = {(a, b) for a, targets in TRANSITIONS.items() for b in targets}
    assert table - taken == set()


# ---- the OOM ladder, the crash loop, the health verdicts ---------------------------------


def test_oom_ladder_replans_smaller_from_the_first_plan() -> None:
    async def main() -> None:
        r = await Rig().ready()
        for step in (1, 2, 3):
            r.spawner.last.exit(ExitCode.OOM)
            await r.until(lambda step=step: len(r.prep.adjusts) == step + 1)
            await r.reach(S.READY)
            adjust = r.prep.adjusts[-1]
            assert adjust is not None and adjust.step == step
            assert r.mgr.view.history.adjust == adjust
        # OOMs re-plan instead of counting toward the crash loop; each waited for the memory.
        assert r.mgr.failure_streak() == 0 and r.prep.settled == 3
        assert r.mgr.view.history.last_exit is not None and r.mgr.view.history.last_exit.kind == FailureKind.OOM.value
        # A reload starts from the configured plan again.
        await r.mgr.reload()
        await r.reach(S.READY)
        assert r.prep.adjusts[-1] is None
        await r.shutdown()

    run_virtual(main)


def test_host_oom_kill_is_an_oom() -> None:
    async def main() -> None:
        r = await Rig().ready()
        r.spawner.last.host_oom = True
        r.spawner.last.exit(-signal.SIGKILL)
        await r.until(lambda: r.mgr.view.history.last_exit is not None)
        last = r.mgr.view.history.last_exit
        assert last is not None and last.kind == "oom" and "host OOM killer" in last.detail
        await r.shutdown()

    run_virtual(main)


def test_crash_loop_answers_at_once_and_counts_down() -> None:
    async def main() -> None:
        r = Rig().start()
        for _ in range(4):  # max_failures 3: the fourth failure spends the budget
            await r.reach(S.READY)
            r.spawner.last.exit(1)
            await r.reach(S.BACKOFF)
        v = r.mgr.view
        assert v.crash_loop and v.backoff is not None and v.backoff.delay_s == 8.0  # backoff_max_s
        with pytest.raises(NotReady) as info:
            await r.mgr.admission.acquire(30.0)
        assert "next attempt in" in info.value.reason and 1 <= info.value.retry_after_s <= 8
        assert r.mgr.snapshot().crash_loop
        # Up for stable_after_s (100s) clears the streak.
        await r.reach(S.READY)
        await r.until(lambda: r.mgr.failure_streak() == 0, within_s=300)
        assert not r.mgr.view.crash_loop
        await r.shutdown()

    run_virtual(main)


def test_failed_health_probes_and_a_token_stall_are_hangs() -> None:
    async def main() -> None:
        r = await Rig().ready()
        r.spawner.last.mode = "silent"  # health_failures 2
        await r.reach(S.BACKOFF, within_s=60)
        assert r.mgr.view.history.last_exit is not None and r.mgr.view.history.last_exit.kind == "hang"
        await r.reach(S.READY)
        r.spawner.last.mode = "stuck"  # 200, but no token for longer than token_stall_timeout_s
        await r.reach(S.BACKOFF, within_s=60)
        assert r.mgr.counters.restarts_by_kind == {"hang": 2}
        await r.shutdown()

    run_virtual(main)


def test_a_worker_that_ignores_sigterm_is_killed_after_the_deadline() -> None:
    async def main() -> None:
        r = await Rig().ready()
        r.spawner.last.ignore_term = True
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await r.mgr.unload()
        assert r.spawner.last.exited.result() == -9 and loop.time() - t0 >= 5.0  # stop_timeout_s
        await r.shutdown()

    run_virtual(main)


# ---- drains and admission -----------------------------------------------------------------


def test_reload_drains_the_requests_in_flight_first() -> None:
    async def main() -> None:
        r = await Rig().ready()
        adm = r.mgr.admission
        h = await r.take()
        old = r.spawner.last
        done = r.mgr.reload()
        await r.reach(S.STOPPING)
        assert "finishes 1 request(s) first" in r.mgr.view.reason and not old.exited.done()
        # A request arriving now waits for the next worker.
        adm.enter()
        later = asyncio.ensure_future(adm.acquire(60.0))
        await asyncio.sleep(3.0)
        assert not later.done() and not old.exited.done()
        r.done(h)
        await done
        h2 = await later
        assert h2.gen == h.gen + 1 and old.stopped and r.spawner.last is not old
        r.done(h2)
        assert (adm.in_flight, adm.ended, adm.waiting) == (0, 2, 0)
        await r.shutdown()

    run_virtual(main)


def test_drain_is_bounded_by_the_grace_period() -> None:
    async def main() -> None:
        r = await Rig().ready()
        h = await r.take()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await r.mgr.unload()  # the request never ends: stopped after shutdown.grace_s (20s)
        assert r.state is S.UNLOADED and 20.0 <= loop.time() - t0 < 30.0
        r.done(h)
        await r.shutdown()

    run_virtual(main)


def test_a_request_for_an_unloaded_model_loads_it_and_a_refusal_answers_it() -> None:
    async def main() -> None:
        r = Rig(unloaded=True).start()
        adm = r.mgr.admission
        r.prep.raises.append(NoRoom("model 'test' needs 2 GiB; held by a (pinned)", 30))
        with pytest.raises(NotReady) as info:
            await adm.acquire(30.0)
        assert info.value.retry_after_s == 30 and "held by a (pinned)" in info.value.reason
        h = await adm.acquire(30.0)  # the next request asks again, and this time there is room
        assert r.state is S.READY and h.gen == 2
        adm.release(h)
        await r.shutdown()

    run_virtual(main)


def test_slots_queue_in_order_and_the_queue_is_bounded() -> None:
    async def main() -> None:
        from supervisor.admission import QueueFull

        r = await Rig().ready()
        adm = r.mgr.admission
        first = await adm.acquire(5.0)  # the one slot (parallel 1)
        waiters = [asyncio.ensure_future(adm.acquire(60.0)) for _ in range(4)]  # queue_size 4
        await asyncio.sleep(0.1)
        assert adm.waiting == 4
        with pytest.raises(QueueFull):
            await adm.acquire(60.0)
        adm.release(first)
        got = await waiters[0]
        assert not any(w.done() for w in waiters[1:])
        adm.release(got)
        for w in waiters[1:]:
            adm.release(await w)
        assert adm.waiting == 0 and adm.active == 0
        await r.shutdown()

    run_virtual(main)


def test_idle_ttl_unloads_after_the_last_request_ends() -> None:
    async def main() -> None:
        r = Rig(ttl_s=50.0).start()
        await r.reach(S.READY)
        adm = r.mgr.admission
        loop = asyncio.get_running_loop()
        adm.enter()
        h = await adm.acquire(5.0)
        await asyncio.sleep(80.0)  # a long request: not idle
        assert r.state is S.READY
        r.done(h)
        t_end = loop.time()
        await r.reach(S.UNLOADED, within_s=120)
        assert loop.time() - t_end >= 50.0
        await r.shutdown()

    run_virtual(main)


def test_shutdown_refuses_waiting_requests_and_answers_every_command() -> None:
    async def main() -> None:
        r = Rig()
        r.spawner.modes.append("loading")
        r.start()
        await r.reach(S.LOADING)
        waiting = asyncio.ensure_future(r.mgr.admission.acquire(60.0))
        unload = r.mgr.unload()
        await asyncio.sleep(0)
        await r.shutdown()
        with pytest.raises(NotReady) as info:
            await waiting
        assert "shutting down" in info.value.reason
        assert unload.done() and r.state is S.UNLOADED  # the unload came first

    run_virtual(main)


def test_commands_cover_the_whole_vocabulary() -> None:
    # Every command the manager accepts is exercised above; this keeps the list honest.
    from supervisor.worker_process import _Cmd

    assert {c.value for c in _Cmd} == {"load", "unload", "reload", "retire", "shutdown"}

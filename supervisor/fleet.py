"""Several models under one supervisor: the model -> WorkerManager map and the one task
that decides and starts loads.

Rules of this module:
- One WorkerManager per model, each with today's lifecycle (state machine, restart backoff,
  OOM ladder, hang detection) and its own socket names: a crash of one model re-plans that
  model only.
- Every worker start of every model (first load, swap in, restart after a crash) asks the
  fleet's decision task for its Launch. That task is the only one that decides placements
  and starts loads, one at a time, so two loads never plan against the same free VRAM. It
  runs the pure placement (supervisor/placement.py), unloads what it says (idle models at
  once; busy ones after their requests finish, new ones held back meanwhile, bounded by
  admission.wait_timeout_s), then plans the start with the model's own Preparer.
- Free VRAM is what the probe reads minus what loads in progress will take
  (``AccountedProbe``). With simulated GPUs nothing real is allocated, so the planned
  footprint of every worker we run is subtracted while it lives: swaps happen in tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from supervisor.config import Config, ModelEntry
from supervisor.inventory import GpuProbe, Inventory
from supervisor.launch import Preparer
from supervisor.nvml import process_gpu_memory
from supervisor.placement import ModelInfo, Resident, place
from supervisor.planning import plan_settings
from supervisor.restart import PlanAdjust
from supervisor.states import PROCESS_STATES, WorkerState
from supervisor.worker_process import Launch, NoRoom, WorkerManager

log = logging.getLogger("vram_llm.fleet")

# How often an unload or an idle wait is checked, and the idle-TTL sweep runs.
POLL_S = 0.05
TTL_SWEEP_S = 1.0


def planned_mib(launch: Launch | None) -> dict[str, int]:
    """GPU UUID -> MiB the launch's plan puts there."""
    if launch is None:
        return {}
    out: dict[str, int] = {}
    for g in launch.plan.get("gpus") or []:
        if g.get("cuda_index") is not None and not g.get("excluded_reason") and g.get("planned_mib"):
            out[g["uuid"]] = int(g["planned_mib"])
    return out


class AccountedProbe:
    """The inventory the fleet and every preparer read: the probe's, less what loads in
    progress are about to take (for simulated GPUs: less what every live worker planned)."""

    def __init__(self, base: GpuProbe, fleet: Fleet, simulated: bool) -> None:
        self._base = base
        self._fleet = fleet
        self._simulated = simulated

    def read(self) -> Inventory:
        inv = self._base.read()
        taken = self._fleet.taken_mib(self._simulated)
        if not taken:
            return inv
        gpus = []
        for g in inv.gpus:
            t = min(taken.get(g.uuid, 0), g.free_mib)
            gpus.append(dataclasses.replace(g, free_mib=g.free_mib - t, used_mib=g.used_mib + t))
        return Inventory(tuple(gpus), inv.note)


@dataclass
class _Ask:
    model: str
    adjust: PlanAdjust | None
    socket_path: str
    done: asyncio.Future[Launch]


class _FleetPreparer:
    """What a model's WorkerManager calls to plan a start: a question to the fleet's task."""

    def __init__(self, fleet: Fleet, model: str) -> None:
        self._fleet = fleet
        self._model = model

    async def __call__(self, adjust: PlanAdjust | None, socket_path: str) -> Launch:
        return await self._fleet.ask(self._model, adjust, socket_path)

    async def wait_gpu_settled(self, timeout_s: float) -> None:
        await self._fleet.preparers[self._model].wait_gpu_settled(timeout_s)


class Fleet:
    def __init__(
        self,
        config: Config,
        entries: list[ModelEntry],
        runtime_dir: Path,
        base_probe: GpuProbe,
        reload_config: Callable[[], Config] | None = None,
        on_state: Callable[[str, WorkerState, str], None] | None = None,
        on_progress: Callable[[float], None] | None = None,
    ) -> None:
        self.ids = [e.id for e in entries]
        self.first = self.ids[0]
        self.probe = AccountedProbe(base_probe, self, simulated=bool(config.gpu.simulate_gpus))
        self.preparers: dict[str, Preparer] = {}
        self.managers: dict[str, WorkerManager] = {}
        self._planned: dict[str, dict[str, int]] = {}  # model -> GPU UUID -> MiB of its current start
        self._measured: dict[str, dict[str, int]] = {}  # model -> GPU UUID -> MiB NVML measured
        self._starting: set[str] = set()  # a Launch handed out, the worker not started yet
        self._asks: asyncio.Queue[_Ask] = asyncio.Queue()
        self._waiting: set[asyncio.Future[Launch]] = set()  # asks not answered yet
        self._stopping = False
        self.swaps = 0  # evictions made to load another model
        several = len(entries) > 1
        for e in entries:
            prep = Preparer(config, reload_config, model_id=e.id, probe=self.probe)
            self.preparers[e.id] = prep
            mdir = runtime_dir / e.id if several else runtime_dir
            mdir.mkdir(mode=0o700, exist_ok=True)

            def state_cb(state: WorkerState, reason: str, mid: str = e.id) -> None:
                if state is not WorkerState.STOPPED:
                    self._starting.discard(mid)
                if on_state is not None:
                    on_state(mid, state, reason)

            self.managers[e.id] = WorkerManager(
                config=lambda p=prep: p.config,  # type: ignore[misc]
                prepare=_FleetPreparer(self, e.id),
                runtime_dir=mdir,
                on_state=state_cb,
                on_progress=on_progress,
                # The first model, pinned and preloaded ones start at once; the others on demand.
                parked=several and not (e.preload or e.pinned) and e.id != self.first,
                name=f"model {e.id}",
            )

    # ---- read side -------------------------------------------------------------

    def entry(self, mid: str) -> ModelEntry:
        return self.preparers[mid].entry

    def taken_mib(self, simulated: bool) -> dict[str, int]:
        """GPU UUID -> MiB the probe does not show yet but our workers hold or will hold."""
        out: dict[str, int] = {}
        for mid, mgr in self.managers.items():
            if mgr.state not in PROCESS_STATES and mid not in self._starting:
                continue
            if not simulated and mgr.state in (WorkerState.READY, WorkerState.STOPPING):
                continue  # loaded: NVML's reading already shows what it holds
            planned = self._planned.get(mid, {})
            measured = {} if simulated else self._measured.get(mid, {})
            for uuid, mib in planned.items():
                left = mib - measured.get(uuid, 0)
                if left > 0:
                    out[uuid] = out.get(uuid, 0) + left
        return out

    def footprint(self, mid: str) -> tuple[dict[str, int], dict[str, int]]:
        """(planned, measured) GPU UUID -> MiB of the model's current worker."""
        return dict(self._planned.get(mid, {})), dict(self._measured.get(mid, {}))

    def ready_for_health(self) -> tuple[bool, str]:
        """/health: every model loaded at start is ready: the first one (it answers requests
        without "model") and every pinned or preloaded one; the reason names one that is not."""
        must = [m for m in self.ids if m == self.first or self.entry(m).pinned or self.entry(m).preload]
        for m in must:
            mgr = self.managers[m]
            if mgr.state is not WorkerState.READY:
                return False, f"model {m}: {mgr.state.value}: {mgr.reason}"
        return True, "ok"

    @property
    def in_flight(self) -> int:
        return sum(m.counters.in_flight for m in self.managers.values())

    # ---- commands ----------------------------------------------------------------

    def load(self, mid: str) -> None:
        self.managers[mid].request_load()

    def unload(self, mid: str) -> None:
        self.managers[mid].request_unload()

    def request_reload(self) -> None:
        for prep in self.preparers.values():
            try:
                prep.reload()
            except Exception as e:  # noqa: BLE001 - a bad new config keeps the old one
                log.error("reload: keeping the previous configuration: %s", e)
        for mgr in self.managers.values():
            if not mgr.parked:
                mgr.request_reload()

    def request_shutdown(self) -> None:
        # A start waiting for room (perhaps for another model to go idle) must not hold the
        # shutdown up: it is answered "no room" now and its manager sees the shutdown.
        self._stopping = True
        for fut in list(self._waiting):
            if not fut.done():
                fut.set_exception(NoRoom("the server is shutting down"))
        for mgr in self.managers.values():
            mgr.request_shutdown()

    async def ask(self, mid: str, adjust: PlanAdjust | None, socket_path: str) -> Launch:
        if self._stopping:
            raise NoRoom("the server is shutting down")
        fut: asyncio.Future[Launch] = asyncio.get_running_loop().create_future()
        self._waiting.add(fut)
        fut.add_done_callback(self._waiting.discard)
        await self._asks.put(_Ask(mid, adjust, socket_path, fut))
        return await fut

    # ---- the tasks -----------------------------------------------------------------

    async def run(self) -> None:
        """Every manager's lifecycle, the decision task and the idle-TTL sweep. Returns when
        every manager has stopped (after request_shutdown)."""
        helpers = [asyncio.create_task(self._decide_loop(), name="fleet-decide")]
        if len(self.ids) > 1:
            helpers.append(asyncio.create_task(self._ttl_loop(), name="fleet-ttl"))
        try:
            await asyncio.gather(*(m.run() for m in self.managers.values()))
        finally:
            for t in helpers:
                t.cancel()
            for t in helpers:
                with contextlib.suppress(BaseException):
                    await t

    async def _decide_loop(self) -> None:
        while True:
            ask = await self._asks.get()
            try:
                launch = await self._decide(ask)
            except BaseException as e:
                if not ask.done.done():
                    ask.done.set_exception(e)
                if not isinstance(e, Exception):
                    raise
            else:
                if not ask.done.done():
                    ask.done.set_result(launch)
                else:  # the manager stopped asking (shutdown): nothing will start
                    self._starting.discard(ask.model)

    async def _decide(self, ask: _Ask) -> Launch:
        mid = ask.model
        prep = self.preparers[mid]
        cfg = prep.config
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.admission.wait_timeout_s
        while True:
            if self._stopping or ask.done.done():
                raise NoRoom("the server is shutting down")
            await self._measure()
            inv = await asyncio.to_thread(self.probe.read)
            models = {
                m: ModelInfo(
                    m,
                    p.facts,
                    plan_settings(p.config, None, ask.adjust if m == mid else None, entry=p.entry),
                    pinned=p.entry.pinned,
                    refuse_when_no_room=p.entry.when_no_room == "refuse",
                )
                for m, p in self.preparers.items()
            }
            d = place(inv.gpus, models, self._residents(mid), mid)
            if d.refusal is not None:
                log.warning("model %s not loaded: %s", mid, d.refusal)
                raise NoRoom(d.refusal, 30)
            if d.evict:
                log.info("to load model %s: unloading idle model(s) %s", mid, ", ".join(d.evict))
                for e in d.evict:
                    await self._unload_now(e)
                    self.swaps += 1
                continue
            if d.wait_for:
                left = deadline - loop.time()
                names = ", ".join(d.wait_for)
                if left <= 0:
                    raise NoRoom(f"model {mid!r} needs the GPU memory of {names}, which stayed busy", 5)
                log.info("to load model %s: waiting (up to %.0fs) for %s to finish its requests", mid, left, names)
                idle = await self._drain(d.wait_for, deadline)
                if not idle:
                    raise NoRoom(
                        f"model {mid!r} needs the GPU memory of {names}, still busy after "
                        f"{cfg.admission.wait_timeout_s:g}s",
                        5,
                    )
                for e in d.wait_for:
                    await self._unload_now(e)
                    self.swaps += 1
                continue
            # Room: plan the start itself with the model's preparer (llama-fit-params,
            # the OOM ladder, the logged plan) on the accounted inventory.
            # Its previous start's footprint is gone (it has no worker now): the plan must
            # not count it against itself.
            self._planned.pop(mid, None)
            self._starting.add(mid)
            try:
                launch = await prep(ask.adjust, ask.socket_path)
            except BaseException:
                self._starting.discard(mid)
                raise
            self._planned[mid] = planned_mib(launch)
            self._measured.pop(mid, None)
            return launch

    def _residents(self, exclude: str) -> list[Resident]:
        out = []
        for mid, mgr in self.managers.items():
            if mid == exclude or (mgr.state not in PROCESS_STATES and mid not in self._starting):
                continue
            planned = self._planned.get(mid, {})
            measured = self._measured.get(mid, {})
            ready = mgr.state is WorkerState.READY
            out.append(
                Resident(
                    mid,
                    measured if ready and measured else planned,
                    last_used=mgr.last_used,
                    busy=mgr.counters.in_flight > 0,  # answering, or requests waiting for it
                    loading=not ready,
                )
            )
        return out

    async def _measure(self) -> None:
        """NVML's per-process memory of every running worker replaces its planned footprint
        (not with simulated GPUs: nothing is allocated there)."""
        if self.probe._simulated:
            return
        pids: dict[str, int] = {}
        for mid, mgr in self.managers.items():
            h = mgr.last_health()
            if h is not None:
                pids[mid] = h[0]
        if not pids:
            return

        def read() -> dict[str, dict[str, int]]:
            return {mid: process_gpu_memory([pid]) for mid, pid in pids.items()}

        got = await asyncio.to_thread(read)
        for mid, used in got.items():
            if used:
                self._measured[mid] = used

    async def _drain(self, mids: tuple[str, ...], deadline: float) -> bool:
        """Let these models finish before they are unloaded (until ``deadline``): a load in
        progress completes and serves the requests that were waiting for it, then new
        requests are held back while the ones in flight finish. False (and the hold lifted)
        if they did not in time. Serving the waiting ones first is what keeps two models
        that need the same memory from unloading each other before either answers."""
        loop = asyncio.get_running_loop()
        targets: dict[str, int] = {}

        def gone(m: str) -> bool:
            return self.managers[m].state not in PROCESS_STATES

        def served_its_queue(m: str) -> bool:
            mgr = self.managers[m]
            if gone(m):
                return True
            if m not in targets and mgr.state is WorkerState.READY:
                targets[m] = mgr.counters.served + mgr.counters.in_flight
            return m in targets and (mgr.counters.served >= targets[m] or mgr.counters.in_flight == 0)

        while not all(served_its_queue(m) for m in mids):
            if loop.time() >= deadline or self._stopping:
                return False
            await asyncio.sleep(POLL_S)
        for m in mids:
            self.managers[m].hold_new(True)
        while loop.time() < deadline and not self._stopping:
            if all(gone(m) or self.managers[m].active == 0 for m in mids):
                return True
            await asyncio.sleep(POLL_S)
        for m in mids:
            self.managers[m].hold_new(False)
        return False

    async def _unload_now(self, mid: str) -> None:
        mgr = self.managers[mid]
        parks = mgr.parks
        mgr.request_unload()
        # The manager drains (nothing is in flight by now) and stops its worker, bounded by
        # worker.stop_timeout_s (then killed); wait for it to say it is parked.
        cfg = self.preparers[mid].config
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.shutdown.grace_s + 2 * cfg.worker.stop_timeout_s + 5
        # A request waiting for it may ask it to load again at once: count the unload, do
        # not wait to see it parked.
        while mgr.parks == parks:
            if loop.time() > deadline or self._stopping:
                raise NoRoom(f"model {mid!r} did not stop in time to make room", 5)
            await asyncio.sleep(POLL_S)
        self._planned.pop(mid, None)
        self._measured.pop(mid, None)

    async def _ttl_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(TTL_SWEEP_S)
            now = loop.time()
            for mid, mgr in self.managers.items():
                ttl = self.entry(mid).ttl_s
                if (
                    ttl > 0
                    and mgr.state is WorkerState.READY
                    and not self.entry(mid).pinned
                    and mgr.counters.in_flight == 0
                    and now - max(mgr.last_used, mgr.ready_since or 0.0) >= ttl
                ):
                    log.info("model %s idle for %.0fs (ttl_s %g): unloading", mid, now - mgr.last_used, ttl)
                    mgr.request_unload()


def status_rows(fleet: Fleet) -> list[dict[str, Any]]:
    """One row per model for /v1/models and /status."""
    rows = []
    now = asyncio.get_running_loop().time()
    for mid in fleet.ids:
        mgr = fleet.managers[mid]
        planned, measured = fleet.footprint(mid)
        loaded = mgr.state in PROCESS_STATES
        rows.append(
            {
                "id": mid,
                "state": mgr.state.value if not (mgr.parked and mgr.state is WorkerState.STOPPED) else "unloaded",
                "reason": mgr.reason,
                "loaded": mgr.state is WorkerState.READY,
                "pinned": fleet.entry(mid).pinned,
                "planned_mib": planned if loaded else {},
                "measured_mib": measured if loaded else {},
                "restarts": mgr.counters.restarts_total,
                "swaps_in": mgr.swaps_in,
                "in_flight": mgr.counters.in_flight,
                "idle_s": round(now - mgr.last_used, 1) if mgr.last_used else None,
            }
        )
    return rows

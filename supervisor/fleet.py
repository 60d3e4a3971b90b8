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
- SIGHUP changes the model list (``request_reload``): the configuration is read once and
  every model of it staged before anything changes (a bad one changes nothing). ``ids`` is
  what requests may name; a removed model leaves it at once but keeps its manager (in
  ``managers``, ``all_ids``) until its requests finished and its worker is gone; which
  models restart is the pure ``list_change``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import shutil
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from supervisor.config import Config, ModelEntry, ModelSection, resolved_models
from supervisor.inventory import GpuProbe, Inventory
from supervisor.launch import SETTLE_TOLERANCE_MIB, Preparer, default_entry_path
from supervisor.nvml import process_gpu_memory
from supervisor.placement import ModelInfo, Resident, place
from supervisor.planning import plan_settings
from supervisor.restart import PlanAdjust
from supervisor.states import PROCESS_STATES, WorkerState
from supervisor.worker_process import Launch, NoRoom, PlanFailed, WorkerManager

log = logging.getLogger("vram_llm.fleet")

# How often an unload or an idle wait is checked, and the idle-TTL sweep runs.
POLL_S = 0.05
TTL_SWEEP_S = 1.0
FREED_POLL_S = 0.1  # how often NVML is read while an unloaded model's memory comes back


# A worker's socket is <runtime dir>/vram-llm-XXXXXXXX/<model dir>/worker-<gen>.sock and a
# Unix socket path holds at most 107 bytes (the worker refuses a longer one): a model's
# directory name is bounded, whatever the length of its id.
MODEL_DIR_MAX = 24


def model_dir_name(mid: str) -> str:
    """The directory of a model's sockets: its id when short (ids are [A-Za-z0-9._:@+-]),
    else its head and a hash of the whole, so long ids (a --models-dir file stem) fit."""
    if len(mid) <= MODEL_DIR_MAX:
        return mid
    return f"{mid[:MODEL_DIR_MAX - 9]}-{hashlib.sha1(mid.encode()).hexdigest()[:8]}"


def planned_mib(launch: Launch | None) -> dict[str, int]:
    """GPU UUID -> MiB the launch's plan puts there."""
    if launch is None:
        return {}
    out: dict[str, int] = {}
    for g in launch.plan.get("gpus") or []:
        if g.get("cuda_index") is not None and not g.get("excluded_reason") and g.get("planned_mib"):
            out[g["uuid"]] = int(g["planned_mib"])
    return out


@dataclass(frozen=True)
class ListChange:
    """What a SIGHUP does to the model list."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    restart: tuple[str, ...]  # loaded models that restart (drained first) with the new settings


def list_change(
    old: Mapping[str, ModelEntry],
    new: Mapping[str, ModelEntry],
    *,
    shared_same: bool,
    loaded: Collection[str],
    failed: Collection[str] = (),
) -> ListChange:
    """PURE: the models of ``new`` that are not in ``old`` are added, those of ``old`` not in
    ``new`` removed. A SIGHUP that leaves the list alone restarts every loaded model, as
    before the list existed (it is also how a model file replaced in place is picked up);
    one that adds or removes models restarts only the loaded models whose entry or the
    shared settings changed, and failed ones (SIGHUP is how a failed model is retried)."""
    added = tuple(m for m in new if m not in old)
    removed = tuple(m for m in old if m not in new)
    same_list = not (added or removed)
    restart = tuple(
        m
        for m in new
        if m in old and m in loaded and (same_list or not shared_same or old[m] != new[m] or m in failed)
    )
    return ListChange(added, removed, restart)


def _shared(cfg: Config) -> Config:
    """The settings every model shares (the model list left out): when they change on
    SIGHUP, every loaded model restarts."""
    return msgspec.structs.replace(cfg, models=[], models_dir="", model=ModelSection())


class AccountedProbe:
    """The inventory the fleet and every preparer read: the probe's, less what loads in
    progress are about to take (for simulated GPUs: less what every live worker planned)."""

    def __init__(self, base: GpuProbe, fleet: Fleet, simulated: bool) -> None:
        self.base = base  # the probe's own reading, without the accounting
        self._fleet = fleet
        self.simulated = simulated

    def read(self) -> Inventory:
        inv = self.base.read()
        taken = self._fleet.taken_mib(self.simulated)
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
        self.config = config  # the configuration in force (SIGHUP replaces it only when valid)
        self.ids = [e.id for e in entries]  # the models requests may name, in config order
        self.first = self.ids[0]
        self._first_at_start = self.first  # /health: the model loaded at start without preload
        self.probe = AccountedProbe(base_probe, self, simulated=bool(config.gpu.simulate_gpus))
        self.preparers: dict[str, Preparer] = {}
        self.managers: dict[str, WorkerManager] = {}  # every model with a manager, removed ones draining too
        self._runtime_dir = runtime_dir
        self._reload_config = reload_config
        self._on_state = on_state
        self._on_progress = on_progress
        self._dirs: dict[str, Path] = {}  # model -> the directory of its sockets
        self._tasks: dict[str, asyncio.Task[None]] = {}  # model -> its manager's run() (once running)
        self._tasks_changed = asyncio.Event()
        self._running = False
        self._retiring: dict[str, asyncio.Task[None]] = {}  # removed by SIGHUP, its worker not gone yet
        self._readd: dict[str, Preparer] = {}  # retiring, but listed again: added once gone
        self._planned: dict[str, dict[str, int]] = {}  # model -> GPU UUID -> MiB of its current start
        self._measured: dict[str, dict[str, int]] = {}  # model -> GPU UUID -> MiB NVML measured
        self._starting: set[str] = set()  # a Launch handed out, the worker not started yet
        self._ready_once: set[str] = set()  # models that have been ready at least once (/health)
        self.removed_ids: set[str] = set()  # removed by SIGHUP and not listed again: 404 even with one model left
        self._asks: asyncio.Queue[_Ask] = asyncio.Queue()
        self._waiting: dict[asyncio.Future[Launch], str] = {}  # asks not answered yet -> their model
        self._stopping = False
        self.swaps = 0  # evictions made to load another model
        several = len(entries) > 1
        for e in entries:
            # One model keeps its sockets in the runtime dir itself, as before several existed.
            self._add(
                Preparer(config, reload_config, model_id=e.id, probe=self.probe),
                runtime_dir / model_dir_name(e.id) if several else runtime_dir,
                # The first model, pinned and preloaded ones start at once; the others on demand.
                parked=several and not (e.preload or e.pinned) and e.id != self.first,
            )

    def _add(self, prep: Preparer, mdir: Path, parked: bool) -> None:
        mid = prep.entry.id
        mdir.mkdir(mode=0o700, exist_ok=True)
        on_state = self._on_state

        def state_cb(state: WorkerState, reason: str) -> None:
            if state is not WorkerState.STOPPED:
                self._starting.discard(mid)
            if state is WorkerState.READY:
                self._ready_once.add(mid)
            if on_state is not None:
                on_state(mid, state, reason)

        self.preparers[mid] = prep
        self._dirs[mid] = mdir
        self.managers[mid] = WorkerManager(
            config=lambda: prep.config,
            prepare=_FleetPreparer(self, mid),
            runtime_dir=mdir,
            on_state=state_cb,
            on_progress=self._on_progress,
            parked=parked,
            name=f"model {mid}",
        )
        if self._running:
            self._start_task(mid)

    def _parks_when_added(self, entry: ModelEntry) -> bool:
        """A model added by SIGHUP loads on demand unless it would have loaded at start."""
        return not (entry.preload or entry.pinned or entry.id == self.first)

    def _start_task(self, mid: str) -> None:
        self._tasks[mid] = asyncio.create_task(self.managers[mid].run(), name=f"worker-manager {mid}")
        self._tasks_changed.set()

    # ---- read side -------------------------------------------------------------

    @property
    def all_ids(self) -> list[str]:
        """Every model with a manager: the configured ones, then removed ones still draining."""
        return [*self.ids, *(m for m in self._retiring if m not in self.ids)]

    @property
    def fallback(self) -> str | None:
        """The model that answers a request naming no configured model: the only one, when
        there is one (a one-model server serves any name, as it always did); none with
        several (an unknown id is a 404). The router keeps ids SIGHUP removed a 404."""
        return self.ids[0] if len(self.ids) == 1 else None

    def entry(self, mid: str) -> ModelEntry:
        return self.preparers[mid].entry

    def taken_mib(self, simulated: bool) -> dict[str, int]:
        """GPU UUID -> MiB the probe does not show yet but our workers hold or will hold."""
        out: dict[str, int] = {}
        # Called from a worker thread (the probe read) while SIGHUP may change the map: a
        # snapshot (list() of a dict is one step under the GIL) is iterated, not the dict.
        for mid, mgr in list(self.managers.items()):
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
        """/health with several models: the supervisor serves, every pinned model is ready
        now (pinned models are never unloaded, so one that is not ready is down), and every
        model loaded at start (the first of the list at start, every preloaded one) has been
        ready once: after that, one unloaded to make room or by its ttl_s is loaded again on
        demand, which is normal service, not a reason to leave a load balancer's rotation.
        The reason names a model that is not."""
        for m in list(self.ids):
            mgr, prep = self.managers.get(m), self.preparers.get(m)
            if mgr is None or prep is None:
                continue  # re-listed while its previous worker drains: added once it is gone
            e = prep.entry
            if e.pinned and mgr.state is not WorkerState.READY:
                return False, f"model {m} (pinned): {mgr.state.value}: {mgr.reason}"
            if (e.preload or m == self._first_at_start) and m not in self._ready_once:
                return False, f"model {m} (loaded at start): {mgr.state.value}: {mgr.reason}"
        return True, "ok"

    @property
    def in_flight(self) -> int:
        return sum(m.counters.in_flight for m in self.managers.values())

    # ---- commands ----------------------------------------------------------------

    def load(self, mid: str) -> None:
        self.managers[mid].request_load()

    def unload(self, mid: str) -> None:
        self.managers[mid].request_unload()

    def request_reload(self) -> Config | None:
        """SIGHUP: read the configuration once and apply it to the model list. A bad one
        (unreadable, invalid, a model file that cannot be read) changes nothing: the loaded
        models restart with the configuration they had, as before the list existed.
        Returns the configuration read when it was valid, even if a model of it was not (the
        API keys follow it: a revoked key must stop working whatever else failed)."""
        config: Config | None = None
        if self._stopping:
            log.warning("SIGHUP: ignored, the server is shutting down")
            return None
        try:
            if self._reload_config is None:
                raise ValueError("no configuration to re-read")
            config = self._reload_config()
            entries = resolved_models(config, default_entry_path)
            # Every model of the new list must be plannable before anything changes.
            staged = {e.id: Preparer(config, self._reload_config, model_id=e.id, probe=self.probe) for e in entries}
        except Exception as e:  # noqa: BLE001 - a bad new config keeps the old one
            log.error("SIGHUP: keeping the previous configuration: %s", e)
            for mid in self.ids:
                if not self.managers[mid].parked:
                    self.managers[mid].request_reload()
            return config
        self._apply(config, staged)
        return config

    def _apply(self, config: Config, staged: dict[str, Preparer]) -> None:
        old_ids = list(self.ids)
        change = list_change(
            {m: self.preparers[m].entry for m in old_ids if m not in self._readd},
            {m: p.entry for m, p in staged.items()},
            shared_same=_shared(self.config) == _shared(config),
            loaded={m for m in old_ids if m not in self._readd and not self.managers[m].parked},
            failed={m for m in old_ids if m not in self._readd and self.managers[m].state is WorkerState.FAILED},
        )
        self.config = config
        self.ids = list(staged)
        self.first = self.ids[0]
        # Ids a client could have picked among several: still a 404 once one model is left.
        # (One model whose id changes, a new file for [model], is not "several": any name
        # is served, as a one-model server always did.)
        picked = set(old_ids) if len(old_ids) > 1 else set()
        self.removed_ids = (self.removed_ids | picked) - set(self.ids)
        for mid in self.ids:
            if mid in self._readd:  # its previous worker still drains: added later, as now configured
                self._readd[mid] = staged[mid]
            elif mid in old_ids:
                try:
                    self.preparers[mid].reload(config)
                except Exception as e:  # noqa: BLE001 - its file changed since it was staged
                    log.error("SIGHUP: model %s keeps its previous configuration: %s", mid, e)
        for mid in change.restart:
            self.managers[mid].request_reload()
        draining = []
        for mid in change.removed:
            n = self.managers[mid].active
            draining.append(f"{mid} (draining {n} request(s))" if n else mid)
            self._retire(mid)
        for mid in change.added:
            if mid in self.managers:  # removed earlier and still draining: added once it is gone
                log.warning("SIGHUP: model %s is added again once its previous worker has stopped", mid)
                self._readd[mid] = staged[mid]
                continue
            self._add(staged[mid], self._runtime_dir / model_dir_name(mid), parked=self._parks_when_added(staged[mid].entry))
        if self.first != old_ids[0] and self.managers[self.first].parked:
            self.managers[self.first].request_load()  # the first is loaded, as at start
        log.warning(
            "SIGHUP: models added: %s; removed: %s; restarting: %s; first (no \"model\" field): %s",
            ", ".join(change.added) or "none",
            ", ".join(draining) or "none",
            ", ".join(change.restart) or "none",
            self.first,
        )

    def _retire(self, mid: str) -> None:
        """A model removed by SIGHUP: new requests are not routed to it (it left ``ids``),
        those waiting for it are refused, its load (if one waits for room) is called off,
        and the ones it answers finish before its worker stops."""
        reason = f"model {mid!r} was removed from the configuration"
        self.managers[mid].retire(reason)
        for fut, m in list(self._waiting.items()):
            if m == mid and not fut.done():
                fut.set_exception(NoRoom(reason))
        self._retiring[mid] = asyncio.create_task(self._retired(mid), name=f"retire {mid}")

    async def _retired(self, mid: str) -> None:
        """Wait for the removed model's manager to park (its drain is bounded by
        shutdown.grace_s, its stop by worker.stop_timeout_s), end it, forget it."""
        mgr, cfg = self.managers[mid], self.preparers[mid].config
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.shutdown.grace_s + 2 * cfg.worker.stop_timeout_s + 5
        while not mgr.parked and loop.time() < deadline and not self._stopping:
            await asyncio.sleep(POLL_S)
        mgr.request_shutdown()
        task = self._tasks.get(mid)
        if task is not None:
            with contextlib.suppress(Exception):
                await task
        # No await from here to the re-add below: a request never finds the id without a manager.
        self.managers.pop(mid)
        self.preparers.pop(mid)
        self._tasks.pop(mid, None)
        self._retiring.pop(mid, None)
        self._planned.pop(mid, None)
        self._measured.pop(mid, None)
        self._starting.discard(mid)
        mdir = self._dirs.pop(mid)
        if mdir != self._runtime_dir:  # one model at start: the runtime dir is everyone's
            shutil.rmtree(mdir, ignore_errors=True)
        self._tasks_changed.set()
        log.info("model %s removed: its worker is gone and its sockets with it", mid)
        prep = self._readd.pop(mid, None)
        if prep is not None and mid in self.ids:  # added again while it drained
            # Even while shutting down: a listed id always has a manager (routing, /status).
            self._add(prep, self._runtime_dir / model_dir_name(mid),
                      parked=self._stopping or self._parks_when_added(prep.entry))
            if self._stopping:
                self.managers[mid].request_shutdown()
            else:
                log.info("model %s added again", mid)

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
        self._waiting[fut] = mid
        fut.add_done_callback(lambda f: self._waiting.pop(f, None))
        await self._asks.put(_Ask(mid, adjust, socket_path, fut))
        return await fut

    # ---- the tasks -----------------------------------------------------------------

    async def run(self) -> None:
        """Every manager's lifecycle (models added by SIGHUP too), the decision task and the
        idle-TTL sweep. Returns when every manager has stopped (after request_shutdown)."""
        helpers = [
            asyncio.create_task(self._decide_loop(), name="fleet-decide"),
            asyncio.create_task(self._ttl_loop(), name="fleet-ttl"),
        ]
        self._running = True
        for mid in self.managers:
            self._start_task(mid)
        try:
            while self._tasks:
                self._tasks_changed.clear()
                changed = asyncio.ensure_future(self._tasks_changed.wait())
                try:
                    done, _ = await asyncio.wait(
                        {changed, *self._tasks.values()}, return_when=asyncio.FIRST_COMPLETED
                    )
                finally:
                    changed.cancel()
                for mid, t in list(self._tasks.items()):
                    if t in done:
                        del self._tasks[mid]
                        t.result()  # a manager that failed is a bug: say so
        finally:
            for t in [*helpers, *self._retiring.values(), *self._tasks.values()]:
                t.cancel()
            for t in [*helpers, *self._retiring.values(), *self._tasks.values()]:
                with contextlib.suppress(BaseException):
                    await t

    async def _decide_loop(self) -> None:
        while True:
            ask = await self._asks.get()
            try:
                launch = await self._decide(ask)
            except BaseException as e:
                if isinstance(e, Exception) and not isinstance(e, (NoRoom, PlanFailed)):
                    # A GPU probe that fails (a bad simulated inventory, an NVML error) fails
                    # this start as a plan failure would; it must not end the manager, or
                    # the decision task that every later load waits for.
                    log.error("model %s: cannot plan its start: %r", ask.model, e, exc_info=e)
                    e = PlanFailed(f"cannot plan the start: {e}")
                self._starting.discard(ask.model)
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
        if self._stopping or ask.done.done():  # shutting down, or the model was removed
            raise NoRoom("the server is shutting down")
        if mid not in self.ids:  # removed by SIGHUP while its start waited in line
            raise NoRoom(f"model {mid!r} was removed from the configuration", 5)
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
                    victim = self.managers.get(e)
                    if victim is not None and victim.counters.in_flight > 0:
                        break  # a request reached it while an earlier one stopped: place again
                    if await self._unload_now(e):
                        self.swaps += 1
                continue
            if d.wait_for:
                left = deadline - loop.time()
                names = ", ".join(d.wait_for)
                if left <= 0:
                    raise NoRoom(f"model {mid!r} needs the GPU memory of {names}, which stayed busy", 5)
                log.info("to load model %s: waiting (up to %.0fs) for %s to finish its requests", mid, left, names)
                try:
                    idle = await self._drain(d.wait_for, deadline)
                    if not idle:
                        raise NoRoom(
                            f"model {mid!r} needs the GPU memory of {names}, still busy after "
                            f"{cfg.admission.wait_timeout_s:g}s",
                            5,
                        )
                    for e in d.wait_for:
                        if await self._unload_now(e):
                            self.swaps += 1
                finally:
                    # Whatever happened, no model stays held back (parking lifts it too).
                    for e in d.wait_for:
                        if e in self.managers:
                            self.managers[e].hold_new(False)
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
        if self.probe.simulated:
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
            if used and mid in self.managers:  # not removed meanwhile
                self._measured[mid] = used

    async def _drain(self, mids: tuple[str, ...], deadline: float) -> bool:
        """Let these models finish before they are unloaded (until ``deadline``): a load in
        progress completes and serves the requests that were waiting for it, then new
        requests are held back while the ones in flight finish. False (the caller lifts the hold)
        if they did not in time. Serving the waiting ones first is what keeps two models
        that need the same memory from unloading each other before either answers."""
        loop = asyncio.get_running_loop()
        targets: dict[str, int] = {}

        def gone(m: str) -> bool:
            mgr = self.managers.get(m)  # None: removed by SIGHUP meanwhile
            return mgr is None or mgr.state not in PROCESS_STATES

        def served_its_queue(m: str) -> bool:
            mgr = self.managers.get(m)
            if mgr is None or gone(m):
                return True
            if m not in targets and mgr.state is WorkerState.READY:
                # Every request here now has left (answered, failed or gone) once ``ended``
                # reaches this: ``served`` alone would wait forever for one that failed.
                targets[m] = mgr.counters.ended + mgr.counters.in_flight
            return m in targets and (mgr.counters.ended >= targets[m] or mgr.counters.in_flight == 0)

        while not all(served_its_queue(m) for m in mids):
            if loop.time() >= deadline or self._stopping:
                return False
            await asyncio.sleep(POLL_S)
        for m in mids:
            if not gone(m):  # a model already gone has nothing to drain: never hold it
                self.managers[m].hold_new(True)
        while loop.time() < deadline and not self._stopping:
            if all(gone(m) or self.managers[m].active == 0 for m in mids):
                return True
            await asyncio.sleep(POLL_S)
        return False  # the caller lifts the hold

    async def _unload_now(self, mid: str) -> bool:
        """Unload ``mid`` and wait until it is parked; False when there was nothing to
        unload (removed, already parked, or no worker and none starting)."""
        mgr = self.managers.get(mid)
        if mgr is None:  # removed by SIGHUP meanwhile: its worker is gone
            return False
        if mgr.parked or (mgr.state not in PROCESS_STATES and mid not in self._starting):
            # Already unloaded (an operator's unload, an idle TTL, a drain that ended): its
            # memory is free and a parked manager would ignore the command.
            self._planned.pop(mid, None)
            self._measured.pop(mid, None)
            return False
        parks = mgr.parks
        planned, measured = self._planned.get(mid, {}), self._measured.get(mid, {})
        held = measured or planned
        before = None if self.probe.simulated or not held else await asyncio.to_thread(self.probe.base.read)
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
        if before is not None:
            await self._wait_freed(mid, held, before, cfg.restart.oom_settle_timeout_s)
        return True

    async def _wait_freed(self, mid: str, held: Mapping[str, int], before: Inventory, timeout_s: float) -> None:
        """Real GPUs: the driver hands a stopped worker's memory back shortly after it exits.
        Until NVML's free shows it, the next placement would take it for memory someone else
        holds and unload more models (or offload partially): wait for it, bounded."""
        was = {g.uuid: g.free_mib for g in before.gpus}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            now = {g.uuid: g.free_mib for g in (await asyncio.to_thread(self.probe.base.read)).gpus}
            if all(now.get(u, 0) - was[u] >= mib - SETTLE_TOLERANCE_MIB for u, mib in held.items() if u in was):
                return
            if loop.time() >= deadline or self._stopping:
                log.warning("model %s unloaded, but NVML does not show its memory free after %.0fs; "
                            "placing with what is free now", mid, timeout_s)
                return
            await asyncio.sleep(FREED_POLL_S)

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


def shown_state(state: WorkerState, parked: bool) -> str:
    """The state /status and /v1/models show: a parked (unloaded) model is "unloaded"."""
    return "unloaded" if parked and state is WorkerState.STOPPED else state.value


def status_rows(fleet: Fleet) -> list[dict[str, Any]]:
    """One row per model for /v1/models and /status."""
    rows = []
    now = asyncio.get_running_loop().time()
    for mid in fleet.all_ids:
        mgr = fleet.managers[mid]
        planned, measured = fleet.footprint(mid)
        loaded = mgr.state in PROCESS_STATES
        rows.append(
            {
                "id": mid,
                "state": shown_state(mgr.state, mgr.parked),
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

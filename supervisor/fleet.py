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
- SIGHUP changes the model list (``request_reload``, in fleet_changes.py). ``ids`` is
  what requests may name; a removed model leaves it at once but keeps its manager (in
  ``managers``, ``all_ids``) until its requests finished and its worker is gone.
- The fleet awaits, never polls: it sends a manager commands and awaits their answers
  (``await mgr.unload()``), and waits on a model's admission for its requests to end
  (``wait_served``, ``wait_workers_idle``). A check that gates an action is made in the
  same step as the action (``hold_if_idle``), never before an await.
- Reads from other threads (the accounted probe) see published snapshots: the managers'
  views and the ledger's (fleet_ledger.py).
- Replicas are capacity of a model: each is a WorkerManager of its own, ``workers`` holds
  them all by worker key (supervisor/fleet_replicas.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

from supervisor.config import Config, ModelEntry
from supervisor.fleet_changes import FleetChanges, ListChange, list_change
from supervisor.fleet_evict import Evictions
from supervisor.fleet_ledger import AccountedProbe, Ledger, model_of, planned_mib, taken_mib
from supervisor.fleet_replicas import FleetReplicas, _Ask
from supervisor.inventory import GpuProbe
from supervisor.launch import Preparer
from supervisor.launches import Launch, NoRoom, PlanFailed
from supervisor.placement import place
from supervisor.planning import model_info, plan_settings
from supervisor.restart import PlanAdjust
from supervisor.spawn import Spawner
from supervisor.states import WorkerState
from supervisor.worker_process import WorkerManager

log = logging.getLogger("vram_llm.fleet")

# A worker's socket is <runtime dir>/vram-llm-XXXXXXXX/<model dir>/worker-<gen>.sock and a
# Unix socket path holds at most 107 bytes (the worker refuses a longer one): a model's
# directory name is bounded, whatever the length of its id.
MODEL_DIR_MAX = 24

__all__ = ["Fleet", "ListChange", "list_change", "model_dir_name", "planned_mib", "MODEL_DIR_MAX"]


def model_dir_name(mid: str) -> str:
    """The directory of a model's sockets: its id when short (ids are [A-Za-z0-9._:@+-]),
    else its head and a hash of the whole, so long ids (a --models-dir file stem) fit."""
    if len(mid) <= MODEL_DIR_MAX:
        return mid
    return f"{mid[:MODEL_DIR_MAX - 9]}-{hashlib.sha1(mid.encode()).hexdigest()[:8]}"


class _FleetPreparer:
    """What a model's WorkerManager calls to plan a start: a question to the fleet's task."""

    def __init__(self, fleet: Fleet, key: str) -> None:
        self._fleet = fleet
        self._key = key  # the worker key: the model, or one of its extra replicas

    async def __call__(self, adjust: PlanAdjust | None, socket_path: str) -> Launch:
        return await self._fleet.ask(self._key, adjust, socket_path)

    async def wait_gpu_settled(self, timeout_s: float) -> None:
        await self._fleet.preparers[model_of(self._key)].wait_gpu_settled(timeout_s)


class Fleet(FleetReplicas, FleetChanges):
    def __init__(
        self,
        config: Config,
        entries: list[ModelEntry],
        runtime_dir: Path,
        base_probe: GpuProbe,
        reload_config: Callable[[], Config] | None = None,
        on_state: Callable[[str, WorkerState, str], None] | None = None,
        on_progress: Callable[[float], None] | None = None,
        spawner: Callable[[str, Callable[[], Config], Path], Spawner] | None = None,  # tests: a fake adapter
    ) -> None:
        self.config = config  # the configuration in force (SIGHUP replaces it only when valid)
        self.ids = [e.id for e in entries]  # the models requests may name, in config order
        self.first = self.ids[0]
        # /health: the model loaded at start without preload (after a SIGHUP that changed or
        # restarted the first model, that one: fleet_changes.py)
        self._first_at_start = self.first
        self.ledger = Ledger()
        self.probe = AccountedProbe(base_probe, self.taken_mib, simulated=bool(config.gpu.simulate_gpus))
        self.preparers: dict[str, Preparer] = {}
        self.managers: dict[str, WorkerManager] = {}  # every model with a manager, removed ones draining too
        self.workers: dict[str, WorkerManager] = {}  # worker key -> manager: every replica of every model
        self.extras: dict[str, list[str]] = {}  # model -> the worker keys of its extra replicas
        self._extra_refused: dict[str, float] = {}  # extra replica -> loop time of its last "no room"
        self._runtime_dir = runtime_dir
        self._reload_config = reload_config
        self._on_state = on_state
        self._on_progress = on_progress
        self._spawner = spawner
        self._dirs: dict[str, Path] = {}  # model -> the directory of its sockets
        self._tasks: dict[str, asyncio.Task[None]] = {}  # model -> its manager's run() (once running)
        self._tasks_changed = asyncio.Event()
        self._running = False
        self._retiring: dict[str, asyncio.Task[None]] = {}  # removed by SIGHUP, its worker not gone yet
        self._readd: dict[str, Preparer] = {}  # retiring, but listed again: added once gone
        self._ready_once: set[str] = set()  # models that have been ready at least once (/health)
        self.removed_ids: set[str] = set()  # removed by SIGHUP and not listed again: 404 even with one model left
        self._asks: asyncio.Queue[_Ask] = asyncio.Queue()
        self._waiting: dict[asyncio.Future[Launch], str] = {}  # asks not answered yet -> their model
        self._stopping = False
        self._several = len(entries) > 1
        self.evictions = Evictions(self.workers, self.preparers, self.ledger, self.probe, lambda: self._stopping)
        for e in entries:
            # One model keeps its sockets in the runtime dir itself, as before several existed.
            self._add(
                Preparer(config, reload_config, model_id=e.id, probe=self.probe),
                runtime_dir / self.dir_name(e.id) if self._several else runtime_dir,
                # The first model, pinned and preloaded ones start at once; the others on demand.
                unloaded=self._several and not (e.preload or e.pinned) and e.id != self.first,
            )
        wanted = self._replica_counts()
        for mid, n in wanted.items():
            for k in range(2, n + 1):
                self._add_extra(mid, k)

    def dir_name(self, mid: str) -> str:
        return model_dir_name(mid)

    def _add(self, prep: Preparer, mdir: Path, unloaded: bool) -> None:
        mid = prep.entry.id
        mdir.mkdir(mode=0o700, exist_ok=True)
        on_state = self._on_state

        def state_cb(state: WorkerState, reason: str) -> None:
            self.ledger.starting(mid, False)  # the start handed its Launch has moved on
            if state is WorkerState.READY:
                self._ready_once.add(mid)
                self.load_extras(mid)
            if on_state is not None:
                on_state(mid, state, reason)

        self.preparers[mid] = prep
        self._dirs[mid] = mdir
        self.extras.setdefault(mid, [])
        self.workers[mid] = self.managers[mid] = WorkerManager(
            config=lambda: prep.config,
            prepare=_FleetPreparer(self, mid),
            runtime_dir=mdir,
            spawner=None if self._spawner is None else self._spawner(mid, lambda: prep.config, mdir),
            on_state=state_cb,
            on_progress=self._on_progress,
            unloaded=unloaded,
            # Idle seconds before it unloads itself; pinned models never do.
            ttl_s=lambda: 0.0 if prep.entry.pinned else prep.entry.ttl_s,
            name=f"model {mid}",
        )
        if self._running:
            self._start_task(mid)
            # Added by SIGHUP: its replicas with it (at start, once every model is listed:
            # "auto" counts what the other models need).
            for k in range(2, self._replica_counts().get(mid, 1) + 1):
                self._add_extra(mid, k)

    def _preparer_for(self, key: str) -> _FleetPreparer:
        return _FleetPreparer(self, key)

    def _start_task(self, mid: str) -> None:
        self._tasks[mid] = asyncio.create_task(self.workers[mid].run(), name=f"worker-manager {mid}")
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
        """GPU UUID -> MiB the probe does not show yet but our workers hold or will hold.
        Called from a worker thread (the probe read): published snapshots only."""
        states = {key: mgr.view.state for key, mgr in list(self.workers.items())}
        return taken_mib(self.ledger.view, states, simulated)

    def footprint(self, mid: str) -> tuple[dict[str, int], dict[str, int]]:
        """(planned, measured) GPU UUID -> MiB of the model's current worker."""
        v = self.ledger.view
        return dict(v.planned.get(mid, {})), dict(v.measured.get(mid, {}))

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
    def swaps(self) -> int:
        """Evictions made to load another model."""
        return self.evictions.swaps

    @property
    def in_flight(self) -> int:
        return sum(m.admission.in_flight for m in self.workers.values())

    async def wait_no_requests(self, deadline: float) -> bool:
        """Until no model has a request (shutdown's grace period); False at ``deadline``."""
        done = await asyncio.gather(*(m.admission.wait_no_requests(deadline) for m in list(self.workers.values())))
        return all(done)

    # ---- commands ----------------------------------------------------------------

    def load(self, mid: str) -> None:
        self.managers[mid].load()
        self.load_extras(mid)

    def unload(self, mid: str) -> None:
        for mgr in self.replicas(mid):
            mgr.unload()

    def request_shutdown(self) -> None:
        # A start waiting for room (perhaps for another model to go idle) must not hold the
        # shutdown up: it is answered "no room" now and its manager sees the shutdown.
        self._stopping = True
        for fut in list(self._waiting):
            if not fut.done():
                fut.set_exception(NoRoom("the server is shutting down"))
        for mgr in self.workers.values():
            mgr.shutdown()

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
        """Every manager's lifecycle (models added by SIGHUP too) and the decision task.
        Returns when every manager has stopped (after request_shutdown)."""
        decider = asyncio.create_task(self._decide_loop(), name="fleet-decide")
        self._running = True
        for key in self.workers:
            self._start_task(key)
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
            for t in [decider, *self._retiring.values(), *self._tasks.values()]:
                t.cancel()
            for t in [decider, *self._retiring.values(), *self._tasks.values()]:
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
                self.ledger.starting(ask.model, False)
                if not ask.done.done():
                    ask.done.set_exception(e)
                if not isinstance(e, Exception):
                    raise
            else:
                if not ask.done.done():
                    ask.done.set_result(launch)
                else:  # the manager stopped asking (shutdown): nothing will start
                    self.ledger.starting(ask.model, False)

    async def _decide(self, ask: _Ask) -> Launch:
        key = ask.model  # the worker key: the model's first replica, or an extra one
        mid = model_of(key)
        if self._stopping or ask.done.done():  # shutting down, or the model was removed
            raise NoRoom("the server is shutting down")
        if mid not in self.ids:  # removed by SIGHUP while its start waited in line
            raise NoRoom(f"model {mid!r} was removed from the configuration", 5)
        if key != mid:
            return await self._decide_extra(ask, key, mid)
        prep = self.preparers[mid]
        cfg = prep.config
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.admission.wait_timeout_s
        while True:
            if self._stopping or ask.done.done():
                raise NoRoom("the server is shutting down")
            await self.evictions.measure()
            inv = await asyncio.to_thread(self.probe.read)
            models = {
                m: model_info(p.entry, p.facts, plan_settings(p.config, None, ask.adjust if m == mid else None, entry=p.entry))
                for m, p in self.preparers.items()
            }
            d = place(inv.gpus, models, self._residents(mid), mid)
            if d.refusal is not None:
                log.warning("model %s not loaded: %s", mid, d.refusal)
                raise NoRoom(d.refusal, 30)
            if d.evict:
                log.info("to load model %s: unloading idle model(s) %s", mid, ", ".join(d.evict))
                await self.evictions.idle(self.with_extras(d.evict))
                continue
            if d.wait_for:
                await self.evictions.busy(mid, d.wait_for, deadline, cfg.admission.wait_timeout_s)
                continue
            return await self._start(ask, mid, mid)

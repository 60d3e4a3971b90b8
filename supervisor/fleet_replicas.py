"""Replicas of a model in the fleet (supervisor/fleet.py): its extra workers, how many,
and whether one may load now.

Rules of this module:
- Replicas are capacity of a model: a model's first replica is its manager (``managers``);
  its extra replicas are WorkerManagers of their own (own GPUs, sockets, restarts, slots,
  prompt cache directory) under the worker key ``<model>#<n>`` (``#`` is never in a model id).
  ``workers`` holds every replica by key: the ledger, the residents and the evictions count
  replicas, not models.
- Extra replicas load once the first is ready (``load_extras``), only where a packed copy fits
  as things are, never evicting a model (placement.place_replica), and are the first evicted
  when another model needs room (placement.Resident.extra); a model evicted goes with its
  extra replicas (``with_extras``). How many: ``replicas = N``, or
  for "auto" the pure ``placement.replica_layout`` on the GPUs at start.
- Like fleet_changes.py, a part of the Fleet class: the fleet's decision task calls
  ``_decide_extra``; nothing here runs on its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from supervisor.config import Config
from supervisor.fleet_evict import Evictions
from supervisor.fleet_ledger import AccountedProbe, Ledger, model_of, planned_mib
from supervisor.launch import Preparer
from supervisor.launches import Launch, LaunchPreparer, NoRoom
from supervisor.placement import Resident, place_replica, replica_layout
from supervisor.planning import model_info, plan_settings
from supervisor.restart import PlanAdjust
from supervisor.spawn import Spawner
from supervisor.states import PROCESS_STATES, WorkerState
from supervisor.worker_process import WorkerManager

log = logging.getLogger("vram_llm.fleet")

# An extra replica refused for want of room is asked to load again after this long at the
# earliest (by the next request or the next time its model's first replica is ready).
EXTRA_RETRY_S = 30.0


@dataclass
class _Ask:
    """A start asking the fleet's decision task for its Launch."""

    model: str  # the worker key
    adjust: PlanAdjust | None
    socket_path: str
    done: asyncio.Future[Launch]


class FleetReplicas:
    """The replica half of the Fleet (its state is declared in fleet.py's ``Fleet.__init__``)."""

    ids: list[str]
    managers: dict[str, WorkerManager]
    workers: dict[str, WorkerManager]
    extras: dict[str, list[str]]
    preparers: dict[str, Preparer]
    probe: AccountedProbe
    ledger: Ledger
    evictions: Evictions
    _extra_refused: dict[str, float]
    _dirs: dict[str, Path]
    _stopping: bool
    _running: bool
    _on_state: Callable[[str, WorkerState, str], None] | None
    _on_progress: Callable[[float], None] | None
    _spawner: Callable[[str, Callable[[], Config], Path], Spawner] | None

    def _preparer_for(self, key: str) -> LaunchPreparer:
        raise NotImplementedError

    def _start_task(self, key: str) -> None:
        raise NotImplementedError

    def _add_extra(self, mid: str, n: int) -> None:
        """Extra replica number ``n`` (2, 3...) of model ``mid``: unloaded until the first is ready."""
        key = f"{mid}#{n}"
        prep = self.preparers[mid]
        rdir = self._dirs[mid] / f"r{n}"  # short: a Unix socket path holds 107 bytes
        rdir.mkdir(mode=0o700, exist_ok=True)
        on_state = self._on_state

        def state_cb(state: WorkerState, reason: str) -> None:
            self.ledger.starting(key, False)
            if on_state is not None:
                on_state(key, state, reason)

        self.extras[mid].append(key)
        self.workers[key] = WorkerManager(
            config=lambda: prep.config,
            prepare=self._preparer_for(key),
            runtime_dir=rdir,
            spawner=None if self._spawner is None else self._spawner(key, lambda: prep.config, rdir),
            on_state=state_cb,
            on_progress=self._on_progress,
            unloaded=True,
            ttl_s=lambda: prep.entry.ttl_s,  # capacity: even a pinned model's extras go when idle
            name=f"model {mid} replica {n}",
        )
        if self._running:
            self._start_task(key)

    def _replica_counts(self) -> dict[str, int]:
        """Model -> how many replicas (1: none extra): ``replicas = N``, or "auto"'s layout on
        the GPUs as they are at start (placement.replica_layout)."""
        wanted = {mid: p.entry.replicas for mid, p in self.preparers.items()}
        out = {mid: n for mid, n in wanted.items() if isinstance(n, int)}
        if all(isinstance(n, int) for n in wanted.values()):
            return out
        try:
            gpus = self.probe.base.read().gpus
        except Exception as e:  # noqa: BLE001 - no inventory: one replica each, said once
            log.error("replicas = \"auto\": cannot read the GPUs (%s); one replica each", e)
            return {mid: n if isinstance(n, int) else 1 for mid, n in wanted.items()}
        models = {m: model_info(p.entry, p.facts, plan_settings(p.config, None, entry=p.entry))
                  for m, p in self.preparers.items()}
        layout = replica_layout(gpus, models)
        for mid, n in wanted.items():
            if n == "auto":
                out[mid] = max(1, len(layout[mid]))
                log.info("model %s: replicas = \"auto\": %d", mid, out[mid])
        return out

    def replicas(self, mid: str) -> list[WorkerManager]:
        """Every replica of model ``mid``, the first (its manager) first."""
        return [self.managers[mid], *(self.workers[k] for k in self.extras.get(mid, ()))]

    def with_extras(self, victims: tuple[str, ...]) -> tuple[str, ...]:
        """Evictions with the extra replicas of every model among them: a model unloaded to
        make room goes with its replicas (else its requests would load it back at once,
        evicting in turn what it made room for)."""
        out = list(victims)
        for v in victims:
            out += [k for k in self.extras.get(v, ()) if k not in out and self.workers[k].state in PROCESS_STATES]
        return tuple(out)

    def load_extras(self, mid: str) -> None:
        """Load the model's unloaded extra replicas (once its first is ready; one refused
        "no room" is not asked again for EXTRA_RETRY_S: every request would re-plan it)."""
        if self._stopping or mid not in self.ids or self.managers[mid].state is not WorkerState.READY:
            return
        now = asyncio.get_running_loop().time()
        for key in self.extras.get(mid, ()):
            if self.workers[key].state is WorkerState.UNLOADED and now - self._extra_refused.get(key, -1e9) >= EXTRA_RETRY_S:
                self.workers[key].load()

    async def _decide_extra(self, ask: _Ask, key: str, mid: str) -> Launch:
        """An extra replica loads where it fits as things are, or not at all (placement.place_replica)."""
        prep = self.preparers[mid]
        await self.evictions.measure()
        inv = await asyncio.to_thread(self.probe.read)
        m = model_info(prep.entry, prep.facts, plan_settings(prep.config, None, ask.adjust, entry=prep.entry))
        d = place_replica(inv.gpus, m, self._own_gpus(mid, key), int(key.rsplit("#", 1)[1]))
        if d.refusal is not None:
            log.info("model %s: %s", mid, d.refusal)
            self._extra_refused[key] = asyncio.get_running_loop().time()
            raise NoRoom(d.refusal, 30)
        return await self._start(ask, mid, key)

    def _own_gpus(self, mid: str, key: str) -> set[str]:
        """GPU UUIDs the model's other replicas hold or will hold."""
        v = self.ledger.view
        out: set[str] = set()
        for other in [mid, *self.extras.get(mid, ())]:
            mgr = self.workers.get(other)
            if other == key or mgr is None or (mgr.view.state not in PROCESS_STATES and other not in v.starting):
                continue
            out |= {u for u, mib in {**v.planned.get(other, {}), **v.measured.get(other, {})}.items() if mib}
        return out

    async def _start(self, ask: _Ask, mid: str, key: str) -> Launch:
        """Room: plan the start itself with the model's preparer (llama-fit-params, the OOM
        ladder, the logged plan) on the accounted inventory, the other replicas' GPUs last."""
        # Its previous start's footprint is gone (it has no worker now): the plan must
        # not count it against itself.
        self.ledger.forget(key)
        self.ledger.starting(key, True)
        try:
            launch = await self.preparers[mid](ask.adjust, ask.socket_path, own=self._own_gpus(mid, key),
                                               extra=key != mid, key=key)
        except BaseException:
            self.ledger.starting(key, False)
            raise
        self.ledger.plan(key, planned_mib(launch))
        return launch

    def _residents(self, exclude: str) -> list[Resident]:
        out = []
        ledger = self.ledger.view
        for key, mgr in self.workers.items():
            state = mgr.view.state
            if key == exclude or (state not in PROCESS_STATES and key not in ledger.starting):
                continue
            planned = dict(ledger.planned.get(key, {}))
            measured = dict(ledger.measured.get(key, {}))
            ready = state is WorkerState.READY
            out.append(
                Resident(
                    key,
                    measured if ready and measured else planned,
                    last_used=mgr.admission.last_used,
                    busy=mgr.admission.in_flight > 0,  # answering, or requests waiting for it
                    loading=not ready,
                    extra=key != model_of(key),
                )
            )
        return out

"""Evictions: unload the models a placement chose, without a race against new requests.

Owns: the count of evictions made to load another model (``swaps``). Callers: the fleet's
decision task (fleet.py), one eviction at a time. It reads the managers' views and their
admission, sends commands and awaits their answers: an unload is ``await mgr.unload()``, a
drain waits on the model's admission (``wait_served``, ``wait_workers_idle``), and an idle
model is held in the same step as the check that it is idle (``hold_if_idle``). The only
polling loop reads NVML (``wait_freed``), an outside reading no task of ours owns.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping

from supervisor.fleet_ledger import AccountedProbe, Ledger, model_of
from supervisor.inventory import Inventory
from supervisor.launch import SETTLE_TOLERANCE_MIB, Preparer
from supervisor.launches import NoRoom
from supervisor.nvml import process_gpu_memory
from supervisor.states import PROCESS_STATES, WorkerState
from supervisor.worker_process import WorkerManager

log = logging.getLogger("vram_llm.fleet")

FREED_POLL_S = 0.1  # how often NVML is read while an unloaded model's memory comes back


class Evictions:
    def __init__(
        self,
        managers: Mapping[str, WorkerManager],
        preparers: Mapping[str, Preparer],
        ledger: Ledger,
        probe: AccountedProbe,
        stopping: Callable[[], bool],
    ) -> None:
        self.managers = managers  # the fleet's registry, read as it is now (SIGHUP changes it)
        self.preparers = preparers
        self.ledger = ledger
        self.probe = probe
        self._stopping = stopping
        self.swaps = 0  # evictions made to load another model

    def _footprint(self, mid: str) -> tuple[dict[str, int], dict[str, int]]:
        v = self.ledger.view
        return dict(v.planned.get(mid, {})), dict(v.measured.get(mid, {}))

    async def measure(self) -> None:
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
        self.ledger.measure({m: used for m, used in got.items() if used and m in self.managers})

    async def idle(self, victims: tuple[str, ...]) -> None:
        """Unload models placement found idle. Each is held (new requests wait) in the same
        step as the check that it is idle, so a request cannot reach it between the check and
        the unload; one that is busy now sends the caller back to place again."""
        for e in victims:
            victim = self.managers.get(e)
            if victim is None:
                continue  # removed by SIGHUP meanwhile: its worker is gone
            if not victim.admission.hold_if_idle():
                return  # a request reached it while an earlier one stopped: place again
            try:
                if await self._unload_now(e):
                    self.swaps += 1
            finally:
                victim.admission.hold(False)

    async def busy(self, mid: str, victims: tuple[str, ...], deadline: float, wait_s: float) -> None:
        """Unload busy models once their requests are done, new ones held back meanwhile."""
        loop = asyncio.get_running_loop()
        left = deadline - loop.time()
        names = ", ".join(victims)
        if left <= 0:
            raise NoRoom(f"model {mid!r} needs the GPU memory of {names}, which stayed busy", 5)
        log.info("to load model %s: waiting (up to %.0fs) for %s to finish its requests", mid, left, names)
        try:
            if not await self._drain(victims, deadline):
                raise NoRoom(f"model {mid!r} needs the GPU memory of {names}, still busy after {wait_s:g}s", 5)
            for e in victims:
                if await self._unload_now(e):
                    self.swaps += 1
        finally:
            # Whatever happened, no model stays held back.
            for e in victims:
                if e in self.managers:
                    self.managers[e].admission.hold(False)

    async def _drain(self, mids: tuple[str, ...], deadline: float) -> bool:
        """Let these models finish before they are unloaded (until ``deadline``): a load in
        progress completes and serves the requests that were waiting for it, then new
        requests are held back while the ones in flight finish. False (the caller lifts the hold)
        if they did not in time. Serving the waiting ones first is what keeps two models
        that need the same memory from unloading each other before either answers."""
        adms = [self.managers[m].admission for m in mids if m in self.managers]  # others: removed meanwhile
        if not all(await asyncio.gather(*(a.wait_served(deadline) for a in adms))) or self._stopping():
            return False
        for a in adms:
            a.hold(True)
        return all(await asyncio.gather(*(a.wait_workers_idle(deadline) for a in adms))) and not self._stopping()

    async def _unload_now(self, mid: str) -> bool:
        """Unload ``mid`` and wait for its answer; False when there was nothing to unload
        (removed, already unloaded, or no worker and none starting)."""
        mgr = self.managers.get(mid)
        if mgr is None:  # removed by SIGHUP meanwhile: its worker is gone
            return False
        state = mgr.view.state
        if state in (WorkerState.UNLOADED, WorkerState.RETIRED) or (
            state not in PROCESS_STATES and mid not in self.ledger.view.starting
        ):
            # Already unloaded (an operator's unload, an idle TTL, a drain that ended): its
            # memory is free.
            self.ledger.forget(mid)
            return False
        planned, measured = self._footprint(mid)
        held = measured or planned
        before = None if self.probe.simulated or not held else await asyncio.to_thread(self.probe.base.read)
        # The manager drains (nothing is in flight by now) and stops its worker, bounded by
        # worker.stop_timeout_s (then killed): its answer says it is unloaded.
        cfg = self.preparers[model_of(mid)].config
        try:
            await asyncio.wait_for(mgr.unload(), cfg.shutdown.grace_s + 2 * cfg.worker.stop_timeout_s + 5)
        except asyncio.TimeoutError:
            raise NoRoom(f"model {mid!r} did not stop in time to make room", 5) from None
        self.ledger.forget(mid)
        if before is not None:
            await self.wait_freed(mid, held, before, cfg.restart.oom_settle_timeout_s)
        return True

    async def wait_freed(self, mid: str, held: Mapping[str, int], before: Inventory, timeout_s: float) -> None:
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
            if loop.time() >= deadline or self._stopping():
                log.warning("model %s unloaded, but NVML does not show its memory free after %.0fs; "
                            "placing with what is free now", mid, timeout_s)
                return
            await asyncio.sleep(FREED_POLL_S)

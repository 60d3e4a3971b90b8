"""The fleet's GPU ledger: what each model's current start planned and NVML measured, and
which starts were handed a Launch but have no worker yet.

Owns: that bookkeeping. Its writer is the fleet, on the event loop; every change replaces
the published ``LedgerView`` whole, so ``AccountedProbe.read`` (run in a worker thread by
``asyncio.to_thread``) reads one consistent snapshot and never a dict being changed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from supervisor.inventory import GpuProbe, Inventory
from supervisor.launches import Launch
from supervisor.states import PROCESS_STATES, WorkerState

_EMPTY: Mapping[str, Mapping[str, int]] = MappingProxyType({})


def model_of(key: str) -> str:
    """The model of a worker key: ``<model>`` (its first replica) or ``<model>#<n>`` (an
    extra replica; ``#`` is never in a model id)."""
    return key.split("#", 1)[0]


def planned_mib(launch: Launch | None) -> dict[str, int]:
    """GPU UUID -> MiB the launch's plan puts there."""
    return {} if launch is None else launch.plan.planned_mib()


@dataclass(frozen=True)
class LedgerView:
    planned: Mapping[str, Mapping[str, int]] = field(default_factory=lambda: _EMPTY)  # model -> GPU UUID -> MiB of its current start
    measured: Mapping[str, Mapping[str, int]] = field(default_factory=lambda: _EMPTY)  # model -> GPU UUID -> MiB NVML measured
    starting: frozenset[str] = field(default_factory=frozenset)  # a Launch handed out, no worker yet


class Ledger:
    def __init__(self) -> None:
        self.view = LedgerView()

    def _set(self, **changes: object) -> None:
        self.view = dataclasses.replace(self.view, **changes)  # type: ignore[arg-type]

    def plan(self, mid: str, mib: Mapping[str, int]) -> None:
        """A start was handed its Launch: what it will take, and nothing measured yet."""
        v = self.view
        self._set(planned=MappingProxyType({**v.planned, mid: MappingProxyType(dict(mib))}),
                  measured=MappingProxyType({k: x for k, x in v.measured.items() if k != mid}))

    def measure(self, got: Mapping[str, Mapping[str, int]]) -> None:
        self._set(measured=MappingProxyType({**self.view.measured, **{m: MappingProxyType(dict(u)) for m, u in got.items()}}))

    def forget(self, mid: str) -> None:
        """No worker and no start: it holds nothing."""
        v = self.view
        self._set(planned=MappingProxyType({k: x for k, x in v.planned.items() if k != mid}),
                  measured=MappingProxyType({k: x for k, x in v.measured.items() if k != mid}),
                  starting=v.starting - {mid})

    def starting(self, mid: str, on: bool) -> None:
        v = self.view
        if (mid in v.starting) != on:
            self._set(starting=v.starting | {mid} if on else v.starting - {mid})


def taken_mib(ledger: LedgerView, states: Mapping[str, WorkerState], simulated: bool) -> dict[str, int]:
    """GPU UUID -> MiB the probe does not show yet but our workers hold or will hold.
    ``states``: each model's published state."""
    out: dict[str, int] = {}
    for mid, state in states.items():
        if state not in PROCESS_STATES and mid not in ledger.starting:
            continue
        if not simulated and state in (WorkerState.READY, WorkerState.STOPPING):
            continue  # loaded: NVML's reading already shows what it holds
        measured = {} if simulated else ledger.measured.get(mid, {})
        for uuid, mib in ledger.planned.get(mid, {}).items():
            left = mib - measured.get(uuid, 0)
            if left > 0:
                out[uuid] = out.get(uuid, 0) + left
    return out


class AccountedProbe:
    """The inventory the fleet and every preparer read: the probe's, less what loads in
    progress are about to take (for simulated GPUs: less what every live worker planned)."""

    def __init__(self, base: GpuProbe, taken: Callable[[bool], dict[str, int]], simulated: bool) -> None:
        self.base = base  # the probe's own reading, without the accounting
        self._taken = taken
        self.simulated = simulated

    def read(self) -> Inventory:
        inv = self.base.read()
        taken = self._taken(self.simulated)
        if not taken:
            return inv
        gpus = []
        for g in inv.gpus:
            t = min(taken.get(g.uuid, 0), g.free_mib)
            gpus.append(dataclasses.replace(g, free_mib=g.free_mib - t, used_mib=g.used_mib + t))
        return Inventory(tuple(gpus), inv.note)

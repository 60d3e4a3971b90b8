"""Placement of several models on the GPUs: where to load one, and what to unload first.

Rules for this module:
- PURE, like the planner beside it: the GPU inventory, every model's facts and settings,
  what is loaded where (with its footprint: the plan's estimate, replaced by what NVML
  measured for its worker once it is up), what is busy and when each was last used are all
  arguments. No I/O, no clock, no logging: it is tested as tables (tests/test_placement.py).
- The model asked for is planned with the existing planner on the GPUs as they would be
  after the chosen evictions (the caller then plans its start for real, on the GPUs as they
  are once those evictions are done). Models share GPUs whenever they fit side by side:
  an eviction is chosen only when the model would get fewer layers on GPUs without it.
- "Free" is what the caller's inventory says: the fleet's reading already takes off what
  loads in progress are about to take (fleet.AccountedProbe), so two loads never plan
  against the same free VRAM.
- Never evicted: a pinned model, a busy one (requests in flight), one still loading.
  Among the rest: the least recently used first, then the cheapest to reload (smallest
  file). When only busy models stand in the way the answer is to wait for them (the
  caller bounds that wait); when even every allowed eviction cannot make room, the model's
  own ``refuse_when_no_room`` decides: partial offload (as with one model) or a refusal
  naming what holds the memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from supervisor.inventory import GpuInfo
from supervisor.model import ModelFacts
from supervisor.planner import Plan, PlanSettings, _reserve_for, plan


@dataclass(frozen=True)
class ModelInfo:
    """A configured model: what the planner needs plus the placement policy."""

    id: str
    facts: ModelFacts
    settings: PlanSettings  # its own: n_ctx, n_batch, devices, reserve, OOM-ladder knobs
    # The policy, from its [[models]] entry (whose schema holds the defaults):
    pinned: bool  # never evicted
    refuse_when_no_room: bool  # False: partial offload when it cannot fit


@dataclass(frozen=True)
class Resident:
    """A model that has a worker (loaded or loading)."""

    id: str
    footprint_mib: Mapping[str, int]  # GPU UUID -> MiB it holds (measured once up, else planned)
    last_used: float = 0.0  # monotonic time of its last request (older: evicted first)
    busy: bool = False  # requests in flight: never evicted now
    loading: bool = False  # not ready yet: never evicted now


@dataclass(frozen=True)
class Placement:
    """The decision: load now (after ``evict``), wait for busy models, or refuse."""

    model: str
    evict: tuple[str, ...] = ()  # unload these first, in this order, then load it
    wait_for: tuple[str, ...] = ()  # busy models whose memory it needs: wait until idle, then ask again
    refusal: str | None = None  # why it is not loaded at all (a sentence for the 503)

    @property
    def loads(self) -> bool:
        return self.refusal is None and not self.wait_for


def _reaches(p: Plan, goal: Plan) -> bool:
    """p puts at least as much on GPUs as goal."""
    return p.offloaded_layers >= goal.offloaded_layers and (p.output_on_gpu or not goal.output_on_gpu)


def _whole(p: Plan) -> bool:
    return not p.cpu_only and p.n_gpu_layers == -1


def _with_freed(gpus: Sequence[GpuInfo], base: Mapping[str, int], freed: Iterable[Resident]) -> tuple[GpuInfo, ...]:
    free = dict(base)
    for r in freed:
        for uuid, mib in r.footprint_mib.items():
            if uuid in free:
                free[uuid] += mib
    return tuple(
        dataclasses.replace(g, free_mib=min(free[g.uuid], g.total_mib), used_mib=g.total_mib - min(free[g.uuid], g.total_mib))
        for g in gpus
    )


def _holds(r: Resident, uuids: set[str]) -> int:
    return sum(mib for uuid, mib in r.footprint_mib.items() if uuid in uuids)


def place(
    gpus: Sequence[GpuInfo],
    models: Mapping[str, ModelInfo],
    residents: Sequence[Resident],
    want: str,
) -> Placement:
    """Where to load ``want`` given what is resident now (``want`` itself is not resident:
    a model being re-planned after a crash has no memory any more)."""
    m = models[want]
    s = m.settings
    others = [r for r in residents if r.id != want]
    base = {g.uuid: g.free_mib for g in gpus}
    allowed = {g.uuid for g in gpus if s.devices is None or g.index in s.devices}
    holders = [r for r in others if _holds(r, allowed) > 0]
    pinned = [r for r in holders if models.get(r.id) is not None and models[r.id].pinned]
    movable = [r for r in holders if r not in pinned]
    idle = [r for r in movable if not r.busy and not r.loading]
    busy = [r for r in movable if r.busy or r.loading]

    def plan_on(freed: Iterable[Resident]) -> Plan:
        return plan(_with_freed(gpus, base, freed), m.facts, s)

    usable = {g.uuid: max(base[g.uuid] - _reserve_for(g, s), 0) for g in gpus if g.uuid in allowed}
    headroom = {g.uuid: g.total_mib - _reserve_for(g, s) for g in gpus if g.uuid in allowed}

    def roomy(freed: Iterable[Resident], need: int) -> bool:
        """A cheap necessary check before a planner run (a planner run costs ~0.3 ms):
        is there that much usable memory on the allowed GPUs at all?"""
        room = dict(usable)
        for r in freed:
            for uuid, mib in r.footprint_mib.items():
                if uuid in room:
                    room[uuid] = min(room[uuid] + mib, max(headroom[uuid], 0))
        return sum(room.values()) >= need

    now = plan_on(())
    if not holders:
        return _no_eviction(m, now)
    alone = plan_on(holders)  # the box with every other model gone
    best = plan_on(movable)  # every allowed eviction, the busy ones included
    no_room = not _reaches(best, alone) or (not _whole(alone) and not _capped(s))
    if no_room and m.refuse_when_no_room:
        return Placement(want, refusal=_refusal(gpus, models, m, alone, pinned, busy, idle, allowed))
    goal = plan_on(idle) if no_room else best
    if _reaches(now, goal):
        return _no_eviction(m, now)
    # Least recently used first, then the cheapest to reload, then by id (deterministic).
    order = sorted(idle, key=lambda r: (r.last_used, _file_size(models, r.id), r.id))
    need = sum(g.planned_mib for g in goal.gpus)
    chosen: list[Resident] = []
    found = False
    for r in order:
        chosen.append(r)
        if roomy(chosen, need) and _reaches(plan_on(chosen), goal):
            found = True
            break
    if not found:
        # Only the busy ones (or loads in progress) stand in the way: wait for them.
        return Placement(want, wait_for=tuple(r.id for r in sorted(busy, key=lambda r: r.id)))
    # Drop evictions that turned out not to be needed (a model on a GPU that did not help).
    for r in list(reversed(chosen[:-1])):
        trial = [c for c in chosen if c is not r]
        if roomy(trial, need) and _reaches(plan_on(trial), goal):
            chosen = trial
    return Placement(want, evict=tuple(r.id for r in chosen))


def _capped(s: PlanSettings) -> bool:
    # The OOM ladder limits the model on purpose: "every layer on GPUs" is not the goal then.
    return s.cpu_only or s.max_gpu_layers is not None


def _file_size(models: Mapping[str, ModelInfo], mid: str) -> int:
    info = models.get(mid)
    return info.facts.file_size if info is not None else 0


def _no_eviction(m: ModelInfo, p: Plan) -> Placement:
    if m.refuse_when_no_room and not _whole(p) and not _capped(m.settings):
        return Placement(m.id, refusal=f"model {m.id!r} does not fit on the GPUs ({_layers(p)})")
    return Placement(m.id)


def _layers(p: Plan) -> str:
    return f"at most {p.offloaded_layers} of {p.model.n_layers} layers would be on GPUs"


def _refusal(
    gpus: Sequence[GpuInfo],
    models: Mapping[str, ModelInfo],
    m: ModelInfo,
    alone: Plan,
    pinned: Sequence[Resident],
    busy: Sequence[Resident],
    idle: Sequence[Resident],
    allowed: set[str],
) -> str:
    idx = {g.uuid: g.index for g in gpus}
    if not _whole(alone):
        return f"model {m.id!r} does not fit on the GPUs even with no other model loaded ({_layers(alone)})"
    need = sum(g.planned_mib for g in alone.gpus)
    parts = []
    for why, rs in (("pinned", pinned), ("busy", busy), ("idle", idle)):
        for r in rs:
            where = ", ".join(f"{mib} MiB on GPU {idx[u]}" for u, mib in sorted(r.footprint_mib.items()) if u in allowed)
            parts.append(f"{r.id} ({why}: {where})")
    return f"model {m.id!r} needs about {need} MiB of VRAM and does not fit; held by " + "; ".join(parts)

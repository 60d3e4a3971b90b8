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
- Which GPUs a model gets (``pack``): "spread" is the planner's own (every usable GPU, shares
  by free VRAM); "pack" restricts the plan to the fewest GPUs that hold what spread holds,
  biggest free first. A layer split is a pipeline: a model that fits one card is no faster
  on four, and leaves three idle for other users (docs/benchmarks.md). Every replica is packed.
- Replicas are capacity of a model (``replica_layout``, ``place_replica``): an extra replica
  loads only where it fits as it is, never evicting another model, and is the first thing
  evicted when another model needs room (``Resident.extra``); a pinned model's first
  replica is pinned, its extras are not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

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
    placement: Literal["spread", "pack"]
    replicas: int | Literal["auto"]


@dataclass(frozen=True)
class Resident:
    """A model that has a worker (loaded or loading)."""

    id: str
    footprint_mib: Mapping[str, int]  # GPU UUID -> MiB it holds (measured once up, else planned)
    last_used: float = 0.0  # monotonic time of its last request (older: evicted first)
    busy: bool = False  # requests in flight: never evicted now
    loading: bool = False  # not ready yet: never evicted now
    extra: bool = False  # an extra replica of its model (capacity): evicted before any model


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
    pinned = [r for r in holders if not r.extra and models.get(r.id) is not None and models[r.id].pinned]
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
    need = sum(g.planned_mib for g in goal.gpus)

    def fewest(order: list[Resident]) -> list[Resident] | None:
        """The shortest prefix of ``order`` whose memory reaches the goal, less those of it
        that turned out not to be needed (a model on a GPU that did not help); None if even
        all of it does not."""
        chosen: list[Resident] = []
        for r in order:
            chosen.append(r)
            if roomy(chosen, need) and _reaches(plan_on(chosen), goal):
                break
        else:
            return None
        for r in list(reversed(chosen[:-1])):
            trial = [c for c in chosen if c is not r]
            if roomy(trial, need) and _reaches(plan_on(trial), goal):
                chosen = trial
        return chosen

    # Extra replicas first (capacity, not a model), then the least recently used, then the
    # cheapest to reload, then by id (deterministic).
    def key(r: Resident) -> tuple[bool, float, int, str]:
        return (not r.extra, r.last_used, _file_size(models, r.id), r.id)

    idle_order = sorted(idle, key=key)
    chosen = fewest(idle_order)
    if chosen is not None:
        return Placement(want, evict=tuple(r.id for r in chosen))
    # Busy ones (or loads in progress) stand in the way: wait for the fewest of them, in the
    # same order after every idle one (a busy model's extra replica, not the model with it;
    # those idle then are evicted when the placement is asked again).
    chosen = fewest(idle_order + sorted(busy, key=key)) or busy
    return Placement(want, wait_for=tuple(sorted(r.id for r in chosen if r in busy)))


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


# --- pack or spread, and replicas ------------------------------------------------------------


@dataclass(frozen=True)
class Packed:
    """The GPUs a start may use, and why (a line of the logged plan and `vram-llm plan`)."""

    devices: tuple[int, ...] | None  # NVML indices for PlanSettings.devices; None: as configured
    why: str


def packs(m: ModelInfo) -> bool:
    """Replicas are always packed: a copy spread over every GPU leaves none for the next."""
    return m.placement == "pack" or m.replicas != 1


def pack(gpus: Sequence[GpuInfo], m: ModelInfo, avoid: Collection[str] = ()) -> Packed:
    """The GPUs model ``m`` gets on ``gpus`` as they are (free VRAM now).

    spread: every usable GPU (the planner's shares by free VRAM). pack: the fewest GPUs, biggest
    usable (free less the reserve) first, whose plan holds what the spread plan holds (every
    layer when it fits at all); mismatched cards are the planner's business, as with spread.
    ``avoid`` (GPU UUIDs, e.g. those of the model's other replicas) are taken last."""
    s = m.settings
    allowed = [g for g in gpus if s.devices is None or g.index in s.devices]
    if not packs(m):
        return Packed(s.devices, "placement spread: every usable GPU, shares by free VRAM")
    if len(allowed) <= 1:
        return Packed(s.devices, "placement pack: one usable GPU" if allowed else "placement pack: no GPU")
    order = sorted(allowed, key=lambda g: (g.uuid in avoid, -(g.free_mib - _reserve_for(g, s)), g.index))
    goal = plan(gpus, m.facts, s)
    for k in range(1, len(order)):
        chosen = order[:k]
        devices = tuple(sorted(g.index for g in chosen))
        p = plan(gpus, m.facts, dataclasses.replace(s, devices=devices))
        if _reaches(p, goal) and (_whole(p) or not _whole(goal)):
            names = ", ".join(str(g.index) for g in chosen)
            if k == 1:
                return Packed(devices, f"placement pack: GPU {names} alone holds weights, KV and compute "
                              "with the reserve (the most free VRAM first)")
            return Packed(devices, f"placement pack: GPUs {names}, the fewest that hold it (the most free VRAM first)")
    return Packed(s.devices, f"placement pack: no fewer than all {len(allowed)} usable GPUs hold it: split over them")


def _taken_by(gpus: Sequence[GpuInfo], p: Plan) -> tuple[list[GpuInfo], set[str]]:
    """The GPUs less what plan ``p`` puts there, and the UUIDs it uses."""
    used = {g.uuid: g.planned_mib for g in p.gpus if g.planned_mib and g.excluded_reason is None}
    left = [
        dataclasses.replace(g, free_mib=max(g.free_mib - used.get(g.uuid, 0), 0), used_mib=g.used_mib + used.get(g.uuid, 0))
        for g in gpus
    ]
    return left, set(used)


def replica_layout(gpus: Sequence[GpuInfo], models: Mapping[str, ModelInfo]) -> dict[str, tuple[tuple[int, ...], ...]]:
    """Every configured model's replicas on ``gpus`` (free VRAM with none of them loaded):
    model -> the GPU indices of each replica, the first replica first.

    First every model's first replica, in configuration order, each on what the ones before
    it left (what the other models *need*). Then extra replicas, one per model per round in
    configuration order (two models wanting many share the GPUs out): ``replicas = N`` packs
    another copy where it fits whole (its own replicas' GPUs last); ``"auto"`` only on GPUs
    no replica of any model uses yet (a second copy on a busy GPU does not add bandwidth).
    A model that does not fit whole gets no extra replica. No GPU at all: ``replicas = N``
    CPU workers (``()`` each), "auto" one."""
    left = list(gpus)
    used: set[str] = set()
    out: dict[str, list[tuple[int, ...]]] = {}
    own: dict[str, set[str]] = {}
    for mid, m in models.items():
        got = pack(left, m)
        p = plan(left, m.facts, dataclasses.replace(m.settings, devices=got.devices))
        left, on = _taken_by(left, p)
        used |= on
        own[mid] = set(on)
        out[mid] = [tuple(sorted(g.index for g in p.gpus if g.uuid in on))]
    if not gpus:
        return {mid: ((),) * (m.replicas if isinstance(m.replicas, int) else 1) for mid, m in models.items()}
    wanting = [mid for mid, m in models.items() if m.replicas != 1]
    while wanting:
        for mid in list(wanting):
            m = models[mid]
            # "auto": only GPUs no replica of any model uses yet (``used``, not just its own).
            got = start_devices(left, m, own[mid] | (used if m.replicas == "auto" else set()), extra=True)
            p = plan(left, m.facts, dataclasses.replace(m.settings, devices=got.devices))
            if p.cpu_only or not _whole(p):
                wanting.remove(mid)
                continue
            left, on = _taken_by(left, p)
            used |= on
            own[mid] |= on
            out[mid].append(tuple(sorted(g.index for g in p.gpus if g.uuid in on)))
            if m.replicas != "auto" and len(out[mid]) >= m.replicas:
                wanting.remove(mid)
    return {mid: tuple(r) for mid, r in out.items()}


def start_devices(gpus: Sequence[GpuInfo], m: ModelInfo, own: Collection[str] = (), extra: bool = False) -> Packed:
    """The GPUs one start of ``m`` may use on ``gpus`` as they are: ``pack`` with the GPUs of
    its other replicas (``own``, UUIDs) taken last; an extra replica of ``"auto"`` only on
    GPUs none of them uses."""
    if extra and m.replicas == "auto":
        free = tuple(g.index for g in gpus if g.uuid not in own and (m.settings.devices is None or g.index in m.settings.devices))
        m = dataclasses.replace(m, settings=dataclasses.replace(m.settings, devices=free or (-1,)))
    return pack(gpus, m, avoid=own)


def place_replica(gpus: Sequence[GpuInfo], m: ModelInfo, own: Collection[str], n: int) -> Placement:
    """Whether extra replica number ``n`` (2, 3...) of ``m`` loads now, on ``gpus`` as they
    are (the fleet's accounted reading): only when a packed copy fits whole without evicting
    anything (``start_devices``). With no GPU at all a replica is a CPU worker (host RAM is
    not planned): it loads."""
    if not gpus:
        return Placement(m.id)
    got = start_devices(gpus, m, own, extra=True)
    p = plan(gpus, m.facts, dataclasses.replace(m.settings, devices=got.devices))
    if p.cpu_only or not _whole(p):
        return Placement(m.id, refusal=f"replica {n} of model {m.id!r} does not fit beside what is loaded "
                         "(an extra replica never evicts a model)")
    return Placement(m.id)

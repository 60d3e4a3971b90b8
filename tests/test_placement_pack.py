"""pack or spread, and replicas (supervisor/placement.py): pure tables on simulated inventories."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from supervisor.inventory import GpuInfo
from supervisor.placement import ModelInfo, Resident, pack, place, place_replica, replica_layout
from supervisor.planner import PlanSettings, plan
from tests.test_placement import facts, gpu

SIM = Path(__file__).parent / "sim"


def sim(name: str) -> list[GpuInfo]:
    rows = json.loads((SIM / name).read_text())
    return [GpuInfo(r["index"], r["uuid"], r["name"], r.get("pci_bus_id", ""), r["total_mib"], r["free_mib"],
                    r.get("used_mib", r["total_mib"] - r["free_mib"])) for r in rows]


def model(mid: str, gib: int, placement: str = "pack", replicas: int | str = 1) -> ModelInfo:
    """A model of about ``gib`` GiB of weights (40 layers) with one slot's KV cache."""
    return ModelInfo(mid, facts(40, gib * 1024 // 40, name=mid), PlanSettings(parallel=1), pinned=False,
                     refuse_when_no_room=False, placement=placement, replicas=replicas)  # type: ignore[arg-type]


def used(gpus: Sequence[GpuInfo], m: ModelInfo, devices: tuple[int, ...] | None) -> tuple[int, ...]:
    """The GPU indices the plan on ``devices`` puts something on, and that it holds every layer."""
    p = plan(gpus, m.facts, dataclasses.replace(m.settings, devices=devices))
    assert p.n_gpu_layers == -1 and not p.cpu_only, p.notes
    return tuple(sorted(g.index for g in p.gpus if g.planned_mib and g.excluded_reason is None))


FOUR_24 = [gpu(i, 24 * 1024, 0) for i in range(4)]
TWO_24 = [gpu(i, 24 * 1024, 0) for i in range(2)]


@pytest.mark.parametrize(
    "name, gpus, m, spread_on, pack_on",
    [
        # A model that fits one card: spread puts it over all four, pack on one.
        ("8 GB on 4 x 24 GB", FOUR_24, model("m", 8), (0, 1, 2, 3), (0,)),
        # Mismatched cards: the 24 GB card alone holds a 20 GB model (not the 12 GB, not the 4 GB).
        ("20 GB on 24+12+4 GB", sim("mix_24_12_4.json"), model("m", 20), (0, 1, 2), (1,)),
        # Too big for one card: pack and spread both split (there is no other way).
        ("40 GB on 2 x 24 GB", TWO_24, model("m", 40), (0, 1), (0, 1)),
    ],
)
def test_pack_takes_the_fewest_gpus_spread_takes_them_all(
    name: str, gpus: list[GpuInfo], m: ModelInfo, spread_on: tuple[int, ...], pack_on: tuple[int, ...]
) -> None:
    spread = pack(gpus, dataclasses.replace(m, placement="spread"))
    assert used(gpus, m, spread.devices) == spread_on, name
    assert spread.why.startswith("placement spread")
    packed = pack(gpus, m)
    assert used(gpus, m, packed.devices) == pack_on, name
    assert packed.why.startswith("placement pack"), packed.why


def test_pack_says_why() -> None:
    assert "GPU 0 alone holds" in pack(FOUR_24, model("m", 8)).why
    assert "GPU 1 alone holds" in pack(sim("mix_24_12_4.json"), model("m", 20)).why
    assert "no fewer than all 2 usable GPUs" in pack(TWO_24, model("m", 40)).why


def test_pack_takes_the_most_free_first_and_a_replicas_gpus_last() -> None:
    gpus = [gpu(0, 24 * 1024, 12 * 1024), gpu(1, 24 * 1024, 0), gpu(2, 24 * 1024, 0)]
    assert pack(gpus, model("m", 8)).devices == (1,)
    assert pack(gpus, model("m", 8), avoid={"GPU-1"}).devices == (2,)


@pytest.mark.parametrize(
    "name, gpus, models, want",
    [
        ("8 GB auto on 4 x 24 GB: a replica per GPU", FOUR_24, [model("a", 8, replicas="auto")],
         {"a": ((0,), (1,), (2,), (3,))}),
        ("20 GB auto on 24+12+4 GB: only the 24 GB card holds one", sim("mix_24_12_4.json"),
         [model("a", 20, replicas="auto")], {"a": ((1,),)}),
        ("40 GB auto on 2 x 24 GB: one replica, split", TWO_24, [model("a", 40, replicas="auto")],
         {"a": ((0, 1),)}),
        ("two models competing: they share the GPUs out, a round each", FOUR_24,
         [model("a", 8, replicas="auto"), model("b", 8, replicas="auto")],
         {"a": ((0,), (2,)), "b": ((1,), (3,))}),
        ("auto leaves the GPUs other models need: b spreads over every GPU", FOUR_24,
         [model("a", 8, replicas="auto"), model("b", 8, placement="spread")],
         {"a": ((0,),), "b": ((0, 1, 2, 3),)}),
        ("auto leaves the GPU a packed model needs", FOUR_24,
         [model("a", 8, replicas="auto"), model("b", 8)],
         {"a": ((0,), (2,), (3,)), "b": ((1,),)}),
        ("replicas = 2 asked: two, on GPUs of their own", FOUR_24, [model("a", 8, replicas=2)],
         {"a": ((0,), (1,))}),
        ("replicas = 3 of 16 GB on 2 x 24 GB: only two fit whole", TWO_24, [model("a", 16, replicas=3)],
         {"a": ((0,), (1,))}),
    ],
)
def test_replica_layout(name: str, gpus: list[GpuInfo], models: list[ModelInfo],
                        want: dict[str, tuple[tuple[int, ...], ...]]) -> None:
    assert replica_layout(gpus, {m.id: m for m in models}) == want, name


def test_no_gpu_replicas_are_cpu_workers() -> None:
    assert replica_layout([], {"a": model("a", 8, replicas=3), "b": model("b", 8, replicas="auto")}) == {
        "a": ((), (), ()), "b": ((),)}
    assert place_replica([], model("a", 8, replicas=2), set(), 2).loads


def test_an_extra_replica_never_evicts_and_auto_takes_a_gpu_of_its_own() -> None:
    a = model("a", 8, replicas="auto")
    # GPU 0 holds the first replica; GPU 1 is free: the second goes there.
    gpus = [gpu(0, 24 * 1024, 9 * 1024), gpu(1, 24 * 1024, 0)]
    assert place_replica(gpus, a, {"GPU-0"}, 2).loads
    # Another model fills GPU 1: no room for a replica without evicting it, and "auto" does
    # not put a second copy beside the first.
    full = [gpu(0, 24 * 1024, 9 * 1024), gpu(1, 24 * 1024, 20 * 1024)]
    refused = place_replica(full, a, {"GPU-0"}, 2)
    assert not refused.loads and "never evicts a model" in (refused.refusal or "")
    # replicas = 2 asked: a second copy may share the first one's GPU when it has room.
    assert place_replica(full, dataclasses.replace(a, replicas=2), {"GPU-0"}, 2).loads


def test_extra_replicas_are_evicted_before_any_model() -> None:
    models = {m.id: m for m in (model("a", 8, placement="spread"), model("b", 8, placement="spread"),
                                model("c", 10, placement="spread"))}
    # One 24 GB GPU: b (used long ago) and a's extra replica (used just now) hold it; c needs
    # 10 GB: the replica goes, though b is the least recently used.
    gpus = [gpu(0, 24 * 1024, 18 * 1024)]
    residents = [Resident("b", {"GPU-0": 9 * 1024}, last_used=1.0),
                 Resident("a#2", {"GPU-0": 9 * 1024}, last_used=50.0, extra=True)]
    assert place(gpus, models, residents, "c").evict == ("a#2",)


def test_busy_extras_are_waited_for_before_a_busy_model() -> None:
    models = {m.id: m for m in (model("a", 8, placement="spread", replicas=2), model("b", 8, placement="spread"),
                                model("c", 10, placement="spread"))}
    gpus = [gpu(0, 24 * 1024, 18 * 1024)]
    # a and its extra replica both answer requests; c needs the memory of one of them: only
    # the extra is waited for (it used to be both, and a went with it).
    busy = [Resident("a", {"GPU-0": 9 * 1024}, last_used=1.0, busy=True),
            Resident("a#2", {"GPU-0": 9 * 1024}, last_used=50.0, extra=True, busy=True)]
    p = place(gpus, models, busy, "c")
    assert (p.wait_for, p.evict) == (("a#2",), ())
    # Two busy models: the least recently used one only.
    two = [Resident("a", {"GPU-0": 9 * 1024}, last_used=9.0, busy=True),
           Resident("b", {"GPU-0": 9 * 1024}, last_used=1.0, busy=True)]
    assert place(gpus, models, two, "c").wait_for == ("b",)
    # An idle one that is enough is evicted at once, whoever is busy.
    mixed = [Resident("a", {"GPU-0": 9 * 1024}, last_used=9.0, busy=True), Resident("b", {"GPU-0": 9 * 1024})]
    assert (place(gpus, models, mixed, "c").evict, place(gpus, models, mixed, "c").wait_for) == (("b",), ())


def test_a_pinned_model_keeps_its_first_replica_not_its_extras() -> None:
    a = dataclasses.replace(model("a", 8, placement="spread", replicas=2), pinned=True)
    models = {"a": a, "c": model("c", 10, placement="spread")}
    gpus = [gpu(0, 24 * 1024, 18 * 1024)]
    residents = [Resident("a", {"GPU-0": 9 * 1024}, last_used=1.0),
                 Resident("a#2", {"GPU-0": 9 * 1024}, last_used=50.0, extra=True)]
    assert place(gpus, models, residents, "c").evict == ("a#2",)
    # c bigger than the extra's memory: the pinned first replica stays, c is offloaded in part
    # (the policy's default) or refused naming what holds the memory.
    big = {"a": a, "c": dataclasses.replace(model("c", 16, placement="spread"), refuse_when_no_room=True)}
    refused = place(gpus, big, residents, "c")
    assert refused.refusal is not None and "a (pinned" in refused.refusal, refused

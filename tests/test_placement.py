"""Placement of several models (supervisor/placement.py): pure table tests, as for the planner."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import pytest

from supervisor.inventory import GpuInfo
from supervisor.model import ModelFacts
from supervisor.placement import ModelInfo, Placement, Resident, place
from supervisor.planner import Plan, PlanSettings, plan

GIB = 1024


def facts(n_layers: int = 20, layer_mib: int = 400, name: str = "m") -> ModelFacts:
    vocab = 32000
    return ModelFacts(
        path=f"{name}.gguf", file_size=n_layers * layer_mib * 2**20, architecture="llama", name=name,
        n_layers=n_layers, n_ctx_train=8192, n_embd=4096, n_ff=11008, n_head=32, n_head_kv=8,
        key_length=128, value_length=128, vocab_size=vocab, layer_bytes=(layer_mib * 2**20,) * n_layers,
        embd_bytes=vocab * 4096 // 2, output_bytes=vocab * 4096 // 2, tied_embeddings=False, other_bytes=0,
        chat_template=True, gguf_version=3,
    )


def gpu(i: int, total: int, used: int) -> GpuInfo:
    return GpuInfo(i, f"GPU-{i}", f"gpu{i}", f"00000000:{i + 1:02X}:00.0", total, total - used, used)


def box(totals: Sequence[int], residents: Sequence[Resident], other: Mapping[int, int] | None = None) -> list[GpuInfo]:
    """GPUs whose used memory is what the residents hold (NVML's view) plus other processes."""
    out = []
    for i, t in enumerate(totals):
        used = (other or {}).get(i, 0) + sum(r.footprint_mib.get(f"GPU-{i}", 0) for r in residents)
        out.append(gpu(i, t, used))
    return out


def model(mid: str, size_layers: int = 20, **kw: object) -> ModelInfo:
    devices = kw.pop("devices", None)
    # One slot: BIG below is the size of such a model with one slot's KV cache.
    settings = PlanSettings(devices=devices, parallel=1)  # type: ignore[arg-type]
    policy = {"pinned": False, "refuse_when_no_room": False, "placement": "spread", "replicas": 1, **kw}
    return ModelInfo(mid, facts(size_layers, name=mid), settings, **policy)  # type: ignore[arg-type]


def res(mid: str, mib: int, gpu_index: int = 0, **kw: object) -> Resident:
    return Resident(mid, {f"GPU-{gpu_index}": mib}, **kw)  # type: ignore[arg-type]


# A 20-layer model of 400 MiB layers plans to ~9.3 GiB: two fit on a 24 GiB GPU, not three;
# one fits on a 12 GiB GPU.
BIG = 9500


@dataclasses.dataclass(frozen=True)
class Decided:
    """A Placement and the plan its caller (the fleet) would make on the GPUs it leaves."""

    evict: tuple[str, ...]
    wait_for: tuple[str, ...]
    refusal: str | None
    plan: Plan | None  # None when it waits or is refused
    partial: bool  # layers left in host RAM


def decided(p: Placement, gpus: Sequence[GpuInfo], models: Mapping[str, ModelInfo],
            residents: Sequence[Resident]) -> Decided:
    freed = [r for r in residents if r.id in p.evict]
    after = [dataclasses.replace(g, free_mib=g.free_mib + sum(r.footprint_mib.get(g.uuid, 0) for r in freed))
             for g in gpus]
    m = models[p.model]
    got = plan(after, m.facts, m.settings) if p.loads else None
    partial = got is not None and (got.cpu_only or got.n_gpu_layers != -1)
    return Decided(p.evict, p.wait_for, p.refusal, got, partial)


def decide(totals: Sequence[int], models: Sequence[ModelInfo], residents: Sequence[Resident], want: str,
           other: Mapping[int, int] | None = None) -> Decided:
    gpus = box(totals, residents, other)
    by_id = {m.id: m for m in models}
    return decided(place(gpus, by_id, residents, want), gpus, by_id, residents)


def test_nothing_loaded_places_without_eviction() -> None:
    p = decide([24 * GIB], [model("a")], [], "a")
    assert p.plan is not None and p.plan.n_gpu_layers == -1 and p.evict == () and not p.partial


def test_room_for_both_they_share_the_gpu() -> None:
    p = decide([24 * GIB], [model("a"), model("b")], [res("a", BIG)], "b")
    assert p.plan is not None and p.evict == () and p.plan.n_gpu_layers == -1


@pytest.mark.parametrize(
    ("residents", "evicted"),
    [
        # room for one: the idle one goes
        ([res("a", BIG, last_used=5.0)], ("a",)),
        # the least recently used goes first
        ([res("a", BIG, last_used=5.0), res("b", BIG, last_used=1.0)], ("b",)),
        ([res("a", BIG, last_used=1.0), res("b", BIG, last_used=5.0)], ("a",)),
    ],
)
def test_evicts_the_least_recently_used(residents: list[Resident], evicted: tuple[str, ...]) -> None:
    totals = [12 * GIB] if len(residents) == 1 else [int(2.2 * BIG)]
    p = decide(totals, [model("a"), model("b"), model("c")], residents, "c")
    assert p.evict == evicted and p.plan is not None and p.plan.n_gpu_layers == -1


def test_same_age_the_cheapest_to_reload_goes_first() -> None:
    small = model("small", 10)
    resid = [res("a", BIG, last_used=1.0), res("small", BIG // 2, last_used=1.0)]
    p = decide([int(BIG * 1.6)], [model("a"), small, model("c", 8)], resid, "c")
    assert p.evict == ("small",)


def test_pinned_is_never_evicted() -> None:
    resid = [res("a", BIG, last_used=0.0), res("b", BIG, last_used=9.0)]
    p = decide([int(2.2 * BIG)], [model("a", pinned=True), model("b"), model("c")], resid, "c")
    assert p.evict == ("b",)
    # Only a pinned model holds the memory: partial offload by default, a refusal naming it on request.
    p = decide([12 * GIB], [model("a", pinned=True), model("c")], [res("a", BIG)], "c")
    assert p.evict == () and p.plan is not None and p.partial and p.plan.n_gpu_layers != -1
    p = decide([12 * GIB], [model("a", pinned=True), model("c", refuse_when_no_room=True)], [res("a", BIG)], "c")
    assert p.plan is None and p.refusal is not None and "a (pinned: 9500 MiB on GPU 0)" in p.refusal


@pytest.mark.parametrize("flag", ["busy", "loading"])
def test_busy_or_loading_models_are_waited_for_not_evicted(flag: str) -> None:
    p = decide([12 * GIB], [model("a"), model("c")], [res("a", BIG, **{flag: True})], "c")
    assert p.plan is None and p.wait_for == ("a",) and p.evict == () and p.refusal is None
    # An idle one that is enough is evicted rather than waiting for the busy one.
    resid = [res("a", BIG, busy=True), res("b", BIG)]
    p = decide([int(2.2 * BIG)], [model("a"), model("b"), model("c")], resid, "c")
    assert p.evict == ("b",) and p.wait_for == ()


def test_a_load_in_progress_counts_against_free_memory() -> None:
    # "a" is loading: NVML does not show its memory yet, the plan must not use it twice.
    loading = Resident("a", {"GPU-0": BIG}, loading=True)
    p = decide([12 * GIB], [model("a"), model("c")], [loading], "c")
    assert p.plan is None and p.wait_for == ("a",)


def test_a_model_limited_to_some_gpus_leaves_the_others_alone() -> None:
    resid = [res("a", BIG, 0, last_used=0.0), res("b", BIG, 1, last_used=9.0)]
    p = decide([12 * GIB, 12 * GIB], [model("a"), model("b"), model("c", devices=(1,))], resid, "c")
    assert p.evict == ("b",)
    assert p.plan is not None and [g.index for g in p.plan.gpus if g.layers] == [1]


def test_evictions_that_do_not_help_are_dropped() -> None:
    # "a" is older but small, on a GPU mostly used by another process: freeing it does not
    # make room; "b" alone does.
    resid = [res("a", 1000, 0, last_used=0.0), res("b", BIG, 1, last_used=9.0)]
    p = decide([12 * GIB, 12 * GIB], [model("a", 2), model("b"), model("c")], resid, "c", other={0: 8000})
    assert p.evict == ("b",) and p.plan is not None and p.plan.n_gpu_layers == -1


def test_too_big_for_the_box_offloads_or_refuses() -> None:
    p = decide([8 * GIB], [model("a")], [], "a")
    assert p.plan is not None and p.partial
    p = decide([8 * GIB], [model("a", refuse_when_no_room=True), model("b", 2)], [res("b", 1000)], "a")
    assert p.plan is None and p.refusal is not None and "even with no other model" in p.refusal


def test_no_gpu_plans_for_cpu_without_eviction() -> None:
    models = {"a": model("a"), "b": model("b")}
    p = decided(place([], models, [Resident("b", {})], "a"), [], models, [Resident("b", {})])
    assert p.plan is not None and p.plan.cpu_only and p.evict == ()

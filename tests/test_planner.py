"""The planner as tables (simulated inventories x the real SmolLM2 header), as properties
(hypothesis), and on GGUF files of other shapes written by tests/gguf_factory.py."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.default_model import default_model_path
from supervisor.gpus import GpuInfo, SimulatedProbe
from supervisor.model import ModelFacts, read_model_facts
from supervisor.planner import (
    CUDA_CONTEXT_MIB,
    NOT_NEEDED,
    NOT_NEEDED_ROW,
    STILL_VISIBLE,
    FitParams,
    Plan,
    PlanSettings,
    assign_layers,
    kv_bytes_per_layer,
    parse_visible_devices,
    plan,
)
from tests.gguf_factory import GGMLQuantizationType, Shape, write_model


def one_slot(**kw: Any) -> PlanSettings:
    """The schema's defaults, but one slot: the KV cache sizes below are those of one slot."""
    return PlanSettings(**{"parallel": 1, **kw})

SIM = Path(__file__).parent / "sim"


@pytest.fixture(scope="module")
def smol() -> ModelFacts:
    return read_model_facts(default_model_path())


def gpus(name: str) -> tuple[GpuInfo, ...]:
    return SimulatedProbe(SIM / f"{name}.json").read().gpus


def by_index(p: Plan) -> dict[int, object]:
    return {g.index: g for g in p.gpus}


def used(p: Plan) -> list[int]:
    """NVML indices of the GPUs the worker uses, in CUDA order."""
    return [g.index for g in sorted(p.gpus, key=lambda g: g.cuda_index or 0) if g.excluded_reason is None]


def llama_cpp_placement(n_layer: int, n_gpu_layers: int, tensor_split: Sequence[float]) -> list[int | None]:
    """llama.cpp's own layer placement, written from its source independently of the planner:
    src/llama-model.cpp, llama_model_base::load_tensors, as llama-cpp-python 0.3.36 vendors it.
    Per layer 0..n_layer (n_layer = the output layer) the CUDA device it lands on; None: CPU.

        n_gpu_layers = params.n_gpu_layers >= 0 ? params.n_gpu_layers : n_layer_all + 1
        splits[i] = cumulative sum of tensor_split (float), then divided by the total
        i_gpu_start = max(n_layer_all + 1 - n_gpu_layers, 0)
        act_gpu_layers = min(n_gpu_layers, n_layer_all + 1)
        layer il: CPU if il < i_gpu_start or il - i_gpu_start >= act_gpu_layers, else device
                  upper_bound(splits, float(il - i_gpu_start) / act_gpu_layers)
    """
    ngl = n_layer + 1 if n_gpu_layers < 0 else n_gpu_layers
    if ngl == 0 or not tensor_split:
        return [None] * (n_layer + 1)
    assert any(x != 0 for x in tensor_split)  # all zero would split by free memory
    splits = np.zeros(len(tensor_split), dtype=np.float32)
    split_sum = np.float32(0)
    for i, x in enumerate(tensor_split):
        split_sum = np.float32(split_sum + np.float32(x))
        splits[i] = split_sum
    splits = (splits / split_sum).astype(np.float32)
    i_gpu_start = max(n_layer + 1 - ngl, 0)
    act = min(ngl, n_layer + 1)
    out: list[int | None] = []
    for il in range(n_layer + 1):
        if il < i_gpu_start or il - i_gpu_start >= act:
            out.append(None)
        else:
            out.append(int(np.searchsorted(splits, np.float32(il - i_gpu_start) / np.float32(act), side="right")))
    return out


def check_llama_cpp_agrees(p: Plan) -> None:
    """The plan's per-GPU layers are what llama.cpp does with the plan's tensor_split."""
    # split mode none: llama.cpp keeps only main_gpu, which is then its device 0
    split = [1.0] if p.split_mode == "none" and not p.cpu_only else p.tensor_split
    placement = llama_cpp_placement(p.model.n_layers, p.n_gpu_layers, split)
    visible = {g.cuda_index: g for g in p.gpus if g.cuda_index is not None}
    if not p.cpu_only and p.split_mode != "none":
        assert sorted(visible) == list(range(len(p.tensor_split)))
    for cuda, g in visible.items():
        if p.split_mode == "none":  # llama.cpp keeps main_gpu only: device 0 of the placement
            dev = 0 if cuda == p.main_gpu else -1
        else:
            dev = cuda
        assert g.layers == sum(1 for d in placement[:-1] if d == dev), (g, placement)
        if p.split_mode == "layer":  # row: the estimate keeps the logits on main_gpu
            assert g.has_output == (placement[-1] == dev), (g, placement)


def check_invariants(p: Plan) -> None:
    check_llama_cpp_agrees(p)
    for g in p.gpus:
        if g.excluded_reason is None and p.source == "vram-llm":
            assert g.planned_mib <= g.usable_mib, g
        if g.excluded_reason is not None:
            assert g.planned_mib == 0 and g.layers == 0 and g.share == 0.0
    if p.cpu_only:
        assert p.n_gpu_layers == 0 and p.tensor_split == () and p.offloaded_layers == 0
    else:
        assert math.isclose(sum(p.tensor_split), 1.0, abs_tol=1e-5)
        assert p.offloaded_layers == sum(g.layers for g in p.gpus)
    assert p.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


# --- the cases issue 2 lists ----------------------------------------------------------------


def test_one_gpu(smol: ModelFacts) -> None:
    p = plan(gpus("one_gpu"), smol, one_slot())
    check_invariants(p)
    assert p.n_gpu_layers == -1 and p.offloaded_layers == 30 and p.output_on_gpu
    assert p.tensor_split == (1.0,) and p.main_gpu == 0
    assert p.env["CUDA_VISIBLE_DEVICES"] == "GPU-11111111-0000-0000-0000-000000000000"
    g = p.gpus[0]
    assert (g.reserve_mib, g.usable_mib, g.layers, g.has_output) == (1024, 24000 - 1024, 30, True)
    e = g.estimate
    assert e.fixed_mib == CUDA_CONTEXT_MIB and e.kv_mib == math.ceil(30 * kv_bytes_per_layer(smol, 4096, 1) / 2**20)
    assert g.planned_mib == e.weights_mib + e.kv_mib + e.compute_mib + e.fixed_mib


def test_two_equal_gpus(smol: ModelFacts) -> None:
    p = plan(gpus("two_equal"), smol, one_slot())
    check_invariants(p)
    assert p.n_gpu_layers == -1 and p.tensor_split == (0.5, 0.5)
    assert used(p) == [0, 1]  # equal free VRAM: PCI order breaks the tie
    a, b = p.gpus
    # llama.cpp splits 31 units (30 layers + output) at 0.5: layers 0-15 | 16-29 + output
    assert (a.layers, b.layers) == (16, 14)
    assert b.has_output and not a.has_output  # llama.cpp puts the output layer on the last GPU


def test_mix_24_12_4_orders_by_free_and_pins_cuda_order(smol: ModelFacts) -> None:
    p = plan(gpus("mix_24_12_4"), smol, one_slot())
    check_invariants(p)
    # NVML (PCI) order is 4 GB, 24 GB, 12 GB; the plan order is by free VRAM.
    assert [g.index for g in p.gpus] == [1, 2, 0]
    # The display GPU would get no layer: it is left out (issue 17), the others keep the order.
    assert [g.cuda_index for g in p.gpus] == [0, 1, None]
    assert p.env["CUDA_VISIBLE_DEVICES"] == ",".join(
        ["GPU-24242424-0000-0000-0000-000000000000", "GPU-12121212-0000-0000-0000-000000000000"]
    )
    s24, s12 = p.tensor_split
    assert s24 > s12 > 0
    # proportional to usable VRAM after the fixed per-GPU cost
    usable = [g.usable_mib - CUDA_CONTEXT_MIB for g in p.gpus[:2]]
    for share, u in zip(p.tensor_split, usable):
        assert share == pytest.approx(u / sum(usable), abs=1e-5)


def test_pci_order_keeps_bus_order(smol: ModelFacts) -> None:
    p = plan(gpus("mix_24_12_4"), smol, one_slot(device_order="pci"))
    check_invariants(p)
    assert [g.index for g in p.gpus] == [0, 1, 2]
    # First on the bus, llama.cpp would give the display GPU layer 0 for its 0.8 layer's worth
    # of share: too little to be worth a CUDA context (issue 17), the others keep bus order.
    assert used(p) == [1, 2] and by_index(p)[0].excluded_reason == NOT_NEEDED
    assert p.env["CUDA_VISIBLE_DEVICES"].split(",")[0] == "GPU-24242424-0000-0000-0000-000000000000"
    assert p.tensor_split[0] > p.tensor_split[1]


def test_free_below_reserve_is_left_out_with_reason(smol: ModelFacts) -> None:
    p = plan(gpus("below_reserve"), smol, one_slot())
    check_invariants(p)
    g = by_index(p)
    assert "below the reserve" in (g[0].excluded_reason or "")
    assert g[0].usable_mib == 0 and g[0].cuda_index is None
    assert used(p) == [1] and p.env["CUDA_VISIBLE_DEVICES"] == "GPU-e0e00000-0000-0000-0000-000000000000"
    assert p.tensor_split == (1.0,) and p.n_gpu_layers == -1


def test_devices_subset(smol: ModelFacts) -> None:
    p = plan(gpus("mix_24_12_4"), smol, one_slot(devices=(0, 2)))
    check_invariants(p)
    assert used(p) == [2, 0]
    assert by_index(p)[1].excluded_reason == "not in --devices"
    assert "GPU-24242424" not in p.env["CUDA_VISIBLE_DEVICES"]


def test_split_mode_none_uses_the_gpu_with_most_usable(smol: ModelFacts) -> None:
    p = plan(gpus("mix_24_12_4"), smol, one_slot(split_mode="none", device_order="pci"))
    check_invariants(p)
    assert used(p) == [1] and p.main_gpu == 0 and p.n_gpu_layers == -1
    assert p.env["CUDA_VISIBLE_DEVICES"] == "GPU-24242424-0000-0000-0000-000000000000"
    for i in (0, 2):
        assert "split mode none" in (by_index(p)[i].excluded_reason or "")


def test_split_mode_row_main_gpu_is_the_biggest(smol: ModelFacts) -> None:
    p = plan(gpus("mix_24_12_4"), smol, one_slot(split_mode="row", device_order="pci"))
    check_invariants(p)
    # The display GPU's row share would be under one layer's worth: left out (issue 17).
    assert used(p) == [1, 2]
    assert p.main_gpu == 0  # CUDA index of the 24 GB GPU in PCI order, the display GPU hidden
    g = by_index(p)
    # llama.cpp assigns each layer a device by the split in row mode too (only the matrices
    # go to the split buffers): layer il's KV cache is on that device, so it is spread, and
    # each GPU holding layers has its own compute buffer.
    assert g[1].estimate.kv_mib > 0 and g[2].estimate.kv_mib > 0
    assert g[1].estimate.compute_mib > 0 and g[2].estimate.compute_mib > 0
    assert g[1].layers + g[2].layers == 30
    assert g[0].excluded_reason == NOT_NEEDED_ROW


def test_partial_offload(smol: ModelFacts) -> None:
    p = plan(gpus("tiny"), smol, one_slot())
    check_invariants(p)
    assert 0 < p.offloaded_layers < 30
    # llama.cpp offloads the output layer first: n_gpu_layers counts it
    assert p.n_gpu_layers == p.offloaded_layers + 1 and p.output_on_gpu
    assert any("partial offload" in n for n in p.notes)
    # One more layer would not fit: the plan is the largest that does.
    bigger = plan(gpus("tiny"), smol, one_slot(reserve_mib=1024 - 20))
    assert bigger.offloaded_layers > p.offloaded_layers


def test_nothing_fits_is_cpu_only(smol: ModelFacts) -> None:
    p = plan(gpus("tiny"), smol, one_slot(reserve_mib=1400))
    check_invariants(p)
    assert p.cpu_only and p.env["CUDA_VISIBLE_DEVICES"] == ""
    assert p.gpus[0].excluded_reason


def test_no_gpu_at_all(smol: ModelFacts) -> None:
    p = plan(gpus("no_gpu"), smol, one_slot())
    check_invariants(p)
    assert p.cpu_only and p.gpus == () and p.n_gpu_layers == 0 and p.tensor_split == ()
    assert p.host_weights_mib > 0


def test_reserve_overrides_by_uuid_and_index(smol: ModelFacts) -> None:
    s = one_slot(reserve_overrides={"GPU-24242424-0000-0000-0000-000000000000": 4000, "2": 0})
    g = by_index(plan(gpus("mix_24_12_4"), smol, s))
    assert (g[0].reserve_mib, g[1].reserve_mib, g[2].reserve_mib) == (1024, 4000, 0)
    assert g[1].usable_mib == 24200 - 4000


# --- CUDA_VISIBLE_DEVICES kept (--no-set-cuda-visible-devices) ------------------------------


def test_keep_env_split_follows_inherited_order(smol: ModelFacts) -> None:
    s = one_slot(set_cuda_visible_devices=False, inherited_cuda_visible_devices="2,0")
    p = plan(gpus("mix_24_12_4"), smol, s)
    check_invariants(p)
    assert "CUDA_VISIBLE_DEVICES" not in p.env  # the inherited value stays
    g = by_index(p)
    assert (g[2].cuda_index, g[0].cuda_index, g[1].cuda_index) == (0, 1, None)
    assert "not visible" in (g[1].excluded_reason or "")
    assert len(p.tensor_split) == 2 and p.tensor_split[0] > p.tensor_split[1]


def test_keep_env_unset_means_all_in_pci_order(smol: ModelFacts) -> None:
    s = one_slot(set_cuda_visible_devices=False, inherited_cuda_visible_devices=None, split_mode="row")
    p = plan(gpus("mix_24_12_4"), smol, s)
    assert [g.cuda_index for g in sorted(p.gpus, key=lambda g: g.index)] == [0, 1, 2]
    assert p.main_gpu == 1  # the 24 GB GPU is CUDA device 1 in PCI order


def test_keep_env_with_devices_subset_zeroes_the_others(smol: ModelFacts) -> None:
    s = one_slot(set_cuda_visible_devices=False, inherited_cuda_visible_devices=None, devices=(2,))
    p = plan(gpus("mix_24_12_4"), smol, s)
    assert p.tensor_split == (0.0, 0.0, 1.0)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, [0, 1, 2]),
        ("", []),
        ("1,0", [1, 0]),
        ("GPU-12121212-0000-0000-0000-000000000000,0", [2, 0]),
        ("GPU-1212", [2]),  # a unique UUID prefix, as CUDA accepts
        ("d15p1a70", [0]),  # CUDA also accepts a UUID without its GPU- prefix
        ("0,9,1", [0]),  # an invalid entry hides itself and all after it
        ("1,1", [1]),
    ],
)
def test_parse_visible_devices(value: str | None, expected: list[int]) -> None:
    seen, _ = parse_visible_devices(value, gpus("mix_24_12_4"))
    assert [g.index for g in seen] == expected


# --- GPUs the placement does not need are not made visible (issue 17) ----------------------


def proportional_split(p: Plan, indices: Sequence[int]) -> list[float]:
    """Shares proportional to usable VRAM after the CUDA context, as the planner balances."""
    g = by_index(p)
    room = [g[i].usable_mib - CUDA_CONTEXT_MIB for i in indices]  # type: ignore[attr-defined]
    return [r / sum(room) for r in room]


def test_display_gpu_without_a_layer_is_left_out_at_8k(smol: ModelFacts) -> None:
    p = plan(gpus("mix_24_12_4"), smol, one_slot(n_ctx=8192))
    check_invariants(p)  # includes: the layers shown are llama.cpp's own placement of tensor_split
    # With all three visible llama.cpp would give the display GPU (last, 2.6% of the split) nothing.
    three = llama_cpp_placement(30, -1, proportional_split(p, [1, 2, 0]))
    assert 2 not in three
    g = by_index(p)
    display = g[0]
    assert display.excluded_reason == NOT_NEEDED == "not needed: the model fits on the others"
    assert (display.cuda_index, display.layers, display.share, display.planned_mib) == (None, 0, 0.0, 0)
    assert p.env["CUDA_VISIBLE_DEVICES"] == (
        "GPU-24242424-0000-0000-0000-000000000000,GPU-12121212-0000-0000-0000-000000000000"
    )
    # the other two shares renormalised, the 3090 (the most usable VRAM) is main_gpu
    assert p.tensor_split == pytest.approx(proportional_split(p, [1, 2]), abs=1e-5)
    assert p.main_gpu == 0 and p.n_gpu_layers == -1 and p.offloaded_layers == 30
    assert g[1].layers + g[2].layers == 30 and g[2].has_output  # type: ignore[attr-defined]
    assert p.to_dict()["gpus"][2]["excluded_reason"] == NOT_NEEDED


def test_model_that_needs_all_three_gpus_gets_the_display_gpu(tmp_path: Path) -> None:
    # 112 layers of ~290 MiB (31 GiB, sparse file): more than the 3090 and 3060 can hold.
    shape = Shape(n_layers=112, n_embd=5120, n_ff=13824, n_head=40, n_head_kv=8, vocab=32000,
                  ttype=GGMLQuantizationType.Q8_0, write_tokens=False)
    m = read_model_facts(write_model(tmp_path / "big.gguf", shape))
    p = plan(gpus("mix_24_12_4"), m, one_slot())
    check_invariants(p)
    assert used(p) == [1, 2, 0] and len(p.tensor_split) == 3
    display = by_index(p)[0]
    assert display.excluded_reason is None and display.cuda_index == 2
    assert display.layers + display.has_output >= 1  # type: ignore[attr-defined]
    # It is needed: without it fewer layers fit on the GPUs.
    without = plan(gpus("mix_24_12_4"), m, one_slot(devices=(1, 2)))
    assert without.offloaded_layers < p.offloaded_layers


def box_of_8(free_mib: Sequence[int]) -> tuple[GpuInfo, ...]:
    return tuple(
        GpuInfo(i, f"GPU-8{i}000000-0000-0000-0000-000000000000", "NVIDIA H100 80GB HBM3",
                f"00000000:{0x18 + 0x10 * i:02X}:00.0", 81559, free, 81559 - free)
        for i, free in enumerate(free_mib)
    )


def test_box_of_8_gpus_where_only_2_are_needed(tmp_path: Path) -> None:
    # Six GPUs busy with other jobs (3.3 GB free each: enough for one layer), two idle.
    inv = box_of_8([3300, 80000, 3300, 3300, 80000, 3300, 3300, 3300])
    shape = Shape(n_layers=80, n_embd=8192, n_ff=28672, n_head=64, n_head_kv=8, vocab=128256,
                  ttype=GGMLQuantizationType.Q8_0, write_tokens=False)
    m = read_model_facts(write_model(tmp_path / "70b.gguf", shape))
    p = plan(inv, m, one_slot(n_ctx=4096))
    check_invariants(p)
    assert used(p) == [1, 4] and p.n_gpu_layers == -1
    assert p.env["CUDA_VISIBLE_DEVICES"] == "GPU-81000000-0000-0000-0000-000000000000,GPU-84000000-0000-0000-0000-000000000000"
    assert p.tensor_split == (0.5, 0.5)
    for g in p.gpus:
        if g.index not in (1, 4):
            assert g.excluded_reason == NOT_NEEDED and g.cuda_index is None
    # Each busy GPU could hold a layer, and with all eight visible llama.cpp would give the
    # busy ones layers; each one's share is under one layer's worth (0.8 of 81), not worth a context.
    busy_share = proportional_split(p, [1, 4, 0, 2, 3, 5, 6, 7])[2]
    assert busy_share * 81 < 1
    assert any(d is not None and d >= 2 for d in llama_cpp_placement(80, -1, proportional_split(p, [1, 4, 0, 2, 3, 5, 6, 7])))
    assert "cannot hold one layer" not in " ".join(g.excluded_reason or "" for g in p.gpus)


def test_row_split_leaves_out_a_gpu_under_one_layers_worth(smol: ModelFacts) -> None:
    p = plan(gpus("mix_24_12_4"), smol, one_slot(split_mode="row", n_ctx=8192))
    check_invariants(p)
    assert used(p) == [1, 2] and p.main_gpu == 0
    assert by_index(p)[0].excluded_reason == NOT_NEEDED_ROW
    assert p.tensor_split == pytest.approx(proportional_split(p, [1, 2]), abs=1e-5)


def test_keep_env_gives_the_unneeded_gpu_a_zero_share_and_says_it_holds_a_context(smol: ModelFacts) -> None:
    s = one_slot(set_cuda_visible_devices=False, inherited_cuda_visible_devices=None, n_ctx=8192)
    p = plan(gpus("mix_24_12_4"), smol, s)
    check_invariants(p)
    assert "CUDA_VISIBLE_DEVICES" not in p.env
    display = by_index(p)[0]
    # We cannot hide it: it stays CUDA device 0 with a zero share, and the plan says what it costs.
    assert display.cuda_index == 0 and p.tensor_split[0] == 0.0 and len(p.tensor_split) == 3
    assert display.excluded_reason == NOT_NEEDED + STILL_VISIBLE
    assert "CUDA context" in display.excluded_reason
    assert p.tensor_split[1:] == pytest.approx(proportional_split(p, [1, 2]), abs=1e-5)
    assert p.main_gpu == 1  # the 3090, CUDA device 1 in PCI order


def test_split_mode_none_and_single_gpu_are_unchanged(smol: ModelFacts) -> None:
    p = plan(gpus("mix_24_12_4"), smol, one_slot(split_mode="none", n_ctx=8192))
    check_invariants(p)
    assert used(p) == [1] and "split mode none" in (by_index(p)[0].excluded_reason or "")
    one = plan(gpus("one_gpu"), smol, one_slot(n_ctx=8192))
    assert used(one) == [0] and one.tensor_split == (1.0,)


# --- OOM ladder knobs and llama-fit-params input --------------------------------------------


def test_ladder_knobs(smol: ModelFacts) -> None:
    base = plan(gpus("one_gpu"), smol, one_slot())
    capped = plan(gpus("one_gpu"), smol, one_slot(max_gpu_layers=10, extra_reserve_mib=512))
    check_invariants(capped)
    # the cap counts repeating layers; the output layer comes with them (llama.cpp offloads it first)
    assert capped.n_gpu_layers == 11 and capped.offloaded_layers == 10 and capped.output_on_gpu
    assert capped.gpus[0].reserve_mib == base.gpus[0].reserve_mib + 512
    cpu = plan(gpus("one_gpu"), smol, one_slot(cpu_only=True))
    assert cpu.cpu_only and cpu.env["CUDA_VISIBLE_DEVICES"] == ""


def test_fit_params_answer_is_used(smol: ModelFacts) -> None:
    fit = FitParams(n_ctx=2048, n_gpu_layers=31, tensor_split=(20.0, 11.0))
    p = plan(gpus("two_equal"), smol, one_slot(fit_params=fit))
    assert p.source == "llama-fit-params" and p.n_ctx == 2048 and p.n_gpu_layers == -1
    assert p.tensor_split == pytest.approx((20 / 31, 11 / 31), abs=1e-5)


def test_fit_params_error_falls_back(smol: ModelFacts) -> None:
    p = plan(gpus("two_equal"), smol, one_slot(fit_params_error="'llama-fit-params' not found"))
    assert p.source == "vram-llm" and any("not found" in n for n in p.notes)
    too_many = FitParams(n_ctx=4096, n_gpu_layers=31, tensor_split=(1.0, 1.0, 1.0))
    p = plan(gpus("two_equal"), smol, one_slot(fit_params=too_many))
    assert p.source == "vram-llm"


# --- llama.cpp's layer placement ------------------------------------------------------------


def test_assign_layers_mirrors_llama_cpp() -> None:
    # 4 layers + output, all offloaded, equal split: [0,0,0,1,1] by upper_bound on (il/5).
    assert assign_layers(4, 5, [1, 1]) == [0, 0, 0, 1, 1]
    # partial: the LAST 2 of the 5 (the output layer counts as layer 4) go to the GPU.
    assert assign_layers(4, 2, [1]) == [None, None, None, 0, 0]
    assert assign_layers(4, 1, [1]) == [None, None, None, None, 0]
    assert assign_layers(4, 0, [1]) == [None] * 5
    assert assign_layers(4, 99, [0, 1]) == [1] * 5


# --- properties -----------------------------------------------------------------------------


def synthetic_model(n_layers: int, layer_mib: int, vocab: int) -> ModelFacts:
    return ModelFacts(
        path="synthetic.gguf", file_size=n_layers * layer_mib * 2**20, architecture="llama", name="synthetic",
        n_layers=n_layers, n_ctx_train=8192, n_embd=4096, n_ff=11008, n_head=32, n_head_kv=8,
        key_length=128, value_length=128, vocab_size=vocab, layer_bytes=(layer_mib * 2**20,) * n_layers,
        embd_bytes=vocab * 4096 // 2, output_bytes=vocab * 4096 // 2, tied_embeddings=False, other_bytes=0,
        chat_template=True, gguf_version=3,
    )


gpu_lists = st.lists(
    st.tuples(st.integers(1024, 81920), st.floats(0.0, 1.0)), min_size=0, max_size=6
).map(
    lambda xs: tuple(
        GpuInfo(i, f"GPU-{i:08d}", f"gpu{i}", f"00000000:{i + 1:02X}:00.0", t, int(t * f), t - int(t * f))
        for i, (t, f) in enumerate(xs)
    )
)


@settings(max_examples=150, deadline=None)
@given(
    inv=gpu_lists,
    n_layers=st.integers(1, 120),
    layer_mib=st.integers(1, 1200),
    vocab=st.sampled_from([32000, 151936]),
    reserve=st.integers(0, 4096),
    order=st.sampled_from(["free_desc", "pci"]),
    mode=st.sampled_from(["layer", "row", "none"]),
    ctx=st.sampled_from([512, 4096, 32768]),
)
def test_properties(
    inv: tuple[GpuInfo, ...], n_layers: int, layer_mib: int, vocab: int, reserve: int, order: str, mode: str, ctx: int
) -> None:
    model = synthetic_model(n_layers, layer_mib, vocab)
    p = plan(inv, model, one_slot(reserve_mib=reserve, device_order=order, split_mode=mode, n_ctx=ctx))  # type: ignore[arg-type]
    check_invariants(p)  # no GPU past its usable VRAM; split sums to 1
    chosen = sorted((g for g in p.gpus if g.excluded_reason is None), key=lambda g: g.cuda_index or 0)
    assert p.env["CUDA_VISIBLE_DEVICES"] == ",".join(g.uuid for g in chosen)
    if order == "free_desc":
        frees = [g.free_mib for g in p.gpus]
        assert frees == sorted(frees, reverse=True)
    else:
        assert [g.index for g in p.gpus] == sorted(g.index for g in p.gpus)
    assert len(p.gpus) == len(inv)
    assert 0 <= p.offloaded_layers <= n_layers
    if mode == "layer":  # no GPU is made visible for nothing (issue 17)
        assert all(g.layers > 0 or g.has_output for g in chosen)
    if p.n_gpu_layers == -1:
        assert p.offloaded_layers == n_layers and p.output_on_gpu


# --- GGUF files of other shapes -------------------------------------------------------------


def test_many_layers(tmp_path: Path) -> None:
    m = read_model_facts(write_model(tmp_path / "deep.gguf", Shape(n_layers=160, n_embd=1024, n_ff=2816,
                                                                  n_head=16, n_head_kv=16, vocab=32000)))
    assert m.n_layers == 160 and len(m.layer_bytes) == 160
    p = plan(gpus("two_equal"), m, one_slot())
    check_invariants(p)
    assert p.n_gpu_layers == -1 and sum(g.layers for g in p.gpus) == 160


def test_gqa_kv_cache_is_sized_by_kv_heads(tmp_path: Path) -> None:
    shape = Shape(n_layers=32, n_embd=4096, n_ff=14336, n_head=32, n_head_kv=8, vocab=32000,
                  ttype=GGMLQuantizationType.Q4_K, write_tokens=False)
    m = read_model_facts(write_model(tmp_path / "gqa.gguf", shape))
    assert (m.n_head, m.n_head_kv, m.key_length, m.value_length) == (32, 8, 128, 128)
    # 2 (K and V) * n_ctx * n_head_kv * head_dim * 2 bytes (f16)
    assert kv_bytes_per_layer(m, 8192, 1) == 2 * 8192 * 8 * 128 * 2
    mha = read_model_facts(write_model(tmp_path / "mha.gguf", replace(shape, n_head_kv=32)))
    p_gqa = plan(gpus("one_gpu"), m, one_slot(n_ctx=8192))
    p_mha = plan(gpus("one_gpu"), mha, one_slot(n_ctx=8192))
    assert p_mha.gpus[0].estimate.kv_mib == 4 * p_gqa.gpus[0].estimate.kv_mib == 4096


def test_large_vocab_output_layer_on_last_gpu(tmp_path: Path) -> None:
    shape = Shape(n_layers=28, n_embd=3584, n_ff=18944, n_head=28, n_head_kv=4, vocab=152064,
                  ttype=GGMLQuantizationType.Q8_0, write_tokens=False)
    m = read_model_facts(write_model(tmp_path / "bigvocab.gguf", shape))
    assert m.vocab_size == 152064 and not m.tied_embeddings
    assert m.output_bytes > max(m.layer_bytes)  # the output matrix dwarfs a layer
    p = plan(gpus("two_equal"), m, one_slot())
    check_invariants(p)
    last = max((g for g in p.gpus if g.excluded_reason is None), key=lambda g: g.cuda_index or 0)
    assert last.has_output
    first = min(p.gpus, key=lambda g: g.cuda_index or 0)
    # logits for 512 tokens x 152k vocab make the output GPU's compute buffer the bigger one
    assert last.estimate.compute_mib > first.estimate.compute_mib


def test_70b_class_model_partially_fits_two_24gb(tmp_path: Path) -> None:
    shape = Shape(n_layers=80, n_embd=8192, n_ff=28672, n_head=64, n_head_kv=8, vocab=128256,
                  ttype=GGMLQuantizationType.Q8_0, write_tokens=False)
    m = read_model_facts(write_model(tmp_path / "70b.gguf", shape))  # sparse: no disk used
    assert m.file_size > 65 * 2**30
    p = plan(gpus("two_equal"), m, one_slot())
    check_invariants(p)
    assert 0 < p.offloaded_layers < 80 and p.host_weights_mib > 0

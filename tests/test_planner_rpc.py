"""The planner with remote devices (llama.cpp RPC servers), as tables: mixed local and remote,
a remote that does not answer, a remote used only when the local GPUs are short."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisor.default_model import default_model_path
from supervisor.gpus import GpuInfo, SimulatedProbe
from supervisor.inventory import RemoteDevice, RemoteInventory
from supervisor.model import ModelFacts, read_model_facts
from supervisor.planner import REMOTE_FIXED_MIB, REMOTE_NOT_NEEDED, Plan, PlanSettings, plan
from tests.gguf_factory import GGMLQuantizationType, Shape, write_model
from tests.test_planner import gpu_lists, llama_cpp_placement, synthetic_model

SIM = Path(__file__).parent / "sim"


def one_slot(**kw: Any) -> PlanSettings:
    return PlanSettings(**{"parallel": 1, **kw})


@pytest.fixture(scope="module")
def smol() -> ModelFacts:
    return read_model_facts(default_model_path())


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> ModelFacts:
    """A 70B-class Q8_0 model (~70 GiB; sparse on disk): more than two 24 GB cards."""
    shape = Shape(n_layers=80, n_embd=8192, n_ff=28672, n_head=64, n_head_kv=8, vocab=128256,
                  ttype=GGMLQuantizationType.Q8_0, write_tokens=False)
    return read_model_facts(write_model(tmp_path_factory.mktemp("m") / "70b.gguf", shape))


def local(name: str) -> tuple[GpuInfo, ...]:
    return SimulatedProbe(SIM / f"{name}.json").read().gpus


def remote(*devs: tuple[str, int], cap: int | None = None, gone: tuple[tuple[str, str], ...] = ()) -> RemoteInventory:
    """Remote devices of 24 GB (``free`` MiB free) on the given endpoints."""
    return RemoteInventory(tuple(RemoteDevice(e, 0, max(24564, free), free, cap) for e, free in devs), gone)


def rows(p: Plan) -> dict[str, Any]:
    return {g.uuid: g for g in p.gpus}


def check_device_list(p: Plan) -> None:
    """What the worker hands llama.cpp (the remotes, then the local CUDA devices, with the
    plan's tensor_split) places each layer where the plan says (llama.cpp's own arithmetic)."""
    worker = [g for g in p.gpus if g.endpoint is not None and g.excluded_reason is None]
    worker += sorted((g for g in p.gpus if g.cuda_index is not None), key=lambda g: g.cuda_index or 0)
    assert [f"{g.endpoint}/0" for g in worker if g.endpoint] == list(p.rpc_devices)
    assert len(worker) == len(p.tensor_split)
    placement = llama_cpp_placement(p.model.n_layers, p.n_gpu_layers, p.tensor_split)
    for dev, g in enumerate(worker):
        assert g.layers == sum(1 for d in placement[:-1] if d == dev), (g, placement)
        assert g.has_output == (placement[-1] == dev)
        held = [il for il, d in enumerate(placement) if d == dev]
        assert (g.first_layer, g.last_layer) == ((held[0], held[-1]) if held else (None, None))
        assert g.planned_mib <= g.usable_mib
    assert math.isclose(sum(p.tensor_split), 1.0, abs_tol=1e-5)


def test_remote_not_used_when_the_local_gpu_holds_the_model(smol: ModelFacts) -> None:
    alone = plan(local("one_gpu"), smol, one_slot())
    p = plan(local("one_gpu"), smol, one_slot(), remote(("10.0.0.2:50052", 24000)))
    assert p.rpc_devices == () and p.tensor_split == alone.tensor_split == (1.0,)
    assert p.n_gpu_layers == -1 and p.env == alone.env
    r = rows(p)["rpc:10.0.0.2:50052/0"]
    assert r.excluded_reason == REMOTE_NOT_NEEDED and r.planned_mib == 0 and r.cuda_index is None
    check_device_list(p)


def test_mixed_local_and_remote_hold_a_model_the_local_gpus_cannot(big: ModelFacts) -> None:
    alone = plan(local("two_equal"), big, one_slot())
    assert 0 < alone.offloaded_layers < 80  # two 24 GB cards are short
    p = plan(local("two_equal"), big, one_slot(), remote(("10.0.0.2:50052", 24000), ("10.0.0.3:50052", 24000)))
    check_device_list(p)
    assert p.n_gpu_layers == -1 and p.offloaded_layers == 80 and p.host_weights_mib < alone.host_weights_mib
    assert p.rpc_devices == ("10.0.0.2:50052/0", "10.0.0.3:50052/0")
    # Only the local GPUs are made visible to CUDA; the remotes come first in the device list,
    # so the local GPUs hold the last layers and the output layer (the logits stay local).
    assert p.env["CUDA_VISIBLE_DEVICES"] == ",".join(g.uuid for g in local("two_equal"))
    r = rows(p)
    a, b = r["rpc:10.0.0.2:50052/0"], r["rpc:10.0.0.3:50052/0"]
    assert a.first_layer == 0 and a.last_layer is not None and b.first_layer == a.last_layer + 1
    last_local = r[local("two_equal")[1].uuid]
    assert last_local.has_output and last_local.last_layer == 80
    assert a.estimate.fixed_mib == REMOTE_FIXED_MIB and last_local.estimate.fixed_mib > REMOTE_FIXED_MIB


def test_an_unreachable_remote_is_left_out_with_its_reason(big: ModelFacts) -> None:
    gone = (("10.0.0.9:50052", "cannot connect: Connection refused"),)
    p = plan(local("two_equal"), big, one_slot(), remote(("10.0.0.2:50052", 24000), gone=gone))
    check_device_list(p)
    assert p.rpc_devices == ("10.0.0.2:50052/0",)
    assert "rpc 10.0.0.9:50052 left out: cannot connect: Connection refused" in p.notes
    assert "rpc:10.0.0.9:50052/0" not in rows(p)
    # Everything unreachable: the local plan, as without remotes.
    q = plan(local("two_equal"), big, one_slot(), remote(gone=gone))
    alone = plan(local("two_equal"), big, one_slot())
    assert (q.tensor_split, q.n_gpu_layers, q.rpc_devices) == (alone.tensor_split, alone.n_gpu_layers, ())


def test_cpu_box_with_capped_remotes_keeps_the_first_layers(smol: ModelFacts) -> None:
    # The case the CI test runs for real: no local GPU, two rpc-servers each allowed 450 MiB.
    p = plan((), smol, one_slot(reserve_mib=0), remote(("127.0.0.1:50052", 60000), ("127.0.0.1:50053", 60000), cap=450))
    check_device_list(p)
    assert not p.cpu_only and p.env["CUDA_VISIBLE_DEVICES"] == ""
    assert p.rpc_devices == ("127.0.0.1:50052/0", "127.0.0.1:50053/0")
    assert p.gpus[0].usable_mib == 450
    # (the cap is what the servers may take: not all of the model fits, so the CPU keeps the
    # first layers: llama.cpp offloads the last ones)
    first = min(g.first_layer for g in p.gpus if g.first_layer is not None)
    assert 0 < first and p.gpus[1].last_layer == 30 and p.gpus[1].has_output


def test_remote_taking_every_layer_of_a_cpu_box(smol: ModelFacts) -> None:
    p = plan((), smol, one_slot(), remote(("127.0.0.1:50052", 60000)))
    check_device_list(p)
    assert p.n_gpu_layers == -1 and p.rpc_devices == ("127.0.0.1:50052/0",) and p.tensor_split == (1.0,)
    assert not any("planning for CPU only" in n for n in p.notes)


@pytest.mark.parametrize(
    ("kw", "why"),
    [
        ({"split_mode": "row"}, "split mode row uses local CUDA GPUs only"),
        ({"split_mode": "none"}, "split mode none uses local CUDA GPUs only"),
        ({"cpu_only": True}, "CPU-only plan"),
    ],
)
def test_remotes_are_left_out_where_they_cannot_take_layers(big: ModelFacts, kw: dict[str, Any], why: str) -> None:
    p = plan(local("two_equal"), big, one_slot(**kw), remote(("10.0.0.2:50052", 24000)))
    assert p.rpc_devices == ()
    assert rows(p)["rpc:10.0.0.2:50052/0"].excluded_reason.startswith(why)  # type: ignore[union-attr]


def test_remote_below_reserve_or_too_small_for_a_layer(big: ModelFacts) -> None:
    p = plan(local("two_equal"), big, one_slot(), remote(("10.0.0.2:50052", 900), ("10.0.0.3:50052", 1500)))
    r = rows(p)
    assert r["rpc:10.0.0.2:50052/0"].excluded_reason == "free 900 MiB is below the reserve 1024 MiB"
    assert "cannot hold one layer" in r["rpc:10.0.0.3:50052/0"].excluded_reason
    assert p.rpc_devices == ()


def test_reserve_override_by_remote_key(big: ModelFacts) -> None:
    p = plan(local("two_equal"), big, one_slot(reserve_overrides={"rpc:10.0.0.2:50052/0": 4000}),
             remote(("10.0.0.2:50052", 24000)))
    r = rows(p)["rpc:10.0.0.2:50052/0"]
    assert (r.reserve_mib, r.usable_mib) == (4000, 20000)
    check_device_list(p)


remote_lists = st.lists(st.tuples(st.integers(1024, 81920), st.floats(0.0, 1.0), st.sampled_from([None, 2000, 30000])),
                        max_size=3).map(
    lambda xs: RemoteInventory(tuple(RemoteDevice(f"10.0.0.{i + 2}:50052", 0, t, int(t * f), cap)
                                     for i, (t, f, cap) in enumerate(xs)))
)


@settings(max_examples=120, deadline=None)
@given(inv=gpu_lists, remotes=remote_lists, n_layers=st.integers(1, 120), layer_mib=st.integers(1, 1200),
       reserve=st.integers(0, 4096), keep_env=st.booleans())
def test_properties_with_remotes(
    inv: tuple[GpuInfo, ...], remotes: RemoteInventory, n_layers: int, layer_mib: int, reserve: int, keep_env: bool
) -> None:
    model = synthetic_model(n_layers, layer_mib, 32000)
    s = one_slot(reserve_mib=reserve, set_cuda_visible_devices=not keep_env)
    p = plan(inv, model, s, remotes)
    alone = plan(inv, model, s)
    if not p.cpu_only:
        check_device_list(p)  # llama.cpp places every layer where the plan says
    assert p.offloaded_layers >= alone.offloaded_layers  # remotes never make it worse
    if alone.n_gpu_layers == -1 and not alone.cpu_only:
        assert p.rpc_devices == () and p.tensor_split == alone.tensor_split  # local first
    used_remote = [g for g in p.gpus if g.endpoint and g.excluded_reason is None]
    assert [f"{g.endpoint}/0" for g in used_remote] == list(p.rpc_devices)
    assert all(g.cuda_index is None for g in p.gpus if g.endpoint)


def test_remotes_are_weighed_after_the_local_gpus_are_trimmed() -> None:
    # Found by the property above: two local GPUs fit the model only once the one without a
    # layer's worth is left out (_leave_out_unneeded); the remote must not be taken before that.
    inv = tuple(GpuInfo(i, f"GPU-{i:08d}", f"gpu{i}", f"00000000:{i + 1:02X}:00.0", t, f, t - f)
                for i, (t, f) in enumerate([(2254, 1127), (6324, 1581)]))
    model = synthetic_model(4, 40, 32000)
    s = one_slot(reserve_mib=0, set_cuda_visible_devices=False)
    alone = plan(inv, model, s)
    p = plan(inv, model, s, RemoteInventory((RemoteDevice("10.0.0.2:50052", 0, 2624, 2624),)))
    assert alone.n_gpu_layers == -1
    assert p.rpc_devices == () and p.tensor_split == alone.tensor_split
    assert rows(p)["rpc:10.0.0.2:50052/0"].excluded_reason == REMOTE_NOT_NEEDED

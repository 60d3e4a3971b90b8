"""The VRAM planner: GPU inventory + model facts + settings -> Plan.

Rules for this module:
- PURE. No I/O, no environment reads, no clock, no logging. Everything it needs (the
  inherited CUDA_VISIBLE_DEVICES, a parsed llama-fit-params answer) is an argument, so it
  is tested as tables and property tests.
- GPU identity is the NVML index / UUID. The worker's environment pins CUDA's order with
  CUDA_DEVICE_ORDER=PCI_BUS_ID and lists the chosen GPUs by UUID in plan order, because
  CUDA's default order (fastest first) differs from NVML's; every planner in this field has
  shipped that bug at least once.
- The estimate mirrors how llama.cpp places tensors (llama-model.cpp, load_tensors):
  * the input layer (token_embd) always stays on the CPU;
  * the output layer counts as layer n_layer, and n_gpu_layers = k puts the LAST k of the
    n_layer + 1 layers on GPUs (i_gpu_start = n_layer + 1 - k): the output layer goes first,
    k = 1 offloads only it, and k = n_layer + 1 is everything (we then send -1 = all);
  * layer il of the offloaded range goes to the device whose cumulative, normalised
    tensor_split first exceeds (il - i_gpu_start) / act_gpu_layers (std::upper_bound);
  * split_mode none uses only main_gpu; row splits each matrix by rows across the GPUs,
    while every layer still gets a device by the split as in layer mode (its KV cache,
    norms and compute buffer live there).
  (llama.cpp as llama-cpp-python 0.3.36 vendors it.)
  All constants of the estimate live in the block below; a GPU check calibrates them.
- A GPU the placement does not need is not made visible to the worker at all
  (_leave_out_unneeded): its CUDA context and compute buffer would cost ~0.9 GiB for nothing.
- Remote devices (llama.cpp RPC servers, supervisor/rpc.py) take layers only when the local
  GPUs cannot hold the whole model: every remote hop costs per token. They come FIRST in the
  worker's device list (llama.cpp's own default order, "to minimize network transfers"): the
  CPU keeps the first layers, the remotes the next ones, the local GPUs the last ones and the
  output layer, so the logits never cross the network. Layer split only (a row split and split
  mode none are local CUDA matters).
"""

from __future__ import annotations

import bisect
import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from supervisor.config import DeviceOrder, GpuSection, ModelSettings
from supervisor.inventory import GpuInfo, RemoteDevice, RemoteInventory
from supervisor.model import ModelFacts
from worker.protocol import SplitMode  # declared once, where the worker reads it

MIB = 1024 * 1024

# --- the estimate's constants (calibrate here, nowhere else) ------------------------------
# Per GPU in use: the CUDA context, cuBLAS workspace and ggml's CUDA pools, i.e. what the
# worker's process uses beyond llama.cpp's own model/KV/compute buffers. Measured by
# bench/gpu_check.py on an H100 80GB (driver 580, CUDA 13, llama-cpp-python 0.3.36,
# 2026-11-27): 688-690 MiB, the same for a 94 MiB and a 1.6 GiB model at 2k-32k context
# (docs/gpu-check.md). The earlier guess of 400 MiB under-predicted by up to 30%.
CUDA_CONTEXT_MIB = 700
# llama-cpp-python leaves n_ubatch at 512 and llama.cpp clamps n_ubatch <= n_batch; the
# compute graph is reserved for one micro-batch of this many tokens.
DEFAULT_N_UBATCH = 512
# f32 activations of width n_embd alive at once in a layer (residual, norm out, attn out,
# ffn out); the graph allocator reuses everything else.
COMPUTE_EMBD_TENSORS = 4
# The compute buffer is the peak of the graph; the biggest single intermediate is one of:
#   attention scores  n_ubatch * n_head * n_ctx * 4 bytes (f32 KQ; none with flash attention)
#   feed-forward      n_ubatch * n_ff * 4 * 2 (gate and up alive together)
#   logits            n_ubatch * n_vocab * 4 (only on the GPU holding the output layer)
# compute = n_ubatch * n_embd * 4 * COMPUTE_EMBD_TENSORS + max(of those) , times a slack:
COMPUTE_SLACK = 1.10
# KV cache type: llama.cpp's default is f16 for K and V.
KV_BYTES_PER_ELEMENT = 2
# Per remote device in use, beyond its model/KV/compute buffers. The rpc-server created its
# backend (for CUDA: the context) before we read its free memory, so what is left is what
# grows on first use (cuBLAS workspace, ggml's CUDA pools). A guess, not yet calibrated on a
# GPU remote; a CPU remote needs none of it.
REMOTE_FIXED_MIB = 256

NO_GPU_NOTE = "no GPU found; planning for CPU only"
REMOTE_NOT_NEEDED = "not needed: the model fits on the local GPUs (a remote device costs a network hop per token)"
# Why a GPU that could take part is left out: it would cost a CUDA context (and in layer
# mode a compute buffer) for nothing, which on a small display GPU is most of what is free.
NOT_NEEDED = "not needed: the model fits on the others"
# Row split: every visible GPU holds rows of every matrix and every matrix product waits for
# all of them, so a GPU whose share is under one layer's worth adds a context and a sync
# point for less than one layer of VRAM.
NOT_NEEDED_ROW = NOT_NEEDED + " (its row share would be under one layer's worth)"
# --no-set-cuda-visible-devices: the worker still sees a GPU we leave out.
STILL_VISIBLE = (
    "; still visible to the worker (inherited CUDA_VISIBLE_DEVICES), so it holds a CUDA context"
    f" (~{CUDA_CONTEXT_MIB} MiB)"
)

# A setting's default is declared once, in the config schema: a PlanSettings built without
# it (tests, bench/) plans what a server started without that key would.
_GPU = GpuSection()
_MODEL = ModelSettings()


@dataclass(frozen=True)
class FitParams:
    """What llama-fit-params answered (parsed by supervisor/fit_params.py)."""

    n_ctx: int
    n_gpu_layers: int
    tensor_split: tuple[float, ...]  # per device in plan order (layer counts; normalised here)


@dataclass(frozen=True, kw_only=True)
class PlanSettings:
    reserve_mib: int = _GPU.reserve_mib
    reserve_overrides: Mapping[str, int] = field(default_factory=dict)  # UUID or "index" -> MiB
    device_order: DeviceOrder = _GPU.device_order
    split_mode: SplitMode = _GPU.split_mode
    devices: tuple[int, ...] | None = None  # NVML indices to keep; None: all
    set_cuda_visible_devices: bool = _GPU.set_cuda_visible_devices
    # The CUDA_VISIBLE_DEVICES the worker inherits; used only when set_cuda_visible_devices
    # is false (None: unset, every GPU visible).
    inherited_cuda_visible_devices: str | None = None
    n_ctx: int = _MODEL.ctx_size  # 0: the model's training context
    n_batch: int = _MODEL.n_batch
    flash_attn: bool = _MODEL.flash_attn != "off"  # the estimate counts on it ("auto": llama.cpp enables it)
    # The worker's slots: each has a KV cache of n_ctx cells of its own (llama.cpp's
    # non-unified KV, see worker/engine/load.py), so the KV cache is n_ctx * parallel.
    parallel: int = _MODEL.parallel
    # OOM ladder knobs (supervisor/restart.py PlanAdjust)
    extra_reserve_mib: int = 0
    max_gpu_layers: int | None = None  # cap on repeating layers on GPUs
    cpu_only: bool = False
    # --use-fit-params: the parsed answer, or why there is none
    fit_params: FitParams | None = None
    fit_params_error: str | None = None


@dataclass(frozen=True)
class Estimate:
    weights_mib: int
    kv_mib: int
    compute_mib: int
    fixed_mib: int

    @property
    def total_mib(self) -> int:
        return self.weights_mib + self.kv_mib + self.compute_mib + self.fixed_mib


@dataclass(frozen=True)
class GpuPlan:
    index: int  # NVML index
    uuid: str
    name: str
    pci_bus_id: str
    total_mib: int
    free_mib: int
    reserve_mib: int
    usable_mib: int
    planned_mib: int
    layers: int  # repeating layers on this GPU
    has_output: bool  # the output layer lives here
    share: float  # this GPU's entry in tensor_split (0 when unused)
    cuda_index: int | None  # index the worker's CUDA sees; None: not visible to the worker
    excluded_reason: str | None
    estimate: Estimate
    endpoint: str | None = None  # a remote device's rpc-server (host:port); None: a local GPU
    first_layer: int | None = None  # the layers placed here, first..last (n_layers: the output layer)
    last_layer: int | None = None


@dataclass(frozen=True)
class ModelSummary:
    path: str
    name: str
    architecture: str
    file_mib: int
    n_layers: int
    n_ctx_train: int
    n_embd: int
    n_head: int
    n_head_kv: int
    vocab_size: int
    tied_embeddings: bool
    chat_template: bool
    kv_mib_per_layer: float


@dataclass(frozen=True)
class Plan:
    env: Mapping[str, str]  # variables to set in the worker's environment
    tensor_split: tuple[float, ...]  # per CUDA device of the worker; () when CPU only
    n_gpu_layers: int  # -1: every layer and the output layer
    offloaded_layers: int  # repeating layers actually on GPUs
    output_on_gpu: bool
    split_mode: SplitMode
    main_gpu: int  # CUDA index inside the worker
    n_ctx: int
    n_batch: int
    flash_attn: bool
    cpu_only: bool
    source: Literal["vram-llm", "llama-fit-params"]
    gpus: tuple[GpuPlan, ...]  # every inventory GPU, in plan order
    model: ModelSummary
    host_weights_mib: int  # weights left in host RAM
    notes: tuple[str, ...]
    # The remote devices the worker uses ("host:port/device"), first in its device list, before
    # the local GPUs; tensor_split then has one entry per remote device first. (): none.
    rpc_devices: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["env"] = dict(self.env)
        d["tensor_split"] = list(self.tensor_split)
        d["notes"] = list(self.notes)
        d["rpc_devices"] = list(self.rpc_devices)
        for g, gp in zip(d["gpus"], self.gpus):
            g["estimate"]["total_mib"] = gp.estimate.total_mib
        d["gpus"] = list(d["gpus"])
        return d


# --- the estimate --------------------------------------------------------------------------


def _mib(n: float) -> int:
    return int(math.ceil(n / MIB))


def kv_bytes_per_layer(model: ModelFacts, n_ctx: int, parallel: int) -> int:
    """KV bytes of one layer: n_ctx cells for each of the worker's ``parallel`` slots."""
    return n_ctx * parallel * model.n_head_kv * (model.key_length + model.value_length) * KV_BYTES_PER_ELEMENT


def compute_bytes(model: ModelFacts, n_ctx: int, n_batch: int, flash_attn: bool, holds_output: bool) -> int:
    """The compute-buffer allowance of one GPU (formula in the constants block above)."""
    ub = min(n_batch, DEFAULT_N_UBATCH)
    base = ub * model.n_embd * 4 * COMPUTE_EMBD_TENSORS
    attn = 0 if flash_attn else ub * model.n_head * n_ctx * 4
    ffn = ub * model.n_ff * 4 * 2
    logits = ub * model.vocab_size * 4 if holds_output else 0
    return int((base + max(attn, ffn, logits)) * COMPUTE_SLACK)


def _f32(x: float) -> float:
    """x rounded to a C float: llama.cpp does the split arithmetic in float."""
    return float(struct.unpack("f", struct.pack("f", x))[0])


def assign_layers(n_layer: int, n_gpu_layers: int, split: Sequence[float]) -> list[int | None]:
    """llama.cpp's placement: device index (into split) per layer 0..n_layer, the last
    entry being the output layer; None = CPU. The arithmetic is float32 as in llama.cpp
    (the shares reach it as C floats), so a layer on a split boundary lands where it will."""
    n_dev = len(split)
    out: list[int | None] = [None] * (n_layer + 1)
    if n_dev == 0 or n_gpu_layers <= 0 or sum(split) <= 0:
        return out
    cum: list[float] = []
    acc = 0.0
    for sp in split:
        acc = _f32(acc + _f32(sp))
        cum.append(acc)
    cum = [_f32(c / acc) for c in cum]
    i_gpu_start = max(n_layer + 1 - n_gpu_layers, 0)
    act = min(n_gpu_layers, n_layer + 1)
    for il in range(n_layer + 1):
        if il < i_gpu_start or il - i_gpu_start >= act:
            continue
        out[il] = min(bisect.bisect_right(cum, _f32((il - i_gpu_start) / act)), n_dev - 1)
    return out


@dataclass
class _Cand:
    gpu: GpuInfo
    reserve: int
    usable: int
    fixed: int = CUDA_CONTEXT_MIB  # per device in use beyond its buffers
    remote: RemoteDevice | None = None


def _estimates(
    model: ModelFacts,
    cands: Sequence[_Cand],
    split: Sequence[float],
    ngl: int,
    mode: SplitMode,
    main: int,
    n_ctx: int,
    s: PlanSettings,
) -> tuple[list[Estimate], list[int], list[bool]]:
    """Per candidate: estimate, repeating layers placed, holds output."""
    n = len(cands)
    kv_layer = kv_bytes_per_layer(model, n_ctx, s.parallel)
    if mode == "none":
        placement = assign_layers(model.n_layers, ngl, [1.0 if i == main else 0.0 for i in range(n)])
    else:
        placement = assign_layers(model.n_layers, ngl, split)
    layers = [0] * n
    weights = [0.0] * n
    kv = [0] * n
    out_dev = placement[-1]
    for il, dev in enumerate(placement[:-1]):
        if dev is not None:
            layers[dev] += 1
            weights[dev] += model.layer_bytes[il]
            kv[dev] += kv_layer
    if out_dev is not None:
        weights[out_dev] += model.output_bytes
    holds_output = [i == out_dev for i in range(n)]
    if mode == "row":
        # Matrices are split by rows across all GPUs (each GPU's split buffer). Everything
        # else follows the layer's device, which llama.cpp assigns by the split exactly as in
        # layer mode (llama-model.cpp get_layer_buft_list; the KV cache of layer il lives on
        # model.dev_layer(il), llama-kv-cache.cpp): the KV cache, the compute buffers and the
        # output layer's device are spread as in layer mode.
        total_w = sum(weights)
        total_split = sum(split) or 1.0
        weights = [total_w * sp / total_split for sp in split]
    ests: list[Estimate] = []
    for i in range(n):
        in_use = mode != "none" or i == main
        comp = 0
        if in_use and (mode != "row" or layers[i] > 0 or holds_output[i] or i == main):
            comp = compute_bytes(model, n_ctx, s.n_batch, s.flash_attn, holds_output[i])
        ests.append(
            Estimate(
                weights_mib=_mib(weights[i]),
                kv_mib=_mib(kv[i]),
                compute_mib=_mib(comp),
                fixed_mib=cands[i].fixed if in_use else 0,
            )
        )
    return ests, layers, holds_output


def _search(
    model: ModelFacts, cands: Sequence[_Cand], split: Sequence[float], top: int, mode: SplitMode, main: int,
    n_ctx: int, s: PlanSettings,
) -> tuple[int, list[Estimate], list[int], list[bool]]:
    """The largest n_gpu_layers <= top whose estimate fits every candidate (0: none)."""
    for k in range(top, 0, -1):
        e, lay, o = _estimates(model, cands, split, k, mode, main, n_ctx, s)
        if all(est.total_mib <= c.usable for est, c in zip(e, cands)):
            return k, e, lay, o
    return 0, [], [], []


def _main_of(cands: Sequence[_Cand]) -> int:
    return max(range(len(cands)), key=lambda i: cands[i].usable)  # max() keeps the first on ties


def _merge_into_neighbours(split: Sequence[float], idle: Sequence[int]) -> list[float]:
    """The split without the idle GPUs, each idle share added to the kept GPU before it (or
    after it when it is first). An idle GPU's interval of the cumulative split holds no layer,
    so joining it to a neighbour's moves no layer: llama.cpp places every layer as before."""
    merged = list(split)
    for i in idle:
        keep_before = [j for j in range(i) if j not in idle]
        keep_after = [j for j in range(i + 1, len(split)) if j not in idle]
        to = keep_before[-1] if keep_before else keep_after[0]
        merged[to] += merged[i]
    return [merged[j] for j in range(len(split)) if j not in idle]


@dataclass
class _Placed:
    cands: list[_Cand]
    weights: list[float]  # what split is rounded from (renormalising these rounds only once)
    split: tuple[float, ...]
    main: int
    ngl: int
    ests: list[Estimate]
    layers: list[int]
    outs: list[bool]


def _leave_out_unneeded(
    model: ModelFacts, p: _Placed, top: int | None, n_ctx: int, s: PlanSettings
) -> tuple[_Placed, list[tuple[_Cand, str]]]:
    """Drop the GPUs the placement does not need, so the worker opens no CUDA context on them.

    The rule, the same for layer and row split: a GPU whose share of the split is worth less
    than one of the offloaded layers (share * act_gpu_layers < 1) is left out (in row mode
    never main_gpu). Such a GPU gets at most one layer, or only
    rows of every matrix adding up to less than one layer, for a CUDA context and a compute
    buffer. The shares of the others are renormalised and the placement redone (``top``:
    search the largest n_gpu_layers again; None: keep n_gpu_layers, as llama-fit-params
    chose it). Leaving GPUs out must not offload fewer layers; when it would, layer mode
    still drops the GPUs llama.cpp gives no layer at all, first with the renormalised split,
    else with each one's share handed to a neighbour (its interval holds no layer, so that
    moves none). A GPU left out for good never comes back in a later round."""
    dropped: list[tuple[_Cand, str]] = []
    mode = s.split_mode
    why = NOT_NEEDED_ROW if mode == "row" else NOT_NEEDED
    while len(p.cands) > 1:
        n = len(p.cands)
        act = min(p.ngl, model.n_layers + 1)
        total = sum(p.split) or 1.0
        small = [i for i in range(n) if p.split[i] / total * act < 1 and not (mode == "row" and i == p.main)]
        trials: list[tuple[list[int], bool]] = [(small, False)]  # (GPUs to drop, merge their shares)
        if mode == "layer":
            empty = [i for i in range(n) if p.layers[i] == 0 and not p.outs[i]]
            trials += [(empty, False), (empty, True)]
        found: tuple[list[int], _Placed] | None = None
        for drop, merge in trials:
            if not drop or len(drop) == n:
                continue
            kept = [c for i, c in enumerate(p.cands) if i not in drop]
            main = _main_of(kept)
            if merge:
                weights = _merge_into_neighbours(p.weights, drop)
            else:
                weights = [w for i, w in enumerate(p.weights) if i not in drop]
            split = _round_split(weights)
            if top is None:
                k = p.ngl
                e, lay, o = _estimates(model, kept, split, k, mode, main, n_ctx, s)
            else:
                k, e, lay, o = _search(model, kept, split, top, mode, main, n_ctx, s)
            if k >= p.ngl:
                found = (drop, _Placed(kept, weights, split, main, k, e, lay, o))
                break
        if found is None:
            break
        dropped += [(p.cands[i], why) for i in found[0]]
        p = found[1]
    return p, dropped


# --- CUDA_VISIBLE_DEVICES -------------------------------------------------------------------


def parse_visible_devices(value: str | None, gpus: Sequence[GpuInfo]) -> tuple[list[GpuInfo], str | None]:
    """The GPUs a CUDA process sees, in its order, given CUDA_VISIBLE_DEVICES and
    CUDA_DEVICE_ORDER=PCI_BUS_ID (so integers are NVML indices). Like CUDA, an entry that
    matches nothing hides itself and every entry after it."""
    if value is None:
        return sorted(gpus, key=lambda g: g.index), None
    by_index = {g.index: g for g in gpus}
    seen: list[GpuInfo] = []
    for raw in value.split(","):
        tok = raw.strip()
        match: GpuInfo | None = None
        if tok.isdigit():
            match = by_index.get(int(tok))
        elif tok:
            hits = [g for g in gpus if g.uuid.startswith(tok) or g.uuid.startswith("GPU-" + tok)]
            match = hits[0] if len(hits) == 1 else None
        if match is None or match in seen:
            note = None
            if tok:
                note = (
                    f"CUDA_VISIBLE_DEVICES entry {tok!r} matches no GPU (or repeats one); "
                    "CUDA hides it and every entry after it"
                )
            return seen, note
        seen.append(match)
    return seen, None


# --- the plan -------------------------------------------------------------------------------


def _reserve_for(g: GpuInfo, s: PlanSettings) -> int:
    r = s.reserve_overrides.get(g.uuid, s.reserve_overrides.get(str(g.index), s.reserve_mib))
    return r + s.extra_reserve_mib


def _summary(model: ModelFacts, n_ctx: int) -> ModelSummary:
    return ModelSummary(
        path=model.path,
        name=model.name,
        architecture=model.architecture,
        file_mib=_mib(model.file_size),
        n_layers=model.n_layers,
        n_ctx_train=model.n_ctx_train,
        n_embd=model.n_embd,
        n_head=model.n_head,
        n_head_kv=model.n_head_kv,
        vocab_size=model.vocab_size,
        tied_embeddings=model.tied_embeddings,
        chat_template=model.chat_template,
        kv_mib_per_layer=round(kv_bytes_per_layer(model, n_ctx, 1) / MIB, 3),  # one slot
    )


def _round_split(weights: Sequence[float]) -> tuple[float, ...]:
    total = sum(weights)
    if total <= 0:
        return ()
    shares = [round(w / total, 6) for w in weights]
    # Put the rounding error on the largest share so the list sums to 1 (to 1e-6).
    big = max(range(len(shares)), key=lambda i: shares[i])
    shares[big] = round(shares[big] + 1.0 - sum(shares), 6)
    return tuple(shares)


def _with_visibility(reason: str | None, visible: bool) -> str | None:
    """A GPU left out but still visible to the worker (only with the inherited
    CUDA_VISIBLE_DEVICES) gets a zero share, yet CUDA still opens a context on it: say so."""
    return reason + STILL_VISIBLE if reason is not None and visible else reason


def _remote_gpu(n: int, d: RemoteDevice) -> GpuInfo:
    """A remote device in the planner's GPU rows: a negative index (never an NVML one), its
    key (rpc:host:port/device) as the UUID."""
    return GpuInfo(-1 - n, d.key, f"RPC {d.endpoint} #{d.device}", "", d.total_mib, d.free_mib, d.total_mib - d.free_mib)


def _remote_candidates(
    remotes: RemoteInventory, model: ModelFacts, s: PlanSettings, one_layer_mib: int, reasons: dict[int, str],
    info: dict[int, tuple[int, int]],
) -> tuple[list[GpuInfo], list[_Cand]]:
    """Every remote device as a plan row, and the ones that could take a layer as candidates
    (the same reserve and "one layer" rule as a local GPU, with the remote's own fixed cost)."""
    rows: list[GpuInfo] = []
    cands: list[_Cand] = []
    one_remote = one_layer_mib - CUDA_CONTEXT_MIB + REMOTE_FIXED_MIB
    for n, d in enumerate(remotes.devices):
        g = _remote_gpu(n, d)
        rows.append(g)
        reserve = _reserve_for(g, s)
        usable = max(g.free_mib - reserve, 0)
        if d.max_mib is not None:
            usable = min(usable, d.max_mib)
        info[g.index] = (reserve, usable)
        if s.cpu_only:
            reasons[g.index] = "CPU-only plan (out-of-memory fallback)"
        elif s.split_mode != "layer":
            reasons[g.index] = f"split mode {s.split_mode} uses local CUDA GPUs only (remote devices take whole layers)"
        elif s.fit_params is not None:
            reasons[g.index] = "llama-fit-params plans the local GPUs only"
        elif g.free_mib < reserve:
            reasons[g.index] = f"free {g.free_mib} MiB is below the reserve {reserve} MiB"
        elif usable < one_remote:
            reasons[g.index] = f"usable {usable} MiB cannot hold one layer plus fixed costs ({one_remote} MiB)"
        else:
            cands.append(_Cand(g, reserve, usable, REMOTE_FIXED_MIB, d))
    return rows, cands


def _layer_ranges(n_layer: int, ngl: int, split: Sequence[float], mode: SplitMode, main: int, n: int) -> list[tuple[int, int] | None]:
    """Per device of the worker's list: the first and last layer llama.cpp places there."""
    placement = assign_layers(n_layer, ngl, [1.0 if i == main else 0.0 for i in range(n)] if mode == "none" else split)
    out: list[tuple[int, int] | None] = [None] * n
    for il, dev in enumerate(placement):
        if dev is not None:
            r = out[dev]
            out[dev] = (il, il) if r is None else (r[0], il)
    return out


def plan(
    gpus: Sequence[GpuInfo], model: ModelFacts, settings: PlanSettings, remotes: RemoteInventory | None = None
) -> Plan:
    """``remotes``: the rpc-servers' devices (supervisor/rpc.py); used only when the local GPUs
    cannot hold the whole model (see the module docstring)."""
    s = settings
    notes: list[str] = []
    remotes = remotes or RemoteInventory()
    for endpoint, why in remotes.unreachable:
        notes.append(f"rpc {endpoint} left out: {why}")
    n_ctx = s.n_ctx or model.n_ctx_train or 4096
    if s.fit_params is not None and s.fit_params.n_ctx > 0:
        n_ctx = s.fit_params.n_ctx
    if model.n_ctx_train and n_ctx > model.n_ctx_train:
        notes.append(f"context {n_ctx} is larger than the model's training context {model.n_ctx_train}")

    # 1. Which GPUs the worker's CUDA will see, in which order (the "logical" order).
    reasons: dict[int, str] = {}
    all_sorted = sorted(gpus, key=lambda g: g.index)
    if s.set_cuda_visible_devices:
        if s.device_order == "free_desc":
            ordered = sorted(all_sorted, key=lambda g: -g.free_mib)  # stable: ties keep PCI order
        else:
            ordered = list(all_sorted)
        visible = ordered
    else:
        visible, note = parse_visible_devices(s.inherited_cuda_visible_devices, all_sorted)
        if note:
            notes.append(note)
        notes.append(
            "keeping the inherited CUDA_VISIBLE_DEVICES="
            + (repr(s.inherited_cuda_visible_devices) if s.inherited_cuda_visible_devices is not None else "(unset)")
            + "; the split follows its order"
        )
        ordered = visible + [g for g in all_sorted if g not in visible]
        for g in all_sorted:
            if g not in visible:
                reasons[g.index] = "not visible in the inherited CUDA_VISIBLE_DEVICES"

    if s.devices is not None:
        known = {g.index for g in gpus}
        missing = [d for d in s.devices if d not in known]
        if missing:
            notes.append(f"--devices lists GPU indices that do not exist: {', '.join(map(str, missing))}")
        for g in ordered:
            if g.index not in s.devices and g.index not in reasons:
                reasons[g.index] = "not in --devices"

    # 2. Usable VRAM and the "cannot hold even one layer" rule.
    kv_layer = kv_bytes_per_layer(model, n_ctx, s.parallel)
    biggest_layer = max(model.layer_bytes, default=0)
    one_layer_mib = (
        CUDA_CONTEXT_MIB
        + _mib(compute_bytes(model, n_ctx, s.n_batch, s.flash_attn, False))
        + _mib(biggest_layer + kv_layer)
    )
    info: dict[int, tuple[int, int]] = {}
    for g in ordered:
        reserve = _reserve_for(g, s)
        usable = max(g.free_mib - reserve, 0)
        info[g.index] = (reserve, usable)
        if g.index in reasons:
            continue
        if g.free_mib < reserve:
            reasons[g.index] = f"free {g.free_mib} MiB is below the reserve {reserve} MiB"
        elif usable < one_layer_mib:
            reasons[g.index] = (
                f"usable {usable} MiB cannot hold one layer plus fixed costs ({one_layer_mib} MiB)"
            )
    if s.cpu_only:
        for g in ordered:
            reasons.setdefault(g.index, "CPU-only plan (out-of-memory fallback)")

    cands = [_Cand(g, *info[g.index]) for g in visible if g.index not in reasons]
    remote_rows, remote_cands = _remote_candidates(remotes, model, s, one_layer_mib, reasons, info)
    if s.split_mode == "none" and len(cands) > 1:
        best = max(cands, key=lambda c: c.usable)  # max() keeps the first on ties
        for c in cands:
            if c is not best:
                reasons[c.gpu.index] = "split mode none uses only the GPU with the most usable VRAM"
        cands = [best]

    # 3. The split and the largest n_gpu_layers that fits.
    source: Literal["vram-llm", "llama-fit-params"] = "vram-llm"
    main = 0
    split: tuple[float, ...] = ()
    ngl = 0
    ests: list[Estimate] = []
    layers: list[int] = []
    outs: list[bool] = []
    if cands or remote_cands:
        main = _main_of(cands) if cands else 0
        if s.split_mode == "none":
            main = 0
        weights = [float(max(c.usable - c.fixed, 0)) for c in cands]
        split = _round_split(weights) if s.split_mode != "none" else (1.0,)
        top = model.n_layers + 1
        if s.max_gpu_layers is not None and s.max_gpu_layers < model.n_layers:
            # The cap counts repeating layers; n_gpu_layers also counts the output layer.
            top = s.max_gpu_layers + 1 if s.max_gpu_layers > 0 else 0

        fit = s.fit_params
        if fit is not None:
            # The tool saw the worker's devices: the plan's GPUs, or every inherited visible one.
            seen_by_tool = cands if s.set_cuda_visible_devices else [_Cand(g, 0, 0) for g in visible]
            pos = [[c.gpu for c in seen_by_tool].index(c.gpu) for c in cands]
            ts = [fit.tensor_split[p] if p < len(fit.tensor_split) else 0.0 for p in pos]
            if len(fit.tensor_split) > len(seen_by_tool) or (
                len(cands) > 1 and sum(ts) <= 0 and s.split_mode != "none"
            ):
                notes.append(
                    f"llama-fit-params answered for {len(fit.tensor_split)} devices, the plan has "
                    f"{len(cands)}; using vram-llm's own plan"
                )
                fit = None
            else:
                source = "llama-fit-params"
                if len(cands) > 1 and s.split_mode != "none":
                    weights, split = ts, _round_split(ts)
                ngl = min(max(fit.n_gpu_layers, 0), model.n_layers + 1, top)
                ests, layers, outs = _estimates(model, cands, split, ngl, s.split_mode, main, n_ctx, s)
                notes.append("layer split and context taken from llama-fit-params")
        elif s.fit_params_error:
            notes.append(f"llama-fit-params: {s.fit_params_error}; using vram-llm's own plan")

        if fit is None and cands:
            ngl, ests, layers, outs = _search(model, cands, split, top, s.split_mode, main, n_ctx, s)
        local_cands = cands
        dropped: list[tuple[_Cand, str]] = []
        if ngl > 0 and s.split_mode != "none":
            placed, dropped = _leave_out_unneeded(
                model, _Placed(cands, weights, split, main, ngl, ests, layers, outs), top if fit is None else None, n_ctx, s
            )
            cands, split, main = placed.cands, placed.split, placed.main
            ngl, ests, layers, outs = placed.ngl, placed.ests, placed.layers, placed.outs
        if remote_cands and local_cands and ngl >= top:
            for c in remote_cands:
                reasons[c.gpu.index] = REMOTE_NOT_NEEDED
        elif remote_cands:
            # The local GPUs are short: the remotes first (see the module docstring), then the
            # same search and leave-out as for the local GPUs alone; kept if it offloads more.
            both = remote_cands + local_cands
            w2 = [float(max(c.usable - c.fixed, 0)) for c in both]
            sp2 = _round_split(w2)
            m2 = _main_of(both)
            k2, e2, l2, o2 = _search(model, both, sp2, top, s.split_mode, m2, n_ctx, s)
            if k2 > ngl:
                placed, dropped2 = _leave_out_unneeded(model, _Placed(both, w2, sp2, m2, k2, e2, l2, o2), top, n_ctx, s)
                cands, split, main, dropped = placed.cands, placed.split, placed.main, dropped2
                ngl, ests, layers, outs = placed.ngl, placed.ests, placed.layers, placed.outs
            else:
                for c in remote_cands:
                    reasons[c.gpu.index] = (
                        "adds no layer to what the local GPUs hold" if local_cands
                        else "not even one layer fits with the estimated context and compute buffers"
                    )
        for c, why in dropped:
            reasons[c.gpu.index] = why
        if fit is None:
            if ngl == 0:
                for c in cands:
                    reasons[c.gpu.index] = "not even one layer fits with the estimated context and compute buffers"
                cands = []
            elif ngl < model.n_layers + 1:
                if s.max_gpu_layers is not None and ngl == top:
                    notes.append(f"GPU layers capped at {s.max_gpu_layers} (out-of-memory fallback)")
                else:
                    notes.append(
                        f"partial offload: {ngl - 1} of {model.n_layers} layers fit on the GPUs, "
                        "with the output layer (llama.cpp offloads it first)"
                    )
    elif gpus or remotes.devices:
        notes.append("no GPU can be used; planning for CPU only")

    cpu_only = not cands
    if cpu_only:
        split, ngl, main, ests, layers, outs = (), 0, 0, [], [], []

    # 4. The worker's environment and the per-GPU rows, in plan order.
    env: dict[str, str] = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    cand_pos = {c.gpu.index: i for i, c in enumerate(cands)}  # position in the worker's device list
    local = [c for c in cands if c.remote is None]
    n_remote = len(cands) - len(local)  # the remotes come first
    ranges = _layer_ranges(model.n_layers, ngl, split, s.split_mode, main, len(cands)) if cands else []
    if s.set_cuda_visible_devices:
        # UUIDs, not indices: unambiguous whatever CUDA_DEVICE_ORDER the worker ends up with.
        # Empty when CPU only, so the worker creates no CUDA context on any GPU.
        env["CUDA_VISIBLE_DEVICES"] = ",".join(c.gpu.uuid for c in local)
        cuda_index = {c.gpu.index: i for i, c in enumerate(local)}
        tensor_split = split
        main_gpu = main
    else:
        cuda_index = {g.index: i for i, g in enumerate(visible)}
        full = [0.0] * len(visible)
        for c, sp in zip(cands, split):
            if c.remote is None:
                full[cuda_index[c.gpu.index]] = sp
        tensor_split = tuple(split[:n_remote]) + tuple(full) if cands else ()
        main_gpu = n_remote + cuda_index[cands[main].gpu.index] if cands and cands[main].remote is None else 0

    rows: list[GpuPlan] = []
    zero = Estimate(0, 0, 0, 0)
    for g in remote_rows + ordered:
        reserve, usable = info[g.index]
        cp = cand_pos.get(g.index)
        est = ests[cp] if cp is not None else zero
        span = ranges[cp] if cp is not None else None
        remote = remotes.devices[-1 - g.index] if g.index < 0 else None
        rows.append(
            GpuPlan(
                index=g.index,
                uuid=g.uuid,
                name=g.name,
                pci_bus_id=g.pci_bus_id,
                total_mib=g.total_mib,
                free_mib=g.free_mib,
                reserve_mib=reserve,
                usable_mib=usable,
                planned_mib=est.total_mib,
                layers=layers[cp] if cp is not None else 0,
                has_output=outs[cp] if cp is not None else False,
                share=split[cp] if cp is not None and split else 0.0,
                cuda_index=cuda_index.get(g.index),
                excluded_reason=_with_visibility(reasons.get(g.index), g.index in cuda_index),
                estimate=est,
                endpoint=remote.endpoint if remote is not None else None,
                first_layer=span[0] if span else None,
                last_layer=span[1] if span else None,
            )
        )
    offloaded = sum(layers)
    output_on_gpu = any(outs)
    # Offloaded layers are the last ones (see the module docstring).
    gpu_weights = sum(model.layer_bytes[model.n_layers - offloaded :]) if offloaded else 0
    host_bytes = model.weights_bytes - gpu_weights - (model.output_bytes - model.embd_bytes_of_output if output_on_gpu else 0)
    if output_on_gpu and model.tied_embeddings:
        notes.append("the model ties its output layer to token_embd; llama.cpp keeps a copy of it on the output GPU")
    if not gpus:
        notes.append(NO_GPU_NOTE if not cands else "no local GPU found; the CPU keeps the layers the remote devices do not hold")
    return Plan(
        env=env,
        tensor_split=tensor_split,
        n_gpu_layers=-1 if ngl > model.n_layers else ngl,
        offloaded_layers=offloaded,
        output_on_gpu=output_on_gpu,
        split_mode=s.split_mode,
        main_gpu=main_gpu,
        n_ctx=n_ctx,
        n_batch=s.n_batch,
        flash_attn=s.flash_attn,
        cpu_only=cpu_only,
        source=source,
        gpus=tuple(rows),
        model=_summary(model, n_ctx),
        host_weights_mib=_mib(max(host_bytes, 0)),
        notes=tuple(notes),
        rpc_devices=tuple(f"{c.remote.endpoint}/{c.remote.device}" for c in cands if c.remote is not None),
    )

"""Render a Plan for people (a table) and for programs (JSON).

Used by ``vram-llm plan``, by ``serve`` when it starts, and by ``vram-llm status``.
Pure formatting: takes a Plan (or every model's placement), returns a string.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from supervisor.planner import Plan
from supervisor.planning import ModelPlacement

_COLUMNS = (
    ("idx", "index"),
    ("cuda", "cuda"),
    ("uuid", "uuid"),
    ("name", "name"),
    ("total", "total_mib"),
    ("free", "free_mib"),
    ("reserve", "reserve_mib"),
    ("usable", "usable_mib"),
    ("planned", "planned_mib"),
    ("layers", "layers"),
    ("range", "first_layer"),
    ("share", "share"),
)


def plan_json(plan: Plan) -> str:
    return json.dumps(plan.to_dict(), indent=2, sort_keys=False)


def summary_of(p: Plan) -> str:
    if p.cpu_only:
        where = "CPU only"
    else:
        used = [g for g in p.gpus if g.cuda_index is not None and g.excluded_reason is None]
        where = f"{p.offloaded_layers}/{p.model.n_layers} layers on GPU " + ",".join(str(g.index) for g in used)
        if p.rpc_devices:
            where += (" + " if used else "") + "RPC " + ",".join(p.rpc_devices)
    return f"{where}, n_ctx {p.n_ctx}, split {p.split_mode}, plan by {p.source}"


def fleet_json(placements: Sequence[ModelPlacement]) -> str:
    """Model id -> its plan (as ``plan_json``; none when it would not load) with ``placement``:
    when it loads, what it unloads, why it would not load."""
    out: dict[str, Any] = {}
    for m in placements:
        out[m.id] = {
            **(m.plan.to_dict() if m.plan is not None else {}),
            "placement": {
                "loads": "at start" if m.at_start else "on demand",
                "at_start_because": m.at_start or None,
                "evicts": list(m.evict),
                "unloaded_for": m.unloaded_for or None,
                "refusal": m.refusal,
                "why": m.why,
                "replicas": [list(r) for r in m.replicas] or None,
            },
        }
    return json.dumps(out, indent=2, sort_keys=False)


def render_fleet(placements: Sequence[ModelPlacement]) -> str:
    """A line per model (when it loads, where, why), then each model's plan."""
    width = max(len(m.id) for m in placements)
    lines = [f"{len(placements)} models, placed as `vram-llm serve` would place them on these GPUs:"]
    for m in placements:
        where = "" if m.plan is None else f" -> {summary_of(m.plan)}"
        lines.append(f"  {m.id:<{width}}  {m.why}{where}")
    lines.append("")
    for m in placements:
        if m.plan is not None:
            lines += [f"== model {m.id} ==", render_plan(m.plan)]
    return "\n".join(lines)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header).rstrip(), fmt.format(*("-" * w for w in widths)).rstrip()]
    out += [fmt.format(*r).rstrip() for r in rows]
    return out


def render_plan(plan: Plan) -> str:
    m = plan.model
    lines = [
        f"model: {m.name} ({m.architecture}, {m.n_layers} layers, {m.file_mib} MiB) {m.path}",
        f"       context {plan.n_ctx} (trained {m.n_ctx_train}), KV cache {m.kv_mib_per_layer:g} MiB/layer, "
        f"vocab {m.vocab_size}, heads {m.n_head}/{m.n_head_kv} kv"
        + (", tied embeddings" if m.tied_embeddings else "")
        + ("" if m.chat_template else ", no chat template"),
        "",
    ]
    if plan.gpus:
        rows: list[list[str]] = []
        for g in plan.gpus:
            layers = str(g.layers) + ("+out" if g.has_output else "")
            span = "-" if g.first_layer is None else f"{g.first_layer}-{g.last_layer}"
            rows.append(
                [
                    "rpc" if g.endpoint else str(g.index),
                    "-" if g.cuda_index is None else str(g.cuda_index),
                    g.uuid,
                    g.name,
                    str(g.total_mib),
                    str(g.free_mib),
                    str(g.reserve_mib),
                    str(g.usable_mib),
                    str(g.planned_mib),
                    layers,
                    span,
                    f"{g.share:.3f}",
                ]
            )
        lines += _table([c for c, _ in _COLUMNS], rows)
        lines.append("")
        lines.append("estimate per GPU (MiB): weights + KV cache + compute buffer + CUDA context")
        for g in plan.gpus:
            e = g.estimate
            who = f"RPC {g.endpoint} #{g.uuid.rsplit('/', 1)[-1]}" if g.endpoint else f"GPU {g.index}"
            if g.excluded_reason:
                lines.append(f"  {who}: not used: {g.excluded_reason}")
            else:
                lines.append(
                    f"  {who}: {e.weights_mib} + {e.kv_mib} + {e.compute_mib} + {e.fixed_mib}"
                    f" = {e.total_mib} of {g.usable_mib} usable"
                    + (f", layers {g.first_layer}-{g.last_layer}" if g.first_layer is not None else "")
                    + (" (the output layer)" if g.has_output else "")
                )
        lines.append("")
    mode = "CPU only" if plan.cpu_only else f"{plan.offloaded_layers} of {m.n_layers} layers on GPU" + (
        " + output layer" if plan.output_on_gpu else ""
    )
    lines.append(f"plan ({plan.source}): {mode}; {plan.host_weights_mib} MiB of weights in host RAM")
    if plan.rpc_devices:
        first = plan.model.n_layers - plan.offloaded_layers
        cpu = f"the CPU keeps layers 0-{first - 1}" if first > 0 else "the CPU keeps only the input layer"
        lines.append(
            f"devices for llama.cpp: RPC {', '.join(plan.rpc_devices)} first, then the local GPUs; {cpu}"
        )
    lines.append(
        "llama.cpp: "
        f"n_gpu_layers={plan.n_gpu_layers} split_mode={plan.split_mode} main_gpu={plan.main_gpu} "
        f"tensor_split={list(plan.tensor_split)} n_ctx={plan.n_ctx} n_batch={plan.n_batch}"
        + (" (flash attention counted on: on or auto)" if plan.flash_attn else " flash_attn=off")
    )
    lines.append("worker env: " + " ".join(f"{k}={v!r}" if v == "" else f"{k}={v}" for k, v in plan.env.items()))
    for n in plan.notes:
        lines.append(f"note: {n}")
    return "\n".join(lines) + "\n"

"""Planning from a Config: the I/O around the pure planner, shared by `plan` and `serve`.

Reads the GPU inventory (NVML or a simulated file) and the model's GGUF header, asks
llama-fit-params when configured, and calls the pure ``planner.plan``. `vram-llm plan`
and every worker start of `vram-llm serve` go through ``make_plan``, so what a person
sees in `plan` is what `serve` does. Imports nothing of the serving stack.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

from supervisor.config import Config, ConfigError, ModelEntry, resolved_models
from supervisor.gpus import GpuProbe, Inventory, make_probe
from supervisor.model import ModelError, ModelFacts, read_model_facts
from supervisor.planner import NO_GPU_NOTE, NOT_NEEDED, FitParams, Plan, PlanSettings, plan
from supervisor.restart import PlanAdjust


def default_entry_path() -> str:
    """The embedded default model's file ("model" when it is not installed: the id of a
    [model] without a path is then "model", and reading it fails with the reason)."""
    from supervisor.default_model import DefaultModelMissing, default_model_path

    try:
        return str(default_model_path())
    except DefaultModelMissing:
        return "model"


def first_entry(cfg: Config) -> ModelEntry:
    """The configuration's first model (a single [model] is a list of one)."""
    return resolved_models(cfg, default_entry_path)[0]


def resolve_model_path(entry: ModelEntry) -> str:
    """The model's file; an empty path means the embedded default model."""
    if entry.path:
        return entry.path
    from supervisor.default_model import DefaultModelMissing, default_model_path

    try:
        return str(default_model_path())
    except DefaultModelMissing as e:
        raise ModelError(str(e)) from None


def plan_settings(
    cfg: Config,
    environ: Mapping[str, str] | None = None,
    adjust: PlanAdjust | None = None,
    *,
    entry: ModelEntry,
    fit_params: FitParams | None = None,
    fit_params_error: str | None = None,
) -> PlanSettings:
    """PlanSettings of one model from the config, shrunk by the OOM ladder's ``adjust`` when
    given, with llama-fit-params' answer (or why there is none)."""
    env = os.environ if environ is None else environ
    g = cfg.gpu
    devices = list(g.devices)
    if entry.devices:
        # A model's own devices are taken within gpu.devices (all GPUs when that is empty).
        devices = [d for d in entry.devices if not g.devices or d in g.devices] or [-1]
    s = PlanSettings(
        reserve_mib=g.reserve_mib,
        reserve_overrides=dict(g.reserve_overrides),
        device_order=g.device_order,
        split_mode=g.split_mode,
        devices=tuple(devices) if devices else None,
        set_cuda_visible_devices=g.set_cuda_visible_devices,
        inherited_cuda_visible_devices=env.get("CUDA_VISIBLE_DEVICES"),
        n_ctx=entry.ctx_size,
        n_batch=entry.n_batch,
        flash_attn=entry.flash_attn,
        parallel=entry.parallel,
        fit_params=fit_params,
        fit_params_error=fit_params_error,
    )
    return s if adjust is None else apply_adjust(s, adjust)


def apply_adjust(s: PlanSettings, adjust: PlanAdjust) -> PlanSettings:
    """The OOM ladder's rung applied to planner settings (unset knobs keep the settings')."""
    return dataclasses.replace(
        s,
        extra_reserve_mib=adjust.extra_reserve_mib,
        max_gpu_layers=adjust.max_gpu_layers if adjust.max_gpu_layers is not None else s.max_gpu_layers,
        n_ctx=adjust.n_ctx if adjust.n_ctx is not None else s.n_ctx,
        cpu_only=adjust.cpu_only,
    )


def check_devices(cfg: Config, inventory: Inventory) -> None:
    """--devices naming a GPU that does not exist is a usage error (when GPUs are known)."""
    if not cfg.gpu.devices or not inventory.gpus:
        return
    known = sorted(g.index for g in inventory.gpus)
    missing = [d for d in cfg.gpu.devices if d not in known]
    if missing:
        raise ConfigError(
            f"--devices/gpu.devices: no GPU with NVML index {', '.join(map(str, missing))} "
            f"(present: {', '.join(map(str, known))})"
        )


def make_plan(
    cfg: Config,
    *,
    probe: GpuProbe | None = None,
    model: ModelFacts | None = None,
    environ: Mapping[str, str] | None = None,
    adjust: PlanAdjust | None = None,
    entry: ModelEntry | None = None,
) -> tuple[Plan, Inventory, ModelFacts]:
    """Probe the GPUs, read the model header, plan (and ask llama-fit-params if configured).

    ``entry``: the model (default: the configuration's first).

    ``adjust``: the OOM ladder's rung; llama-fit-params' answer already ran out of memory
    once, so with a rung our own ladder is climbed without asking it again.
    Raises ConfigError, ModelError or GpuProbeError with a one-line message.
    """
    inventory = (probe or make_probe(cfg)).read()
    check_devices(cfg, inventory)
    entry = entry or first_entry(cfg)
    facts = model if model is not None else read_model_facts(resolve_model_path(entry))
    settings = plan_settings(cfg, environ, adjust, entry=entry)
    result = plan(inventory.gpus, facts, settings)
    if cfg.gpu.use_fit_params and adjust is None and not settings.cpu_only:
        from supervisor.fit_params import run_fit_params

        if result.cpu_only:
            answer: FitParams | str = "no GPU to fit the model on"
        else:
            tool_env = dict(result.env)
            if settings.set_cuda_visible_devices:
                # The tool chooses among every GPU the plan could use, the ones our own plan
                # left out as not needed included (in plan order, as the planner reads the answer).
                used = [g for g in result.gpus if g.excluded_reason is None or g.excluded_reason.startswith(NOT_NEEDED)]
                tool_env["CUDA_VISIBLE_DEVICES"] = ",".join(g.uuid for g in used)
            else:
                used = sorted((g for g in result.gpus if g.cuda_index is not None), key=lambda g: g.cuda_index or 0)
            answer = run_fit_params(
                cfg.gpu.fit_params_command,
                facts.path,
                [g.reserve_mib for g in used],
                result.n_ctx,
                settings.n_batch,
                settings.flash_attn,
                tool_env,
            )
        if isinstance(answer, str):
            settings = plan_settings(cfg, environ, entry=entry, fit_params_error=answer)
        else:
            settings = plan_settings(cfg, environ, entry=entry, fit_params=answer)
        result = plan(inventory.gpus, facts, settings)
    if inventory.note:
        # The probe's reason (e.g. "NVML not available: ...") replaces the generic one.
        rest = tuple(n for n in result.notes if n != NO_GPU_NOTE)
        result = dataclasses.replace(result, notes=(inventory.note, *rest))
    return result, inventory, facts

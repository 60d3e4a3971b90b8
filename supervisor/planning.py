"""Planning from a Config: the I/O around the pure planner, shared by `plan` and `serve`.

Reads the GPU inventory (NVML or a simulated file) and the model's GGUF header, asks
llama-fit-params when configured, and calls the pure ``planner.plan``. `vram-llm plan`
and every worker start of `vram-llm serve` go through ``make_plan``, so what a person
sees in `plan` is what `serve` does; ``place_fleet`` drives the fleet's pure placement
(supervisor/placement.py) as the fleet does at start, for every configured model.
Imports nothing of the serving stack (no aiohttp, no psutil: a test runs `plan` without them).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from supervisor.config import Config, ConfigError, ModelEntry, resolved_models
from supervisor.gpus import GpuProbe, Inventory, make_probe
from supervisor.inventory import RemoteInventory, RemoteProbe
from supervisor.model import ModelError, ModelFacts, read_model_facts
from supervisor.placement import ModelInfo, Resident, place, replica_layout, start_devices
from supervisor.planner import NO_GPU_NOTE, NOT_NEEDED, FitParams, Plan, PlanSettings, plan
from supervisor.restart import PlanAdjust
from supervisor.rpc import endpoint_warning, make_remote_probe


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
        flash_attn=entry.flash_attn != "off",
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


def model_info(entry: ModelEntry, facts: ModelFacts, settings: PlanSettings) -> ModelInfo:
    """What the pure placement knows of a configured model."""
    return ModelInfo(
        entry.id,
        facts,
        settings,
        pinned=entry.pinned,
        refuse_when_no_room=entry.when_no_room == "refuse",
        placement=entry.placement,
        replicas=entry.replicas,
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
    remote_probe: RemoteProbe | None = None,
    own: Collection[str] = (),
    extra: bool = False,
) -> tuple[Plan, Inventory, ModelFacts]:
    """Probe the GPUs, read the model header, plan (and ask llama-fit-params if configured).

    ``entry``: the model (default: the configuration's first).

    ``adjust``: the OOM ladder's rung; llama-fit-params' answer already ran out of memory
    once, so with a rung our own ladder is climbed without asking it again.

    ``own``: GPU UUIDs the model's other replicas use (taken last when packing); ``extra``:
    this start is an extra replica (placement.start_devices).
    Raises ConfigError, ModelError or GpuProbeError with a one-line message.
    """
    inventory = (probe or make_probe(cfg)).read()
    check_devices(cfg, inventory)
    entry = entry or first_entry(cfg)
    facts = model if model is not None else read_model_facts(resolve_model_path(entry))
    settings = plan_settings(cfg, environ, adjust, entry=entry)
    # Remote devices are read before every plan (a host that went away is left out, with why).
    remotes = (remote_probe or make_remote_probe(cfg)).read()
    configured = settings.devices
    packed = start_devices(inventory.gpus, model_info(entry, facts, settings), own, extra)
    settings = dataclasses.replace(settings, devices=packed.devices)
    result = plan(inventory.gpus, facts, settings, remotes)
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
                entry.flash_attn,
                tool_env,
            )
        if isinstance(answer, str):
            settings = plan_settings(cfg, environ, entry=entry, fit_params_error=answer)
        else:
            settings = plan_settings(cfg, environ, entry=entry, fit_params=answer)
        result = plan(inventory.gpus, facts, dataclasses.replace(settings, devices=packed.devices), remotes)
    result = _placed(result, packed.why, configured, packed.devices)
    if inventory.note:
        # The probe's reason (e.g. "NVML not available: ...") replaces the generic one.
        rest = tuple(n for n in result.notes if n != NO_GPU_NOTE)
        result = dataclasses.replace(result, notes=(inventory.note, *rest))
    warnings = tuple(w for w in (endpoint_warning(d) for d in _endpoints(remotes)) if w)
    if warnings:
        result = dataclasses.replace(result, notes=(*result.notes, *warnings))
    return result, inventory, facts


def _endpoints(remotes: RemoteInventory) -> list[str]:
    seen = [d.endpoint for d in remotes.devices] + [e for e, _ in remotes.unreachable]
    return list(dict.fromkeys(seen))


def _placed(p: Plan, why: str, configured: tuple[int, ...] | None, packed: tuple[int, ...] | None) -> Plan:
    """The plan says why the model got its GPUs: a note, and the GPUs pack left out named so."""
    if packed == configured:
        return dataclasses.replace(p, notes=(*p.notes, why))
    rows = tuple(
        dataclasses.replace(g, excluded_reason="left out by placement pack")
        if packed is not None and g.index not in packed and (configured is None or g.index in configured)
        and g.excluded_reason == "not in --devices"
        else g
        for g in p.gpus
    )
    return dataclasses.replace(p, gpus=rows, notes=(*p.notes, why))


# --- `vram-llm plan` for every configured model: the fleet's start, as a what-if ------------


@dataclass(frozen=True)
class ModelPlacement:
    """Where one configured model would go, and why (``place_fleet``)."""

    id: str
    at_start: str  # why it loads at start ("first model", "pinned", "preload"); "" : on demand
    evict: tuple[str, ...] = ()  # models unloaded to make room for it
    beside: tuple[str, ...] = ()  # the models loaded beside it
    refusal: str | None = None  # why it would not load at all
    plan: Plan | None = None  # where it goes (None when refused)
    unloaded_for: str = ""  # loaded at start, then unloaded to make room for this one
    replicas: tuple[tuple[int, ...], ...] = ()  # each replica's GPU indices (replicas other than 1)

    @property
    def why(self) -> str:
        """One line: when it loads and what that takes."""
        when = f"at start ({self.at_start})" if self.at_start else "on demand (its first request)"
        if self.refusal is not None:
            return f"{when}: would not load: {self.refusal}"
        room = f"unloads {', '.join(self.evict)} to make room" if self.evict else "fits"
        if self.beside:
            room += f" beside {', '.join(self.beside)}"
        if self.plan is not None and not self.plan.cpu_only and self.plan.n_gpu_layers != -1:
            room += "; layers left in host RAM (the GPUs cannot hold it whole)"
        if self.unloaded_for:
            room += f"; then unloaded for {self.unloaded_for} (loads again on demand)"
        return f"{when}: {room}" if self.at_start else f"{when}: now it {room}"


class _Fixed:
    """A probe that answers one inventory (the GPUs as the fleet would see them)."""

    def __init__(self, inventory: Inventory) -> None:
        self._inventory = inventory

    def read(self) -> Inventory:
        return self._inventory


def _taking(inv: Inventory, held: Mapping[str, Mapping[str, int]]) -> Inventory:
    """The inventory less what the given models hold (GPU UUID -> MiB each)."""
    gpus = []
    for g in inv.gpus:
        t = min(sum(h.get(g.uuid, 0) for h in held.values()), g.free_mib)
        gpus.append(dataclasses.replace(g, free_mib=g.free_mib - t, used_mib=g.used_mib + t))
    return Inventory(tuple(gpus), inv.note)


def footprint(p: Plan) -> dict[str, int]:
    """GPU UUID -> MiB the plan puts there (the GPUs its worker is given)."""
    return {g.uuid: g.planned_mib for g in p.gpus if g.cuda_index is not None and not g.excluded_reason and g.planned_mib}


def place_fleet(
    cfg: Config, *, probe: GpuProbe | None = None, environ: Mapping[str, str] | None = None
) -> list[ModelPlacement]:
    """Every configured model's placement on the GPUs as they are now, decided as the fleet
    decides at start (supervisor/fleet.py): the first model, the pinned and the preloaded
    ones load at start, in configuration order, each placed by the pure ``placement.place``
    beside the ones before it (which it may unload, unless pinned) and planned on what they
    leave; every other model is placed as its first request would place it then.
    A single model is a fleet of one: its plan is ``make_plan``'s."""
    entries = resolved_models(cfg, default_entry_path)
    inventory = (probe or make_probe(cfg)).read()
    check_devices(cfg, inventory)
    facts: dict[str, ModelFacts] = {}
    for e in entries:
        path = resolve_model_path(e)
        if path not in facts:
            facts[path] = read_model_facts(path)
    models = {e.id: model_info(e, facts[resolve_model_path(e)], plan_settings(cfg, environ, entry=e)) for e in entries}
    first = entries[0].id
    held: dict[str, dict[str, int]] = {}  # the models loaded so far -> their footprint

    def decide(e: ModelEntry, at_start: str) -> ModelPlacement:
        # The ones loaded before are up and idle by the time it is placed (the fleet waits
        # for a loading model to serve its queue before it unloads it).
        residents = [Resident(m, mib) for m, mib in held.items()]
        d = place(_taking(inventory, held).gpus, models, residents, e.id)
        if d.refusal is not None:
            return ModelPlacement(e.id, at_start, refusal=d.refusal)
        left = {m: mib for m, mib in held.items() if m not in d.evict}
        p, _, _ = make_plan(
            cfg, probe=_Fixed(_taking(inventory, left)), model=models[e.id].facts, environ=environ, entry=e
        )
        if at_start:
            held.clear()
            held.update(left)
            held[e.id] = footprint(p)
        return ModelPlacement(e.id, at_start, evict=d.evict, beside=tuple(left), plan=p)

    out: dict[str, ModelPlacement] = {}
    for e in entries:
        why = "first model" if e.id == first else "pinned" if e.pinned else "preload" if e.preload else ""
        if why:
            out[e.id] = decide(e, why)
            for gone in out[e.id].evict:
                out[gone] = dataclasses.replace(out[gone], unloaded_for=e.id)
    for e in entries:
        if e.id not in out:
            out[e.id] = decide(e, "")
    if any(m.replicas != 1 for m in models.values()):
        layout = replica_layout(inventory.gpus, models)
        for mid, m in models.items():
            got = out[mid]
            if m.replicas != 1 and got.plan is not None:
                note = replicas_note(m.replicas, layout[mid])
                out[mid] = dataclasses.replace(got, replicas=layout[mid], plan=dataclasses.replace(
                    got.plan, notes=(*got.plan.notes, note)))
    return [out[e.id] for e in entries]


def replicas_note(asked: int | str, layout: tuple[tuple[int, ...], ...]) -> str:
    """One line: how many replicas a model gets, and each one's GPUs."""
    where = " | ".join("GPU " + ",".join(map(str, r)) if r else "CPU" for r in layout)
    why = "as many packed copies as fit on GPUs no other model needs" if asked == "auto" else f"{asked} asked"
    return f"replicas: {len(layout)} ({why}): {where}"

"""From configuration to a worker start: inventory now -> plan -> LaunchSpec + env.

This is the I/O shell around the pure planner: it reads the GPU inventory (NVML or a
simulated file), the model header, runs llama-fit-params when asked, and turns the
resulting Plan into what the worker is started with. `vram-llm plan` and `serve` both
plan through ``plan_now`` so they cannot disagree.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from pathlib import Path
from typing import Any

import msgspec

from supervisor.config import Config, ConfigError, ModelEntry, model_cache_dir, resolved_models
from supervisor.gpus import GpuProbe, GpuProbeError, Inventory, make_probe
from supervisor.launches import Launch, PlanFailed
from supervisor.model import ModelError, read_model_facts
from supervisor.nvml import process_gpu_memory
from supervisor.plan_report import render_plan, summary_of
from supervisor.planner import Plan
from supervisor.planning import default_entry_path, make_plan, resolve_model_path
from supervisor.restart import PlanAdjust
from supervisor.status import GpuNow, PlanView
from worker.protocol import LaunchSpec

log = logging.getLogger("vram_llm.plan")

# Two inventory readings closer than this (per GPU) mean the memory stopped moving.
SETTLE_TOLERANCE_MIB = 64
SETTLE_POLL_S = 0.5


def spec_of(config: Config, p: Plan, model_path: Path, socket_path: str, entry: ModelEntry) -> LaunchSpec:
    """The worker's launch: the plan's placement and the model's settings. The worker answers
    under the model's id (for a single [model]: its alias, else the file stem)."""
    return LaunchSpec(
        model_path=str(model_path),
        socket_path=socket_path,
        model_alias=entry.id,
        n_gpu_layers=p.n_gpu_layers,
        tensor_split=list(p.tensor_split) or None,
        split_mode=p.split_mode,
        main_gpu=p.main_gpu,
        rpc_devices=list(p.rpc_devices),
        n_ctx=p.n_ctx,
        n_batch=p.n_batch,
        flash_attn=entry.flash_attn,
        **settings_of(config, entry),
    )


def settings_of(config: Config, entry: ModelEntry) -> dict[str, Any]:
    """The LaunchSpec fields that come from the configuration alone (not from the plan)."""
    return {
        "n_threads": entry.threads or None,
        "chat_format": entry.chat_format or None,
        "parallel": entry.parallel,
        "prefill_chunk": entry.prefill_chunk,
        "token_gap_ms": entry.token_gap_ms,
        "draft_max": entry.draft_max,
        "cache_ram_mib": entry.cache_ram_mib,
        "cache_disk_mib": entry.cache_disk_mib,
        "cache_dir": str(model_cache_dir(config, entry.id)),
        "cache_disk_total_mib": config.server.cache_disk_total_mib,
        "strict_params": config.server.strict_params,
        "embeddings": entry.embeddings,
        "pooling": entry.pooling or None,
        "reranking": entry.reranking,
        "chat_template": entry.chat_template or None,
        "tools": entry.tools,
        "responses_store_size": config.server.responses_store_size,
        "responses_store_ttl_s": config.server.responses_store_ttl_s,
    }


def default_spec(model_path: str, socket_path: str, **fields: Any) -> LaunchSpec:
    """A launch with the schema's defaults for every setting (what a server started with no
    config keys sends), ``fields`` on top: for tests and benchmarks that start a worker alone."""
    config = Config()
    entry = ModelEntry(id=Path(model_path).stem or "model", path=model_path)
    base: dict[str, Any] = {
        "split_mode": config.gpu.split_mode,
        "n_ctx": entry.ctx_size,
        "n_batch": entry.n_batch,
        "flash_attn": entry.flash_attn,
        **settings_of(config, entry),
    }
    return LaunchSpec(model_path=model_path, socket_path=socket_path, **{**base, **fields})


def env_of(p: Plan, base: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    env.update(p.env)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def entry_of(config: Config, model_id: str | None) -> ModelEntry:
    """The [[models]] entry named ``model_id`` (None: the first); ConfigError if none."""
    entries = resolved_models(config, default_entry_path)
    for e in entries:
        if model_id is None or e.id == model_id:
            return e
    raise ConfigError(f"model {model_id!r} is no longer in the configuration")


class Preparer:
    """Plans each worker start from the inventory at that moment."""

    def __init__(
        self,
        config: Config,
        reload_config: Callable[[], Config] | None = None,
        model_id: str | None = None,
        probe: GpuProbe | None = None,
    ) -> None:
        self._reload_config = reload_config
        # Several models: one Preparer per model (its [[models]] entry); None: the first.
        self._model_id = model_id
        self._probe = probe  # the fleet's accounted probe; None: the config's
        self._set(config)

    # /status answers from one inventory read per this many seconds, however often it is
    # polled: every read is NVML calls on a worker thread.
    gpus_now_ttl_s = 1.0

    def _set(self, config: Config) -> None:
        entry = entry_of(config, self._model_id)
        path = Path(resolve_model_path(entry))
        facts = read_model_facts(path)  # ModelError: the caller reports it
        self.config = config
        self.entry = entry
        self.model_path = path
        self.facts = facts
        self.probe = self._probe or make_probe(config)
        # (monotonic time of the read, the worker pids asked about, the answer)
        self._gpus_now: tuple[float, tuple[int, ...], list[GpuNow]] | None = None

    def reload(self, config: Config | None = None) -> None:
        """Re-read the configuration (SIGHUP), or take ``config`` (read once by the fleet
        for every model). Raises and keeps the old one on error."""
        if config is not None:
            self._set(config)
        elif self._reload_config is not None:
            self._set(self._reload_config())

    async def __call__(
        self, adjust: PlanAdjust | None, socket_path: str, own: Collection[str] = (), extra: bool = False,
        key: str | None = None,
    ) -> Launch:
        """``own``: GPU UUIDs of the model's other replicas; ``extra``: an extra replica,
        ``key`` its worker key (its prompt cache is a directory of its own)."""
        try:
            p, _inv, _ = await asyncio.to_thread(
                make_plan, self.config, probe=self.probe, model=self.facts, adjust=adjust, entry=self.entry,
                own=own, extra=extra,
            )
        except (ConfigError, ModelError, GpuProbeError) as e:
            raise PlanFailed(str(e)) from e
        log.info("plan for this start%s:\n%s", f" ({key})" if key else "", render_plan(p))
        for note in p.notes:
            if note.startswith("rpc "):  # a remote host left out, or an endpoint on an open network
                log.warning("%s", note)
        spec = spec_of(self.config, p, self.model_path, socket_path, self.entry)
        if key is not None and key != self.entry.id:
            # Two workers never share a disk cache directory.
            spec = msgspec.structs.replace(spec, cache_dir=str(model_cache_dir(self.config, key)))
        return Launch(
            spec=spec,
            env=env_of(p),
            plan=msgspec.convert(p.to_dict(), PlanView),
            planned_layers=p.offloaded_layers,
            reserve_mib=self.config.gpu.reserve_mib,
            summary=summary_of(p),
        )

    async def wait_gpu_settled(self, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        prev = await asyncio.to_thread(self.probe.read)
        while loop.time() < deadline:
            await asyncio.sleep(SETTLE_POLL_S)
            cur = await asyncio.to_thread(self.probe.read)
            moved = {g.uuid: g.free_mib for g in cur.gpus}
            if all(abs(moved.get(g.uuid, g.free_mib) - g.free_mib) <= SETTLE_TOLERANCE_MIB for g in prev.gpus):
                return
            prev = cur
        log.warning("GPU memory still moving after %.0fs; planning with what is free now", timeout_s)

    async def gpus_now(self, worker_pids: Iterable[int] = ()) -> list[GpuNow]:
        """The inventory now, with what the worker's processes use on each GPU (NVML).

        "Now" is at most ``gpus_now_ttl_s`` old: a recent answer for the same worker
        processes is reused.
        """
        pids = tuple(worker_pids)
        cached = self._gpus_now
        if cached is not None and cached[1] == pids and time.monotonic() - cached[0] < self.gpus_now_ttl_s:
            return cached[2]

        def read() -> tuple[Inventory, dict[str, int]]:
            return self.probe.read(), (process_gpu_memory(list(pids)) if pids else {})

        inv, used = await asyncio.to_thread(read)
        rows = [
            GpuNow(index=g.index, uuid=g.uuid, name=g.name, total_mib=g.total_mib, free_mib=g.free_mib,
                   used_mib=g.used_mib, worker_mib=used.get(g.uuid))
            for g in inv.gpus
        ]
        self._gpus_now = (time.monotonic(), pids, rows)
        return rows

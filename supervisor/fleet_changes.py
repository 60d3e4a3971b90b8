"""SIGHUP and the model list: stage the new configuration, then add, remove and restart.

Owns: nothing of its own; ``FleetChanges`` is the part of ``Fleet`` (fleet.py) that
changes its registry (``ids``, ``managers``, ``preparers``) on SIGHUP, on the event loop.
Callers: app.py's SIGHUP handler (``request_reload``). The decision of what changes is the
pure ``list_change``; every model of the new list is staged (read, planned) before anything
changes, so a bad one changes nothing. A removed model leaves ``ids`` at once, keeps its
manager until its requests finished and its worker is gone (``retire`` is awaited), then is
forgotten.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

import msgspec

from supervisor.config import Config, ModelEntry, ModelSection, resolved_models
from supervisor.fleet_ledger import AccountedProbe, Ledger
from supervisor.launch import Preparer
from supervisor.launches import Launch, NoRoom
from supervisor.planning import default_entry_path
from supervisor.states import WorkerState
from supervisor.worker_process import WorkerManager

log = logging.getLogger("vram_llm.fleet")


@dataclass(frozen=True)
class ListChange:
    """What a SIGHUP does to the model list."""

    added: tuple[str, ...]
    removed: tuple[str, ...]
    restart: tuple[str, ...]  # loaded models that restart (drained first) with the new settings


def list_change(
    old: Mapping[str, ModelEntry],
    new: Mapping[str, ModelEntry],
    *,
    shared_same: bool,
    loaded: Collection[str],
    failed: Collection[str] = (),
) -> ListChange:
    """PURE: the models of ``new`` that are not in ``old`` are added, those of ``old`` not in
    ``new`` removed. A SIGHUP that leaves the list alone restarts every loaded model, as
    before the list existed (it is also how a model file replaced in place is picked up);
    one that adds or removes models restarts only the loaded models whose entry or the
    shared settings changed, and failed ones (SIGHUP is how a failed model is retried)."""
    added = tuple(m for m in new if m not in old)
    removed = tuple(m for m in old if m not in new)
    same_list = not (added or removed)
    restart = tuple(
        m
        for m in new
        if m in old and m in loaded and (same_list or not shared_same or old[m] != new[m] or m in failed)
    )
    return ListChange(added, removed, restart)


def _shared(cfg: Config) -> Config:
    """The settings every model shares (the model list left out): when they change on
    SIGHUP, every loaded model restarts."""
    return msgspec.structs.replace(cfg, models=[], models_dir="", model=ModelSection())


_UNLOADED = (WorkerState.UNLOADED, WorkerState.RETIRED)


class FleetChanges:
    """The SIGHUP half of ``Fleet``: the registry it changes is declared here, kept by Fleet."""

    config: Config
    ids: list[str]
    first: str
    removed_ids: set[str]
    managers: dict[str, WorkerManager]
    workers: dict[str, WorkerManager]  # every replica by worker key
    extras: dict[str, list[str]]  # model -> the worker keys of its extra replicas
    preparers: dict[str, Preparer]
    probe: AccountedProbe
    ledger: Ledger
    _stopping: bool
    _reload_config: Callable[[], Config] | None
    _runtime_dir: Path
    _dirs: dict[str, Path]
    _tasks: dict[str, asyncio.Task[None]]
    _tasks_changed: asyncio.Event
    _retiring: dict[str, asyncio.Task[None]]
    _readd: dict[str, Preparer]  # retiring, but listed again: added once gone
    _first_at_start: str  # /health waits for this one to have been ready
    _ready_once: set[str]
    _waiting: dict[asyncio.Future[Launch], str]

    def _add(self, prep: Preparer, mdir: Path, unloaded: bool) -> None:
        raise NotImplementedError

    def replicas(self, mid: str) -> list[WorkerManager]:
        raise NotImplementedError

    def dir_name(self, mid: str) -> str:
        raise NotImplementedError

    def request_reload(self) -> Config | None:
        """SIGHUP: read the configuration once and apply it to the model list. A bad one
        (unreadable, invalid, a model file that cannot be read) changes nothing: the loaded
        models restart with the configuration they had, as before the list existed.
        Returns the configuration read when it was valid, even if a model of it was not (the
        API keys follow it: a revoked key must stop working whatever else failed)."""
        config: Config | None = None
        if self._stopping:
            log.warning("SIGHUP: ignored, the server is shutting down")
            return None
        try:
            if self._reload_config is None:
                raise ValueError("no configuration to re-read")
            config = self._reload_config()
            entries = resolved_models(config, default_entry_path)
            # Every model of the new list must be plannable before anything changes.
            staged = {e.id: Preparer(config, self._reload_config, model_id=e.id, probe=self.probe) for e in entries}
        except Exception as e:  # noqa: BLE001 - a bad new config keeps the old one
            log.error("SIGHUP: keeping the previous configuration: %s", e)
            for mid in self.ids:
                for mgr in self.replicas(mid):
                    if mgr.state not in _UNLOADED:
                        mgr.reload()
            return config
        self._apply(config, staged)
        return config

    def _apply(self, config: Config, staged: dict[str, Preparer]) -> None:
        old_ids = list(self.ids)
        kept = [m for m in old_ids if m not in self._readd]
        change = list_change(
            {m: self.preparers[m].entry for m in kept},
            {m: p.entry for m, p in staged.items()},
            shared_same=_shared(self.config) == _shared(config),
            loaded={m for m in kept if self.managers[m].state not in _UNLOADED},
            failed={m for m in kept if self.managers[m].state is WorkerState.FAILED},
        )
        self.config = config
        self.ids = list(staged)
        self.first = self.ids[0]
        # Ids a client could have picked among several: still a 404 once one model is left.
        # (One model whose id changes, a new file for [model], is not "several": any name
        # is served, as a one-model server always did.)
        picked = set(old_ids) if len(old_ids) > 1 else set()
        self.removed_ids = (self.removed_ids | picked) - set(self.ids)
        for mid in self.ids:
            if mid in self._readd:  # its previous worker still drains: added later, as now configured
                self._readd[mid] = staged[mid]
            elif mid in old_ids:
                try:
                    self.preparers[mid].reload(config)
                except Exception as e:  # noqa: BLE001 - its file changed since it was staged
                    log.error("SIGHUP: model %s keeps its previous configuration: %s", mid, e)
        for mid in change.restart:
            for i, mgr in enumerate(self.replicas(mid)):
                if i == 0 or mgr.state not in _UNLOADED:  # an unloaded extra loads with its first
                    mgr.reload()
        draining = []
        for mid in change.removed:
            n = self.managers[mid].admission.active
            draining.append(f"{mid} (draining {n} request(s))" if n else mid)
            self._retire(mid)
        for mid in change.added:
            if mid in self.managers:  # removed earlier and still draining: added once it is gone
                log.warning("SIGHUP: model %s is added again once its previous worker has stopped", mid)
                self._readd[mid] = staged[mid]
                continue
            self._add(staged[mid], self._runtime_dir / self.dir_name(mid), unloaded=self._parks_when_added(staged[mid].entry))
        if self.first != old_ids[0] and self.managers[self.first].state is WorkerState.UNLOADED:
            self.managers[self.first].load()  # the first is loaded, as at start
        if self.first in change.restart or (
            self.first != old_ids[0] and self.managers[self.first].state is not WorkerState.READY
        ):
            # /health is 503 until the model that answers requests without "model" is ready
            # (again): a balancer must not send them to a box that would make them wait.
            self._first_at_start = self.first
            self._ready_once.discard(self.first)
        log.warning(
            "SIGHUP: models added: %s; removed: %s; restarting: %s; first (no \"model\" field): %s",
            ", ".join(change.added) or "none",
            ", ".join(draining) or "none",
            ", ".join(change.restart) or "none",
            self.first,
        )

    def _parks_when_added(self, entry: ModelEntry) -> bool:
        """A model added by SIGHUP loads on demand unless it would have loaded at start."""
        return not (entry.preload or entry.pinned or entry.id == self.first)

    def _retire(self, mid: str) -> None:
        """A model removed by SIGHUP: new requests are not routed to it (it left ``ids``),
        those waiting for it are refused, its load (if one waits for room) is called off,
        and the ones it answers finish before its worker stops."""
        reason = f"model {mid!r} was removed from the configuration"
        retired = self.managers[mid].retire(reason)
        for key in self.extras.get(mid, ()):
            self.workers[key].retire(reason)
        for fut, m in list(self._waiting.items()):
            if m == mid and not fut.done():
                fut.set_exception(NoRoom(reason))
        self._retiring[mid] = asyncio.create_task(self._retired(mid, retired), name=f"retire {mid}")

    async def _retired(self, mid: str, retired: asyncio.Future[None]) -> None:
        """Wait for the removed model's manager to say it is retired (its drain is bounded by
        shutdown.grace_s, its stop by worker.stop_timeout_s), end it, forget it."""
        mgr, cfg = self.managers[mid], self.preparers[mid].config
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(retired), cfg.shutdown.grace_s + 2 * cfg.worker.stop_timeout_s + 5)
        mgr.shutdown()
        task = self._tasks.get(mid)
        if task is not None:
            with contextlib.suppress(Exception):
                await task
        for key in self.extras.get(mid, ()):
            self.workers[key].shutdown()
            extra = self._tasks.get(key)
            if extra is not None:
                with contextlib.suppress(Exception):
                    await extra
        # No await from here to the re-add below: a request never finds the id without a manager.
        for key in self.extras.pop(mid, []):
            self.workers.pop(key, None)
            self._tasks.pop(key, None)
            self.ledger.forget(key)
        self.workers.pop(mid, None)
        self.managers.pop(mid)
        self.preparers.pop(mid)
        self._tasks.pop(mid, None)
        self._retiring.pop(mid, None)
        self.ledger.forget(mid)
        mdir = self._dirs.pop(mid)
        if mdir != self._runtime_dir:  # one model at start: the runtime dir is everyone's
            shutil.rmtree(mdir, ignore_errors=True)
        self._tasks_changed.set()
        log.info("model %s removed: its worker is gone and its sockets with it", mid)
        prep = self._readd.pop(mid, None)
        if prep is not None and mid in self.ids:  # added again while it drained
            # Even while shutting down: a listed id always has a manager (routing, /status).
            self._add(prep, self._runtime_dir / self.dir_name(mid),
                      unloaded=self._stopping or self._parks_when_added(prep.entry))
            if self._stopping:
                self.managers[mid].shutdown()
            else:
                log.info("model %s added again", mid)

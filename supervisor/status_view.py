"""Status shaping: published views + admission counters + psutil -> the status.py structs.

Owns nothing; reads only what its owners publish (a manager's ``WorkerView``, its
``Admission`` counters, the fleet's footprints) and the OS (psutil, through the process
adapter). Callers: /status (app.py), ``WorkerManager.snapshot`` and the fleet's model rows
(for /status and ``vram-llm status``, which decodes the same structs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from supervisor.admission import Admission
from supervisor.states import PROCESS_STATES, WorkerState
from supervisor.status import DiskCache, ModelRow, RamCache, ReplicaRow, RequestCounts, Status, WorkerStatus

if TYPE_CHECKING:
    from supervisor.fleet import Fleet
    from supervisor.worker_process import WorkerView


def disk_cache(view: WorkerView) -> DiskCache | None:
    """The model's disk tier as its worker last reported it (None: off, or no report yet)."""
    h, spec = view.last_health, None if view.launch is None else view.launch.spec
    if h is None or spec is None or spec.cache_disk_mib <= 0 or not spec.cache_dir:
        return None
    return DiskCache(dir=spec.cache_dir, entries=h.disk_cache_entries, bytes=h.disk_cache_bytes,
                     hits=h.disk_cache_hits, tokens_saved=h.disk_cache_tokens_saved, errors=h.disk_cache_errors)


def worker_status(view: WorkerView, now: float) -> WorkerStatus | None:
    """The current worker process, if there is one."""
    proc = view.proc
    if proc is None or view.started_mono is None or view.started_wall is None:
        return None
    w = WorkerStatus(
        pid=proc.pid,
        generation=view.gen,
        started_at=view.started_wall,
        uptime_s=round(now - view.started_mono, 3),
        ready_for_s=None if view.ready_since is None else round(now - view.ready_since, 3),
        load_progress=view.progress,
    )
    h = view.last_health
    if h is not None:
        w.active, w.queued, w.seconds_since_token = h.active, h.queued, h.seconds_since_token
        w.requests_served, w.cache_hits, w.cache_tokens_reused = h.requests_served, h.cache_hits, h.cache_tokens_reused
        w.ram_cache = RamCache(entries=h.ram_cache_entries, bytes=h.ram_cache_bytes, hits=h.ram_cache_hits,
                               tokens_saved=h.ram_cache_tokens_saved)
        w.disk_cache = disk_cache(view)
        w.draft_tokens, w.draft_tokens_accepted = h.draft_tokens, h.draft_tokens_accepted
        w.draft_acceptance = h.draft_acceptance
        w.steps, w.step_seconds, w.decode_seconds = h.steps, h.step_seconds, h.decode_seconds
    w.rss_mib, w.cpu_percent = proc.usage()
    return w


def status_of(view: WorkerView, admission: Admission, stderr: Sequence[str], streak: int, now: float) -> Status:
    """Everything /status shows about one model's worker (GPU readings are added by app)."""
    hist = view.history
    next_in = view.next_attempt_in(now)
    return Status(
        state=view.state.value,
        reason=view.reason_at(now),
        worker=worker_status(view, now),
        restarts=hist.restarts_total,  # the history below keeps the last 50
        restart_history=list(hist.restarts),
        failure_streak=streak,
        crash_loop=view.crash_loop,
        backoff_delay_s=None if view.backoff is None else view.backoff.delay_s,
        next_attempt_in_s=None if next_in is None else round(next_in, 3),
        last_exit=hist.last_exit,
        stderr_tail=list(stderr)[-40:],
        plan=None if view.launch is None else view.launch.plan,
        oom_adjustment=None if hist.adjust is None else hist.adjust.description,
        requests=RequestCounts(
            in_flight=admission.in_flight, waiting_for_worker=admission.waiting, served=admission.served
        ),
    )


def model_rows(fleet: Fleet, now: float) -> list[ModelRow]:
    """One row per model for /status (removed models still draining included)."""
    rows = []
    for mid in fleet.all_ids:
        mgr = fleet.managers[mid]
        view, adm = mgr.view, mgr.admission
        planned, measured = fleet.footprint(mid)
        loaded = view.state in PROCESS_STATES
        rows.append(
            ModelRow(
                id=mid,
                state=view.state.value,
                reason=view.reason_at(now),
                loaded=view.state is WorkerState.READY,
                pinned=fleet.entry(mid).pinned,
                planned_mib=planned if loaded else {},
                measured_mib=measured if loaded else {},
                restarts=view.history.restarts_total,
                swaps_in=view.swaps_in,
                in_flight=model_requests(fleet, mid).in_flight,
                idle_s=round(now - adm.last_used, 1) if adm.last_used else None,
                disk_cache=disk_cache(view) if loaded else None,
                replicas=replica_rows(fleet, mid, now),
            )
        )
    return rows


def model_requests(fleet: Fleet, mid: str) -> RequestCounts:
    """The model's request counts: every replica's together."""
    adms = [m.admission for m in fleet.replicas(mid)] if mid in fleet.ids else [fleet.managers[mid].admission]
    return RequestCounts(in_flight=sum(a.in_flight for a in adms), waiting_for_worker=sum(a.waiting for a in adms),
                         served=sum(a.served for a in adms))


def replica_rows(fleet: Fleet, mid: str, now: float) -> list[ReplicaRow]:
    """One row per replica of model ``mid``; none when it has one."""
    reps = fleet.replicas(mid) if mid in fleet.managers else []
    if len(reps) < 2:
        return []
    keys = [mid, *fleet.extras.get(mid, ())]
    rows = []
    for n, (key, mgr) in enumerate(zip(keys, reps), 1):
        view, adm = mgr.view, mgr.admission
        h, health = view.handle, view.last_health
        rows.append(ReplicaRow(
            replica=n,
            state=view.state.value,
            reason=view.reason_at(now),
            pid=None if view.proc is None else view.proc.pid,
            planned_mib=fleet.footprint(key)[0] if view.state in PROCESS_STATES else {},
            slots=h.slots if h is not None and view.state is WorkerState.READY else 0,
            generating=adm.generating,
            waiting=adm.waiting,
            served=adm.served,
            restarts=view.history.restarts_total,
            cache_hits=None if health is None else health.cache_hits,
            cache_tokens_reused=None if health is None else health.cache_tokens_reused,
        ))
    return rows

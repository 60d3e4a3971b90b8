"""One task owns one worker's whole lifecycle.

Rules of this module (STYLE.md habits 2, 4, 6):
- ``WorkerManager.run()`` is the only code that changes the worker's state, spawns or
  kills the process, or touches the failure history. Everyone else (HTTP handlers,
  signal handlers) sends it a command (``request_reload``/``request_shutdown``) or waits
  for a state (``acquire``). No read of the state gates a mutation elsewhere.
- Time is ``loop.time()`` (monotonic); every wait has a deadline.
- The worker is a fresh interpreter in its own process group; it is stopped with
  SIGTERM to the group, a deadline, then SIGKILL, and always reaped.
- Decisions (restart or give up, the OOM ladder) are made by the pure functions in
  ``restart.py``; legal state moves live in ``states.py``.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import logging
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import msgspec
import psutil

from supervisor.cgroup import OomWatch
from supervisor.config import Config, WorkerSection, resolved_worker_command
from supervisor.restart import (
    Decision,
    Failure,
    FailureKind,
    PlanAdjust,
    RestartPolicy,
    classify_exit,
    decide,
    describe_exit,
    failure_streak,
    oom_ladder,
    prune_failures,
)
from supervisor.states import StateMachine, WorkerState
from supervisor.status import DiskCache, LastExit, RamCache, RequestCounts, RestartRecord, Status, WorkerStatus
from worker.protocol import Health, LaunchSpec, health_decoder, is_oom_line

log = logging.getLogger("vram_llm.worker")

# Level names the worker's log lines start with (worker/__main__.py's format); anything
# else it prints (llama.cpp's lines, a traceback) is logged at INFO.
_WORKER_LEVELS = {"WARNING": logging.WARNING, "ERROR": logging.ERROR, "CRITICAL": logging.CRITICAL}

# How often the health endpoint is polled while a worker starts or loads.
START_POLL_S = 0.2


@dataclass(frozen=True)
class Launch:
    """What one start of the worker uses: the plan in force and how to apply it."""

    spec: LaunchSpec
    env: dict[str, str]
    plan: dict[str, Any]  # the Plan as JSON-able dict (for /status and logs)
    planned_layers: int  # layers actually offloaded by the plan (for the OOM ladder)
    reserve_mib: int
    summary: str  # one line for logs and sd_notify STATUS=


class LaunchPreparer(Protocol):
    """Plans a start: reads the GPU inventory now, applies the OOM-ladder adjustment."""

    async def __call__(self, adjust: PlanAdjust | None, socket_path: str) -> Launch: ...

    async def wait_gpu_settled(self, timeout_s: float) -> None:
        """Wait (bounded) until a dead worker's GPU memory has come back."""


class PlanFailed(Exception):
    """The plan itself cannot be made (e.g. the model file vanished): not retried."""


class NotReady(Exception):
    """No ready worker within the caller's deadline, or the manager gave up."""

    def __init__(self, state: WorkerState, reason: str, retry_after_s: int) -> None:
        super().__init__(reason)
        self.state = state
        self.reason = reason
        self.retry_after_s = retry_after_s


class QueueFull(Exception):
    pass


@dataclass
class WorkerHandle:
    """A ready worker: where to send requests. Valid until its generation changes.

    ``generating`` and ``in_flight`` change only in ``acquire``/``release`` (on the event
    loop); the owner task reads ``in_flight`` to drain the worker before a reload.
    """

    gen: int
    pid: int
    socket_path: str
    session: aiohttp.ClientSession
    slots: int = 1  # generations the worker runs at once (its `parallel`; 1 without one)
    generating: int = 0  # requests holding one of those slots
    in_flight: int = 0  # requests sent to this worker and not finished yet


class _Command(enum.Enum):
    RELOAD = "reload"
    SHUTDOWN = "shutdown"
    LOAD = "load"  # a parked (unloaded) model: start it
    UNLOAD = "unload"  # stop the worker once its requests are done and stay parked


class _Outcome(enum.Enum):
    EXITED = "exited"
    HANG = "hang"
    LOAD_STALL = "load_stall"
    RELOAD = "reload"
    SHUTDOWN = "shutdown"
    UNLOAD = "unload"


class NoRoom(Exception):
    """The fleet cannot place the model now (no room, or busy models did not go idle in
    time): the manager parks it and the requests waiting for it get 503 with this reason."""

    def __init__(self, reason: str, retry_after_s: int = 5) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


@dataclass
class _Run:
    """One started worker process. Owned by the manager's task."""

    gen: int
    launch: Launch
    proc: asyncio.subprocess.Process
    started_mono: float
    started_wall: float
    session: aiohttp.ClientSession
    exit_task: asyncio.Future[int]
    stderr_task: asyncio.Task[None]
    ready_mono: float | None = None
    oom_seen: bool = False
    oom_line: str | None = None
    killed_by_us: bool = False
    progress: float = 0.0
    psproc: psutil.Process | None = None
    last_health: Health | None = None
    oom_watch: OomWatch = field(default_factory=lambda: OomWatch(()))


@dataclass
class Counters:
    in_flight: int = 0
    waiting: int = 0
    served: int = 0
    ended: int = 0  # requests that left, answered or not (in_flight counts those still here)
    restarts_total: int = 0
    restarts_by_kind: dict[str, int] = field(default_factory=dict)


def host_oom_killed(pid: int) -> bool:
    """True when the kernel log says the host OOM killer killed ``pid``.

    Reading /dev/kmsg needs privileges that a sandboxed service may not have: then we
    cannot tell, and say no (the death is treated as an ordinary crash).
    """
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    needle = f"Killed process {pid} ".encode()
    try:
        while True:
            try:
                rec = os.read(fd, 8192)
            except BlockingIOError:
                return False
            except OSError:  # EPIPE when records were overwritten; keep reading
                continue
            if not rec:
                return False
            if needle in rec and b"ut of memory" in rec:
                return True
    finally:
        os.close(fd)


class WorkerManager:
    def __init__(
        self,
        *,
        config: Callable[[], Config],
        prepare: LaunchPreparer,
        runtime_dir: Path,
        on_state: Callable[[WorkerState, str], None] | None = None,
        on_progress: Callable[[float], None] | None = None,
        parked: bool = False,
        name: str = "worker",
    ) -> None:
        # The configuration is read where it is used, so a SIGHUP reload changes the
        # timeouts and the restart policy too, not only the plan.
        self._config = config
        self._prepare = prepare
        self._runtime_dir = runtime_dir
        self._on_state = on_state
        self._on_progress = on_progress
        self._sm = StateMachine()
        self._reason = "not started"
        self._commands: asyncio.Queue[_Command] = asyncio.Queue()
        self._changed = asyncio.Event()
        self._handle: WorkerHandle | None = None
        self._run: _Run | None = None
        self._gen = 0
        self._failures: list[Failure] = []
        # The decision being waited out while in BACKOFF, and when its delay ends (loop time);
        # both None in every other state.
        self._backoff: Decision | None = None
        self._next_attempt_at: float | None = None
        self._restarts: collections.deque[RestartRecord] = collections.deque(maxlen=50)
        self._stderr: collections.deque[str] = collections.deque(maxlen=config().worker.stderr_lines)
        self._last_exit: LastExit | None = None
        self._adjust: PlanAdjust | None = None
        self._oom_step = 0
        self._oom_exhausted = False
        self._ladder_base: Launch | None = None  # the plan the OOM ladder shrinks from
        self._launch: Launch | None = None
        self._stopping = False
        # Several models (supervisor/fleet.py): a parked manager has no worker and starts one
        # only on LOAD; ``_hold`` keeps new requests waiting while the fleet drains it for an
        # eviction; ``_refused`` answers them at once when the fleet could not place it.
        self._parked = parked
        self._hold = False
        self._refused: NoRoom | None = None
        self._load_queued = False
        self._retired = False  # removed from the configuration: nothing loads it again
        self.name = name
        self.swaps_in = 0  # loads after the first (a model swapped back in)
        self.parks = 0  # times it was unloaded (the fleet waits for this to move)
        self.last_used = 0.0  # loop time of the last request taken
        self.counters = Counters()
        self.started_wall = time.time()

    @property
    def _w(self) -> WorkerSection:
        return self._config().worker

    def _policy(self) -> RestartPolicy:
        r = self._config().restart
        return RestartPolicy(
            backoff_initial_s=r.backoff_initial_s,
            backoff_max_s=r.backoff_max_s,
            stable_after_s=r.stable_after_s,
            max_failures=r.max_failures,
            failure_window_s=r.failure_window_s,
            give_up=r.give_up,
        )

    # ---- read side (any task) -------------------------------------------------

    @property
    def state(self) -> WorkerState:
        return self._sm.state

    @property
    def reason(self) -> str:
        if self.crash_loop:
            # Said when read, so /status, /health and 503 bodies count down to the next try.
            return f"{self._reason}; next attempt in {self.retry_after_s()}s"
        return self._reason

    @property
    def crash_loop(self) -> bool:
        """Waiting out the capped delay after the failure budget was spent."""
        return self.state is WorkerState.BACKOFF and self._backoff is not None and self._backoff.crash_loop

    def next_attempt_in_s(self) -> float | None:
        """Seconds until the next start attempt while in BACKOFF; None in other states."""
        if self.state is not WorkerState.BACKOFF or self._next_attempt_at is None:
            return None
        return max(0.0, self._next_attempt_at - asyncio.get_running_loop().time())

    def retry_after_s(self, default: int = 5) -> int:
        """A Retry-After value (whole seconds, at least 1): until the next start attempt when
        one is scheduled, else ``default``."""
        left = self.next_attempt_in_s()
        return default if left is None else max(1, math.ceil(left))

    def failure_streak(self) -> int:
        """Failures in the current streak, as the restart policy counts them now."""
        return failure_streak(
            self._policy(),
            self._failures,
            asyncio.get_running_loop().time(),
            oom_ladder_exhausted=self._oom_exhausted,
        )

    @property
    def launch(self) -> Launch | None:
        return self._launch

    def last_health(self) -> tuple[int, Health] | None:
        """The current worker's pid and its last /health answer (read by the metrics)."""
        run = self._run
        if run is None or run.last_health is None:
            return None
        return run.proc.pid, run.last_health

    def snapshot(self) -> Status:
        """Everything /status shows about the worker (GPU readings are added by app)."""
        run = self._run
        now = asyncio.get_running_loop().time()
        worker: WorkerStatus | None = None
        if run is not None:
            worker = WorkerStatus(
                pid=run.proc.pid,
                generation=run.gen,
                started_at=run.started_wall,
                uptime_s=round(now - run.started_mono, 3),
                ready_for_s=None if run.ready_mono is None else round(now - run.ready_mono, 3),
                load_progress=run.progress,
            )
            if run.last_health is not None:
                worker.active = run.last_health.active
                worker.queued = run.last_health.queued
                worker.seconds_since_token = run.last_health.seconds_since_token
                worker.requests_served = run.last_health.requests_served
                worker.cache_hits = run.last_health.cache_hits
                worker.cache_tokens_reused = run.last_health.cache_tokens_reused
                worker.ram_cache = RamCache(
                    entries=run.last_health.ram_cache_entries,
                    bytes=run.last_health.ram_cache_bytes,
                    hits=run.last_health.ram_cache_hits,
                    tokens_saved=run.last_health.ram_cache_tokens_saved,
                )
                h = run.last_health
                if run.launch.spec.cache_disk_mib > 0 and run.launch.spec.cache_dir:
                    worker.disk_cache = DiskCache(
                        dir=run.launch.spec.cache_dir,
                        entries=h.disk_cache_entries,
                        bytes=h.disk_cache_bytes,
                        hits=h.disk_cache_hits,
                        tokens_saved=h.disk_cache_tokens_saved,
                        errors=h.disk_cache_errors,
                    )
            if run.psproc is not None:
                with contextlib.suppress(psutil.Error):
                    with run.psproc.oneshot():
                        worker.rss_mib = round(run.psproc.memory_info().rss / 2**20, 1)
                        worker.cpu_percent = run.psproc.cpu_percent(interval=None)
        next_in = self.next_attempt_in_s()
        return Status(
            state=self.state.value,
            reason=self.reason,
            worker=worker,
            restarts=self.counters.restarts_total,  # the history below keeps the last 50
            restart_history=list(self._restarts),
            failure_streak=self.failure_streak(),
            crash_loop=self.crash_loop,
            backoff_delay_s=None if self._backoff is None else self._backoff.delay_s,
            next_attempt_in_s=None if next_in is None else round(next_in, 3),
            last_exit=self._last_exit,
            stderr_tail=list(self._stderr)[-40:],
            plan=None if self._launch is None else self._launch.plan,
            oom_adjustment=None if self._adjust is None else self._adjust.description,
            requests=RequestCounts(
                in_flight=self.counters.in_flight,
                waiting_for_worker=self.counters.waiting,
                served=self.counters.served,
            ),
        )

    async def acquire(self, timeout_s: float, not_gen: int | None = None, *, slot: bool = True) -> WorkerHandle:
        """Wait (bounded) for a ready worker; ``not_gen`` skips a generation known dead.

        One admission limit for everything waiting: a request that needs a generation
        ``slot`` waits here (not inside the worker) until the worker has a free one, and
        at most ``admission.queue_size`` requests wait, whatever they wait for. Requests
        being generated are not counted. The caller must ``release`` the handle.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        queued = False
        try:
            while True:
                h = self._handle
                if self._refused is not None:
                    raise NotReady(self.state, self._refused.reason, self._refused.retry_after_s)
                if self._parked:
                    # A request for an unloaded model (or one evicted while it waited) loads it.
                    self.request_load()
                if self.state is WorkerState.READY and h is not None and h.gen != not_gen and not self._hold:
                    # A newcomer does not overtake requests already waiting for a slot.
                    if not slot or (h.generating < h.slots and (queued or self.counters.waiting == 0)):
                        h.in_flight += 1
                        self.last_used = loop.time()
                        if slot:
                            h.generating += 1
                            if queued and h.generating < h.slots:
                                self._signal_change()  # more free slots: the next in line re-checks
                        return h
                if self.state is WorkerState.FAILED:
                    raise NotReady(self.state, self._reason, 30)
                if self._stopping:
                    raise NotReady(self.state, "the server is shutting down", 5)
                if self.crash_loop:
                    # The next attempt will likely fail like the last ones: answer at once and
                    # say when it comes, rather than hold the request and a queue slot for it.
                    raise NotReady(self.state, self.reason, self.retry_after_s())
                if not queued:
                    if self.counters.waiting >= self._config().admission.queue_size:
                        raise QueueFull()
                    queued = True
                    self.counters.waiting += 1
                remaining = deadline - loop.time()
                if remaining <= 0:
                    if self.state is WorkerState.READY and h is not None and h.gen != not_gen:
                        raise NotReady(
                            self.state,
                            f"worker pid {h.pid} stayed busy ({h.generating} of {h.slots} generation slot(s)) "
                            f"for {timeout_s:g}s",
                            5,
                        )
                    raise NotReady(
                        self.state,
                        f"no worker became ready within {timeout_s:g}s (state {self.state.value}: {self.reason})",
                        self.retry_after_s(),
                    )
                changed = self._changed
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(changed.wait(), remaining)
        finally:
            if queued:
                self.counters.waiting -= 1

    def release(self, handle: WorkerHandle, *, slot: bool = True) -> None:
        """The request that ``acquire`` returned ``handle`` to is done with it."""
        handle.in_flight -= 1
        if slot:
            handle.generating -= 1
        # Idle since the END of its last request: a 10-minute stream is not 10 minutes idle
        # to the idle TTL and the least-recently-used eviction.
        self.last_used = asyncio.get_running_loop().time()
        # Wakes a request waiting for the slot, and a reload draining this worker.
        self._signal_change()

    def is_current(self, handle: WorkerHandle) -> bool:
        """True while ``handle`` is the ready worker: the owner has not seen it die or
        replaced it, so a refused connection to it is worth trying again."""
        return self._handle is handle and self.state is WorkerState.READY

    # ---- commands (any task) --------------------------------------------------

    def request_reload(self) -> None:
        self._commands.put_nowait(_Command.RELOAD)

    @property
    def parked(self) -> bool:
        """No worker, and none will start until ``request_load``."""
        return self._parked

    @property
    def ready_since(self) -> float | None:
        """Loop time the current worker became ready (None: no ready worker)."""
        run = self._run
        return None if run is None else run.ready_mono

    @property
    def active(self) -> int:
        """Requests the worker is answering now (taken by ``acquire``, not yet released)."""
        h = self._handle
        return 0 if h is None else h.in_flight

    def request_load(self) -> None:
        """Start a parked model (a no-op for a loaded one). Clears a previous refusal so
        the requests that asked for it wait for the load."""
        if self._retired:
            return
        self._refused = None
        if self._parked:
            self._hold = False  # no worker to drain: nothing may hold requests back any more
        if self._parked and not self._load_queued:
            self._load_queued = True
            self._commands.put_nowait(_Command.LOAD)

    def request_unload(self) -> None:
        self._commands.put_nowait(_Command.UNLOAD)

    def retire(self, reason: str) -> None:
        """The model was removed from the configuration (SIGHUP): requests waiting for a
        worker get ``reason`` at once, nothing loads it again, and the worker stops once the
        requests it is answering finish (the unload drain, bounded by shutdown.grace_s)."""
        self._retired = True
        self._refused = NoRoom(reason, 5)
        self._signal_change()
        self.request_unload()

    def hold_new(self, on: bool) -> None:
        """While on, new requests wait (the fleet is draining this model to evict it)."""
        self._hold = on
        self._signal_change()

    def request_shutdown(self) -> None:
        self._stopping = True
        self._signal_change()
        self._commands.put_nowait(_Command.SHUTDOWN)

    # ---- the owner task -------------------------------------------------------

    def _signal_change(self) -> None:
        old = self._changed
        self._changed = asyncio.Event()
        old.set()

    def _move(self, new: WorkerState, reason: str) -> None:
        old = self._sm.state
        self._sm.transition(new, reason)
        self._reason = reason
        if new is not WorkerState.READY:
            self._handle = None
        if new is not WorkerState.BACKOFF:
            self._backoff = None
            self._next_attempt_at = None
        log.log(
            logging.ERROR if new is WorkerState.FAILED or self.crash_loop else logging.INFO,
            "worker state %s -> %s: %s",
            old.value,
            new.value,
            self.reason,
        )
        if self._on_state is not None:
            self._on_state(new, self.reason)
        self._signal_change()

    async def run(self) -> None:
        """The lifecycle loop. Returns after a shutdown command, with no worker left."""
        cmd_task: asyncio.Task[_Command] = asyncio.ensure_future(self._next_command())
        try:
            while True:
                if self._parked:
                    cmd = await cmd_task
                    cmd_task = asyncio.ensure_future(self._next_command())
                    if cmd is _Command.SHUTDOWN:
                        return
                    if cmd is _Command.LOAD:
                        self._parked = False
                        self._reset_history()
                        if self._gen > 0:
                            self.swaps_in += 1
                    continue
                if self.state is WorkerState.FAILED:
                    cmd = await cmd_task
                    cmd_task = asyncio.ensure_future(self._next_command())
                    if cmd is _Command.SHUTDOWN:
                        return
                    if cmd is _Command.UNLOAD:
                        self._park("unloaded")
                        continue
                    self._reset_history()
                    self._move(WorkerState.STOPPED, "reload requested: starting again")
                    continue
                outcome, cmd_task = await self._start_and_supervise(cmd_task)
                if outcome is _Outcome.SHUTDOWN:
                    return
                if outcome is _Outcome.UNLOAD:
                    continue
                if outcome is _Outcome.RELOAD:
                    self._reset_history()
                    continue
                # A failure: decide what to do next.
                decision = decide(
                    self._policy(),
                    self._failures,
                    asyncio.get_running_loop().time(),
                    oom_ladder_exhausted=self._oom_exhausted,
                )
                if decision.action == "give_up":
                    self._move(WorkerState.FAILED, decision.reason)
                    continue
                # Set before the move, so the waiters it wakes see when the next attempt comes.
                self._backoff = decision
                self._next_attempt_at = asyncio.get_running_loop().time() + decision.delay_s
                self._move(WorkerState.BACKOFF, decision.reason)
                got = await self._wait_cmd(cmd_task, decision.delay_s)
                if got is not None:
                    cmd_task = asyncio.ensure_future(self._next_command())
                    if got is _Command.SHUTDOWN:
                        return
                    if got is _Command.UNLOAD:
                        self._park("unloaded")
                        continue
                    if got is _Command.LOAD:
                        continue  # it starts now rather than at the end of the delay
                    self._reset_history()
        finally:
            cmd_task.cancel()
            with contextlib.suppress(BaseException):
                await cmd_task
            if self._run is not None:
                await self._stop_run(self._run, "supervisor is shutting down")
            if self.state is not WorkerState.STOPPED:
                self._move(WorkerState.STOPPED, "supervisor stopped")

    async def _next_command(self) -> _Command:
        cmd = await self._commands.get()
        if cmd is _Command.LOAD:
            self._load_queued = False  # the next request_load queues one again
        return cmd

    def _park(self, reason: str) -> None:
        self.parks += 1
        self._parked = True
        self._hold = False
        if self.state is WorkerState.STOPPED:
            self._reason = reason
            log.info("%s: %s", self.name, reason)
            self._signal_change()
        else:
            self._move(WorkerState.STOPPED, reason)

    def _reset_history(self) -> None:
        self._failures.clear()
        self._adjust = None
        self._oom_step = 0
        self._oom_exhausted = False
        self._ladder_base = None

    async def _wait_cmd(self, cmd_task: asyncio.Task[_Command], timeout_s: float) -> _Command | None:
        done, _ = await asyncio.wait({cmd_task}, timeout=max(0.0, timeout_s))
        return cmd_task.result() if done else None

    async def _start_and_supervise(
        self, cmd_task: asyncio.Task[_Command]
    ) -> tuple[_Outcome, asyncio.Task[_Command]]:
        loop = asyncio.get_running_loop()
        self._gen += 1
        gen = self._gen
        socket_path = str(self._runtime_dir / f"worker-{gen}.sock")
        try:
            launch = await self._prepare(self._adjust, socket_path)
        except NoRoom as e:
            self._refused = e
            self._park(f"not loaded: {e.reason}")
            return _Outcome.UNLOAD, cmd_task
        except PlanFailed as e:
            self._record_failure(Failure(at=loop.time(), kind=FailureKind.PERMANENT, detail=str(e), ran_for_s=0.0))
            return _Outcome.EXITED, cmd_task
        self._launch = launch
        run = await self._spawn(gen, launch)
        if run is None:
            return _Outcome.EXITED, cmd_task
        self._run = run
        outcome, cmd_task = await self._supervise(run, cmd_task)
        if outcome in (_Outcome.RELOAD, _Outcome.UNLOAD):
            outcome, cmd_task = await self._drain(run, cmd_task, outcome)
        reason = {
            _Outcome.SHUTDOWN: "supervisor is shutting down",
            _Outcome.RELOAD: "reload requested",
            _Outcome.UNLOAD: "unloaded",
            _Outcome.HANG: "worker hung",
            _Outcome.LOAD_STALL: "load made no progress",
            _Outcome.EXITED: "worker exited",
        }[outcome]
        await self._stop_run(run, reason)
        self._run = None
        if outcome is _Outcome.UNLOAD:
            self._park(f"unloaded (worker pid {run.proc.pid} stopped)")
            return outcome, cmd_task
        if outcome in (_Outcome.SHUTDOWN, _Outcome.RELOAD):
            if outcome is _Outcome.RELOAD:
                self._move(WorkerState.STOPPED, "reload requested: re-planning")
            return outcome, cmd_task
        failure = self._classify(run, outcome)
        self._record_failure(failure)
        if failure.kind is FailureKind.OOM:
            await self._on_oom(run)
        return _Outcome.EXITED, cmd_task

    async def _drain(
        self, run: _Run, cmd_task: asyncio.Task[_Command], why: _Outcome = _Outcome.RELOAD
    ) -> tuple[_Outcome, asyncio.Task[_Command]]:
        """Before a reload stops the worker: new requests wait for the next worker while
        the ones it is answering finish (bounded by shutdown.grace_s). Stopping it at once
        would cut their answers short (issue 13)."""
        h = self._handle
        if h is None or h.gen != run.gen or h.in_flight == 0 or run.proc.returncode is not None:
            return why, cmd_task
        loop = asyncio.get_running_loop()
        grace = self._config().shutdown.grace_s
        deadline = loop.time() + grace
        if self._retired:
            what, then = "removed from the configuration", "new requests are refused"
        else:
            what, then = f"{why.value} requested", "new requests wait for the next worker"
        self._move(
            WorkerState.STOPPING,
            f"{what}: worker pid {run.proc.pid} finishes {h.in_flight} request(s) first (up to {grace:g}s); {then}",
        )
        while h.in_flight > 0:
            remaining = deadline - loop.time()
            if remaining <= 0:
                log.warning(
                    "reload: worker pid %d still has %d request(s) after %.0fs; they will end with an error",
                    run.proc.pid,
                    h.in_flight,
                    grace,
                )
                break
            changed: asyncio.Future[Any] = asyncio.ensure_future(self._changed.wait())
            waiters: set[asyncio.Future[Any]] = {run.exit_task, cmd_task, changed}
            try:
                done, _ = await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            finally:
                changed.cancel()
            if cmd_task in done:
                cmd = cmd_task.result()
                cmd_task = asyncio.ensure_future(self._next_command())
                if cmd is _Command.SHUTDOWN:
                    return _Outcome.SHUTDOWN, cmd_task
                if cmd is _Command.UNLOAD:
                    why = _Outcome.UNLOAD  # an unload (or removal) while a reload drains: park after
                # Another reload while draining: the next start reads the newest config anyway.
            if run.exit_task in done:
                break
        return why, cmd_task

    async def _spawn(self, gen: int, launch: Launch) -> _Run | None:
        loop = asyncio.get_running_loop()
        spec_path = self._runtime_dir / f"worker-{gen}.spec.json"
        spec_path.write_bytes(msgspec.json.encode(launch.spec))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(launch.spec.socket_path)
        cmd = [*resolved_worker_command(self._config()), "--spec", str(spec_path)]
        self._move(WorkerState.STARTING, f"starting worker (generation {gen}): {launch.summary}")
        log.info("worker command: %s", " ".join(cmd))
        try:
            proc = await asyncio.create_subprocess_exec(
                *cmd,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env=launch.env,
                start_new_session=True,  # own process group: we kill the whole group
                limit=1 << 20,
            )
        except OSError as e:
            self._record_failure(
                Failure(at=loop.time(), kind=FailureKind.START_ERROR, detail=f"cannot start worker: {e}", ran_for_s=0.0)
            )
            log.error("cannot start worker %s: %s", cmd, e)
            return None
        self._stderr.clear()
        session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=launch.spec.socket_path, limit=0),
            # The proxy sets per-request timeouts; the session itself never times out a
            # streamed generation.
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            auto_decompress=False,
        )
        run = _Run(
            gen=gen,
            launch=launch,
            proc=proc,
            started_mono=loop.time(),
            started_wall=time.time(),
            session=session,
            exit_task=asyncio.ensure_future(proc.wait()),
            stderr_task=asyncio.create_task(self._read_stderr(proc)),
        )
        with contextlib.suppress(psutil.Error):
            run.psproc = psutil.Process(proc.pid)
            run.psproc.cpu_percent(interval=None)
        run.oom_watch = OomWatch.of(proc.pid)  # the cgroup's OOM-kill count before it can run out
        self._run = run
        log.info("worker pid %d started", proc.pid)
        return run

    async def _read_stderr(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        run_pid = proc.pid
        own = f"worker[{run_pid}] "
        while True:
            try:
                raw = await proc.stdout.readline()
            except ValueError:  # a line over the limit: take what is there
                raw = await proc.stdout.read(1 << 16)
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip("\n")
            # The worker's own lines start "worker[PID] LEVEL ": keep its level, drop the
            # prefix we are about to add again.
            if line.startswith(own):
                line = line[len(own):]
            level = _WORKER_LEVELS.get(line.split(" ", 1)[0], logging.INFO)
            self._stderr.append(line)
            run = self._run
            if run is not None and run.proc.pid == run_pid and is_oom_line(line):
                run.oom_seen = True
                run.oom_line = line
                level = logging.ERROR
            log.log(level, "worker[%d]: %s", run_pid, line)

    async def _health(self, run: _Run, timeout_s: float) -> tuple[int, Health] | None:
        try:
            async with run.session.get(
                "http://worker/health", timeout=aiohttp.ClientTimeout(total=timeout_s)
            ) as resp:
                body = await resp.read()
            h = health_decoder.decode(body)
            run.last_health = h
            return resp.status, h
        except (aiohttp.ClientError, asyncio.TimeoutError, msgspec.DecodeError, OSError):
            return None

    async def _supervise(
        self, run: _Run, cmd_task: asyncio.Task[_Command]
    ) -> tuple[_Outcome, asyncio.Task[_Command]]:
        loop = asyncio.get_running_loop()
        last_progress_at = loop.time()
        last_progress = -1.0
        health_failures = 0
        next_health = loop.time()
        while True:
            ready = self.state is WorkerState.READY
            wait_s = max(0.0, next_health - loop.time())
            waiters: set[asyncio.Future[Any]] = {run.exit_task, cmd_task}
            done, _ = await asyncio.wait(waiters, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
            if cmd_task in done:
                cmd = cmd_task.result()
                cmd_task = asyncio.ensure_future(self._next_command())
                if cmd is _Command.LOAD:
                    continue  # already loaded
                outcome = {_Command.SHUTDOWN: _Outcome.SHUTDOWN, _Command.UNLOAD: _Outcome.UNLOAD}
                return outcome.get(cmd, _Outcome.RELOAD), cmd_task
            if run.exit_task in done:
                return _Outcome.EXITED, cmd_task
            now = loop.time()
            if not ready:
                next_health = now + START_POLL_S
                res = await self._health(run, min(2.0, self._w.health_timeout_s))
                if res is not None:
                    status, h = res
                    if status == 200 and h.status == "ok":
                        run.ready_mono = loop.time()
                        run.progress = 1.0
                        self._handle = WorkerHandle(
                            run.gen, run.proc.pid, run.launch.spec.socket_path, run.session, _slots(h, run.launch.spec)
                        )
                        self._move(
                            WorkerState.READY,
                            f"worker pid {run.proc.pid} ready after {run.ready_mono - run.started_mono:.1f}s",
                        )
                        next_health = loop.time() + self._w.health_interval_s
                        continue
                    if self.state is WorkerState.STARTING:
                        self._move(WorkerState.LOADING, f"worker pid {run.proc.pid} is loading the model")
                    run.progress = h.progress
                    if h.progress > last_progress:
                        last_progress = h.progress
                        last_progress_at = now
                        if self._on_progress is not None:
                            self._on_progress(h.progress)
                if now - last_progress_at > self._w.load_stall_timeout_s:
                    return _Outcome.LOAD_STALL, cmd_task
                continue
            # READY: liveness.
            next_health = now + self._w.health_interval_s
            res = await self._health(run, self._w.health_timeout_s)
            if res is None or res[0] != 200:
                health_failures += 1
                log.warning(
                    "worker pid %d: health check failed (%d of %d allowed)",
                    run.proc.pid,
                    health_failures,
                    self._w.health_failures,
                )
                if health_failures >= self._w.health_failures:
                    return _Outcome.HANG, cmd_task
                continue
            health_failures = 0
            if self._failures and run.ready_mono is not None and now - run.ready_mono >= self._policy().stable_after_s:
                # Up long enough to call the failures before it over (the policy would say the
                # same at the next failure): /status and /metrics stop showing a streak now.
                log.info(
                    "worker pid %d has been up %.0fs: the %d failure(s) before it no longer count",
                    run.proc.pid,
                    now - run.ready_mono,
                    len(self._failures),
                )
                self._failures.clear()
            h = res[1]
            if h.seconds_since_token is not None and h.seconds_since_token > self._w.token_stall_timeout_s:
                log.error(
                    "worker pid %d: generation produced no token for %.0fs (limit %.0fs)",
                    run.proc.pid,
                    h.seconds_since_token,
                    self._w.token_stall_timeout_s,
                )
                return _Outcome.HANG, cmd_task

    def _classify(self, run: _Run, outcome: _Outcome) -> Failure:
        loop = asyncio.get_running_loop()
        ran_for = 0.0 if run.ready_mono is None else loop.time() - run.ready_mono
        code = run.proc.returncode
        if outcome is _Outcome.HANG:
            kind, detail = FailureKind.HANG, (
                f"worker pid {run.proc.pid} hung (health checks failed or no token for "
                f"{self._w.token_stall_timeout_s:g}s); killed"
            )
        elif outcome is _Outcome.LOAD_STALL:
            kind, detail = FailureKind.LOAD_STALL, (
                f"worker pid {run.proc.pid} made no load progress for {self._w.load_stall_timeout_s:g}s; killed"
            )
        else:
            assert code is not None
            what = describe_exit(code)
            host_oom = False
            if code == -signal.SIGKILL and not run.killed_by_us:
                # The cgroup's OOM-kill counter (readable under systemd); the kernel log where there is none.
                counted = run.oom_watch.killed()
                host_oom = counted if counted is not None else host_oom_killed(run.proc.pid)
            kind = classify_exit(code, oom_evidence=run.oom_seen or host_oom)
            if host_oom:
                what += ", by the host OOM killer"
            elif code == -signal.SIGKILL and not run.killed_by_us:
                what += ", not by us (perhaps out of memory?)"
            detail = f"worker pid {run.proc.pid} {what}"
            if run.oom_line:
                detail += f": {run.oom_line.strip()}"
            elif kind is FailureKind.PERMANENT and self._stderr:
                detail += f": {self._stderr[-1].strip()}"
        self._last_exit = LastExit(
            pid=run.proc.pid,
            code=code,
            description=describe_exit(code) if code is not None else None,
            kind=kind.value,
            detail=detail,
            at=time.time(),
            ran_for_s=round(ran_for, 3),
        )
        return Failure(at=loop.time(), kind=kind, detail=detail, ran_for_s=ran_for)

    def _record_failure(self, failure: Failure) -> None:
        # Pruned as it grows: a crash loop retries for ever, its history must not grow with it.
        self._failures = prune_failures(self._policy(), [*self._failures, failure], failure.at)
        self._restarts.append(RestartRecord(at=time.time(), kind=failure.kind.value, reason=failure.detail))
        self.counters.restarts_total += 1
        k = failure.kind.value
        self.counters.restarts_by_kind[k] = self.counters.restarts_by_kind.get(k, 0) + 1
        log.error("worker failure (%s): %s", k, failure.detail)

    async def _on_oom(self, run: _Run) -> None:
        """Climb one step of the OOM ladder, after the GPU memory has come back."""
        self._oom_step += 1
        if self._ladder_base is None:
            self._ladder_base = run.launch
        base = self._ladder_base
        adjust = oom_ladder(
            self._oom_step,
            planned_layers=base.planned_layers,
            n_ctx=base.spec.n_ctx,
            reserve_mib=base.reserve_mib,
        )
        if adjust is None:
            self._oom_exhausted = True
            log.error("out of memory with the smallest plan (CPU only): no smaller plan to try")
            return
        self._adjust = adjust
        log.warning("out of memory (step %d of the OOM ladder): %s", self._oom_step, adjust.description)
        # The dead worker's GPU memory is released by the driver asynchronously. The
        # preparer re-reads the inventory at the next start; here we only wait until
        # two consecutive readings agree (memory stopped coming back), bounded.
        await self._prepare.wait_gpu_settled(self._config().restart.oom_settle_timeout_s)

    async def _stop_run(self, run: _Run, reason: str) -> None:
        """Stop the worker: TERM to the group, deadline, KILL; always reap and clean up."""
        if run.proc.returncode is None:
            if self.state is WorkerState.STOPPING:  # already draining (reload)
                log.info("stopping worker pid %d: %s", run.proc.pid, reason)
            else:
                self._move(WorkerState.STOPPING, f"stopping worker pid {run.proc.pid}: {reason}")
            run.killed_by_us = True
            _killpg(run.proc.pid, signal.SIGTERM)
            done, _ = await asyncio.wait({run.exit_task}, timeout=self._w.stop_timeout_s)
            if not done:
                log.error(
                    "worker pid %d did not stop within %.0fs of SIGTERM: sending SIGKILL",
                    run.proc.pid,
                    self._w.stop_timeout_s,
                )
                _killpg(run.proc.pid, signal.SIGKILL)
                await run.exit_task
        else:
            await run.exit_task
            if self.state is not WorkerState.STOPPING:
                self._move(
                    WorkerState.STOPPING,
                    f"worker pid {run.proc.pid} {describe_exit(run.proc.returncode)}: cleaning up",
                )
        # Anything the worker left in its group (helpers, grandchildren) goes too.
        _killpg(run.proc.pid, signal.SIGKILL)
        with contextlib.suppress(asyncio.TimeoutError, Exception):
            await asyncio.wait_for(run.stderr_task, 2.0)
        run.stderr_task.cancel()
        await run.session.close()
        for p in (run.launch.spec.socket_path, str(self._runtime_dir / f"worker-{run.gen}.spec.json")):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        log.info("worker pid %d is gone (%s)", run.proc.pid, describe_exit(run.proc.returncode or 0))


def _slots(health: Health, spec: LaunchSpec) -> int:
    """How many generations the worker runs at once: its `parallel` setting where the
    worker reports one (health params, else the launch spec), else one."""
    for source in (health.params, spec):
        n = getattr(source, "parallel", None)
        if isinstance(n, int) and n >= 1:
            return n
    return 1


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


# Re-exported for app wiring and tests.
__all__ = [
    "Launch",
    "LaunchPreparer",
    "NotReady",
    "PlanFailed",
    "QueueFull",
    "WorkerHandle",
    "WorkerManager",
]

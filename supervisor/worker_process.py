"""One task owns one worker's whole lifecycle: the run loop and the state machine.

Owns: the worker's state (states.py's table), its process (through the process adapter,
spawn.py), its generation, the failure history and the OOM ladder (``FailureBook``).
Publishes: a frozen ``WorkerView`` of itself after every move; every reader (HTTP handlers,
the fleet, /status, /metrics, threads) reads the view, never a field.
Callers send commands (``load``, ``unload``, ``reload``, ``retire``, ``shutdown``); each
returns a future answered when the command has taken effect (``await mgr.unload()`` returns
once the model is unloaded and its worker gone). Request admission and its counters belong
to ``mgr.admission`` (admission.py).

Rules of this module (STYLE.md habits 2, 4, 6):
- ``WorkerManager.run()`` is the only code that moves the state, starts or stops the
  process or touches the failure history. No read of the state gates a mutation elsewhere.
- Time is ``loop.time()`` (monotonic); every wait has a deadline.
- Decisions are made by pure functions: restart or give up and the OOM ladder in
  ``restart.py``, liveness and exit verdicts in ``liveness.py``; legal moves in ``states.py``.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from supervisor.admission import Admission, NotReady, QueueFull
from supervisor.config import Config
from supervisor.launches import Launch, LaunchPreparer, NoRoom, PlanFailed
from supervisor.liveness import (
    Limits,
    Probe,
    exit_verdict,
    hang_verdict,
    load_stall_verdict,
    load_stalled,
    needs_oom_check,
    probe_verdict,
    stable,
)
from supervisor.restart import (
    Decision,
    Failure,
    FailureKind,
    PlanAdjust,
    RestartPolicy,
    decide,
    describe_exit,
    failure_streak,
    oom_ladder,
    prune_failures,
)
from supervisor.spawn import ProcessSpawner, Spawner, WorkerProcess
from supervisor.states import StateMachine, WorkerState
from supervisor.status import LastExit, RestartRecord, Status
from supervisor.status_view import status_of
from worker.protocol import Health, LaunchSpec, is_rpc_loss_line

log = logging.getLogger("vram_llm.worker")

S = WorkerState

# How often the health endpoint is polled while a worker starts or loads.
START_POLL_S = 0.2


@dataclass(frozen=True)
class WorkerHandle:
    """A ready worker: where to send requests. Valid until its generation changes."""

    gen: int
    pid: int
    socket_path: str
    session: aiohttp.ClientSession
    slots: int = 1  # generations the worker runs at once (its `parallel`)


@dataclass(frozen=True)
class History:
    """The failure book as published: what /status and /metrics show of past failures."""

    failures: tuple[Failure, ...] = ()
    oom_exhausted: bool = False
    adjust: PlanAdjust | None = None  # the OOM ladder's step in force
    restarts: tuple[RestartRecord, ...] = ()  # the last 50
    restarts_total: int = 0
    restarts_by_kind: tuple[tuple[str, int], ...] = ()
    last_exit: LastExit | None = None


@dataclass(frozen=True)
class WorkerView:
    """The manager as others may see it: replaced whole after every move, never changed."""

    state: WorkerState
    reason: str = "not started"
    gen: int = 0
    handle: WorkerHandle | None = None  # only while READY
    proc: WorkerProcess | None = None  # the current worker process (for psutil readings)
    launch: Launch | None = None  # the start in force (the latest one planned)
    started_mono: float | None = None
    started_wall: float | None = None
    ready_since: float | None = None  # loop time the current worker became ready
    progress: float = 0.0
    last_health: Health | None = None
    backoff: Decision | None = None  # the decision waited out while in BACKOFF
    next_attempt_at: float | None = None  # loop time its delay ends (BACKOFF only)
    history: History = History()
    swaps_in: int = 0  # loads after the first (a model swapped back in)

    @property
    def crash_loop(self) -> bool:
        """Waiting out the capped delay after the failure budget was spent."""
        return self.state is S.BACKOFF and self.backoff is not None and self.backoff.crash_loop

    def next_attempt_in(self, now: float) -> float | None:
        """Seconds until the next start attempt while in BACKOFF; None in other states."""
        if self.state is not S.BACKOFF or self.next_attempt_at is None:
            return None
        return max(0.0, self.next_attempt_at - now)

    def retry_after_s(self, now: float, default: int = 5) -> int:
        """A Retry-After value (whole seconds, at least 1): until the next start attempt when
        one is scheduled, else ``default``."""
        left = self.next_attempt_in(now)
        return default if left is None else max(1, math.ceil(left))

    def reason_at(self, now: float) -> str:
        if self.crash_loop:
            # Said when read, so /status, /health and 503 bodies count down to the next try.
            return f"{self.reason}; next attempt in {self.retry_after_s(now)}s"
        return self.reason


@dataclass(frozen=True)
class Counters:
    """Request and restart counts, read together (``mgr.counters``)."""

    in_flight: int
    waiting: int
    served: int
    ended: int
    restarts_total: int
    restarts_by_kind: dict[str, int]


class FailureBook:
    """Failures, restart records and the OOM ladder. Owned by the manager's task."""

    def __init__(self) -> None:
        self.failures: list[Failure] = []
        self._restarts: collections.deque[RestartRecord] = collections.deque(maxlen=50)
        self._total = 0
        self._by_kind: dict[str, int] = {}
        self.last_exit: LastExit | None = None
        self.adjust: PlanAdjust | None = None
        self.step = 0
        self.exhausted = False
        self._base: Launch | None = None  # the plan the OOM ladder shrinks from

    def record(self, policy: RestartPolicy, failure: Failure) -> None:
        # Pruned as it grows: a crash loop retries for ever, its history must not grow with it.
        self.failures = prune_failures(policy, [*self.failures, failure], failure.at)
        self._restarts.append(RestartRecord(at=time.time(), kind=failure.kind.value, reason=failure.detail))
        self._total += 1
        self._by_kind[failure.kind.value] = self._by_kind.get(failure.kind.value, 0) + 1
        log.error("worker failure (%s): %s", failure.kind.value, failure.detail)

    def reset(self) -> None:
        """A reload or a new load: the failures and the ladder start over."""
        self.failures.clear()
        self.adjust, self.step, self.exhausted, self._base = None, 0, False, None

    def climb(self, launch: Launch) -> PlanAdjust | None:
        """One step down the OOM ladder, computed from the first plan that ran out of memory."""
        self.step += 1
        base = self._base = self._base or launch
        adjust = oom_ladder(
            self.step, planned_layers=base.planned_layers, n_ctx=base.spec.n_ctx, reserve_mib=base.reserve_mib
        )
        if adjust is None:
            self.exhausted = True
        else:
            self.adjust = adjust
        return adjust

    def view(self) -> History:
        return History(
            tuple(self.failures), self.exhausted, self.adjust, tuple(self._restarts), self._total,
            tuple(sorted(self._by_kind.items())), self.last_exit,
        )


class _Cmd(enum.Enum):
    LOAD = "load"  # an unloaded model: start it
    UNLOAD = "unload"  # stop the worker once its requests are done and stay unloaded
    RELOAD = "reload"
    RETIRE = "retire"  # removed from the configuration: like unload, then nothing loads it
    SHUTDOWN = "shutdown"


# When a command has taken effect: the states that answer its future.
_ANSWERED_IN: dict[_Cmd, frozenset[WorkerState]] = {
    _Cmd.LOAD: frozenset({S.READY, S.BACKOFF, S.FAILED, S.UNLOADED, S.RETIRED}),
    _Cmd.UNLOAD: frozenset({S.UNLOADED, S.RETIRED}),
    _Cmd.RELOAD: frozenset({S.STOPPED, S.STARTING, S.UNLOADED, S.RETIRED}),
    _Cmd.RETIRE: frozenset({S.RETIRED}),
    _Cmd.SHUTDOWN: frozenset(),  # when run() returns
}


@dataclass(frozen=True)
class _Command:
    kind: _Cmd
    done: asyncio.Future[None]
    reason: str = ""


class _Outcome(enum.Enum):
    EXITED = "exited"
    HANG = "hang"
    LOAD_STALL = "load_stall"
    RELOAD = "reload"
    SHUTDOWN = "shutdown"
    UNLOAD = "unload"
    RETIRE = "retire"


_STOP_REASON = {
    _Outcome.SHUTDOWN: "supervisor is shutting down",
    _Outcome.RELOAD: "reload requested",
    _Outcome.UNLOAD: "unloaded",
    _Outcome.RETIRE: "removed from the configuration",
    _Outcome.HANG: "worker hung",
    _Outcome.LOAD_STALL: "load made no progress",
    _Outcome.EXITED: "worker exited",
}


def _answer(cmd: _Command) -> None:
    if not cmd.done.done():  # a caller may have given up waiting (cancelled it)
        cmd.done.set_result(None)


def _retrieve(fut: asyncio.Future[None]) -> None:
    """Nobody has to await a command: its exception is looked at, never logged as lost."""
    if not fut.cancelled():
        fut.exception()


class WorkerManager:
    """One model's worker: the commands others send and the view they read. The owner task
    (``run``) is ``_Owner``; a started process is supervised by ``_Watch``."""

    def __init__(
        self,
        *,
        config: Callable[[], Config],
        prepare: LaunchPreparer,
        runtime_dir: Path,
        spawner: Spawner | None = None,
        on_state: Callable[[WorkerState, str], None] | None = None,
        on_progress: Callable[[float], None] | None = None,
        unloaded: bool = False,
        ttl_s: Callable[[], float] = lambda: 0.0,
        name: str = "worker",
    ) -> None:
        # The configuration is read where it is used, so a SIGHUP reload changes the
        # timeouts and the restart policy too, not only the plan.
        self._config = config
        self._owner = _Owner(config, prepare, runtime_dir, spawner or ProcessSpawner(config, runtime_dir),
                             on_state, on_progress, ttl_s, name, S.UNLOADED if unloaded else S.STOPPED)
        self._queued_load: asyncio.Future[None] | None = None  # coalesces loads sent meanwhile
        self.admission = self._owner.admission = Admission(
            lambda: self._owner.view, self.load, lambda: config().admission.queue_size
        )
        self.name = name
        self.started_wall = time.time()

    async def run(self) -> None:
        """The lifecycle loop. Returns after a shutdown command, with no worker left."""
        await self._owner.run()

    # ---- read side (any task, any thread): the published view ----------------------

    @property
    def view(self) -> WorkerView:
        return self._owner.view

    @property
    def state(self) -> WorkerState:
        return self.view.state

    @property
    def reason(self) -> str:
        return self.view.reason_at(asyncio.get_running_loop().time())

    @property
    def crash_loop(self) -> bool:
        return self.view.crash_loop

    def next_attempt_in_s(self) -> float | None:
        return self.view.next_attempt_in(asyncio.get_running_loop().time())

    def retry_after_s(self, default: int = 5) -> int:
        return self.view.retry_after_s(asyncio.get_running_loop().time(), default)

    def failure_streak(self) -> int:
        """Failures in the current streak, as the restart policy counts them now."""
        h = self.view.history
        return failure_streak(
            self._owner.policy(), h.failures, asyncio.get_running_loop().time(), oom_ladder_exhausted=h.oom_exhausted
        )

    @property
    def parked(self) -> bool:
        """Unloaded: no worker until a load (read by the model cards)."""
        return self.view.state is S.UNLOADED

    @property
    def launch(self) -> Launch | None:
        return self.view.launch

    def last_health(self) -> tuple[int, Health] | None:
        """The current worker's pid and its last /health answer (read by the metrics)."""
        v = self.view
        return None if v.proc is None or v.last_health is None else (v.proc.pid, v.last_health)

    @property
    def counters(self) -> Counters:
        a, h = self.admission, self.view.history
        return Counters(a.in_flight, a.waiting, a.served, a.ended, h.restarts_total, dict(h.restarts_by_kind))

    def snapshot(self) -> Status:
        """Everything /status shows about the worker (GPU readings are added by app)."""
        return status_of(self.view, self.admission, self._owner.spawner.stderr, self.failure_streak(),
                         asyncio.get_running_loop().time())

    # ---- commands (any task) ------------------------------------------------------------

    def _send(self, kind: _Cmd, reason: str = "") -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fut.add_done_callback(_retrieve)
        self._owner.mail.put_nowait(_Command(kind, fut, reason))
        return fut

    def load(self) -> asyncio.Future[None]:
        """Load an unloaded model (a no-op otherwise). Answered when the load took effect:
        ready, or failed (BACKOFF, FAILED); NoRoom when the fleet found no room for it."""
        if self.view.state is not S.UNLOADED:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        if self._queued_load is None or self._queued_load.done():
            self._queued_load = self._send(_Cmd.LOAD)
        return self._queued_load

    def unload(self) -> asyncio.Future[None]:
        """Stop the worker once the requests it answers are done; answered once unloaded."""
        return self._send(_Cmd.UNLOAD)

    def reload(self) -> asyncio.Future[None]:
        """Drain, stop and start again with the configuration now (SIGHUP)."""
        return self._send(_Cmd.RELOAD)

    def retire(self, reason: str) -> asyncio.Future[None]:
        """Removed from the configuration: requests waiting for a worker get ``reason`` at
        once, nothing loads it again, and the worker stops once the requests it answers
        finish (bounded by shutdown.grace_s). Answered once RETIRED."""
        self.admission.refuse(reason)
        return self._send(_Cmd.RETIRE, reason)

    def shutdown(self) -> asyncio.Future[None]:
        """Stop for good; answered when ``run()`` returns."""
        self.admission.close("the server is shutting down")
        return self._send(_Cmd.SHUTDOWN)


class _Owner:
    """The owner task: the only code that moves the state, starts or stops the process or
    touches the failure book. Its fields are its own; others read ``view``."""

    def __init__(
        self,
        config: Callable[[], Config],
        prepare: LaunchPreparer,
        runtime_dir: Path,
        spawner: Spawner,
        on_state: Callable[[WorkerState, str], None] | None,
        on_progress: Callable[[float], None] | None,
        ttl_s: Callable[[], float],
        name: str,
        initial: WorkerState,
    ) -> None:
        self.config = config
        self.prepare = prepare
        self.runtime_dir = runtime_dir
        self.spawner = spawner
        self.on_state = on_state
        self.on_progress = on_progress
        self.ttl_s = ttl_s  # idle seconds before it unloads itself (0: never)
        self.name = name
        self.sm = StateMachine(initial)
        self.view = WorkerView(initial, "unloaded" if initial is S.UNLOADED else "not started")
        self.mail: asyncio.Queue[_Command] = asyncio.Queue()
        self.cmd_task: asyncio.Future[_Command] | None = None
        self.pending: list[_Command] = []  # taken, answered when their state comes
        self.book = FailureBook()
        self.proc: WorkerProcess | None = None
        self.admission: Admission  # set by WorkerManager

    def policy(self) -> RestartPolicy:
        r = self.config().restart
        return RestartPolicy(
            backoff_initial_s=r.backoff_initial_s,
            backoff_max_s=r.backoff_max_s,
            stable_after_s=r.stable_after_s,
            max_failures=r.max_failures,
            failure_window_s=r.failure_window_s,
            give_up=r.give_up,
        )

    def limits(self) -> Limits:
        c = self.config()
        w = c.worker
        return Limits(w.load_stall_timeout_s, w.health_failures, w.token_stall_timeout_s, c.restart.stable_after_s)

    def publish(self, **changes: object) -> None:
        self.view = dataclasses.replace(self.view, **changes)  # type: ignore[arg-type]
        self.admission.notify()

    def move(self, new: WorkerState, reason: str, **changes: object) -> None:
        old = self.sm.state
        self.sm.transition(new)
        if new is not S.READY:
            changes.setdefault("handle", None)
        if new is not S.BACKOFF:
            changes.setdefault("backoff", None)
            changes.setdefault("next_attempt_at", None)
        self.publish(state=new, reason=reason, history=self.book.view(), **changes)
        shown = self.view.reason_at(asyncio.get_running_loop().time())
        level = logging.ERROR if new is S.FAILED or self.view.crash_loop else logging.INFO
        log.log(level, "worker state %s -> %s: %s", old.value, new.value, shown)
        for cmd in [c for c in self.pending if new in _ANSWERED_IN[c.kind]]:
            self.pending.remove(cmd)
            _answer(cmd)
        if self.on_state is not None:
            self.on_state(new, shown)

    def take(self) -> _Command:
        assert self.cmd_task is not None
        cmd = self.cmd_task.result()
        self.cmd_task = asyncio.ensure_future(self.mail.get())
        return cmd

    def pend(self, cmd: _Command) -> None:
        self.pending.append(cmd)

    async def run(self) -> None:
        """The lifecycle loop. Returns after a shutdown command, with no worker left."""
        self.cmd_task = asyncio.ensure_future(self.mail.get())
        try:
            while True:
                st = self.sm.state
                if st in (S.UNLOADED, S.FAILED, S.RETIRED):
                    go = await self._idle()
                elif st is S.BACKOFF:
                    go = await self._backoff()
                else:  # STOPPED: a start is wanted now
                    go = True
                if go is None:
                    return
                if go and not await self._attempt():
                    return
        finally:
            self.cmd_task.cancel()
            if self.proc is not None:
                await _Watch(self).stop(self.proc, "supervisor is shutting down")
                self.proc = None
                self.publish(proc=None)
            if self.sm.state not in (S.STOPPED, S.UNLOADED, S.RETIRED):
                self.move(S.STOPPED, "supervisor stopped")
            leftover = list(self.pending)
            while not self.mail.empty():
                leftover.append(self.mail.get_nowait())
            if self.cmd_task.done() and not self.cmd_task.cancelled():
                leftover.append(self.cmd_task.result())
            for cmd in leftover:
                _answer(cmd)

    async def _idle(self) -> bool | None:
        """UNLOADED, FAILED or RETIRED: no process, wait for a command. True: start now;
        None: shut down."""
        assert self.cmd_task is not None
        await asyncio.wait({self.cmd_task})
        cmd, st = self.take(), self.sm.state
        if cmd.kind is _Cmd.SHUTDOWN:
            self.pend(cmd)
            return None
        if st is not S.RETIRED:
            if cmd.kind is _Cmd.RETIRE:
                self.pend(cmd)
                self.move(S.RETIRED, cmd.reason)
            elif cmd.kind is _Cmd.LOAD and st is S.UNLOADED:
                self.pend(cmd)
                self.book.reset()
                if self.view.gen > 0:
                    self.publish(swaps_in=self.view.swaps_in + 1)
                return True
            elif cmd.kind is _Cmd.RELOAD and st is S.FAILED:
                self.book.reset()
                self.pend(cmd)
                self.move(S.STOPPED, "reload requested: starting again")
                return True
            elif cmd.kind is _Cmd.UNLOAD and st is S.FAILED:
                self.pend(cmd)
                self.move(S.UNLOADED, "unloaded")
        _answer(cmd)  # nothing (more) to do: already there
        return False

    async def _backoff(self) -> bool | None:
        """BACKOFF: wait out the delay unless a command cuts it short."""
        assert self.cmd_task is not None
        left = (self.view.next_attempt_at or 0.0) - asyncio.get_running_loop().time()
        done, _ = await asyncio.wait({self.cmd_task}, timeout=max(0.0, left))
        if not done:
            return True
        cmd = self.take()
        self.pend(cmd)
        if cmd.kind is _Cmd.SHUTDOWN:
            return None
        if cmd.kind is _Cmd.UNLOAD:
            self.move(S.UNLOADED, "unloaded")
            return False
        if cmd.kind is _Cmd.RETIRE:
            self.move(S.RETIRED, cmd.reason)
            return False
        if cmd.kind is _Cmd.RELOAD:
            self.book.reset()
        return True  # a reload or a load starts now rather than at the end of the delay

    def _fail_loads(self, e: NoRoom) -> None:
        for cmd in [c for c in self.pending if c.kind is _Cmd.LOAD]:
            self.pending.remove(cmd)
            if not cmd.done.done():
                cmd.done.set_exception(e)

    async def _attempt(self) -> bool:
        """Plan, start and supervise one worker until it stops. False: shut down."""
        loop = asyncio.get_running_loop()
        gen = self.view.gen + 1
        self.publish(gen=gen)
        socket_path = str(self.runtime_dir / f"worker-{gen}.sock")
        try:
            launch = await self.prepare(self.book.adjust, socket_path)
        except NoRoom as e:
            self._fail_loads(e)
            if self.sm.state is S.UNLOADED:  # a load refused: it stays unloaded, saying why
                self.publish(reason=f"not loaded: {e.reason}")
                log.info("%s: not loaded: %s", self.name, e.reason)
            else:
                self.move(S.UNLOADED, f"not loaded: {e.reason}")
            return True
        except PlanFailed as e:
            self.book.record(self.policy(), Failure(at=loop.time(), kind=FailureKind.PERMANENT, detail=str(e)))
            self._after_failure()
            return True
        self.move(S.STARTING, f"starting worker (generation {gen}): {launch.summary}", launch=launch)
        try:
            proc = await self.spawner.start(gen, launch)
        except OSError as e:
            failure = Failure(at=loop.time(), kind=FailureKind.START_ERROR, detail=f"cannot start worker: {e}")
            self.book.record(self.policy(), failure)
            self._after_failure()
            return True
        self.proc = proc
        self.publish(proc=proc, started_mono=loop.time(), started_wall=time.time(), ready_since=None,
                      progress=0.0, last_health=None)
        watch = _Watch(self)
        outcome = await watch.supervise(proc, launch.spec)
        if outcome in (_Outcome.RELOAD, _Outcome.UNLOAD, _Outcome.RETIRE):
            outcome = await watch.drain(proc, outcome)
        await watch.stop(proc, _STOP_REASON[outcome])
        ready_since = self.view.ready_since
        self.proc = None
        self.publish(proc=None)
        if outcome is _Outcome.SHUTDOWN:
            return False
        if outcome is _Outcome.RELOAD:
            self.book.reset()
            self.move(S.STOPPED, "reload requested: re-planning")
        elif outcome is _Outcome.UNLOAD:
            self.move(S.UNLOADED, f"unloaded (worker pid {proc.pid} stopped)")
        elif outcome is _Outcome.RETIRE:
            self.move(S.RETIRED, next(c.reason for c in self.pending if c.kind is _Cmd.RETIRE))
        else:
            failure = self._classify(proc, outcome, ready_since)
            self.book.record(self.policy(), failure)
            if failure.kind is FailureKind.OOM:
                await self._climb_oom_ladder(launch)
            self._after_failure()
        return True

    def _after_failure(self) -> None:
        now = asyncio.get_running_loop().time()
        decision = decide(self.policy(), self.book.failures, now, oom_ladder_exhausted=self.book.exhausted)
        if decision.action == "give_up":
            self.move(S.FAILED, decision.reason)
        else:
            # In the same view as the move, so the waiters it wakes see when the next attempt comes.
            self.move(S.BACKOFF, decision.reason, backoff=decision, next_attempt_at=now + decision.delay_s)

    def _classify(self, proc: WorkerProcess, outcome: _Outcome, ready_since: float | None) -> Failure:
        now = asyncio.get_running_loop().time()
        ran_for = 0.0 if ready_since is None else now - ready_since
        code = proc.exited.result()
        limits = self.limits()
        if outcome is _Outcome.HANG:
            v = hang_verdict(proc.pid, limits)
        elif outcome is _Outcome.LOAD_STALL:
            v = load_stall_verdict(proc.pid, limits)
        else:
            host_oom = needs_oom_check(code, proc.killed_by_us) and proc.host_oom_killed()
            stderr = self.spawner.stderr
            rpc_line = next((ln for ln in reversed(stderr) if is_rpc_loss_line(ln)), None)
            v = exit_verdict(proc.pid, code, killed_by_us=proc.killed_by_us, oom_line=proc.oom_line,
                             host_oom=host_oom, last_line=stderr[-1] if stderr else None, rpc_line=rpc_line)
        self.book.last_exit = LastExit(pid=proc.pid, code=code, description=describe_exit(code), kind=v.kind.value,
                                        detail=v.detail, at=time.time(), ran_for_s=round(ran_for, 3))
        return Failure(at=now, kind=v.kind, detail=v.detail, ran_for_s=ran_for)

    async def _climb_oom_ladder(self, launch: Launch) -> None:
        """Climb one step of the OOM ladder, after the GPU memory has come back."""
        adjust = self.book.climb(launch)
        if adjust is None:
            log.error("out of memory with the smallest plan (CPU only): no smaller plan to try")
            return
        log.warning("out of memory (step %d of the OOM ladder): %s", self.book.step, adjust.description)
        # The dead worker's GPU memory is released by the driver asynchronously. The
        # preparer re-reads the inventory at the next start; here we only wait until
        # two consecutive readings agree (memory stopped coming back), bounded.
        await self.prepare.wait_gpu_settled(self.config().restart.oom_settle_timeout_s)


class _Watch:
    """Supervises one started process for the owner: probes it, drains it, stops it. Moves
    the state only through the owner (``self.o.move``), from the owner's task."""

    def __init__(self, owner: _Owner) -> None:
        self.o = owner

    async def supervise(self, proc: WorkerProcess, spec: LaunchSpec) -> _Outcome:
        """Probe the worker until it exits, hangs, stalls, or a command stops it."""
        assert self.o.cmd_task is not None
        loop = asyncio.get_running_loop()
        last_progress_at, last_progress = loop.time(), -1.0
        missed = 0
        next_health = loop.time()
        idle: asyncio.Future[None] | None = None  # the idle TTL, while ready
        try:
            while True:
                ready = self.o.sm.state is S.READY
                w = self.o.config().worker
                if ready and idle is None and (ttl := self.o.ttl_s()) > 0:
                    idle = asyncio.ensure_future(self.o.admission.wait_idle_for(ttl, self.o.view.ready_since or 0.0))
                waiters: set[asyncio.Future[object]] = {proc.exited, self.o.cmd_task}  # type: ignore[arg-type]
                if idle is not None:
                    waiters.add(idle)  # type: ignore[arg-type]
                wait_s = max(0.0, next_health - loop.time())
                done, _ = await asyncio.wait(waiters, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
                if self.o.cmd_task in done:
                    cmd = self.o.take()
                    if cmd.kind is _Cmd.LOAD and ready:
                        _answer(cmd)
                        continue
                    self.o.pend(cmd)
                    if cmd.kind is _Cmd.LOAD:
                        continue  # loading already: answered when it is ready
                    return _Outcome(cmd.kind.value)
                if proc.exited in done:
                    return _Outcome.EXITED
                now = loop.time()
                if idle is not None and idle in done:
                    log.info("%s idle for %.0fs (ttl_s %g): unloading", self.o.name,
                             now - max(self.o.admission.last_used, self.o.view.ready_since or 0.0), self.o.ttl_s())
                    return _Outcome.UNLOAD
                if not ready:
                    next_health = now + START_POLL_S
                    res = await proc.health(min(2.0, w.health_timeout_s))
                    if res is not None:
                        status, h = res
                        if status == 200 and h.status == "ok":
                            t = loop.time()
                            handle = WorkerHandle(self.o.view.gen, proc.pid, spec.socket_path, proc.session,
                                                  _slots(h, spec))
                            started = self.o.view.started_mono or t
                            self.o.move(S.READY, f"worker pid {proc.pid} ready after {t - started:.1f}s",
                                       handle=handle, ready_since=t, progress=1.0, last_health=h)
                            next_health = t + w.health_interval_s
                            continue
                        if self.o.sm.state is S.STARTING:
                            self.o.move(S.LOADING, f"worker pid {proc.pid} is loading the model")
                        self.o.publish(progress=h.progress, last_health=h)
                        if h.progress > last_progress:
                            last_progress, last_progress_at = h.progress, now
                            if self.o.on_progress is not None:
                                self.o.on_progress(h.progress)
                    if load_stalled(self.o.limits(), now, last_progress_at):
                        return _Outcome.LOAD_STALL
                    continue
                next_health = now + w.health_interval_s
                verdict, missed = await self.probe_ready(proc, missed)
                if verdict is Probe.HANG:
                    return _Outcome.HANG
        finally:
            if idle is not None:
                idle.cancel()

    async def probe_ready(self, proc: WorkerProcess, missed: int) -> tuple[Probe, int]:
        """One liveness probe of a ready worker."""
        w, limits = self.o.config().worker, self.o.limits()
        res = await proc.health(w.health_timeout_s)
        answered = res is not None and res[0] == 200
        if res is not None:
            self.o.publish(last_health=res[1])
        since_token = res[1].seconds_since_token if res is not None and answered else None
        verdict, missed = probe_verdict(limits, answered=answered, failures_before=missed, seconds_since_token=since_token)
        if not answered:
            log.warning("worker pid %d: health check failed (%d of %d allowed)", proc.pid, missed, w.health_failures)
            return verdict, missed
        if verdict is Probe.HANG:
            log.error("worker pid %d: generation produced no token for %.0fs (limit %.0fs)", proc.pid,
                      since_token or 0.0, w.token_stall_timeout_s)
            return verdict, missed
        now = asyncio.get_running_loop().time()
        if self.o.book.failures and stable(limits, now, self.o.view.ready_since):
            # Up long enough to call the failures before it over (the policy would say the
            # same at the next failure): /status and /metrics stop showing a streak now.
            log.info("worker pid %d has been up %.0fs: the %d failure(s) before it no longer count",
                     proc.pid, now - (self.o.view.ready_since or now), len(self.o.book.failures))
            self.o.book.failures.clear()
            self.o.publish(history=self.o.book.view())
        return verdict, missed

    async def drain(self, proc: WorkerProcess, why: _Outcome) -> _Outcome:
        """Before a reload, unload or removal stops the worker: new requests wait for the next
        worker (or are refused) while the ones it is answering finish (bounded by
        shutdown.grace_s). Stopping it at once would cut their answers short (issue 13)."""
        assert self.o.cmd_task is not None
        h = self.o.view.handle
        if h is None or self.o.admission.in_worker(h.gen) == 0 or proc.exited.done():
            return why
        loop = asyncio.get_running_loop()
        grace = self.o.config().shutdown.grace_s
        deadline = loop.time() + grace
        if why is _Outcome.RETIRE:
            what, then = "removed from the configuration", "new requests are refused"
        else:
            what, then = f"{why.value} requested", "new requests wait for the next worker"
        n = self.o.admission.in_worker(h.gen)
        self.o.move(S.STOPPING, f"{what}: worker pid {proc.pid} finishes {n} request(s) first (up to {grace:g}s); {then}")
        idle = asyncio.ensure_future(self.o.admission.wait_gen_idle(h.gen))
        try:
            while not idle.done():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    log.warning("%s: worker pid %d still has %d request(s) after %.0fs; they will end with an error",
                                why.value, proc.pid, self.o.admission.in_worker(h.gen), grace)
                    break
                waiters: set[asyncio.Future[object]] = {proc.exited, self.o.cmd_task, idle}  # type: ignore[arg-type]
                done, _ = await asyncio.wait(waiters, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                if self.o.cmd_task in done:
                    cmd = self.o.take()
                    self.o.pend(cmd)
                    if cmd.kind is _Cmd.SHUTDOWN:
                        return _Outcome.SHUTDOWN
                    if cmd.kind is _Cmd.RETIRE:
                        why = _Outcome.RETIRE
                    elif cmd.kind is _Cmd.UNLOAD and why is _Outcome.RELOAD:
                        why = _Outcome.UNLOAD  # an unload while a reload drains: stay unloaded after
                    # Another reload while draining: the next start reads the newest config anyway.
                if proc.exited in done:
                    break
        finally:
            idle.cancel()
        return why

    async def stop(self, proc: WorkerProcess, reason: str) -> None:
        """Stop the worker (TERM to the group, deadline, KILL, reap: the adapter does it)."""
        if not proc.exited.done():
            if self.o.sm.state is S.STOPPING:  # already draining
                log.info("stopping worker pid %d: %s", proc.pid, reason)
            else:
                self.o.move(S.STOPPING, f"stopping worker pid {proc.pid}: {reason}")
        elif self.o.sm.state is not S.STOPPING:
            self.o.move(S.STOPPING, f"worker pid {proc.pid} {describe_exit(proc.exited.result())}: cleaning up")
        await proc.stop(self.o.config().worker.stop_timeout_s)


def _slots(health: Health, spec: LaunchSpec) -> int:
    """How many generations the worker runs at once: its `parallel` setting as the worker
    reports it (health params), else as launched."""
    if health.params is not None and health.params.parallel >= 1:
        return health.params.parallel
    return max(1, spec.parallel)


# Re-exported for app wiring and tests.
__all__ = [
    "Launch",
    "LaunchPreparer",
    "NoRoom",
    "NotReady",
    "PlanFailed",
    "QueueFull",
    "WorkerHandle",
    "WorkerManager",
    "WorkerView",
]

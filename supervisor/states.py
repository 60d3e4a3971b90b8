"""The worker's lifecycle as data: a state enum and an explicit transition table.

Rules for this module (after h11's ``_state.py`` and supervisord's process states):
- Every move the worker's lifecycle can make is listed in ``TRANSITIONS``, with a comment
  saying what causes it. A move that is not in the table is a bug in the caller:
  ``check_transition`` raises ``IllegalTransition`` and nothing changes.
- Pure: no I/O, no clock, no logging. The reason for a move and its time belong to the
  caller (the manager publishes them in its view).
- One owner: a ``StateMachine`` belongs to the single task that owns the worker; nobody
  else mutates it (they send that task commands).
"""

from __future__ import annotations

import enum


class WorkerState(enum.Enum):
    STOPPED = "stopped"  # initial: no worker process exists (also between a reload's stop and start)
    UNLOADED = "unloaded"  # no worker, and none until a load command (on demand, evicted, idle, no room)
    STARTING = "starting"  # process spawned, its socket does not answer yet
    LOADING = "loading"  # /health answers 503 "loading" (model load in progress)
    READY = "ready"  # /health answers 200; requests are proxied
    BACKOFF = "backoff"  # a worker failed; waiting before the next start (a crash loop keeps coming back here)
    STOPPING = "stopping"  # draining requests or SIGTERM sent to the worker's group; waiting for it to exit
    FAILED = "failed"  # a permanent cause, or restart.give_up: only a reload (SIGHUP) or a shutdown leaves it
    RETIRED = "retired"  # removed from the configuration: no worker, nothing loads it again (terminal)


S = WorkerState

# Every failure (an exit, a hang, a stalled load) goes through STOPPING, where the worker is
# reaped, and only then to BACKOFF (the policy will restart it) or FAILED (the policy gave
# up); a failure before any process exists (the plan, the spawn) moves there directly. The
# policy gives up only on a permanent cause (bad model or spec, no plan) or, with
# restart.give_up, on a spent failure budget; otherwise a crash loop goes BACKOFF ->
# STARTING -> ... -> BACKOFF for as long as it lasts. STOPPED means "no process, and one
# wanted now": the initial state, after a shutdown, or between a reload's stop and start.
# UNLOADED means "no process until asked": several models share the GPUs (supervisor/fleet.py).
# A start is planned in the state it leaves (STOPPED, UNLOADED, BACKOFF), then moves to STARTING.
TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    S.STOPPED: frozenset(
        {
            S.STARTING,  # STOPPED -> STARTING: initial start, or the start half of a reload
            S.FAILED,  # STOPPED -> FAILED: no plan could be made (e.g. a reload with a bad config)
            S.UNLOADED,  # STOPPED -> UNLOADED: the fleet found no room for the start
        }
    ),
    S.UNLOADED: frozenset(
        {
            S.STARTING,  # UNLOADED -> STARTING: a load command (a request, an operator, SIGHUP)
            S.FAILED,  # UNLOADED -> FAILED: the load could not be planned (PlanFailed)
            S.RETIRED,  # UNLOADED -> RETIRED: removed from the configuration
        }
    ),
    S.STARTING: frozenset(
        {
            S.LOADING,  # STARTING -> LOADING: socket answers, /health says "loading"
            S.READY,  # STARTING -> READY: the first /health answer is already 200 (fast load)
            S.STOPPING,  # STARTING -> STOPPING: exited, load stalled, or reload/unload/shutdown
            S.BACKOFF,  # STARTING -> BACKOFF: the process could not be spawned; will retry
            S.FAILED,  # STARTING -> FAILED: could not be spawned and the policy gave up (give_up)
        }
    ),
    S.LOADING: frozenset(
        {
            S.READY,  # LOADING -> READY: /health answers 200
            S.STOPPING,  # LOADING -> STOPPING: exited (crash, OOM), load stalled, or reload/unload/shutdown
        }
    ),
    S.READY: frozenset(
        {
            S.STOPPING,  # READY -> STOPPING: exited, hang (health or token stall), reload/unload/retire drain, shutdown
        }
    ),
    S.BACKOFF: frozenset(
        {
            S.STARTING,  # BACKOFF -> STARTING: the delay elapsed (or a reload/load cut it short)
            S.STOPPED,  # BACKOFF -> STOPPED: shutdown during the delay (no process)
            S.FAILED,  # BACKOFF -> FAILED: re-planning failed (PlanFailed, e.g. the model file vanished)
            S.UNLOADED,  # BACKOFF -> UNLOADED: an unload during the delay, or no room for the restart
            S.RETIRED,  # BACKOFF -> RETIRED: removed from the configuration during the delay
        }
    ),
    S.STOPPING: frozenset(
        {
            S.STOPPED,  # STOPPING -> STOPPED: exited after a requested stop (shutdown, reload)
            S.BACKOFF,  # STOPPING -> BACKOFF: a failed worker (exited, or hung/stalled and killed) is gone; will retry
            S.FAILED,  # STOPPING -> FAILED: a failed worker is gone and the policy gave up (permanent, or give_up)
            S.UNLOADED,  # STOPPING -> UNLOADED: unloaded (evicted, idle ttl_s, operator) and its worker is gone
            S.RETIRED,  # STOPPING -> RETIRED: removed from the configuration and its worker is gone
        }
    ),
    S.FAILED: frozenset(
        {
            S.STOPPED,  # FAILED -> STOPPED: shutdown, or a reload (SIGHUP), which starts again from STOPPED
            S.UNLOADED,  # FAILED -> UNLOADED: an unload (the fleet frees it; a load tries again)
            S.RETIRED,  # FAILED -> RETIRED: removed from the configuration
        }
    ),
    S.RETIRED: frozenset(),  # terminal: the fleet forgets the manager once it is here
}

# States in which a worker process may exist (the supervisor must stop it on exit).
PROCESS_STATES = frozenset({S.STARTING, S.LOADING, S.READY, S.STOPPING})


class IllegalTransition(Exception):
    """A move that is not in ``TRANSITIONS``: a bug in the caller, never a user error."""

    def __init__(self, old: WorkerState, new: WorkerState) -> None:
        allowed = ", ".join(sorted(s.name for s in TRANSITIONS[old])) or "none"
        super().__init__(
            f"illegal worker state transition {old.name} -> {new.name} "
            f"(allowed from {old.name}: {allowed})"
        )
        self.old = old
        self.new = new


def check_transition(old: WorkerState, new: WorkerState) -> None:
    """Raise IllegalTransition unless ``old -> new`` is in the table. Changes nothing."""
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(old, new)


class StateMachine:
    """Holds the current state. Owned by one task (the worker's manager)."""

    def __init__(self, initial: WorkerState = S.STOPPED) -> None:
        self._state = initial

    @property
    def state(self) -> WorkerState:
        return self._state

    def transition(self, new: WorkerState) -> None:
        # Check before touching anything, so an illegal move leaves the state as it was.
        check_transition(self._state, new)
        self._state = new

    def __repr__(self) -> str:
        return f"StateMachine(state={self._state.name})"

"""The worker's lifecycle as data: a state enum and an explicit transition table.

Rules for this module (after h11's ``_state.py`` and supervisord's process states):
- Every move the worker's lifecycle can make is listed in ``TRANSITIONS``, with a comment
  saying what causes it. A move that is not in the table is a bug in the caller:
  ``check_transition`` raises ``IllegalTransition`` and nothing changes.
- Pure: no I/O, no clock, no logging. A caller that wants times in the history passes
  ``at`` (monotonic seconds) explicitly.
- One owner: a ``StateMachine`` belongs to the single task that owns the worker; nobody
  else mutates it (they send that task commands).
"""

from __future__ import annotations

import collections
import enum
from typing import NamedTuple


class WorkerState(enum.Enum):
    STOPPED = "stopped"  # initial: no worker process exists
    STARTING = "starting"  # process spawned, its socket does not answer yet
    LOADING = "loading"  # /health answers 503 "loading" (model load in progress)
    READY = "ready"  # /health answers 200; requests are proxied
    BACKOFF = "backoff"  # a worker failed; waiting before the next start (a crash loop keeps coming back here)
    STOPPING = "stopping"  # SIGTERM sent to the worker's group; waiting for it to exit
    FAILED = "failed"  # a permanent cause, or restart.give_up: only a reload (SIGHUP) or a shutdown leaves it


S = WorkerState

# A worker that exits on its own is always a failure: its state moves straight to BACKOFF
# (the policy will restart it) or FAILED (the policy gave up). The policy gives up only on a
# permanent cause (bad model or spec, no plan) or, with restart.give_up, on a spent failure
# budget; otherwise a crash loop goes BACKOFF -> STARTING -> ... -> BACKOFF for as long as it
# lasts. STOPPED means "no process, and none wanted": the initial state, after a shutdown, or
# between a reload's stop and start.
TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    S.STOPPED: frozenset(
        {
            S.STARTING,  # STOPPED -> STARTING: initial start, or the start half of a reload
            S.FAILED,  # STOPPED -> FAILED: no plan could be made (e.g. a reload with a bad config)
        }
    ),
    S.STARTING: frozenset(
        {
            S.LOADING,  # STARTING -> LOADING: socket answers, /health says "loading"
            S.READY,  # STARTING -> READY: the first /health answer is already 200 (fast load)
            S.STOPPING,  # STARTING -> STOPPING: socket never answered in time, or reload/shutdown
            S.BACKOFF,  # STARTING -> BACKOFF: spawn failed or the process exited; will retry
            S.FAILED,  # STARTING -> FAILED: exited with a permanent code, or the policy gave up
        }
    ),
    S.LOADING: frozenset(
        {
            S.READY,  # LOADING -> READY: /health answers 200
            S.STOPPING,  # LOADING -> STOPPING: load stalled (no progress), or reload/shutdown
            S.BACKOFF,  # LOADING -> BACKOFF: exited during load (crash, OOM); will retry
            S.FAILED,  # LOADING -> FAILED: bad model/spec exit, or the policy gave up
        }
    ),
    S.READY: frozenset(
        {
            S.STOPPING,  # READY -> STOPPING: crash, hang (health or token stall), reload or shutdown
            S.BACKOFF,  # READY -> BACKOFF: exited on its own (crash, kill -9); will retry
            S.FAILED,  # READY -> FAILED: exited on its own and the policy gave up
        }
    ),
    S.BACKOFF: frozenset(
        {
            S.STARTING,  # BACKOFF -> STARTING: the delay elapsed
            S.STOPPED,  # BACKOFF -> STOPPED: shutdown or reload during the delay (no process)
            S.FAILED,  # BACKOFF -> FAILED: re-planning failed (PlanFailed, e.g. the model file vanished)
        }
    ),
    S.STOPPING: frozenset(
        {
            S.STOPPED,  # STOPPING -> STOPPED: exited after a requested stop (shutdown, reload)
            S.BACKOFF,  # STOPPING -> BACKOFF: a failed worker (exited, or hung/stalled and killed) is gone; will retry
            S.FAILED,  # STOPPING -> FAILED: a failed worker is gone and the policy gave up (permanent, or give_up)
        }
    ),
    S.FAILED: frozenset(
        {
            S.STARTING,  # FAILED -> STARTING: reload (SIGHUP) with a new config/plan
            S.STOPPED,  # FAILED -> STOPPED: shutdown, or a reload that stops first
        }
    ),
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


class Transition(NamedTuple):
    """One recorded move; ``at`` is whatever clock the caller passed (None if none)."""

    old: WorkerState
    new: WorkerState
    reason: str
    at: float | None = None


class StateMachine:
    """Holds the current state and a bounded history of moves. Owned by one task."""

    def __init__(self, initial: WorkerState = S.STOPPED, history_len: int = 64) -> None:
        self._state = initial
        self.history: collections.deque[Transition] = collections.deque(maxlen=history_len)

    @property
    def state(self) -> WorkerState:
        return self._state

    def transition(self, new: WorkerState, reason: str, at: float | None = None) -> None:
        # Check before touching anything, so an illegal move leaves state and history as they were.
        check_transition(self._state, new)
        self.history.append(Transition(self._state, new, reason, at))
        self._state = new

    def __repr__(self) -> str:
        return f"StateMachine(state={self._state.name}, moves={len(self.history)})"

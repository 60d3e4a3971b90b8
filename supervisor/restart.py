"""The restart policy: how long to wait after the Nth failure, when to give up, and how to
shrink the plan step by step after an out-of-memory failure.

Rules for this module:
- Pure: no I/O, no clock, no logging. "now" and every failure time are monotonic seconds
  passed in by the caller, so the policy is tested as tables without sleeping.
- Exit codes are a contract (worker.protocol.ExitCode): a bad spec or model is PERMANENT and
  never retried; an OOM is a reason to re-plan smaller (the ladder below), not to back off.
- Transient failures never end the retrying unless the user asked for that (``give_up``):
  once the failure budget is spent the worker is in a *crash loop* and is tried again at the
  capped delay for ever. A box nobody watches must come back by itself after a passing storm
  (an OOM killer spree, a driver hiccup), not sit in ``failed`` until someone sends SIGHUP.
- Every reason and description is a sentence a person can read in a log line, in
  ``vram-llm status`` and in a 503 body.
"""

from __future__ import annotations

import enum
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from worker.protocol import PERMANENT_EXIT_CODES, ExitCode


class FailureKind(enum.Enum):
    CRASH = "crash"  # nonzero exit or death by a signal
    HANG = "hang"  # health pings or token generation stalled; we killed it
    LOAD_STALL = "load_stall"  # the model load made no progress for too long; we killed it
    OOM = "oom"  # out of memory (exit code, OOM lines in stderr, or the host OOM killer)
    PERMANENT = "permanent"  # bad launch spec or model: restarting cannot help
    START_ERROR = "start_error"  # the worker process could not even be spawned


# How each kind reads in a sentence: "crashed 3 times in 41s".
_VERBS: dict[FailureKind, str] = {
    FailureKind.CRASH: "crashed",
    FailureKind.HANG: "hung",
    FailureKind.LOAD_STALL: "stalled while loading",
    FailureKind.OOM: "ran out of memory",
    FailureKind.PERMANENT: "failed permanently",
    FailureKind.START_ERROR: "failed to start",
}


@dataclass(frozen=True)
class RestartPolicy:
    backoff_initial_s: float = 1.0  # delay before the first restart of a streak
    backoff_max_s: float = 60.0  # the delay never grows past this
    backoff_factor: float = 2.0  # each further failure in a streak multiplies the delay
    stable_after_s: float = 300.0  # a worker READY this long before failing starts a new streak
    max_failures: int = 5  # failures per streak within the window before the capped delay applies
    failure_window_s: float = 600.0  # failures older than this (before "now") no longer count
    give_up: bool = False  # True: one failure more than max_failures gives up instead (FAILED)


@dataclass(frozen=True)
class Failure:
    at: float  # monotonic seconds when the failure was seen
    kind: FailureKind
    detail: str  # e.g. "exit code -9 (SIGKILL)", "no token for 120s"
    ran_for_s: float = 0.0  # how long the worker had been READY before failing; 0 if never


@dataclass(frozen=True)
class Decision:
    action: Literal["restart", "give_up"]
    delay_s: float  # wait this long before starting again (0 for give_up)
    reason: str  # one sentence for logs, status and 503 bodies
    crash_loop: bool = False  # the failure budget is spent: retrying at the capped delay


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _streak_start(policy: RestartPolicy, ordered: Sequence[Failure]) -> int:
    """Index of the first failure of the current streak in ``ordered`` (oldest first): a
    failure after a stable run starts a fresh streak; it counts, older ones do not."""
    start = 0
    for i, f in enumerate(ordered):
        if f.ran_for_s >= policy.stable_after_s:
            start = i
    return start


def _counted(
    policy: RestartPolicy, failures: Sequence[Failure], now: float, oom_ladder_exhausted: bool
) -> list[Failure]:
    """The failures of the current streak: inside the window, not before the latest failure
    that followed a stable run, and (until the OOM ladder is exhausted) not OOMs."""
    ordered = sorted(failures, key=lambda f: f.at)
    streak = ordered[_streak_start(policy, ordered):]
    return [
        f
        for f in streak
        if now - f.at <= policy.failure_window_s
        and (f.kind is not FailureKind.OOM or oom_ladder_exhausted)
    ]


def failure_streak(
    policy: RestartPolicy, failures: Sequence[Failure], now: float, *, oom_ladder_exhausted: bool = False
) -> int:
    """How many failures the current streak holds at ``now`` (what ``decide`` compares with
    ``max_failures``): for /status and /metrics between failures."""
    return len(_counted(policy, failures, now, oom_ladder_exhausted))


def prune_failures(policy: RestartPolicy, failures: Sequence[Failure], now: float) -> list[Failure]:
    """The failures that can still count for a decision at ``now`` or later, oldest first.

    A crash loop retries for ever; without pruning its history would grow by one entry per
    attempt for as long as the box runs. Dropped: failures outside the window (they only get
    older) and failures before the latest one that followed a stable run (a new streak began).
    The latest failure is always kept.
    """
    ordered = sorted(failures, key=lambda f: f.at)
    kept = [f for f in ordered[_streak_start(policy, ordered):-1] if now - f.at <= policy.failure_window_s]
    return kept + ordered[-1:]


def _duration(seconds: float) -> str:
    """'10 minutes', '1 hour', '90s': a window as a person says it."""
    for unit, size in (("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            return _plural(int(seconds // size), unit)
    return f"{seconds:g}s"


def decide(
    policy: RestartPolicy,
    failures: Sequence[Failure],
    now: float,
    *,
    oom_ladder_exhausted: bool = False,
) -> Decision:
    """What to do after the latest failure (the one with the greatest ``at``).

    OOM failures are re-planned by the caller with ``oom_ladder`` and restarted after the
    initial delay; they only join the streak once the caller says the ladder is exhausted.
    """
    if not failures:
        return Decision("restart", 0.0, "no failures recorded; starting now")
    last = max(failures, key=lambda f: f.at)
    if last.kind is FailureKind.PERMANENT:
        return Decision("give_up", 0.0, f"will not retry: {last.detail}")
    if last.kind is FailureKind.OOM and not oom_ladder_exhausted:
        delay = min(policy.backoff_initial_s, policy.backoff_max_s)
        return Decision(
            "restart",
            delay,
            f"ran out of memory ({last.detail}); re-planning with a smaller footprint, "
            f"restarting in {delay:.1f}s",
        )

    counted = _counted(policy, failures, now, oom_ladder_exhausted)
    # The latest failure always counts (even if the caller's clock says it is older than the
    # window), so a non-empty history never yields a streak of zero.
    if last not in counted:
        counted.append(last)
    streak = len(counted)
    span = max(0.0, now - min(f.at for f in counted))
    kinds = {f.kind for f in counted}
    verb = _VERBS[last.kind] if len(kinds) == 1 else "failed"
    if streak > policy.max_failures:
        if policy.give_up:
            return Decision(
                "give_up",
                0.0,
                f"gave up after {_plural(streak, 'failure')} in {span:.0f}s "
                f"(more than {policy.max_failures} in {policy.failure_window_s:.0f}s); "
                f"last: {last.detail}",
            )
        # The budget is spent, but the cause may pass by itself: keep trying, at the capped
        # delay so a worker that dies at once costs little, until one stays up (stable_after_s).
        delay = policy.backoff_max_s
        return Decision(
            "restart",
            delay,
            f"crash loop: {_plural(streak, 'failure')} in the last "
            f"{_duration(policy.failure_window_s)} (more than {policy.max_failures}; last: {last.detail}); "
            f"retrying every {delay:g}s until a worker stays up for {policy.stable_after_s:g}s",
            crash_loop=True,
        )
    delay = min(policy.backoff_initial_s * policy.backoff_factor ** (streak - 1), policy.backoff_max_s)
    if streak == 1 and last.ran_for_s >= policy.stable_after_s:
        # The first failure after a stable run restarts at once: a single crash costs only
        # the load time; the backoff starts with the second.
        delay = 0.0
    return Decision(
        "restart",
        delay,
        f"{verb} {_plural(streak, 'time')} in {span:.0f}s (last: {last.detail}); "
        f"restarting in {delay:.1f}s",
    )


def describe_exit(returncode: int) -> str:
    """'exit code 1', 'exit code 4 (BAD_MODEL)' or 'exit code -9 (SIGKILL)' (Popen's convention:
    a negative code is death by that signal)."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"exit code {returncode} ({name})"
    try:
        return f"exit code {returncode} ({ExitCode(returncode).name})"
    except ValueError:
        return f"exit code {returncode}"


def classify_exit(returncode: int, *, oom_evidence: bool = False) -> FailureKind:
    """The failure kind of a worker that exited on its own.

    ``oom_evidence``: the caller saw OOM lines in the worker's stderr (worker.protocol.is_oom_line)
    or the host OOM killer's trace for its pid; a worker SIGKILLed mid-load leaves no exit code.
    """
    if returncode in PERMANENT_EXIT_CODES:
        return FailureKind.PERMANENT
    if returncode == ExitCode.OOM or oom_evidence:
        return FailureKind.OOM
    return FailureKind.CRASH


# --- OOM ladder -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class PlanAdjust:
    """How to shrink the original plan; every rung keeps the rungs before it."""

    description: str  # one log-ready sentence, e.g. "OOM step 2: 24 of 32 layers on GPU ..."
    extra_reserve_mib: int = 0  # add this much to the per-GPU VRAM reserve
    max_gpu_layers: int | None = None  # put at most this many layers on GPUs (None: no cap)
    n_ctx: int | None = None  # use this context size (None: the configured one)
    cpu_only: bool = False  # no GPU at all (empty CUDA_VISIBLE_DEVICES, 0 layers)
    step: int = 0  # which rung this is (1-based)


# Fractions of the originally planned GPU layers tried after more reserve did not help.
_LAYER_FRACTIONS: tuple[tuple[int, int, str], ...] = ((3, 4, "3/4"), (1, 2, "1/2"), (1, 4, "1/4"))


def _rungs(planned_layers: int, n_ctx: int, reserve_mib: int, min_ctx: int) -> list[PlanAdjust]:
    rungs: list[PlanAdjust] = []
    extra = max(reserve_mib // 2, 512)
    layers: int | None = None
    ctx: int | None = None

    def add(desc: str, cpu: bool = False) -> None:
        step = len(rungs) + 1
        rungs.append(
            PlanAdjust(
                description=f"out-of-memory step {step}: {desc}",
                extra_reserve_mib=extra,
                max_gpu_layers=0 if cpu else layers,
                n_ctx=ctx,
                cpu_only=cpu,
                step=step,
            )
        )

    if planned_layers > 0:
        add(f"raising the VRAM reserve from {reserve_mib} to {reserve_mib + extra} MiB per GPU")
        previous = planned_layers
        for num, den, label in _LAYER_FRACTIONS:
            candidate = planned_layers * num // den
            # Skip a rung that would not change anything (tiny models: 3/4 of 2 layers is 1, 1/2 too).
            if candidate >= previous:
                continue
            layers = candidate
            previous = candidate
            add(f"{layers} of {planned_layers} layers on GPU ({label} of the plan)")
        halved = max(n_ctx // 2, min_ctx)
        if halved < n_ctx:
            ctx = halved
            add(f"context halved from {n_ctx} to {ctx} tokens, {layers} layers on GPU")
    else:
        # Already no layers on GPU: only a smaller context (for host RAM) can help before CPU only.
        halved = max(n_ctx // 2, min_ctx)
        if halved < n_ctx:
            ctx = halved
            add(f"context halved from {n_ctx} to {ctx} tokens")
    ctx_note = f", context {ctx} tokens" if ctx is not None else ""
    add(f"CPU only (no GPU layers{ctx_note})", cpu=True)
    return rungs


def oom_ladder(
    step: int,
    *,
    planned_layers: int,
    n_ctx: int,
    reserve_mib: int,
    min_ctx: int = 512,
) -> PlanAdjust | None:
    """The ``step``-th (1-based) shrink after repeated OOMs, or None when nothing smaller is left.

    Pass the ORIGINAL plan's numbers on every call (not the adjusted ones): the ladder is a
    fixed list computed from them, so step N always means the same plan. ``planned_layers`` is
    the number of layers the plan put on GPUs (a count, never -1). Rungs that would change
    nothing (e.g. 3/4 of 1 layer) are skipped, so every step really is smaller.
    """
    if planned_layers < 0:
        raise ValueError(f"planned_layers must be a layer count >= 0, not {planned_layers}")
    if step < 1:
        raise ValueError(f"OOM ladder steps start at 1, not {step}")
    rungs = _rungs(planned_layers, n_ctx, reserve_mib, min_ctx)
    return rungs[step - 1] if step <= len(rungs) else None

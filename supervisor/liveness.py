"""PURE verdicts on a running worker: is it alive, and what did its exit mean.

Owns nothing. Called by the manager (worker_process.py) with what it observed; "now" and
every time are monotonic seconds passed in, so these are tested as tables (tests/test_liveness.py)
without a process or a clock. No I/O, no logging: reading the cgroup or the kernel log is the
process adapter's job (spawn.py), which hands the answer in as ``host_oom``.
"""

from __future__ import annotations

import enum
import signal
from dataclasses import dataclass

from supervisor.restart import FailureKind, classify_exit, describe_exit


@dataclass(frozen=True)
class Limits:
    """The worker.* settings the verdicts compare against."""

    load_stall_s: float  # worker.load_stall_timeout_s
    health_failures: int  # worker.health_failures: consecutive failed probes allowed
    token_stall_s: float  # worker.token_stall_timeout_s
    stable_after_s: float  # restart.stable_after_s


def load_stalled(limits: Limits, now: float, last_progress_at: float) -> bool:
    """A loading worker whose progress has not moved for longer than the limit is stuck."""
    return now - last_progress_at > limits.load_stall_s


class Probe(enum.Enum):
    OK = "ok"
    MISSED = "missed"  # a failed probe, within the allowance
    HANG = "hang"  # too many failed probes in a row, or no token for too long


def probe_verdict(
    limits: Limits, *, answered: bool, failures_before: int, seconds_since_token: float | None
) -> tuple[Probe, int]:
    """A ready worker's health probe: the verdict and the count of failed probes in a row.
    ``answered``: a 200 came back in time."""
    if not answered:
        failures = failures_before + 1
        return (Probe.HANG if failures >= limits.health_failures else Probe.MISSED), failures
    if seconds_since_token is not None and seconds_since_token > limits.token_stall_s:
        return Probe.HANG, 0
    return Probe.OK, 0


def stable(limits: Limits, now: float, ready_since: float | None) -> bool:
    """Up long enough that the failures before it no longer count (the restart policy would
    say the same at the next failure)."""
    return ready_since is not None and now - ready_since >= limits.stable_after_s


@dataclass(frozen=True)
class ExitVerdict:
    kind: FailureKind
    detail: str  # one sentence for logs, /status and 503 bodies


def needs_oom_check(code: int | None, killed_by_us: bool) -> bool:
    """A SIGKILL we did not send: worth asking the cgroup (or the kernel log) who sent it."""
    return code == -signal.SIGKILL and not killed_by_us


def hang_verdict(pid: int, limits: Limits) -> ExitVerdict:
    return ExitVerdict(
        FailureKind.HANG,
        f"worker pid {pid} hung (health checks failed or no token for {limits.token_stall_s:g}s); killed",
    )


def load_stall_verdict(pid: int, limits: Limits) -> ExitVerdict:
    return ExitVerdict(
        FailureKind.LOAD_STALL, f"worker pid {pid} made no load progress for {limits.load_stall_s:g}s; killed"
    )


def exit_verdict(
    pid: int,
    code: int,
    *,
    killed_by_us: bool,
    oom_line: str | None,
    host_oom: bool,
    last_line: str | None,
    rpc_line: str | None = None,
) -> ExitVerdict:
    """A worker that exited on its own (or was killed by someone else): what kind of failure.
    ``host_oom``: the cgroup's oom_kill counter or the kernel log says the OOM killer did it;
    ``oom_line``: the worker printed an out-of-memory line; ``last_line``: its last stderr line;
    ``rpc_line``: llama.cpp's RPC client aborted it, a remote host being gone (worker/protocol.py)."""
    what = describe_exit(code)
    kind = classify_exit(code, oom_evidence=oom_line is not None or host_oom)
    if host_oom:
        what += ", by the host OOM killer"
    elif needs_oom_check(code, killed_by_us):
        what += ", not by us (perhaps out of memory?)"
    detail = f"worker pid {pid} {what}"
    if oom_line:
        detail += f": {oom_line.strip()}"
    elif rpc_line:
        detail += f": lost a remote device (llama.cpp: {rpc_line.strip()}); the next plan leaves out a host that does not answer"
    elif kind is FailureKind.PERMANENT and last_line:
        detail += f": {last_line.strip()}"
    return ExitVerdict(kind, detail)

"""The liveness and exit verdicts as tables: what was observed in, a verdict out; "now" is
an argument, so nothing sleeps."""

from __future__ import annotations

import signal

import pytest

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
from supervisor.restart import FailureKind
from worker.protocol import ExitCode

LIMITS = Limits(load_stall_s=120.0, health_failures=3, token_stall_s=60.0, stable_after_s=300.0)


@pytest.mark.parametrize(
    ("now", "last_progress_at", "stalled"),
    [(100.0, 0.0, False), (120.0, 0.0, False), (120.5, 0.0, True), (1000.0, 900.0, False)],
)
def test_load_stall(now: float, last_progress_at: float, stalled: bool) -> None:
    assert load_stalled(LIMITS, now, last_progress_at) is stalled


@pytest.mark.parametrize(
    ("answered", "before", "since_token", "verdict", "after"),
    [
        (True, 0, None, Probe.OK, 0),  # idle and answering
        (True, 2, 5.0, Probe.OK, 0),  # an answer resets the count of missed probes
        (False, 0, None, Probe.MISSED, 1),
        (False, 1, None, Probe.MISSED, 2),
        (False, 2, None, Probe.HANG, 3),  # the third miss in a row (health_failures 3)
        (True, 0, 60.0, Probe.OK, 0),  # at the limit: not yet
        (True, 0, 60.5, Probe.HANG, 0),  # no token for longer than token_stall_s
    ],
)
def test_probe_verdicts(answered: bool, before: int, since_token: float | None, verdict: Probe, after: int) -> None:
    assert probe_verdict(LIMITS, answered=answered, failures_before=before, seconds_since_token=since_token) == (
        verdict,
        after,
    )


@pytest.mark.parametrize(
    ("now", "ready_since", "is_stable"), [(299.0, 0.0, False), (300.0, 0.0, True), (10.0, None, False)]
)
def test_stable_after(now: float, ready_since: float | None, is_stable: bool) -> None:
    assert stable(LIMITS, now, ready_since) is is_stable


@pytest.mark.parametrize(
    ("code", "by_us", "oom_line", "host_oom", "last", "kind", "says"),
    [
        (1, False, None, False, None, FailureKind.CRASH, "exit code 1"),
        (-signal.SIGSEGV, False, None, False, None, FailureKind.CRASH, "SIGSEGV"),
        (ExitCode.OOM, False, None, False, None, FailureKind.OOM, "exit code 5"),
        (1, False, "CUDA error: out of memory", False, None, FailureKind.OOM, "out of memory"),
        (-signal.SIGKILL, False, None, True, None, FailureKind.OOM, "by the host OOM killer"),
        (-signal.SIGKILL, False, None, False, None, FailureKind.CRASH, "perhaps out of memory?"),
        (ExitCode.BAD_MODEL, False, None, False, "not a GGUF file", FailureKind.PERMANENT, "not a GGUF file"),
        (ExitCode.BAD_SPEC, False, None, False, None, FailureKind.PERMANENT, "exit code 3"),
    ],
)
def test_exit_classification(
    code: int, by_us: bool, oom_line: str | None, host_oom: bool, last: str | None, kind: FailureKind, says: str
) -> None:
    v = exit_verdict(42, code, killed_by_us=by_us, oom_line=oom_line, host_oom=host_oom, last_line=last)
    assert v.kind is kind
    assert says in v.detail and v.detail.startswith("worker pid 42 ")


def test_oom_check_only_for_a_kill_we_did_not_send() -> None:
    assert needs_oom_check(-signal.SIGKILL, killed_by_us=False)
    assert not needs_oom_check(-signal.SIGKILL, killed_by_us=True)
    assert not needs_oom_check(1, killed_by_us=False)
    assert not needs_oom_check(None, killed_by_us=False)


def test_hang_and_stall_verdicts_name_the_limit() -> None:
    assert hang_verdict(7, LIMITS).kind is FailureKind.HANG and "60s" in hang_verdict(7, LIMITS).detail
    v = load_stall_verdict(7, LIMITS)
    assert v.kind is FailureKind.LOAD_STALL and "120s" in v.detail and "pid 7" in v.detail

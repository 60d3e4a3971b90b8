"""The two polling helpers: "not yet" errors are retried, a verdict ends the wait at once."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from bench.procs import poll as bench_poll
from tests.supervisor_harness import poll as harness_poll


def flaky_then(value: Any, error: Exception, failures: int = 2) -> Callable[[], Any]:
    calls = {"n": 0}

    def predicate() -> Any:
        calls["n"] += 1
        if calls["n"] <= failures:
            raise error
        return value

    return predicate


def test_not_yet_errors_are_retried() -> None:
    assert harness_poll(flaky_then("up", ConnectionRefusedError()), 10.0, "x", 0.001) == "up"
    assert bench_poll(flaky_then("up", ConnectionRefusedError()), 10.0, "x", 0.001) == "up"


@pytest.mark.parametrize(
    ("poll", "error"),
    [(harness_poll, AssertionError("the supervisor exited")), (bench_poll, RuntimeError("the worker exited"))],
)
def test_a_verdict_ends_the_wait_at_once(poll: Callable[..., Any], error: Exception) -> None:
    t0 = time.monotonic()
    with pytest.raises(type(error), match="exited"):
        poll(flaky_then("never", error, failures=10**9), 30.0, "x", 0.001)
    assert time.monotonic() - t0 < 5.0  # not the 30 s timeout

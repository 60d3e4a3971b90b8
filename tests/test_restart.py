"""The restart policy and the OOM ladder, as tables (no clock: "now" is an argument)."""

from __future__ import annotations

import pytest

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

K = FailureKind
P = RestartPolicy()
GIVE_UP = RestartPolicy(give_up=True)


def crashes(*times: float, kind: FailureKind = K.CRASH, ran_for_s: float = 0.0) -> list[Failure]:
    return [Failure(at=t, kind=kind, detail="exit code 1 (FAILURE)", ran_for_s=ran_for_s) for t in times]


# --- decide: backoff --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "delay"),
    [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 16.0)],
)
def test_delay_doubles_per_failure_in_a_streak(n: int, delay: float) -> None:
    times = [100.0 + i for i in range(n)]
    d = decide(P, crashes(*times), now=times[-1])
    assert d.action == "restart"
    assert d.delay_s == delay


def test_delay_is_capped() -> None:
    policy = RestartPolicy(max_failures=20, backoff_max_s=10.0)
    d = decide(policy, crashes(*range(8)), now=8.0)
    assert d == Decision("restart", 10.0, d.reason)


def test_gives_up_after_more_than_max_failures_in_window() -> None:
    # Only when asked to (restart.give_up); by default this is a crash loop (below).
    fails = crashes(0.0, 5.0, 10.0, 20.0, 30.0, 41.0)
    assert decide(GIVE_UP, fails[:5], now=30.0).action == "restart"
    d = decide(GIVE_UP, fails, now=41.0)
    assert d.action == "give_up"
    assert d.delay_s == 0.0
    assert d.reason.startswith("gave up after 6 failures in 41s")
    assert "exit code 1" in d.reason


def test_failures_outside_the_window_do_not_count() -> None:
    # Five old crashes 1000s ago, then one now: a streak of one.
    fails = crashes(0.0, 1.0, 2.0, 3.0, 4.0, 1005.0)
    d = decide(P, fails, now=1005.0)
    assert d.action == "restart"
    assert d.delay_s == 1.0


def test_stable_run_resets_the_streak() -> None:
    fails = crashes(0.0, 1.0, 3.0, 7.0, 15.0)
    assert decide(P, fails, now=15.0).delay_s == 16.0
    # The worker then ran 300s before crashing: the first failure after a stable run
    # restarts at once (issue 12; it was the initial delay)...
    fails.append(Failure(at=320.0, kind=K.CRASH, detail="exit code -11 (SIGSEGV)", ran_for_s=300.0))
    d = decide(P, fails, now=320.0)
    assert (d.action, d.delay_s) == ("restart", 0.0)
    # ...and the next quick crash is the second of the new streak, not the seventh overall.
    fails.append(Failure(at=322.0, kind=K.CRASH, detail="exit code 1", ran_for_s=0.5))
    d = decide(P, fails, now=322.0)
    assert (d.action, d.delay_s) == ("restart", 2.0)


def test_failure_order_does_not_matter() -> None:
    fails = crashes(3.0, 1.0, 2.0)
    assert decide(P, fails, now=3.0).delay_s == 4.0


def test_reason_is_a_sentence_with_count_span_and_delay() -> None:
    d = decide(P, crashes(0.0, 20.0, 41.0), now=41.0)
    assert d.reason == "crashed 3 times in 41s (last: exit code 1 (FAILURE)); restarting in 4.0s"


def test_mixed_kinds_say_failed() -> None:
    fails = [
        Failure(at=0.0, kind=K.CRASH, detail="exit code 1"),
        Failure(at=10.0, kind=K.HANG, detail="no token for 120s", ran_for_s=5.0),
    ]
    d = decide(P, fails, now=10.0)
    assert d.reason.startswith("failed 2 times in 10s (last: no token for 120s)")


@pytest.mark.parametrize("kind", [K.CRASH, K.HANG, K.LOAD_STALL, K.START_ERROR])
def test_retryable_kinds_restart(kind: FailureKind) -> None:
    d = decide(P, [Failure(at=0.0, kind=kind, detail="x")], now=0.0)
    assert (d.action, d.delay_s) == ("restart", 1.0)


def test_permanent_gives_up_at_once() -> None:
    d = decide(P, [Failure(at=0.0, kind=K.PERMANENT, detail="exit code 4 (BAD_MODEL): no such file")], now=0.0)
    assert d == Decision("give_up", 0.0, "will not retry: exit code 4 (BAD_MODEL): no such file")


def test_no_failures_starts_now() -> None:
    assert decide(P, [], now=0.0).action == "restart"


# --- decide: crash loop -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "give_up", "action", "delay", "crash_loop"),
    [
        (5, False, "restart", 16.0, False),  # the budget (5) is not spent yet
        (6, False, "restart", 60.0, True),  # spent: the capped delay, not a stop
        (7, False, "restart", 60.0, True),
        (500, False, "restart", 60.0, True),  # however long it lasts
        (5, True, "restart", 16.0, False),
        (6, True, "give_up", 0.0, False),  # restart.give_up: today's stop
        (500, True, "give_up", 0.0, False),
    ],
)
def test_crash_loop_retries_at_the_cap_unless_told_to_give_up(
    n: int, give_up: bool, action: str, delay: float, crash_loop: bool
) -> None:
    policy = RestartPolicy(give_up=give_up, failure_window_s=1e9)
    d = decide(policy, crashes(*range(n)), now=float(n))
    assert (d.action, d.delay_s, d.crash_loop) == (action, delay, crash_loop)


def test_crash_loop_reason_says_what_when_and_why() -> None:
    d = decide(P, crashes(0.0, 5.0, 10.0, 20.0, 30.0, 41.0, 101.0), now=101.0)
    assert d.reason == (
        "crash loop: 7 failures in the last 10 minutes (more than 5; last: exit code 1 (FAILURE)); "
        "retrying every 60s until a worker stays up for 300s"
    )


@pytest.mark.parametrize(("window", "words"), [(600.0, "10 minutes"), (3600.0, "1 hour"), (90.0, "90s"), (60.0, "1 minute")])
def test_crash_loop_reason_names_the_window_as_a_person_would(window: float, words: str) -> None:
    policy = RestartPolicy(max_failures=1, failure_window_s=window)
    d = decide(policy, crashes(0.0, 1.0), now=1.0)
    assert d.reason.startswith(f"crash loop: 2 failures in the last {words} (more than 1;")


def test_crash_loop_cap_follows_the_configured_maximum() -> None:
    policy = RestartPolicy(max_failures=2, backoff_initial_s=0.1, backoff_max_s=0.5)
    delays = [decide(policy, crashes(*range(n)), now=float(n)).delay_s for n in range(1, 7)]
    assert delays == [0.1, 0.2, 0.5, 0.5, 0.5, 0.5]


def test_crash_loop_ends_after_a_stable_run() -> None:
    fails = crashes(*range(10))
    assert decide(P, fails, now=10.0).crash_loop
    fails.append(Failure(at=400.0, kind=K.CRASH, detail="exit code 1", ran_for_s=300.0))
    d = decide(P, fails, now=400.0)
    assert (d.action, d.delay_s, d.crash_loop) == ("restart", 0.0, False)  # at once after a stable run


def test_crash_loop_ends_when_its_failures_leave_the_window() -> None:
    d = decide(P, crashes(*range(10), 700.0), now=700.0)
    assert (d.delay_s, d.crash_loop) == (1.0, False)


def test_permanent_failure_in_a_crash_loop_gives_up() -> None:
    fails = [*crashes(*range(10)), Failure(at=11.0, kind=K.PERMANENT, detail="exit code 4 (BAD_MODEL)")]
    d = decide(P, fails, now=11.0)
    assert (d.action, d.crash_loop) == ("give_up", False)


def test_oom_in_a_crash_loop_still_climbs_the_ladder_first() -> None:
    fails = [*crashes(*range(10)), Failure(at=11.0, kind=K.OOM, detail="exit code 5 (OOM)")]
    d = decide(P, fails, now=11.0)
    assert (d.action, d.delay_s, d.crash_loop) == ("restart", 1.0, False)
    assert "smaller footprint" in d.reason


@pytest.mark.parametrize(
    ("times", "now", "exhausted", "streak"),
    [
        ([], 0.0, False, 0),
        ([0.0, 1.0, 2.0], 2.0, False, 3),
        ([0.0, 1.0, 2.0], 601.5, False, 1),  # two left the window
        ([0.0, 1.0, 2.0], 700.0, False, 0),  # all did: no streak any more
    ],
)
def test_failure_streak(times: list[float], now: float, exhausted: bool, streak: int) -> None:
    assert failure_streak(P, crashes(*times), now, oom_ladder_exhausted=exhausted) == streak


def test_failure_streak_leaves_out_ooms_until_the_ladder_is_exhausted() -> None:
    fails = [*crashes(0.0, 1.0), *crashes(2.0, 3.0, kind=K.OOM)]
    assert failure_streak(P, fails, 3.0) == 2
    assert failure_streak(P, fails, 3.0, oom_ladder_exhausted=True) == 4


def test_prune_drops_what_can_no_longer_count() -> None:
    fails = crashes(0.0, 1.0, 700.0, 701.0)
    assert [f.at for f in prune_failures(P, fails, now=701.0)] == [700.0, 701.0]
    # Before a stable run: a new streak began there.
    fails = [*crashes(0.0, 1.0), Failure(at=310.0, kind=K.CRASH, detail="x", ran_for_s=300.0), *crashes(311.0)]
    assert [f.at for f in prune_failures(P, fails, now=311.0)] == [310.0, 311.0]
    # The latest failure is kept whatever the clock says; nothing in, nothing out.
    assert [f.at for f in prune_failures(P, crashes(0.0), now=5000.0)] == [0.0]
    assert prune_failures(P, [], now=0.0) == []


@pytest.mark.parametrize("n", [1, 5, 6, 40])
def test_prune_changes_no_decision(n: int) -> None:
    # A crash every 30s (the window holds 20): deciding on the pruned history is the same.
    fails = crashes(*(30.0 * i for i in range(n)))
    now = 30.0 * (n - 1)
    assert decide(P, prune_failures(P, fails, now), now) == decide(P, fails, now)


# --- decide: OOM ------------------------------------------------------------------------


def test_oom_restarts_quickly_and_does_not_count_until_the_ladder_is_exhausted() -> None:
    fails = crashes(0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, kind=K.OOM)
    d = decide(P, fails, now=6.0)
    assert (d.action, d.delay_s) == ("restart", 1.0)
    assert "smaller footprint" in d.reason
    # A crash after five OOMs is the first failure of its streak.
    fails.append(Failure(at=7.0, kind=K.CRASH, detail="exit code 1"))
    assert decide(P, fails, now=7.0).delay_s == 1.0


def test_oom_counts_once_the_ladder_is_exhausted() -> None:
    fails = crashes(0.0, 1.0, 2.0, kind=K.OOM)
    d = decide(P, fails, now=2.0, oom_ladder_exhausted=True)
    assert (d.action, d.delay_s) == ("restart", 4.0)
    fails = crashes(*range(6), kind=K.OOM)
    d = decide(GIVE_UP, fails, now=5.0, oom_ladder_exhausted=True)
    assert d.action == "give_up"
    assert d.reason.startswith("gave up after 6 failures in 5s")
    d = decide(P, fails, now=5.0, oom_ladder_exhausted=True)
    assert (d.action, d.delay_s, d.crash_loop) == ("restart", 60.0, True)


# --- exit classification ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "oom", "kind"),
    [
        (1, False, K.CRASH),
        (0, False, K.CRASH),  # exiting unasked is a failure too
        (-11, False, K.CRASH),
        (-9, False, K.CRASH),
        (-9, True, K.OOM),  # the host OOM killer left its trace
        (1, True, K.OOM),  # OOM lines in stderr, generic exit
        (5, False, K.OOM),
        (3, False, K.PERMANENT),
        (4, False, K.PERMANENT),
        (4, True, K.PERMANENT),  # a bad model is never retried, whatever stderr said
    ],
)
def test_classify_exit(code: int, oom: bool, kind: FailureKind) -> None:
    assert classify_exit(code, oom_evidence=oom) is kind


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (1, "exit code 1 (FAILURE)"),
        (4, "exit code 4 (BAD_MODEL)"),
        (-9, "exit code -9 (SIGKILL)"),
        (-11, "exit code -11 (SIGSEGV)"),
        (42, "exit code 42"),
        (-200, "exit code -200 (signal 200)"),
    ],
)
def test_describe_exit(code: int, text: str) -> None:
    assert describe_exit(code) == text


# --- OOM ladder -------------------------------------------------------------------------


def ladder(**kw: int) -> list[PlanAdjust]:
    out = []
    step = 1
    while (adj := oom_ladder(step, **kw)) is not None:  # type: ignore[arg-type]
        out.append(adj)
        step += 1
        assert step < 50
    return out


def test_ladder_full() -> None:
    rungs = ladder(planned_layers=32, n_ctx=4096, reserve_mib=512)
    got = [(a.step, a.extra_reserve_mib, a.max_gpu_layers, a.n_ctx, a.cpu_only) for a in rungs]
    assert got == [
        (1, 512, None, None, False),  # more reserve (+50% of 512 is 256, but at least 512)
        (2, 512, 24, None, False),  # 3/4 of the layers
        (3, 512, 16, None, False),  # 1/2
        (4, 512, 8, None, False),  # 1/4
        (5, 512, 8, 2048, False),  # half the context
        (6, 512, 0, 2048, True),  # CPU only
    ]
    assert rungs[0].description == "out-of-memory step 1: raising the VRAM reserve from 512 to 1024 MiB per GPU"
    assert rungs[1].description == "out-of-memory step 2: 24 of 32 layers on GPU (3/4 of the plan)"
    assert rungs[4].description == "out-of-memory step 5: context halved from 4096 to 2048 tokens, 8 layers on GPU"
    assert rungs[5].description == "out-of-memory step 6: CPU only (no GPU layers, context 2048 tokens)"
    assert oom_ladder(7, planned_layers=32, n_ctx=4096, reserve_mib=512) is None


def test_ladder_reserve_grows_by_half_when_large() -> None:
    first = oom_ladder(1, planned_layers=80, n_ctx=8192, reserve_mib=2048)
    assert first is not None and first.extra_reserve_mib == 1024


def test_ladder_skips_rungs_that_change_nothing() -> None:
    rungs = ladder(planned_layers=2, n_ctx=512, reserve_mib=0)
    got = [(a.max_gpu_layers, a.n_ctx, a.cpu_only) for a in rungs]
    # 3/4 of 2 is 1, 1/2 of 2 is 1 (skipped), 1/4 of 2 is 0; context already at the minimum.
    assert got == [(None, None, False), (1, None, False), (0, None, False), (0, None, True)]
    assert [a.step for a in rungs] == [1, 2, 3, 4]


def test_ladder_context_not_below_minimum() -> None:
    rungs = ladder(planned_layers=4, n_ctx=768, reserve_mib=512, min_ctx=512)
    assert [a.n_ctx for a in rungs if a.n_ctx is not None] == [512, 512]


def test_ladder_when_plan_is_already_cpu() -> None:
    rungs = ladder(planned_layers=0, n_ctx=4096, reserve_mib=512)
    assert [(a.n_ctx, a.cpu_only) for a in rungs] == [(2048, False), (2048, True)]


def test_ladder_is_cumulative_and_monotonic() -> None:
    rungs = ladder(planned_layers=33, n_ctx=32768, reserve_mib=1000)
    for prev, cur in zip(rungs, rungs[1:]):
        assert cur.extra_reserve_mib >= prev.extra_reserve_mib
        prev_layers = 33 if prev.max_gpu_layers is None else prev.max_gpu_layers
        cur_layers = 33 if cur.max_gpu_layers is None else cur.max_gpu_layers
        assert cur_layers <= prev_layers
        assert (cur.n_ctx or 32768) <= (prev.n_ctx or 32768)
    assert rungs[-1].cpu_only and rungs[-1].max_gpu_layers == 0


@pytest.mark.parametrize("bad", [{"step": 0}, {"planned_layers": -1}])
def test_ladder_rejects_bad_input(bad: dict[str, int]) -> None:
    args = {"step": 1, "planned_layers": 10, "n_ctx": 4096, "reserve_mib": 512} | bad
    step = args.pop("step")
    with pytest.raises(ValueError):
        oom_ladder(step, **args)

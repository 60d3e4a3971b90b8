"""The worker state table: every legal move works, every other move raises and changes nothing."""

from __future__ import annotations

import itertools

import pytest

from supervisor.states import (
    PROCESS_STATES,
    TRANSITIONS,
    IllegalTransition,
    StateMachine,
    WorkerState,
    check_transition,
)

S = WorkerState
ALL_PAIRS = list(itertools.product(S, S))
LEGAL = [(a, b) for a, b in ALL_PAIRS if b in TRANSITIONS[a]]
ILLEGAL = [(a, b) for a, b in ALL_PAIRS if b not in TRANSITIONS[a]]


def _ids(pair: tuple[WorkerState, WorkerState]) -> str:
    return f"{pair[0].name}->{pair[1].name}"


def test_table_covers_every_state() -> None:
    assert set(TRANSITIONS) == set(S)
    for targets in TRANSITIONS.values():
        assert isinstance(targets, frozenset)
        assert targets <= set(S)


def test_no_self_loops() -> None:
    # Staying in a state is not a transition; a caller doing it has lost track of the state.
    for state, targets in TRANSITIONS.items():
        assert state not in targets


def test_every_state_reachable_from_stopped() -> None:
    seen = {S.STOPPED}
    frontier = [S.STOPPED]
    while frontier:
        for nxt in TRANSITIONS[frontier.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    assert seen == set(S)


def test_failed_left_only_by_reload_shutdown_unload_or_removal() -> None:
    # A reload (or a shutdown) goes through STOPPED; the fleet may unload or remove it.
    assert TRANSITIONS[S.FAILED] == frozenset({S.STOPPED, S.UNLOADED, S.RETIRED})


def test_retired_is_terminal() -> None:
    assert TRANSITIONS[S.RETIRED] == frozenset()


def test_every_failure_with_a_process_goes_through_stopping() -> None:
    # The worker is reaped in STOPPING before the policy's BACKOFF or FAILED.
    for state in (S.LOADING, S.READY):
        assert TRANSITIONS[state] & {S.BACKOFF, S.FAILED} == frozenset()


def test_process_states_can_reach_stopping_or_exit() -> None:
    # Wherever a process may exist, a shutdown must be able to stop it (or see it gone).
    for state in PROCESS_STATES - {S.STOPPING}:
        assert S.STOPPING in TRANSITIONS[state]


@pytest.mark.parametrize("pair", LEGAL, ids=_ids)
def test_legal_move(pair: tuple[WorkerState, WorkerState]) -> None:
    old, new = pair
    check_transition(old, new)
    sm = StateMachine(initial=old)
    sm.transition(new)
    assert sm.state is new


@pytest.mark.parametrize("pair", ILLEGAL, ids=_ids)
def test_illegal_move_raises_and_changes_nothing(pair: tuple[WorkerState, WorkerState]) -> None:
    old, new = pair
    with pytest.raises(IllegalTransition) as info:
        check_transition(old, new)
    assert info.value.old is old and info.value.new is new
    sm = StateMachine(initial=old)
    with pytest.raises(IllegalTransition):
        sm.transition(new)
    assert sm.state is old


def test_error_message_names_both_states_and_the_allowed_ones() -> None:
    with pytest.raises(IllegalTransition) as info:
        check_transition(S.STOPPED, S.READY)
    msg = str(info.value)
    assert "STOPPED -> READY" in msg
    assert "STARTING" in msg


def test_typical_lifecycle() -> None:
    sm = StateMachine()
    assert sm.state is S.STOPPED
    moves = [
        S.STARTING,  # initial start
        S.LOADING,  # health says loading
        S.READY,  # health 200
        S.STOPPING,  # exit code -9 (SIGKILL): reaped
        S.BACKOFF,
        S.STARTING,  # backoff elapsed
        S.READY,
        S.STOPPING,  # no token for 120s
        S.FAILED,  # gave up
        S.STOPPED,  # reload
        S.STARTING,
        S.READY,
        S.STOPPING,  # unloaded to make room
        S.UNLOADED,
        S.STARTING,  # a request loads it again
        S.READY,
        S.STOPPING,  # removed from the configuration
        S.RETIRED,
    ]
    for new in moves:
        sm.transition(new)
    assert sm.state is S.RETIRED

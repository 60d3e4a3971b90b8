"""The worker state table: every legal move works, every other move raises and changes nothing."""

from __future__ import annotations

import itertools

import pytest

from supervisor.states import (
    PROCESS_STATES,
    TRANSITIONS,
    IllegalTransition,
    StateMachine,
    Transition,
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


def test_failed_left_only_by_reload_or_shutdown() -> None:
    assert TRANSITIONS[S.FAILED] == frozenset({S.STARTING, S.STOPPED})


def test_process_states_can_reach_stopping_or_exit() -> None:
    # Wherever a process may exist, a shutdown must be able to stop it (or see it gone).
    for state in PROCESS_STATES - {S.STOPPING}:
        assert S.STOPPING in TRANSITIONS[state]


@pytest.mark.parametrize("pair", LEGAL, ids=_ids)
def test_legal_move(pair: tuple[WorkerState, WorkerState]) -> None:
    old, new = pair
    check_transition(old, new)
    sm = StateMachine(initial=old)
    sm.transition(new, "because", at=12.5)
    assert sm.state is new
    assert list(sm.history) == [Transition(old, new, "because", 12.5)]


@pytest.mark.parametrize("pair", ILLEGAL, ids=_ids)
def test_illegal_move_raises_and_changes_nothing(pair: tuple[WorkerState, WorkerState]) -> None:
    old, new = pair
    with pytest.raises(IllegalTransition) as info:
        check_transition(old, new)
    assert info.value.old is old and info.value.new is new
    sm = StateMachine(initial=old)
    with pytest.raises(IllegalTransition):
        sm.transition(new, "should not happen")
    assert sm.state is old
    assert list(sm.history) == []


def test_error_message_names_both_states_and_the_allowed_ones() -> None:
    with pytest.raises(IllegalTransition) as info:
        check_transition(S.STOPPED, S.READY)
    msg = str(info.value)
    assert "STOPPED -> READY" in msg
    assert "STARTING" in msg


def test_typical_lifecycle_and_history() -> None:
    sm = StateMachine()
    assert sm.state is S.STOPPED
    moves = [
        (S.STARTING, "initial start"),
        (S.LOADING, "health says loading"),
        (S.READY, "health 200"),
        (S.BACKOFF, "exit code -9 (SIGKILL)"),
        (S.STARTING, "backoff elapsed"),
        (S.READY, "health 200"),
        (S.STOPPING, "no token for 120s"),
        (S.FAILED, "gave up"),
        (S.STARTING, "reload"),
        (S.READY, "health 200"),
        (S.STOPPING, "shutdown"),
        (S.STOPPED, "exited"),
    ]
    for i, (new, reason) in enumerate(moves):
        sm.transition(new, reason, at=float(i))
    assert sm.state is S.STOPPED
    assert [(t.old, t.new, t.reason) for t in sm.history][:2] == [
        (S.STOPPED, S.STARTING, "initial start"),
        (S.STARTING, S.LOADING, "health says loading"),
    ]
    old, new, reason, at = sm.history[-1]
    assert (old, new, reason, at) == (S.STOPPING, S.STOPPED, "exited", 11.0)


def test_history_is_bounded() -> None:
    sm = StateMachine(history_len=3)
    for _ in range(5):
        sm.transition(S.STARTING, "start")
        sm.transition(S.BACKOFF, "crash")
    assert len(sm.history) == 3
    assert sm.history[-1].new is S.BACKOFF
    assert sm.history[0].at is None

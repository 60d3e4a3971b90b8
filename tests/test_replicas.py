"""Which replica a request goes to (supervisor/replicas.py): pure tables."""

from __future__ import annotations

import json

import pytest

from supervisor.replicas import PROMPT_BLOCK, PrefixMemory, ReplicaLoad, choose, prefixes_of

R = ReplicaLoad


def ready(slots: int = 4, generating: int = 0, waiting: int = 0) -> ReplicaLoad:
    return R(True, slots=slots, generating=generating, waiting=waiting)


DOWN = R(False)
LOADING = R(False, coming=True)


@pytest.mark.parametrize(
    "why, loads, holder, want",
    [
        ("one replica: always it", [ready()], None, 0),
        ("one replica, down: still it (its admission waits or loads it)", [DOWN], None, 0),
        ("the most free slots", [ready(generating=3), ready(generating=1)], None, 1),
        ("ties: the first", [ready(generating=2), ready(generating=2)], None, 0),
        ("free slots net of the queue", [ready(generating=1, waiting=2), ready(generating=2)], None, 1),
        ("the holder of the prefix while it has a free slot", [ready(generating=0), ready(generating=3)], 1, 1),
        ("the holder is full: the least busy", [ready(generating=0), ready(generating=4)], 1, 0),
        ("the holder is down: the least busy", [ready(generating=2), DOWN], 1, 0),
        ("a holder out of range (the replicas changed): ignored", [ready(), ready(generating=1)], 5, 0),
        ("all full: the shortest queue", [ready(generating=4, waiting=3), ready(generating=4, waiting=1)], None, 1),
        ("a dead replica is passed over", [DOWN, ready(generating=4, waiting=5)], None, 1),
        ("none ready: the one coming up", [DOWN, LOADING], None, 1),
        ("none ready, several coming: the fewest waiting",
         [R(False, coming=True, waiting=3), R(False, coming=True, waiting=1)], None, 1),
        ("none ready, none coming: the first (a request loads it)", [DOWN, DOWN], None, 0),
    ],
)
def test_choose(why: str, loads: list[ReplicaLoad], holder: int | None, want: int) -> None:
    assert choose(loads, holder) == want, why


def test_eight_clients_spread_over_two_replicas() -> None:
    """Requests arriving one after another with nothing finished: they alternate."""
    gen = [0, 0]
    for _ in range(8):
        i = choose([ready(generating=gen[0]), ready(generating=gen[1])])
        gen[i] += 1
    assert gen == [4, 4]


def chat(*turns: str) -> bytes:
    roles = ["user", "assistant"]
    return json.dumps({"model": "m", "messages": [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]}).encode()


def test_a_conversations_next_turn_finds_the_replica_of_its_first() -> None:
    memory = PrefixMemory()
    memory.sent(1, prefixes_of(chat("hello")))
    memory.sent(0, prefixes_of(chat("something else")))
    assert memory.holder(prefixes_of(chat("hello", "hi there", "and then?"))) == 1
    # Its third turn too, once the second was sent there.
    memory.sent(1, prefixes_of(chat("hello", "hi there", "and then?")))
    assert memory.holder(prefixes_of(chat("hello", "hi there", "and then?", "this", "more"))) == 1
    assert memory.holder(prefixes_of(chat("a new one"))) is None


def test_a_shared_system_prompt_is_no_reason_to_stick() -> None:
    memory = PrefixMemory()
    system = {"role": "system", "content": "You are helpful."}

    def body(*users: str) -> bytes:
        return json.dumps({"messages": [system, *({"role": "user", "content": u} for u in users)]}).encode()

    memory.sent(0, prefixes_of(body("first conversation")))
    assert memory.holder(prefixes_of(body("second conversation"))) is None


def test_a_replaced_worker_forgets_and_the_memory_is_bounded() -> None:
    memory = PrefixMemory(size=4)
    memory.sent(1, prefixes_of(chat("hello")))
    memory.forget(1)
    assert memory.holder(prefixes_of(chat("hello", "hi", "again"))) is None
    for n in range(10):
        memory.sent(0, prefixes_of(chat(f"conversation {n}")))
    assert len(memory) == 4


def test_prompts_in_blocks_and_bodies_without_a_prompt() -> None:
    text = "x" * (3 * PROMPT_BLOCK + 10)
    first = prefixes_of(json.dumps({"prompt": text}).encode())
    assert len(first) == 3
    longer = prefixes_of(json.dumps({"prompt": text + "y" * PROMPT_BLOCK}).encode())
    assert longer[:3] == first
    assert prefixes_of(b"not json") == ()
    assert prefixes_of(json.dumps({"input": "short"}).encode()) == ()
    assert len(prefixes_of(json.dumps({"input": [{"role": "user", "content": "hi"}]}).encode())) == 1

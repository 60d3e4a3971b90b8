"""Which idle slot a request takes (worker/engine/slots.py ``pick_slot``): a table."""

from __future__ import annotations

import pytest

from worker.engine.slots import Slot, pick_slot

HEADER = [1, 500, 501, 502, 503]  # BOS and a chat template's opening tokens
A = HEADER + list(range(1000, 1300))  # conversation A's first turn (300 tokens of its own)
B = HEADER + list(range(2000, 2300))


def _slots(*caches: list[int]) -> list[Slot]:
    return [Slot(seq, tokens=list(c), last_used=seq + 1 if c else 0) for seq, c in enumerate(caches)]


@pytest.mark.parametrize(
    ("caches", "head", "want"),
    [
        # Nothing cached: the first slot (least recently used).
        ([[], [], []], A, (0, 0)),
        # Another conversation shares only the template's opening: an empty slot, not its cache
        # (the shared tokens would be reused from there, but the cut loses 300 of its own).
        ([A, [], []], B, (1, 0)),
        # A's next turn keeps all of A's cache: that slot, whatever the recency.
        ([B, A, []], A + [7, 8, 9], (1, len(A))),
        # A branch of A (its last 100 tokens changed): still 2/3 of the prompt shared.
        ([B, A, []], A[:-100] + list(range(3000, 3100)), (1, len(A) - 100)),
        # Every slot holds someone's cache and nothing is similar: the least recently used one,
        # reusing what it shares.
        ([A, B], HEADER + list(range(4000, 4300)), (0, len(HEADER))),
        # A long shared system prompt is worth a slot even if the cut loses that slot's tail.
        ([HEADER + list(range(5000, 5400)) + [1, 2, 3], []], HEADER + list(range(5000, 5400)) + [9], (0, 405)),
        # BOS alone is never a reason.
        ([[1, 9, 9], []], [1, 8, 8], (1, 0)),
    ],
)
def test_pick_slot(caches: list[list[int]], head: list[int], want: tuple[int, int]) -> None:
    got = pick_slot(_slots(*caches), head)
    assert got is not None and (got[0].seq, got[1]) == want


def test_no_idle_slot() -> None:
    assert pick_slot([], A) is None

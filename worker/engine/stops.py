"""Stop strings: pure text matching, shared by every slot's token stream."""

from __future__ import annotations


def _stop_at(text: str, stops: tuple[str, ...]) -> int | None:
    """Index of the earliest stop string in text, or None."""
    best: int | None = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i < best):
            best = i
    return best


def _stop_end(text: str, stops: tuple[str, ...], at: int) -> int:
    """Where the longest stop string that starts at ``at`` in text ends."""
    return at + max(len(s) for s in stops if text.startswith(s, at))


def _held_back(text: str, stops: tuple[str, ...], prefix_chars: frozenset[str]) -> int:
    """Length of the longest tail of text that could still become a stop string.

    ``prefix_chars`` holds every character of every stop string but its last: a tail that
    is a proper prefix of a stop string ends in one of them, so most pieces are passed
    with one set lookup.
    """
    if not text or text[-1] not in prefix_chars:
        return 0
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:n]):
                hold = n
                break
    return hold

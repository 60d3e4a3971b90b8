"""Which replica of a model a request goes to: PURE, tested as a table (tests/test_replicas.py).

Rules for this module:
- No I/O, no clock, no logging, nothing mutated but the ``PrefixMemory`` it is handed: the
  router (supervisor/router.py) reads each replica's load from its published view and its
  admission, asks ``choose``, and tells the memory what it sent where.
- Least busy first: the most free generation slots (slots less requests generating and
  waiting), then the fewest requests, then the first. A request waits only where no
  replica has a free slot, in the shortest queue (join-shortest-queue).
- Conversation affinity: a request whose prompt prefix a replica was sent before goes to that
  replica while it has a free slot, so its slots' KV cache (or its RAM cache) answers the
  prefix without reading it again. The supervisor does not parse the workers' caches: it
  remembers, per replica, hashes of the prefixes it sent there (``PrefixMemory``, bounded,
  least recently used out first) and forgets a replica's when its worker is replaced (a
  restart starts with an empty cache; the disk tier is per replica too).
- A prefix is counted in whole messages (chat, messages, responses) or in blocks of
  ``PROMPT_BLOCK`` characters (a completion's prompt): a conversation's next turn repeats the
  previous turn's messages, and the answer, then adds one. A prefix of one message (a shared
  system prompt) is no reason to stick: every conversation would pile onto one replica.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import msgspec

PROMPT_BLOCK = 256  # characters of a completion prompt per prefix block
MAX_BLOCKS = 64  # prefix hashes kept per request at most (the longest ones)
MEMORY_SIZE = 4096  # prefixes remembered per model, every replica together


@dataclass(frozen=True)
class ReplicaLoad:
    """One replica, as the router sees it when a request arrives."""

    ready: bool  # a ready worker now
    coming: bool = False  # starting or loading: ready soon
    slots: int = 0  # its generation slots (0 when not ready)
    generating: int = 0  # requests holding one of them
    waiting: int = 0  # requests waiting for one of them (or for the worker)

    @property
    def free(self) -> int:
        return self.slots - self.generating - self.waiting


def choose(loads: Sequence[ReplicaLoad], holder: int | None = None) -> int:
    """The index of the replica a request goes to. ``holder``: the replica that was sent the
    longest prefix of its prompt (``PrefixMemory.holder``), if any.

    1. the holder, if it is ready with a free slot;
    2. else the ready replica with the most free slots (a full one only when all are full:
       then the shortest queue), then the fewest requests, then the first;
    3. none ready: the first one coming up with the fewest waiting; none coming: the first
       replica (a request to an unloaded model loads it)."""
    if holder is not None and 0 <= holder < len(loads) and loads[holder].ready and loads[holder].free > 0:
        return holder
    ready = [i for i, x in enumerate(loads) if x.ready]
    if ready:
        return min(ready, key=lambda i: (-loads[i].free, loads[i].generating + loads[i].waiting, i))
    coming = [i for i, x in enumerate(loads) if x.coming]
    if coming:
        return min(coming, key=lambda i: (loads[i].waiting, i))
    return 0


class PrefixMemory:
    """Prefix hash -> the replica it was last sent to; bounded, least recently used out first."""

    def __init__(self, size: int = MEMORY_SIZE) -> None:
        self._size = size
        self._where: OrderedDict[int, int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._where)

    def holder(self, prefixes: Sequence[int]) -> int | None:
        """The replica that was sent the longest of ``prefixes`` (shortest first, as
        ``prefixes_of`` gives them), or None."""
        for h in reversed(prefixes):
            got = self._where.get(h)
            if got is not None:
                return got
        return None

    def sent(self, replica: int, prefixes: Sequence[int]) -> None:
        """``replica`` was sent a prompt with these prefixes: it holds them now. The first
        alone (one message, one block) only when it is the whole prompt: a shared system
        prompt is no reason for every conversation to go to one replica."""
        for h in prefixes[1:] or prefixes:
            self._where[h] = replica
            self._where.move_to_end(h)
        while len(self._where) > self._size:
            self._where.popitem(last=False)

    def forget(self, replica: int) -> None:
        """``replica``'s worker was replaced: its cache is empty."""
        for h in [h for h, r in self._where.items() if r == replica]:
            del self._where[h]


class _Prompt(msgspec.Struct):
    """The fields a prompt is read from (every other field is ignored here)."""

    messages: list[msgspec.Raw] | None = None  # chat completions, Anthropic messages
    input: list[msgspec.Raw] | str | None = None  # responses
    prompt: str | None = None  # completions


_decode_prompt = msgspec.json.Decoder(_Prompt).decode


def prefixes_of(body: bytes) -> tuple[int, ...]:
    """Hashes of the prompt's prefixes, shortest first: of 1, 2... whole messages (each
    message as its JSON text), or of 1, 2... blocks of a prompt string. Empty when the body
    has no prompt this can read (the request still goes to the least busy replica).
    Python's ``hash`` of bytes is salted per process: these never leave it."""
    try:
        got = _decode_prompt(body)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return ()
    items = got.messages if got.messages is not None else got.input if isinstance(got.input, list) else None
    out: list[int] = []
    h = 0
    if items is not None:
        for m in items:
            h = hash((h, bytes(m)))
            out.append(h)
    else:
        text = got.prompt if got.prompt is not None else got.input if isinstance(got.input, str) else None
        if text is None:
            return ()
        for start in range(0, len(text) - PROMPT_BLOCK + 1, PROMPT_BLOCK):
            h = hash((h, text[start:start + PROMPT_BLOCK]))
            out.append(h)
    return tuple(out[-MAX_BLOCKS:])

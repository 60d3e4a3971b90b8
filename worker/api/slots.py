"""llama-server's ``GET /slots``: what each generation slot is doing, in llama-server's shape
(paddler's agents poll it to route to the instance with idle slots).

Rules for this module:
- Read-only. The slots belong to the batch loop thread; this runs on the event loop and
  reads each slot once into locals (``slot.gen`` may turn None between two reads), never
  writes a field and takes no lock: a reading may be one step old, which is what
  llama-server's own answer is (a task posted to its loop) by the time a client reads it.
- The shape is llama-server's ``server_slot::to_json(only_metrics = true)`` (its default
  without ``--slots-debug``): ``id``, ``id_task``, ``n_ctx``, ``speculative``,
  ``is_processing``, and while a request runs ``params`` (the sampling subset we have)
  and ``next_token`` (a list of one object, as llama-server writes it).
  ``prompt``/``generated`` are debug fields llama-server leaves out by default; so do we.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from worker.engine.slots import Slot


def slot_json(slot: Slot, n_ctx: int) -> dict[str, Any]:
    gen = slot.gen  # one read: the loop thread may end the request meanwhile
    out: dict[str, Any] = {
        "id": slot.seq,
        # llama-server's task id; ours is the slot's admission number (-1: never used).
        "id_task": slot.admitted if slot.admitted else -1,
        "n_ctx": n_ctx,
        "speculative": slot.drafter.limit > 0,  # drafts from the context (engine/drafts.py)
        "is_processing": gen is not None,
    }
    if gen is None:
        return out
    p = gen.prepared
    s = p.sampling
    out["params"] = {
        "seed": 0xFFFFFFFF if s.seed is None else s.seed,  # LLAMA_DEFAULT_SEED, as llama-server shows it
        "temperature": s.temperature,
        "top_k": s.top_k,
        "top_p": s.top_p,
        "min_p": s.min_p,
        "typical_p": s.typical_p,
        "repeat_penalty": s.repeat_penalty,
        "presence_penalty": s.presence_penalty,
        "frequency_penalty": s.frequency_penalty,
        "max_tokens": p.max_tokens,
        "n_predict": p.max_tokens,
        "ignore_eos": s.ignore_eos,
        "n_probs": s.logprobs or 0,
    }
    done = gen.completion_tokens
    out["next_token"] = [{
        "has_next_token": not gen.done,
        "has_new_line": False,  # not tracked: the text is assembled by the request's handler
        "n_remain": max(0, p.max_tokens - done),
        "n_decoded": done,
    }]
    return out


def slots_json(slots: Sequence[Slot], n_ctx: int) -> list[dict[str, Any]]:
    return [slot_json(s, n_ctx) for s in list(slots)]


def active_kv_tokens(slots: Sequence[Slot]) -> int:
    """KV cells held by slots generating now (/health's ``kv_tokens_active``)."""
    return sum(len(s.tokens) for s in list(slots) if s.gen is not None)

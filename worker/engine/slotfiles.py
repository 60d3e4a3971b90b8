"""llama-server's slot files (``POST /slots/{id}?action=save|restore|erase``): a slot's
cached tokens and KV state written to a named file, read back into a slot, or dropped.

Rules for this module:
- Each action runs on the batch loop thread (``BatchLoop.chores``, ``SlotChores``), between steps and
  only on an idle slot: the loop owns the context, and a running request's cells are not
  to be touched. The HTTP side only names the slot, the action and the file.
- Files live in one directory (``<cache_dir>/slots``, created private); a file name is one
  path component of safe characters, never a path (a client cannot reach other files).
- The answers have llama-server's shapes (server-task.cpp, server_task_result_slot_*).
"""

from __future__ import annotations

import ctypes
import re
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import llama_cpp.llama_cpp as llama_lib

from worker.engine.prompt import InvalidInput
from worker.engine.saved import forget
from worker.engine.slots import Slot

T = TypeVar("T")
ACTIONS = ("save", "restore", "erase")
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


class SlotBusy(Exception):
    """The slot is generating: its cells are not to be saved over or replaced now."""


class SlotFileMissing(Exception):
    """A restore named a file that is not there (or not a state llama.cpp can read)."""


class SlotChores:
    """Work for the batch loop thread on one slot, queued by any thread: ``add`` gives a
    future, the loop calls ``run`` between steps (a slot that is generating fails its
    chore with SlotBusy) and ``fail_all`` when it stops. ``cond`` is the loop's condition:
    adding wakes the loop, which waits while nothing is pending (``bool(chores)``); woken
    for a chore alone it runs an empty step (nothing to plan, no decode) and then the chore."""

    def __init__(self, cond: threading.Condition, stopping: Callable[[], bool]) -> None:
        self._cond = cond
        self._stopping = stopping  # read under the loop's lock
        self._queue: deque[tuple[int, Callable[[Slot], Any], Future[Any]]] = deque()

    def __bool__(self) -> bool:
        return bool(self._queue)

    def add(self, seq: int, fn: Callable[[Slot], T]) -> Future[T]:
        """Run ``fn(slot)`` on the loop thread between steps. Once the loop is stopping the
        future fails at once instead of waiting for a loop that is gone."""
        fut: Future[T] = Future()
        with self._cond:
            if self._stopping():
                fut.set_exception(RuntimeError("the worker is stopping"))
            else:
                self._queue.append((seq, fn, fut))
                self._cond.notify()
        return fut

    def run(self, slots: list[Slot]) -> None:
        """On the loop thread only (every turn of the loop: nothing queued, no lock taken)."""
        if not self._queue:
            return
        with self._cond:
            chores, self._queue = self._queue, deque()
        for seq, fn, fut in chores:
            slot = slots[seq]
            if slot.gen is not None:
                fut.set_exception(SlotBusy(f"slot {seq} is generating; retry when it is idle"))
                continue
            try:
                fut.set_result(fn(slot))
            except Exception as e:
                fut.set_exception(e)

    def fail_all(self) -> None:
        with self._cond:
            chores, self._queue = self._queue, deque()
        for _, _, fut in chores:
            fut.set_exception(RuntimeError("the worker is stopping"))


def slot_file(directory: str, filename: str) -> Path:
    """The file's path in the slot directory; InvalidInput for a name that is not one safe
    path component (a separator, "..", a leading dot, control characters)."""
    if not directory:
        raise InvalidInput("slot files are off: the model has no cache_dir", "filename", code="unsupported")
    if not _NAME.fullmatch(filename) or ".." in filename:
        raise InvalidInput(
            "filename must be one file name of letters, digits, '.', '_' and '-' (at most 128, "
            "no leading dot, no '..'), never a path", "filename",
        )
    return Path(directory) / "slots" / filename


def save(ctx: Any, slot: Slot, path: Path) -> dict[str, Any]:
    t0 = time.monotonic()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tokens = (llama_lib.llama_token * max(1, len(slot.tokens)))(*slot.tokens)
    written = llama_lib.llama_state_seq_save_file(ctx, str(path).encode(), slot.seq, tokens, len(slot.tokens))
    if written == 0:
        raise OSError(f"llama.cpp could not write {path.name}")
    return {
        "id_slot": slot.seq, "filename": path.name, "n_saved": len(slot.tokens), "n_written": int(written),
        "timings": {"save_ms": round((time.monotonic() - t0) * 1000.0, 3)},
    }


def restore(ctx: Any, slot: Slot, path: Path, n_ctx: int) -> dict[str, Any]:
    """The slot's cache becomes the file's (what it held before is dropped first)."""
    if not path.is_file():
        raise SlotFileMissing(f"no slot file named {path.name!r}")
    t0 = time.monotonic()
    mem = llama_lib.llama_get_memory(ctx)
    forget(mem, slot)
    tokens = (llama_lib.llama_token * n_ctx)()
    n_out = ctypes.c_size_t(0)
    read = llama_lib.llama_state_seq_load_file(ctx, str(path).encode(), slot.seq, tokens, n_ctx, ctypes.byref(n_out))
    if read == 0:
        forget(mem, slot)  # a half-read state must not pass for a cached prompt
        raise SlotFileMissing(f"{path.name!r} is not a slot state this model can restore")
    slot.tokens[:] = tokens[: n_out.value]
    return {
        "id_slot": slot.seq, "filename": path.name, "n_restored": n_out.value, "n_read": int(read),
        "timings": {"restore_ms": round((time.monotonic() - t0) * 1000.0, 3)},
    }


def erase(ctx: Any, slot: Slot) -> dict[str, Any]:
    n = len(slot.tokens)
    forget(llama_lib.llama_get_memory(ctx), slot)
    return {"id_slot": slot.seq, "n_erased": n}

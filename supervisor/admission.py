"""Admission: which request may use a model's worker now, and the request counters.

Owns (and is the ONLY writer of, tests/test_architecture.py checks it): the request
counters of one model (in flight, waiting, served, ended), the generation slots in use on
each worker, the hold (new requests wait while the fleet drains the model to evict it), the
refusal (a removed model, a shutdown) and the time of the last request.
Reads: the manager's published view (``WorkerView``), never its fields.
Callers: the proxy (``enter``/``acquire``/``release``/``leave``/``count_served``), the
manager (``notify`` after each published view, ``refuse``, ``wait_gen_idle``), the fleet
(``hold``, ``hold_if_idle``, ``wait_served``, ``wait_workers_idle``, ``wait_idle_for``) and
the readers of counters (``/status``, ``/metrics``). All on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from supervisor.launches import NoRoom
from supervisor.states import PROCESS_STATES, WorkerState

if TYPE_CHECKING:
    from supervisor.worker_process import WorkerHandle, WorkerView


# A timer may fire this much before its time (the loop's clock resolution): a deadline
# that close counts as reached, or a wait would be re-armed for nothing, again and again.
_EARLY_S = 1e-3


class NotReady(Exception):
    """No ready worker within the caller's deadline, or the manager gave up."""

    def __init__(self, state: WorkerState, reason: str, retry_after_s: int) -> None:
        super().__init__(reason)
        self.state = state
        self.reason = reason
        self.retry_after_s = retry_after_s


class QueueFull(Exception):
    pass


class Moved(Exception):
    """The replica asked not to be waited for (``acquire(stay=False)``) has no ready worker:
    the request goes to another replica of its model (supervisor/router.py)."""


@dataclass
class _OnWorker:
    """Requests a worker generation has taken (``acquire``d, not yet ``release``d)."""

    in_flight: int = 0
    generating: int = 0  # of those, the ones holding a generation slot


class Admission:
    def __init__(
        self,
        view: Callable[[], WorkerView],
        load: Callable[[], asyncio.Future[None]],
        queue_size: Callable[[], int],
    ) -> None:
        self._view = view  # the manager's latest published view
        self._load = load  # asks the manager to load an unloaded model
        self._queue_size = queue_size  # read per request: SIGHUP may change it
        self._changed = asyncio.Event()
        self._on: dict[int, _OnWorker] = {}  # worker generation -> its requests
        self._held = False
        self._refusal: NoRoom | None = None  # refused first: waiting requests too
        self._closed: str | None = None  # shutting down: whoever cannot be served now is refused
        self.in_flight = 0  # requests in the supervisor for this model (waiting or answered)
        self.waiting = 0  # of those, waiting for a ready worker or a free slot
        self.served = 0  # answered by the worker
        self.ended = 0  # left, answered or not
        self.last_used = 0.0  # loop time of the end of the last request (or the start of one)

    # ---- wake-ups ----------------------------------------------------------------

    def notify(self) -> None:
        """Something changed (a published view, a release, the hold): every wait re-checks."""
        old = self._changed
        self._changed = asyncio.Event()
        old.set()

    async def _until(self, ok: Callable[[], bool], deadline: float | None) -> bool:
        """Wait until ``ok()`` (re-checked at every change) or ``deadline`` (loop time).
        True when ``ok()``."""
        loop = asyncio.get_running_loop()
        while not ok():
            left = None if deadline is None else deadline - loop.time()
            if left is not None and left <= _EARLY_S:
                return False
            waiter = asyncio.ensure_future(self._changed.wait())
            try:
                await asyncio.wait({waiter}, timeout=left)
            finally:
                waiter.cancel()
        return True

    # ---- the proxy -----------------------------------------------------------------

    def enter(self) -> None:
        """A request for this model arrived (counted until ``leave``)."""
        self.in_flight += 1

    def leave(self) -> None:
        self.in_flight -= 1
        self.ended += 1
        self.notify()

    def count_served(self) -> None:
        self.served += 1

    @property
    def active(self) -> int:
        """Requests the worker(s) answer now (taken by ``acquire``, not yet released)."""
        return sum(o.in_flight for o in self._on.values())

    @property
    def generating(self) -> int:
        """Requests holding a generation slot now (every worker generation: a reload's old
        worker finishing its answers included): what a scheduler calls "running"."""
        return sum(o.generating for o in self._on.values())

    def in_worker_slots(self, gen: int) -> int:
        """Requests holding a generation slot of worker generation ``gen``."""
        o = self._on.get(gen)
        return 0 if o is None else o.generating

    def in_worker(self, gen: int) -> int:
        o = self._on.get(gen)
        return 0 if o is None else o.in_flight

    async def acquire(
        self, timeout_s: float, not_gen: int | None = None, *, slot: bool = True, stay: bool = True
    ) -> WorkerHandle:
        """Wait (bounded) for a ready worker; ``not_gen`` skips a generation known dead.
        ``stay=False`` (another replica of the model is ready): ``Moved`` instead of waiting
        for a worker that is not ready (it died, or is unloaded); waiting for a slot is fine.

        One admission limit for everything waiting: a request that needs a generation
        ``slot`` waits here (not inside the worker) until the worker has a free one, and
        at most ``admission.queue_size`` requests wait, whatever they wait for. Requests
        being generated are not counted. The caller must ``release`` the handle.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        queued = False
        load: asyncio.Future[None] | None = None
        try:
            while True:
                v = self._view()
                h = v.handle
                if self._refusal is not None:
                    raise NotReady(v.state, self._refusal.reason, self._refusal.retry_after_s)
                if not stay and (v.state is not WorkerState.READY or h is None or h.gen == not_gen):
                    raise Moved()
                if load is not None and load.done() and not load.cancelled():
                    e = load.exception()
                    if isinstance(e, NoRoom):
                        raise NotReady(v.state, e.reason, e.retry_after_s)
                if v.state is WorkerState.UNLOADED and (load is None or load.done()):
                    # A request for an unloaded model (or one evicted while it waited) loads it.
                    load = self._load()
                if v.state is WorkerState.READY and h is not None and h.gen != not_gen and not self._held:
                    on = self._on.setdefault(h.gen, _OnWorker())
                    # A newcomer does not overtake requests already waiting for a slot.
                    if not slot or (on.generating < h.slots and (queued or self.waiting == 0)):
                        on.in_flight += 1
                        self.last_used = loop.time()
                        if slot:
                            on.generating += 1
                            if queued and on.generating < h.slots:
                                self.notify()  # more free slots: the next in line re-checks
                        return h
                now = loop.time()
                if v.state is WorkerState.FAILED:
                    raise NotReady(v.state, v.reason, 30)
                if self._closed is not None:
                    raise NotReady(v.state, self._closed, 5)
                if v.crash_loop:
                    # The next attempt will likely fail like the last ones: answer at once and
                    # say when it comes, rather than hold the request and a queue slot for it.
                    raise NotReady(v.state, v.reason_at(now), v.retry_after_s(now))
                if not queued:
                    if self.waiting >= self._queue_size():
                        raise QueueFull()
                    queued = True
                    self.waiting += 1
                remaining = deadline - now
                if remaining <= 0:
                    if v.state is WorkerState.READY and h is not None and h.gen != not_gen:
                        on = self._on.get(h.gen, _OnWorker())
                        raise NotReady(
                            v.state,
                            f"worker pid {h.pid} stayed busy ({on.generating} of {h.slots} generation slot(s)) "
                            f"for {timeout_s:g}s",
                            5,
                        )
                    raise NotReady(
                        v.state,
                        f"no worker became ready within {timeout_s:g}s (state {v.state.value}: {v.reason_at(now)})",
                        v.retry_after_s(now),
                    )
                changed = self._changed
                others = () if load is None else (load,)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(_first(changed, *others), remaining)
        finally:
            if queued:
                self.waiting -= 1

    def release(self, handle: WorkerHandle, *, slot: bool = True) -> None:
        """The request that ``acquire`` returned ``handle`` to is done with it."""
        on = self._on[handle.gen]
        on.in_flight -= 1
        if slot:
            on.generating -= 1
        if on.in_flight == 0:
            del self._on[handle.gen]
        # Idle since the END of its last request: a 10-minute stream is not 10 minutes idle
        # to the idle TTL and the least-recently-used eviction.
        self.last_used = asyncio.get_running_loop().time()
        # Wakes a request waiting for the slot, and a drain waiting for the worker.
        self.notify()

    def is_current(self, handle: WorkerHandle) -> bool:
        """True while ``handle`` is the ready worker: the owner has not seen it die or
        replaced it, so a refused connection to it is worth trying again."""
        v = self._view()
        return v.handle is handle and v.state is WorkerState.READY

    # ---- the manager -------------------------------------------------------------------

    def refuse(self, reason: str, retry_after_s: int = 5) -> None:
        """From now on every request (waiting or new) is answered 503 ``reason`` at once:
        the model was removed, or the server is shutting down."""
        self._refusal = NoRoom(reason, retry_after_s)
        self.notify()

    def close(self, reason: str) -> None:
        """Shutting down: a request that cannot be served at once is answered ``reason``."""
        self._closed = reason
        self.notify()

    async def wait_gen_idle(self, gen: int) -> None:
        """Until worker generation ``gen`` answers no request (a reload's drain)."""
        await self._until(lambda: self.in_worker(gen) == 0, None)

    # ---- the fleet -----------------------------------------------------------------------

    def hold(self, on: bool) -> None:
        """While on, new requests wait (the fleet is draining this model to evict it)."""
        self._held = on
        self.notify()

    @property
    def held(self) -> bool:
        """Being drained to be evicted (``hold``)."""
        return self._held

    def hold_if_idle(self) -> bool:
        """Hold new requests if none is here now, in one step (no await between the check
        and the hold: a request cannot slip in between). False, and no hold, if busy."""
        if self.in_flight > 0:
            return False
        self.hold(True)
        return True

    async def wait_served(self, deadline: float) -> bool:
        """Until the requests here when its worker was ready have left (a load in progress
        completes and serves the requests waiting for it first). False at ``deadline``."""
        target: list[int] = []

        def served() -> bool:
            v = self._view()
            if v.state not in PROCESS_STATES:
                return True
            if not target and v.state is WorkerState.READY:
                # Every request here now has left (answered, failed or gone) once ``ended``
                # reaches this: ``served`` alone would wait forever for one that failed.
                target.append(self.ended + self.in_flight)
            return bool(target) and (self.ended >= target[0] or self.in_flight == 0)

        return await self._until(served, deadline)

    async def wait_workers_idle(self, deadline: float) -> bool:
        """Until no worker answers a request (or none runs). False at ``deadline``."""
        return await self._until(lambda: self._view().state not in PROCESS_STATES or self.active == 0, deadline)

    async def wait_no_requests(self, deadline: float) -> bool:
        """Until no request is here (shutdown's grace period). False at ``deadline``."""
        return await self._until(lambda: self.in_flight == 0, deadline)

    async def wait_idle_for(self, seconds: float, since: float) -> None:
        """Until no request has been here for ``seconds`` (counted from the last request's
        end, or ``since`` if later): the idle TTL."""
        loop = asyncio.get_running_loop()
        while True:
            if self.in_flight == 0:
                left = max(self.last_used, since) + seconds - loop.time()
                if left <= _EARLY_S:
                    return
                await self._until(lambda: self.in_flight > 0, loop.time() + left)
            else:
                await self._until(lambda: self.in_flight == 0, None)


async def _first(*futures: asyncio.Event | asyncio.Future[None]) -> None:
    """Returns when the event is set or one of the futures is done."""
    waits = [asyncio.ensure_future(f.wait()) if isinstance(f, asyncio.Event) else f for f in futures]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w, f in zip(waits, futures):
            if isinstance(f, asyncio.Event):
                w.cancel()


"""Several models: route each /v1 request to its model's proxy by the request's "model".

Rules of this module:
- OpenAI semantics: the JSON body's ``model`` picks the model, else the query's ``model``
  (llama-server's router mode: ``GET /props?model=ID``); no ``model`` (e.g. a plain GET) goes
  to the first model of the list; an unknown id is a 404 ``model_not_found`` in OpenAI's
  error shape, answered without touching any worker.
- ``GET /v1/models`` is answered here (``ModelCards``), with one model as with several: the
  supervisor knows every configured model, loaded or not, and where it is, so the list
  answers at once, while a worker loads or restarts too (``state`` says so), without a
  round trip to a worker. A card is the worker's own (id: the alias or file stem; OpenAI's
  fields) plus where the model is.
- A request for a model that is not loaded asks for it to be loaded and then waits like
  any request waiting for a worker (admission.wait_timeout_s, admission.queue_size).
- One model is a fleet of one, routed by the same rule: a name that is not configured goes
  to the fleet's ``fallback`` model (the only one, when there is one; none with several),
  except a name SIGHUP removed (``removed_ids``): that stays a 404, not a silent stand-in.
  The model list may change on SIGHUP (supervisor/fleet.py), so every request asks the
  fleet which models there are now.
- Replicas (``Dispatch``): the pure ``replicas.choose`` picks a model's replica from each
  one's published view and admission (least busy, conversation affinity from the
  ``PrefixMemory`` of what was sent where). The model's queue bound and wait are the
  model's: a request is refused 429 when as many wait across its replicas as
  admission.queue_size, and it keeps the one deadline whichever replica it ends up on. While
  another replica is ready, a request whose replica dies before answering goes there
  instead of waiting for a restart. One replica is the same path with one choice.
"""

from __future__ import annotations

import asyncio
import time
from typing import NamedTuple

import msgspec
from aiohttp import web

from supervisor.access_log import record
from supervisor.fleet import Fleet
from supervisor.proxy import Elsewhere, Proxy, openai_error, queue_full
from supervisor.replicas import PrefixMemory, ReplicaLoad, choose, prefixes_of
from supervisor.routes import worker_path
from supervisor.states import PROCESS_STATES, WorkerState
from supervisor.worker_process import WorkerManager
from worker.protocol import MAX_BODY_BYTES

# Bodies are read whole to find "model"; larger ones are refused before reading (the
# worker's own limit, LaunchSpec.max_body_bytes, is the same by default).
MAX_BODY = MAX_BODY_BYTES


class _ModelField(msgspec.Struct):
    model: str | None = None  # every other field is ignored here


_decode_model = msgspec.json.Decoder(_ModelField).decode


def model_not_found(mid: str) -> web.Response:
    return openai_error(
        404, f"The model '{mid}' does not exist", type_="invalid_request_error", code="model_not_found"
    )


class Router:
    """The handler of every proxied route: the API under /v1, its root aliases (proxied to
    the /v1 path: supervisor/routes.py) and llama-server's native root endpoints."""

    def __init__(self, fleet: Fleet, body_timeout_s: float) -> None:
        self._fleet = fleet
        self._body_timeout_s = body_timeout_s
        # (model, replica index) -> (its manager, the proxy to it); a model added by SIGHUP gets
        # one when first asked for, one removed loses it then.
        self._proxies: dict[tuple[str, int], tuple[WorkerManager, Proxy]] = {}
        # model -> what was sent to which replica, and each replica's worker generation then
        self._memory: dict[str, tuple[PrefixMemory, list[int]]] = {}

    def proxy(self, mid: str, replica: int = 0) -> Proxy:
        """The proxy to replica ``replica`` of model ``mid`` now (which must exist)."""
        mgr = self._fleet.replicas(mid)[replica]
        got = self._proxies.get((mid, replica))
        if got is None or got[0] is not mgr:
            if len(self._proxies) > len(self._fleet.workers):
                for gone in [k for k in self._proxies if k[0] not in self._fleet.managers]:
                    del self._proxies[gone]
            prep = self._fleet.preparers[mid]
            got = (mgr, Proxy(mgr, lambda: prep.config.admission.wait_timeout_s, self._body_timeout_s))
            self._proxies[(mid, replica)] = got
        return got[1]

    async def expect_handler(self, request: web.Request) -> web.StreamResponse | None:
        return await self.proxy(self._fleet.first).expect_handler(request)

    def _memory_of(self, mid: str, reps: list[WorkerManager]) -> PrefixMemory:
        """The model's prefix memory, less what replicas whose worker was replaced held."""
        got = self._memory.get(mid)
        if got is None or len(got[1]) != len(reps):
            got = self._memory[mid] = (PrefixMemory(), [m.view.gen for m in reps])
        memory, gens = got
        for i, m in enumerate(reps):
            if m.view.gen != gens[i]:
                memory.forget(i)
                gens[i] = m.view.gen
        return memory

    async def dispatch(
        self, mid: str, request: web.Request, raw: bytes | None, upstream: str | None
    ) -> web.StreamResponse:
        """Send the request to a replica of ``mid`` (``replicas.choose``), and to another
        one if that one has no ready worker by the time it is its turn."""
        reps = self._fleet.replicas(mid)
        prep = self._fleet.preparers[mid]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + prep.config.admission.wait_timeout_s
        # One replica: the same path, one choice (and no prompt to hash).
        prefixes = prefixes_of(raw) if raw and request.method == "POST" and len(reps) > 1 else ()
        memory = self._memory_of(mid, reps)
        gone: set[int] = set()
        resent = False
        while True:
            loads = [_load(m) if i not in gone else ReplicaLoad(False) for i, m in enumerate(reps)]
            i = choose(loads, memory.holder(prefixes))
            if loads[i].free <= 0 and sum(x.waiting for x in loads) >= prep.config.admission.queue_size:
                return queue_full()  # the model's queue bound, across its replicas
            stay = not any(x.ready for j, x in enumerate(loads) if j != i)
            memory.sent(i, prefixes)
            got = await self.proxy(mid, i).handle(
                request, prebody=raw, upstream_path=upstream, deadline=deadline, stay=stay, resent=resent
            )
            if not isinstance(got, Elsewhere):
                return got
            resent = resent or got.resent
            gone.add(i)

    async def _read_body(self, request: web.Request) -> bytes:
        """The whole body, at most MAX_BODY bytes (ValueError beyond), with no gap between
        two reads longer than server.body_timeout_s (asyncio.TimeoutError)."""
        parts: list[bytes] = []
        size = 0
        while True:
            chunk = await asyncio.wait_for(request.content.readany(), self._body_timeout_s)
            if not chunk:
                return b"".join(parts)
            size += len(chunk)
            if size > MAX_BODY:
                raise ValueError(size)
            parts.append(chunk)

    def model_for(self, named: str | None) -> str:
        """The model a request goes to: the one it names, the first without a name; a name
        that is not configured goes to the fallback (one model serves any name), except one
        that SIGHUP removed. The caller answers 404 when the result is not in ``ids``."""
        fleet = self._fleet
        mid = named or fleet.first
        if mid not in fleet.ids and mid not in fleet.removed_ids and fleet.fallback is not None:
            return fleet.fallback
        return mid

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw: bytes | None = None
        named: str | None = None
        if request.body_exists:
            length = request.content_length
            if length is not None and length > MAX_BODY:
                return openai_error(
                    413,
                    f"the request body ({length} bytes) is larger than the {MAX_BODY} bytes accepted",
                    type_="invalid_request_error",
                    code="request_too_large",
                )
            try:
                raw = await self._read_body(request)
            except ValueError:
                return openai_error(
                    413,
                    f"the request body is larger than the {MAX_BODY} bytes accepted",
                    type_="invalid_request_error",
                    code="request_too_large",
                )
            except asyncio.TimeoutError:
                resp = openai_error(
                    408,
                    f"the request body did not arrive within {self._body_timeout_s:g}s",
                    type_="invalid_request_error",
                    code="request_timeout",
                )
                resp.force_close()
                return resp
            try:
                named = _decode_model(raw).model
            except (msgspec.DecodeError, msgspec.ValidationError):
                named = None  # not JSON, or "model" not a string: the worker explains
        if named is None:
            # A request whose body names no model (a GET has none) may name it in the query, as
            # llama-server's router mode asks (GET /props?model=ID); passed on as it came.
            named = request.query.get("model") or None
        mid = self.model_for(named)
        if mid not in self._fleet.ids:
            return model_not_found(mid)
        record(request).model = mid
        # A no-op when loaded; otherwise the request waits for the load (and a request clears
        # an earlier "no room" refusal, which would otherwise answer 503 until an operator's load).
        self._fleet.load(mid)
        upstream = worker_path(request.path)
        return await self.dispatch(mid, request, raw, None if upstream == request.path else upstream)


def _load(mgr: WorkerManager) -> ReplicaLoad:
    """A replica's load, from its published view and its admission's counters. A replica
    being drained to be evicted is neither ready nor coming: it finishes the requests it
    has, and a new one sent there would wait for them and for the eviction before going to
    another replica; when every replica is drained, the request waits for the first one (if
    it loads the model again, the model comes back whole)."""
    v = mgr.view
    h = v.handle
    adm = mgr.admission
    if adm.held:
        return ReplicaLoad(False, waiting=adm.waiting)
    if v.state is WorkerState.READY and h is not None:
        return ReplicaLoad(True, slots=h.slots, generating=adm.in_worker_slots(h.gen), waiting=adm.waiting)
    return ReplicaLoad(False, coming=v.state in PROCESS_STATES, waiting=adm.waiting)


class ModelCards:
    """GET /v1/models and GET /v1/models/{id}, from the fleet's state: no worker, no NVML.

    A card is made from its model's facts alone (``_facts``); the encoded list is kept until
    the facts change, so a repeated GET encodes nothing (supervisor/fastpath.py answers it in
    microseconds)."""

    def __init__(self, fleet: Fleet) -> None:
        self._fleet = fleet
        self._created = int(time.time())
        self._facts_now: tuple[_Facts, ...] | None = None
        self._cards: list[dict[str, object]] = []
        self._list = b""

    async def model(self, request: web.Request) -> web.Response:
        """GET /v1/models/{id}: one card, or 404 model_not_found."""
        mid = request.match_info["id"]
        body = self.card_body(mid)
        if body is None:
            return model_not_found(mid)
        return web.Response(body=body, content_type="application/json")

    async def models(self, request: web.Request) -> web.Response:
        return web.Response(body=self.list_body(), content_type="application/json")

    # The bodies, shared with supervisor/fastpath.py (which answers the same GETs before aiohttp).
    def list_body(self) -> bytes:
        facts = self._facts()
        if facts != self._facts_now:
            self._cards = [self._card(f) for f in facts]
            self._list = msgspec.json.encode({"object": "list", "data": self._cards})
            self._facts_now = facts
        return self._list

    def card_body(self, mid: str) -> bytes | None:
        """Model ``mid``'s card; None if there is no such model."""
        self.list_body()
        card = next((c for c in self._cards if c["id"] == mid), None)
        return None if card is None else msgspec.json.encode(card)

    def _facts(self) -> tuple[_Facts, ...]:
        """Everything the cards say, per servable model (a model removed by SIGHUP and
        finishing its requests is not servable any more), in the fleet's order."""
        fleet = self._fleet
        return tuple(
            _Facts(mid, fleet.managers[mid].state, fleet.entry(mid).pinned, *fleet.footprint(mid), self._replicas(mid))
            for mid in fleet.ids
        )

    def _replicas(self, mid: str) -> tuple[tuple[WorkerState, tuple[str, ...]], ...]:
        """Each replica's state and GPUs, when the model has several; () with one."""
        fleet = self._fleet
        keys = [mid, *fleet.extras.get(mid, ())]
        if len(keys) < 2:
            return ()
        out = []
        for key in keys:
            state = fleet.workers[key].state
            planned, measured = fleet.footprint(key) if state in PROCESS_STATES else ({}, {})
            out.append((state, tuple(sorted(set(planned) | set(measured)))))
        return tuple(out)

    def _card(self, f: _Facts) -> dict[str, object]:
        # Where a model is: only while it has a worker process.
        planned, measured = (f.planned_mib, f.measured_mib) if f.state in PROCESS_STATES else ({}, {})
        return {
            "id": f.id,  # the worker's id: the alias or the file stem, or the [[models]] id
            "object": "model",
            "created": self._created,
            "owned_by": "vram-llm",
            # Beyond OpenAI's shape: where the model is and what it holds.
            "loaded": f.state is WorkerState.READY or any(s is WorkerState.READY for s, _ in f.replicas),
            "state": f.state.value,  # an unloaded model is "unloaded", a state of its own
            "gpus": sorted(set(measured) | set(planned)),
            "mib": sum((measured or planned).values()),
            "pinned": f.pinned,
            **({"replicas": [{"replica": n, "state": s.value, "loaded": s is WorkerState.READY, "gpus": list(g)}
                             for n, (s, g) in enumerate(f.replicas, 1)]} if f.replicas else {}),
        }


class _Facts(NamedTuple):
    """One model's card, before it is a card: compared to know whether the cards changed."""

    id: str
    state: WorkerState
    pinned: bool
    planned_mib: dict[str, int]  # GPU UUID -> MiB (fleet.footprint: copies, compared by value)
    measured_mib: dict[str, int]
    replicas: tuple[tuple[WorkerState, tuple[str, ...]], ...]  # (state, GPU UUIDs) of each, with several

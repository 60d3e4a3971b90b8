"""Forward /v1/* to the ready worker over its Unix socket.

Rules of this module:
- One long-lived aiohttp ClientSession per worker generation (owned by the
  WorkerManager), never one per request.
- Bodies stream in both directions. A request body is forwarded chunk by chunk while a
  bounded copy is kept, so that a request whose worker died before answering can be
  sent again to the next worker ("a crash between requests loses none of them").
- A response, once started, is never retried: if the worker dies mid-stream an SSE
  client gets one final error event and a clean end.
- Requests wait for a ready worker and a free generation slot (bounded by
  admission.wait_timeout_s and admission.queue_size) in the model's admission
  (supervisor/admission.py), which alone counts them; the manager decides when one is
  ready. A refused connection to a worker the manager still calls ready is retried
  against that worker with a short backoff, not sent to wait for the next worker.
- One Proxy per replica of a model (supervisor/router.py chooses the replica). While
  another replica is ready (``stay=False``), a request whose worker is gone before it
  answered comes back ``Elsewhere`` instead of waiting for this replica's next worker; the
  resend rule holds across replicas (``resent`` travels with it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import msgspec
from aiohttp import web

from supervisor.access_log import record
from supervisor.admission import Moved
from supervisor.http_guard import RateLimitedLog
from supervisor.worker_process import NotReady, QueueFull, WorkerHandle, WorkerManager
from worker.protocol import has_usage_trailer, split_usage_trailer

log = logging.getLogger("vram_llm.proxy")
# Refusals (413/429/503) come in floods when clients ignore Retry-After (a crash loop, a full
# queue): the access log has one line per request already; these say why, rate-limited.
_refusals = RateLimitedLog(log)

# RFC 9110 7.6.1 hop-by-hop headers, plus those aiohttp sets itself for each leg.
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
        # Credentials for the supervisor (supervisor/auth.py): the worker never sees them.
        "Authorization",
        "X-Api-Key",
    )
)

# A request body up to this size can be replayed to a new worker after a crash.
REPLAY_LIMIT = 1 << 20
# A connection refused by a worker that is still ready is tried again after this delay,
# doubling up to RETRY_MAX_S (bounded by the request's wait_timeout_s).
RETRY_FIRST_S = 0.02
RETRY_MAX_S = 0.5
# A non-streamed answer up to this size is relayed in one piece.
SMALL_BODY = 256 * 1024


class Elsewhere:
    """The answer of ``Proxy.handle(stay=False)`` when its replica has no ready worker: the
    request was not answered and goes to another replica. ``resent``: it was sent to a
    worker that died with it (the resend rule holds across replicas too)."""

    def __init__(self, resent: bool) -> None:
        self.resent = resent


def queue_full() -> web.Response:
    return openai_error(
        429,
        "too many requests are waiting for the worker; retry later",
        type_="rate_limit_error",
        code="queue_full",
        retry_after=1,
    )


def openai_error(status: int, message: str, *, type_: str, code: str | None, retry_after: int | None = None) -> web.Response:
    body = msgspec.json.encode({"error": {"message": message, "type": type_, "param": None, "code": code}})
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


class _ReplayableBody:
    """Streams the client's body once and remembers it (bounded) for a resend."""

    def __init__(self, content: aiohttp.StreamReader, limit: int, read_timeout_s: float) -> None:
        self._content = content
        self._limit = limit
        self._read_timeout_s = read_timeout_s
        self._seen: list[bytes] = []
        self._seen_bytes = 0
        self.replayable = True
        self.timed_out = False  # the client stopped sending its body (server.body_timeout_s)

    def prime(self, data: bytes) -> None:
        """The body was read already: replay ``data`` (the client's stream is at its end)."""
        self._seen = [data]
        self._seen_bytes = len(data)

    async def stream(self) -> AsyncIterator[bytes]:
        for chunk in self._seen:
            yield chunk
        while True:
            try:
                # Like nginx's client_body_timeout: the limit is between two reads.
                chunk = await asyncio.wait_for(self._content.readany(), self._read_timeout_s)
            except asyncio.TimeoutError:
                self.timed_out = True
                raise
            if not chunk:
                return
            if self.replayable:
                self._seen_bytes += len(chunk)
                if self._seen_bytes > self._limit:
                    self.replayable = False
                    self._seen.clear()
                else:
                    self._seen.append(chunk)
            yield chunk


def _forward_headers(headers: aiohttp.typedefs.LooseHeaders) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}  # type: ignore[union-attr]


class Proxy:
    def __init__(
        self, manager: WorkerManager, wait_timeout_s: Callable[[], float], body_timeout_s: float = 60.0
    ) -> None:
        self._mgr = manager
        self._wait_timeout_s = wait_timeout_s  # read per request: SIGHUP may change it
        self._body_timeout_s = body_timeout_s

    async def handle(
        self,
        request: web.Request,
        prebody: bytes | None = None,
        upstream_path: str | None = None,
        *,
        deadline: float | None = None,
        stay: bool = True,
        resent: bool = False,
    ) -> web.StreamResponse | Elsewhere:
        """Forward one request; ``prebody``: its body, already read (by the router, to find
        the model it names), replayed instead of read from the client; ``upstream_path``:
        the worker's path for it when not the request's own (a root alias of a /v1 route,
        supervisor/routes.py), the query string kept. The router's replica choice:
        ``deadline`` (loop time) of its wait, the model's; ``stay=False``: another replica
        is ready, so ``Elsewhere`` rather than wait for this one's next worker; ``resent``:
        a worker died with it already."""
        adm = self._mgr.admission
        rec = record(request)
        rid = rec.request_id
        too_big = self._too_big(request)
        if too_big is not None:
            _refusals.warning("%s %s %s: 413, %s", rid, request.method, request.path, too_big.text)
            return too_big
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + self._wait_timeout_s()
        body = (
            _ReplayableBody(request.content, REPLAY_LIMIT, self._body_timeout_s) if request.body_exists else None
        )
        if body is not None and prebody is not None:
            body = _ReplayableBody(request.content, max(REPLAY_LIMIT, len(prebody)), self._body_timeout_s)
            body.prime(prebody)
        headers = _forward_headers(request.headers)
        headers["X-Request-Id"] = rid
        target = request.path_qs
        if upstream_path is not None:
            query = request.rel_url.raw_query_string
            target = upstream_path + ("?" + query if query else "")
        # Generation requests (POST) take one of the worker's generation slots; the model
        # list and other reads only need a ready worker.
        slot = request.method == "POST"
        not_gen: int | None = None
        handle: WorkerHandle | None = None
        retries = 0
        adm.enter()
        try:
            while True:
                if handle is not None and not adm.is_current(handle):
                    # The worker being retried died or was replaced meanwhile (its owner
                    # saw it): wait for the next one instead.
                    not_gen = handle.gen
                    adm.release(handle, slot=slot)
                    handle = None
                try:
                    if handle is None:
                        handle = await adm.acquire(max(0.0, deadline - loop.time()), not_gen, slot=slot, stay=stay)
                except Moved:
                    return Elsewhere(resent)
                except QueueFull:
                    _refusals.warning("%s %s %s: 429, too many requests waiting for the worker", rid, request.method, request.path)
                    return queue_full()
                except NotReady as e:
                    _refusals.warning("%s %s %s: 503, %s", rid, request.method, request.path, e.reason)
                    return openai_error(
                        503,
                        f"the model worker is not available (state {e.state.value}): {e.reason}",
                        type_="server_error",
                        code="worker_unavailable",
                        retry_after=e.retry_after_s,
                    )
                rec.worker_taken(time.monotonic())
                try:
                    upstream = await handle.session.request(
                        request.method,
                        "http://worker" + target,
                        headers=headers,
                        data=None if body is None else body.stream(),
                        allow_redirects=False,
                    )
                except (aiohttp.ClientConnectionError, asyncio.TimeoutError) as e:
                    if body is not None and body.timed_out:
                        log.warning(
                            "%s %s %s: 408, the client sent no body data for %gs",
                            rid, request.method, request.path, self._body_timeout_s,
                        )
                        resp = openai_error(
                            408,
                            f"the request body did not arrive: nothing received for {self._body_timeout_s:g}s",
                            type_="invalid_request_error",
                            code="request_timeout",
                        )
                        resp.force_close()
                        return resp
                    # The worker died or is dying before it answered: nothing was
                    # returned to the client yet, so send the request to the next worker.
                    # A refused connection never reached the worker and is always resent;
                    # a request that was sent and then lost its worker is resent once
                    # only, so a request that kills workers cannot kill them all.
                    refused = isinstance(e, aiohttp.ClientConnectorError)
                    if (
                        (refused or not resent)
                        and (body is None or body.replayable)
                        and loop.time() < deadline
                    ):
                        resent = resent or not refused
                        if adm.is_current(handle):
                            # The owner has not seen this worker die: a full listen backlog
                            # (a paused or busy worker) or a reset. Try the same worker again
                            # shortly; waiting for a next worker that never comes would park
                            # the request until wait_timeout_s (issue 13).
                            retries += 1
                            delay = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** (retries - 1), max(0.0, deadline - loop.time()))
                            if retries == 1:
                                log.warning(
                                    "%s: worker pid %d did not take the request (%s); trying it again",
                                    rid,
                                    handle.pid,
                                    e.__class__.__name__,
                                )
                            await asyncio.sleep(delay)
                            continue
                        log.warning(
                            "%s: worker pid %d did not answer (%s); %s",
                            rid,
                            handle.pid,
                            e.__class__.__name__,
                            "waiting for the next worker" if stay else "sending it to another replica",
                        )
                        not_gen = handle.gen
                        adm.release(handle, slot=slot)
                        handle = None
                        if not stay:
                            return Elsewhere(resent)
                        continue
                    return openai_error(
                        502,
                        f"the model worker failed before answering: {e.__class__.__name__}",
                        type_="server_error",
                        code="worker_failed",
                    )
                break
            return await self._relay(request, upstream, rid, handle.pid)
        finally:
            if handle is not None:
                adm.release(handle, slot=slot)
            adm.leave()

    def _too_big(self, request: web.Request) -> web.Response | None:
        """A 413 for a body announced larger than the worker accepts, before reading it."""
        launch = self._mgr.launch
        length = request.content_length
        if launch is None or length is None or length <= launch.spec.max_body_bytes:
            return None
        return openai_error(
            413,
            f"the request body ({length} bytes) is larger than the {launch.spec.max_body_bytes} bytes accepted",
            type_="invalid_request_error",
            code="request_too_large",
        )

    async def expect_handler(self, request: web.Request) -> web.StreamResponse | None:
        """``Expect: 100-continue``: refuse a too large body at once instead of inviting it."""
        too_big = self._too_big(request)
        if too_big is not None:
            return too_big
        # The rest is aiohttp's default expect handler.
        expect = request.headers.get("Expect", "")
        if request.version == aiohttp.HttpVersion11:
            if expect.lower() != "100-continue":
                raise web.HTTPExpectationFailed(text=f"Unknown Expect: {expect}")
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            request.writer.output_size = 0  # the response proper has not started
        return None

    async def _relay(
        self, request: web.Request, upstream: aiohttp.ClientResponse, rid: str, pid: int
    ) -> web.StreamResponse:
        completed = False
        try:
            if upstream.status >= 500 and upstream.content_type not in ("application/json", "text/event-stream"):
                # Not an answer of the worker's API (e.g. aiohttp's plain-text 500 from a
                # worker being stopped): give the client an OpenAI-shaped error instead.
                text = (await upstream.content.read(200)).decode("utf-8", "replace").splitlines()
                log.error("%s: worker pid %d answered %d: %s", rid, pid, upstream.status, text[:1])
                return openai_error(
                    502,
                    f"the model worker failed (HTTP {upstream.status})",
                    type_="server_error",
                    code="worker_failed",
                )
            headers = _forward_headers(upstream.headers)
            is_sse = upstream.content_type == "text/event-stream"
            length = upstream.content_length
            if not is_sse and length is not None and length <= SMALL_BODY:
                # A small answer of known size (the model list, a non-streamed completion):
                # read it whole and answer in one write, the fewest awaits on the hot path.
                try:
                    body = await upstream.read()
                except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as e:
                    log.error("%s: worker pid %d failed mid-response (%s)", rid, pid, e.__class__.__name__)
                    return openai_error(
                        502, "the model worker failed while answering", type_="server_error", code="worker_failed"
                    )
                completed = True
                self._mgr.admission.count_served()
                record(request).body_usage(body)
                return web.Response(status=upstream.status, reason=upstream.reason, body=body, headers=headers)
            resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            resp.headers.update(headers)
            if is_sse:
                resp.headers["X-Accel-Buffering"] = "no"
                resp.headers["Cache-Control"] = "no-cache"
            elif upstream.content_length is not None:
                resp.content_length = upstream.content_length
            await resp.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    if has_usage_trailer(chunk):  # the last one: cut the worker's usage trailer out
                        chunk, usage = split_usage_trailer(chunk)
                        rec = record(request)
                        rec.stream_usage(usage)
                        await resp.write(chunk)
                        rec.answered = resp.status
                        continue
                    await resp.write(chunk)
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as e:
                log.error("%s: worker pid %d failed mid-response (%s)", rid, pid, e.__class__.__name__)
                if is_sse:
                    err = msgspec.json.encode(
                        {
                            "error": {
                                "message": "the model worker failed during generation; the request can be retried",
                                "type": "server_error",
                                "param": None,
                                "code": "worker_failed",
                            }
                        }
                    )
                    await resp.write(b"data: " + err + b"\n\n")
                    await resp.write_eof()
                    completed = True
                # A non-streamed body cannot be mended: the client sees it cut short.
                return resp
            await resp.write_eof()
            completed = True
            self._mgr.admission.count_served()
            return resp
        finally:
            if completed:
                upstream.release()
            else:
                # Client gone (handler cancelled) or error: closing the upstream
                # connection is what tells the worker to stop generating.
                upstream.close()

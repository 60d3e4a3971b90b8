"""GET /v1/models answered at the connection, before aiohttp's request machinery (issue 12).

Why it exists: issue 12 asks that ``GET /v1/models`` be no slower than llama-server's (p50).
On CPython 3.11 aiohttp spends more per request on its own machinery (a task, a Request,
the middleware chain) than llama-server takes for the whole answer, so the plain form of
this one request is answered straight from the connection's ``data_received``.

Rules of this module:
- Every accepted connection's aiohttp protocol (``web.RequestHandler``) is wrapped by a
  ``FastConnection`` (``ConnectionGuard.factory``'s ``wrap``), which forwards every protocol
  call to it.
- A connection is *fast* only while everything it has sent was answered here. The first
  bytes that are not go to aiohttp, and so does everything after them, for good (sticky):
  aiohttp's parser starts at a request boundary with nothing before it, so there is no
  ordering, pipelining or smuggling interplay between the two.
- A ``data_received`` chunk is answered here only if it is exactly one complete request
  (``parse``): ``GET /v1/models`` or ``GET /v1/models/{id}`` (no query, no percent-encoding),
  ``HTTP/1.1``, at most 8 KiB and 64 header lines; header lines strict (token names, the
  colon right after the name, printable ASCII values, no obs-fold, no bare CR or LF);
  exactly one Host; at most one of each header read here and of each aiohttp refuses twice
  (its SINGLETON_HEADERS); no header that announces a body
  or another protocol (Content-Length, Transfer-Encoding, Expect, Upgrade, TE, Trailer,
  HTTP2-Settings); no Origin (a browser's request: its CORS headers are aiohttp's, by
  supervisor/cors.py; an answer here carries the CORS headers of a request without one,
  ``Cors.plain_headers``); Connection only ``close`` or ``keep-alive``; the chunk ends with the one
  blank line and nothing after it. Anything else (a request split over two reads, two
  pipelined in one read, a lowercase method, HTTP/1.0, a query string) passes through, and
  aiohttp handles it, errors included.
- What ``parse`` made of a request's bytes is remembered (``FastPath.parse``: at most
  PARSED_CACHE entries, then all forgotten), keyed by the bytes' sha256 and holding the
  presented key only as its digest (``auth.key_digest``), as auth.py keeps keys: a kept-alive
  client repeats the same bytes, and every microsecond before the write costs about two of
  round trip (docs/benchmarks.md). Only the parse is remembered: the key is checked against
  the current key set (SIGHUP may revoke it) and the cards are read, on every request.
- Only 200 answers are made here. An unknown id, or a key the rule refuses
  (``auth.KeyStore.check_digest``, the rule the middleware applies), passes through: every
  error body has one code path, aiohttp's.
- The answer is the aiohttp route's: the same body (``router.ModelCards.list_body`` /
  ``card_body``), Content-Type, Content-Length, Date, Server and X-Request-Id (the client's
  when sane: ``access_log.request_id_for``), the same access-log line and metrics
  (``access_log.RequestLog.finished`` with a ``Finished``). ``Connection: close`` is
  answered, then the connection closes.
- Idle connections: aiohttp restarts its keep-alive timer only after a request it handled,
  so at a connection's first fast answer its timer is stopped (``RequestHandler.keep_alive``,
  a public call) and this module keeps its own: server.keepalive_timeout_s after the last
  answer an idle connection is closed. After a pass-through that timer still closes a
  connection whose next request never completes (as aiohttp's would); once aiohttp has had
  a request on it (``ConnectionGuard.requests_of``: counted when its handler starts),
  aiohttp's own timer governs. The one difference: between aiohttp parsing a request and
  its handler starting (a loop iteration, or the 100 Continue of ``Expect`` draining to a
  client that does not read) the connection counts as idle, so a timer firing just then
  closes it where aiohttp's would not; a client racing a keep-alive timeout races it anyway. A
  connection that never had a fast answer keeps aiohttp's timers untouched. Each answer
  counts with the connection guard as a request (``ConnectionGuard.answered``), so its
  header timeout and idle eviction see the connection as aiohttp-served ones.
- Never answered here: on a connection whose writes are paused (a client that does not read
  its answers: aiohttp's flow control takes over), or after ``stop()`` (shutdown: aiohttp
  stops taking new requests then too).
- Installed by ``app.serve()`` only (a fleet exists there); ``build_app`` alone is unchanged.
- Everything here runs on the event loop: no locks.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import re
import time
from typing import NamedTuple, Protocol, cast

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.http_parser import SINGLETON_HEADERS

from supervisor.access_log import Finished, RequestLog, RequestRecord, request_id_for
from supervisor.auth import KeyStore, key_digest, presented_key_of
from supervisor.cors import Cors
from supervisor.http_guard import ConnectionGuard

MAX_REQUEST_BYTES = 8192
MAX_HEADER_LINES = 64
PARSED_CACHE = 256
LIST_PATH = "/v1/models"

# The request line, whole: an id as config.py's model ids (a dot segment cannot match).
_REQUEST_LINE = re.compile(rb"GET /v1/models(?:/([A-Za-z0-9][A-Za-z0-9._:@+-]{0,127}))? HTTP/1\.1")
# Every header line with its CRLF: an RFC 9110 token, the colon, printable ASCII or HTAB (no
# control bytes, no obs-text). No two branches can match the same byte, so no backtracking.
_HEADER_BLOCK = re.compile(
    rb"(?:[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e]*\r\n){0," + str(MAX_HEADER_LINES).encode() + rb"}"
)
# Headers that announce a body, another protocol or hop-by-hop behaviour: aiohttp's job.
_PASS = frozenset({
    b"content-length", b"transfer-encoding", b"expect", b"upgrade", b"te", b"trailer", b"http2-settings", b"origin",
})
_READ = frozenset({b"host", b"connection", b"authorization", b"x-api-key", b"x-request-id"})
# Headers that may appear once: the ones read here, and those aiohttp's strict parser refuses
# twice (400 "Duplicate ... header found"): a repeat passes through, so the verdict is aiohttp's.
_ONCE = _READ | frozenset(str(h).lower().encode("ascii") for h in SINGLETON_HEADERS)
_CONNECTION = {"close": True, "keep-alive": False}  # value -> close after the answer


class FastRequest(NamedTuple):  # a tuple: the cheapest object to build, once per request
    """One request the fast path may answer: what it needs of the headers."""

    model_id: str | None  # None: the list
    close: bool  # Connection: close
    request_id: str | None = None  # X-Request-Id as sent
    key_digest: bytes | None = None  # auth.key_digest of the key presented; never the key


def parse(chunk: bytes) -> FastRequest | None:
    """``chunk`` as one complete request this module answers, or None: pass it through."""
    if len(chunk) > MAX_REQUEST_BYTES or not chunk.startswith(b"GET /v1/models"):
        return None
    end = chunk.find(b"\r\n\r\n")
    if end != len(chunk) - 4:
        return None  # incomplete, or more than one request (or a body) in this read
    first = chunk.find(b"\r\n")
    m = _REQUEST_LINE.fullmatch(chunk, 0, first)
    # An obs-fold line starts with a space, which no token holds; a bare CR or LF is in
    # neither a token nor a value.
    if m is None or _HEADER_BLOCK.fullmatch(chunk, first + 2, end + 2) is None:
        return None
    seen: dict[bytes, str] = {}
    once: set[bytes] = set()
    for line in chunk[first + 2 : end].split(b"\r\n"):
        name, _, value = line.partition(b":")
        key = name.lower()
        if key in _PASS:
            return None
        if key in _ONCE:
            if key in once:
                return None
            once.add(key)
            if key in _READ:
                seen[key] = value.strip(b" \t").decode("ascii")
    if not seen.get(b"host"):
        return None
    close = False
    conn = seen.get(b"connection")
    if conn is not None:
        got = _CONNECTION.get(conn.lower())
        if got is None:
            return None  # a list, an upgrade, anything else: aiohttp's rules
        close = got
    mid = m.group(1)
    secret = presented_key_of(seen.get(b"authorization"), seen.get(b"x-api-key"))
    return FastRequest(
        model_id=None if mid is None else mid.decode("ascii"),
        close=close,
        request_id=seen.get(b"x-request-id"),
        key_digest=None if secret is None else key_digest(secret),
    )


class _HttpDate:
    """The Date header's value, made once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def now(self) -> bytes:
        t = time.time()
        if int(t) != self._second:
            self._second = int(t)
            self._value = email.utils.formatdate(self._second, usegmt=True).encode("ascii")
        return self._value


_SERVER = SERVER_SOFTWARE.encode("ascii")


class Cards(Protocol):
    """The bodies the aiohttp route answers with (router.ModelCards)."""

    def list_body(self) -> bytes: ...

    def card_body(self, mid: str) -> bytes | None: ...


class FastPath:
    """What every fast connection shares: the cards, the keys, the log, the guard."""

    def __init__(
        self,
        cards: Cards,
        keys: KeyStore,
        requests: RequestLog,
        guard: ConnectionGuard,
        keepalive_timeout_s: float,
        cors: Cors | None = None,
    ) -> None:
        self._cards = cards
        self._cors = cors
        self._keys = keys
        self._requests = requests
        self.guard = guard
        self.keepalive_timeout_s = keepalive_timeout_s
        self.stopped = False
        self._date = _HttpDate()
        # sha256 of a request's bytes -> what parse made of them: a client on a kept-alive
        # connection sends the same bytes each time. Only digests, as auth.py keeps keys.
        self._parsed: dict[bytes, FastRequest] = {}

    def wrap(self, inner: web.RequestHandler) -> FastConnection:
        """``ConnectionGuard.factory``'s ``wrap``: one accepted connection."""
        return FastConnection(self, inner)

    def stop(self) -> None:
        """Shutdown: every connection passes through from now on."""
        self.stopped = True

    def parse(self, chunk: bytes) -> FastRequest | None:
        """``parse``, remembered (at most PARSED_CACHE requests, then forgotten at once)."""
        if len(chunk) > MAX_REQUEST_BYTES or not chunk.startswith(b"GET /v1/models"):
            return None  # the cheap refusal first: no digest for what is passed through
        h = hashlib.sha256(chunk).digest()
        req = self._parsed.get(h)
        if req is None:
            req = parse(chunk)
            if req is not None:
                if len(self._parsed) >= PARSED_CACHE:
                    self._parsed.clear()
                self._parsed[h] = req
        return req

    def answer(self, req: FastRequest, transport: asyncio.Transport, client: str | None, started: float) -> bool:
        """Write the answer to ``req`` (True), or nothing if it is not a 200 (False)."""
        path = LIST_PATH if req.model_id is None else f"{LIST_PATH}/{req.model_id}"
        verdict, key = self._keys.check_digest(path, req.key_digest)
        if verdict != 200:
            return False
        body = self._cards.list_body() if req.model_id is None else self._cards.card_body(req.model_id)
        if body is None:
            return False  # no such model: aiohttp's 404
        rec = RequestRecord(request_id_for(req.request_id), started)
        # The header order aiohttp writes for this route (X-Request-Id and then the CORS
        # headers come from its on_response_prepare hooks, after the rest).
        transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\nDate: %s\r\nServer: %s\r\n"
            b"%sX-Request-Id: %s\r\n%s\r\n%s"
            % (
                len(body),
                self._date.now(),
                _SERVER,
                b"Connection: close\r\n" if req.close else b"",
                rec.request_id.encode("ascii"),
                b"" if self._cors is None else self._cors.plain_headers(),
                body,
            )
        )
        self._requests.finished(
            Finished(rec, "GET", path, 200, time.monotonic() - started, None if key is None else key.name, client)
        )
        return True


class FastConnection(asyncio.Protocol):
    """One connection: answers what ``parse`` accepts while it is fast, forwards the rest."""

    def __init__(self, fast: FastPath, inner: web.RequestHandler) -> None:
        self._fast = fast
        self._inner = inner
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._client: str | None = None
        self._passed = False  # sticky: the connection is aiohttp's
        self._write_paused = False
        self._answered = 0
        self._last = 0.0  # loop time of the last fast answer
        self._timer: asyncio.TimerHandle | None = None

    # ---- the protocol, forwarded -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        # As aiohttp's request.remote.
        self._client = str(peer[0]) if isinstance(peer, (list, tuple)) and peer else None
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._write_paused = True
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._inner.resume_writing()

    def eof_received(self) -> bool | None:
        self._inner.eof_received()
        return None  # aiohttp's answer: the transport closes itself

    def data_received(self, data: bytes) -> None:
        if not self._passed:
            if self._answered_here(data):
                return
            self._passed = True
        self._inner.data_received(data)

    # ---- the fast path -----------------------------------------------------------------

    def _answered_here(self, data: bytes) -> bool:
        fast = self._fast
        transport = self._transport
        if fast.stopped or self._write_paused or transport is None or transport.is_closing():
            return False
        req = fast.parse(data)
        if req is None or not fast.answer(req, transport, self._client, time.monotonic()):
            return False
        fast.guard.answered(self._inner)
        if self._answered == 0:
            self._inner.keep_alive(True)  # stops aiohttp's idle timer: ours runs from now
        self._answered += 1
        if req.close:
            transport.close()  # after the answer is written
            return True
        self._last = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(self._last + fast.keepalive_timeout_s, self._idle)
        return True

    def _idle(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        if self._passed and self._fast.guard.requests_of(self._inner) > self._answered:
            return  # aiohttp has had a request: its own keep-alive timer governs now
        due = self._last + self._fast.keepalive_timeout_s
        if self._loop.time() < due:
            self._timer = self._loop.call_at(due, self._idle)  # answered since: not idle yet
            return
        transport.close()

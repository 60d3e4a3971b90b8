"""GET /v1/models answered before aiohttp (supervisor/fastpath.py): the request matcher as a
table, one connection's rules against real sockets in this process, then the real supervisor
with the fake worker and API keys."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from supervisor.access_log import Finished, RequestLog
from supervisor.auth import KeyStore, key_digest, parse_key_line
from supervisor.fastpath import MAX_REQUEST_BYTES, FastPath, FastRequest, parse
from supervisor.http_guard import ConnectionGuard
from tests.supervisor_harness import Supervisor, key_file, poll, ready_supervisor, total

INF = "inf-key-0123456789abcdef"
ADMIN = "adm-key-0123456789abcdef"
H = b"Host: x\r\n"


def req(line: bytes = b"GET /v1/models HTTP/1.1", headers: bytes = H, tail: bytes = b"") -> bytes:
    return line + b"\r\n" + headers + b"\r\n" + tail


# --- the matcher ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("chunk", "want"),
    [
        (req(), FastRequest(None, False)),
        (req(b"GET /v1/models/my-model.Q4_1 HTTP/1.1"), FastRequest("my-model.Q4_1", False)),
        (req(b"GET /v1/models/org:tag@v1+x HTTP/1.1"), FastRequest("org:tag@v1+x", False)),
        (req(headers=b"host: x\r\nConnection: close\r\n"), FastRequest(None, True)),
        (req(headers=H + b"connection:Keep-Alive\r\n"), FastRequest(None, False)),
        (
            req(headers=H + b"X-Request-Id:  abc-1 \r\nAUTHORIZATION: Bearer k\tk \r\nx-api-key: z\r\nAccept: */*\r\n"),
            FastRequest(None, False, request_id="abc-1", key_digest=key_digest("k\tk")),  # Authorization first
        ),
        (req(headers=H + b"Accept: a\r\nAccept: b\r\nX-Empty:\r\n"), FastRequest(None, False)),  # not read here
        (req(headers=H + b"X-Api-Key: z \r\n"), FastRequest(None, False, key_digest=key_digest("z"))),
        (req(headers=H + b"Authorization: Basic z\r\n"), FastRequest(None, False)),  # no key presented
    ],
)
def test_accepted(chunk: bytes, want: FastRequest) -> None:
    assert parse(chunk) == want


@pytest.mark.parametrize(
    "chunk",
    [
        req() + req(),  # two pipelined requests in one read
        req()[:-2],  # incomplete
        b"GET /v1/models HTTP/1.1\r\n",
        req(tail=b"x"),  # bytes after the blank line
        req(headers=H + b"Content-Length: 0\r\n"),
        req(headers=H + b"Transfer-Encoding: chunked\r\n"),
        req(headers=H + b"Expect: 100-continue\r\n"),
        req(headers=H + b"Upgrade: websocket\r\nConnection: Upgrade\r\n"),
        req(headers=H + b"TE: trailers\r\n"),
        req(headers=H + b"Origin: https://app.example\r\n"),  # a browser's: CORS headers are aiohttp's
        req(headers=H + b"Connection: close, keep-alive\r\n"),
        req(headers=H + b"Connection: \r\n"),
        req(b"get /v1/models HTTP/1.1"),
        req(b"HEAD /v1/models HTTP/1.1"),
        req(b"POST /v1/models HTTP/1.1"),
        req(b"GET /v1/models HTTP/1.0"),
        req(b"GET /v1/models HTTP/2.0"),
        req(b"GET /v1/models?x=1 HTTP/1.1"),
        req(b"GET /v1/models#f HTTP/1.1"),
        req(b"GET /v1/models/ HTTP/1.1"),
        req(b"GET /v1/models/.. HTTP/1.1"),
        req(b"GET /v1/models/.x HTTP/1.1"),
        req(b"GET /v1/models/a%20b HTTP/1.1"),
        req(b"GET /v1/models/a/b HTTP/1.1"),
        req(b"GET /v1/modelsx HTTP/1.1"),
        req(b"GET  /v1/models HTTP/1.1"),
        req(b"GET http://x/v1/models HTTP/1.1"),
        b"\r\n" + req(),
        req(headers=b""),  # no Host
        req(headers=b"Host:\r\n"),
        req(headers=H + H),
        req(headers=H + b"Authorization: Bearer a\r\nAuthorization: Bearer b\r\n"),
        req(headers=H + b"X-Api-Key: a\r\nx-api-key: b\r\n"),
        req(headers=H + b"X-Request-Id: a\r\nX-Request-Id: b\r\n"),
        # aiohttp's strict parser refuses these twice (400): a repeat is its to answer.
        req(headers=H + b"User-Agent: a\r\nuser-agent: b\r\n"),
        req(headers=H + b"Content-Type: a\r\nContent-Type: b\r\n"),
        req(headers=H + b"ETag: a\r\nETag: b\r\n"),
        req(headers=H + b"Server: a\r\nserver: b\r\n"),
        req(headers=H + b"Max-Forwards: 1\r\nMax-Forwards: 2\r\n"),
        req(headers=H + b"Accept: a\r\n b\r\n"),  # obs-fold
        req(headers=H + b"Accept : a\r\n"),  # space before the colon
        req(headers=H + b"no colon\r\n"),
        req(headers=H + b"Acc\x00ept: a\r\n"),
        req(headers=H + b"Accept: a\x01\r\n"),
        req(headers=H + b"Accept: caf\xc3\xa9\r\n"),  # obs-text
        req(headers=H + b"Accept: a\rb\r\n"),  # bare CR
        req(headers=H + b"Accept: a\nX-B: b\r\n"),  # bare LF
        b"GET /v1/models HTTP/1.1\nHost: x\n\n",
        req(headers=H + b"X-Pad: " + b"a" * MAX_REQUEST_BYTES + b"\r\n"),
        req(headers=H + b"X-A: a\r\n" * 64),
        b"",
    ],
)
def test_passed_through(chunk: bytes) -> None:
    assert parse(chunk) is None


def test_parsed_requests_hold_no_key_and_are_remembered_as_parsed() -> None:
    fast = FastPath(Cards(), KeyStore(), RequestLog(), ConnectionGuard(header_timeout_s=60, max_connections=10), 30)
    for chunk in (req(headers=H + _auth()), req(headers=H + f"X-Api-Key: {INF}\r\n".encode())):
        got = parse(chunk)
        assert got is not None and got.key_digest == key_digest(INF)
        assert INF not in repr(got) and INF.encode() not in b"".join(x for x in got if isinstance(x, bytes))
        assert fast.parse(chunk) == got and fast.parse(chunk) == got  # a miss, then a hit
    assert fast.parse(req(b"GET /v1/models?x=1 HTTP/1.1")) is None


def test_key_check_is_the_middlewares_rule() -> None:
    keys = KeyStore((parse_key_line(f"app:{INF}", "x"), parse_key_line(f"ops:{ADMIN} admin", "y")))
    assert keys.check("/v1/models", None) == (401, None)
    assert keys.check("/v1/models", "wrong-key-0123456789") == (401, None)
    assert keys.check("/v1/models", INF)[0] == 200
    assert keys.check("/status", INF)[0] == 403
    assert keys.check("/status", ADMIN)[0] == 200
    assert keys.check("/health", None) == (200, None)
    assert KeyStore().check("/status", None) == (200, None)


# --- one connection, in this process ----------------------------------------------------------


class Inner(asyncio.Protocol):
    """Stands in for aiohttp's RequestHandler: records what the fast path forwards."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.data: list[bytes] = []
        self.keep_alive_calls: list[bool] = []
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.data.append(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.transport = None

    def keep_alive(self, val: bool) -> None:
        self.keep_alive_calls.append(val)


class Cards:
    def list_body(self) -> bytes:
        return b'{"object":"list","data":[]}'

    def card_body(self, mid: str) -> bytes | None:
        return b'{"id":"m"}' if mid == "m" else None


async def _read_answer(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(next(ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")).split(b":")[1])
    return head, await asyncio.wait_for(reader.readexactly(length), 5)


async def _until(pred: Any, what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


@dataclass
class Served:
    """A loopback server whose connections are FastConnections around ``Inner``s."""

    fast: FastPath
    port: int = 0
    inners: list[Inner] = field(default_factory=list)
    conns: list[Any] = field(default_factory=list)  # the FastConnections
    done: list[Finished] = field(default_factory=list)  # what the access log saw
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    def factory(self) -> asyncio.Protocol:
        self.inners.append(Inner())
        self.conns.append(self.fast.wrap(cast(web.RequestHandler, self.inners[-1])))
        return cast(asyncio.Protocol, self.conns[-1])

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        r, w = await asyncio.open_connection("127.0.0.1", self.port)
        self.writers.append(w)
        return r, w


@contextlib.asynccontextmanager
async def serving(keepalive_s: float = 30.0) -> AsyncIterator[Served]:
    done: list[Finished] = []
    guard = ConnectionGuard(header_timeout_s=60, max_connections=10)
    sv = Served(FastPath(Cards(), KeyStore(), RequestLog(done.append), guard, keepalive_s), done=done)
    server = await asyncio.get_running_loop().create_server(sv.factory, "127.0.0.1", 0)
    sv.port = server.sockets[0].getsockname()[1]
    try:
        yield sv
    finally:
        for w in sv.writers:
            w.close()
        server.close()
        await server.wait_closed()


def _run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 20))


def test_answers_while_fast_then_passes_through_for_good() -> None:
    async def main() -> None:
        async with serving() as sv:
            reader, writer = await sv.connect()
            writer.write(req(headers=H + b"X-Request-Id: r1\r\n"))
            head, body = await _read_answer(reader)
            assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nX-Request-Id: r1\r\n" in head
            assert body == Cards().list_body()
            assert [(d.method, d.path, d.status, d.record.request_id) for d in sv.done] == [
                ("GET", "/v1/models", 200, "r1")
            ]
            inner = sv.inners[0]
            assert inner.data == [] and inner.keep_alive_calls == [True]  # aiohttp's idle timer stopped
            writer.write(req(b"GET /v1/models/nope HTTP/1.1"))  # not a 200: aiohttp's
            await _until(lambda: len(inner.data) == 1, "the pass-through")
            writer.write(req())  # answerable, but the connection is aiohttp's now
            await _until(lambda: len(inner.data) == 2, "the second pass-through")
            assert inner.data == [req(b"GET /v1/models/nope HTTP/1.1"), req()] and len(sv.done) == 1

    _run(main())


def test_paused_writes_stop_and_connection_close_pass_or_close() -> None:
    async def main() -> None:
        async with serving() as sv:
            # Connection: close is answered, then the server closes.
            r, w = await sv.connect()
            w.write(req(b"GET /v1/models/m HTTP/1.1", H + b"Connection: close\r\n"))
            head, body = await _read_answer(r)
            assert b"\r\nConnection: close\r\n" in head and body == b'{"id":"m"}'
            assert await asyncio.wait_for(r.read(), 5) == b""
            await _until(lambda: sv.inners[0].lost, "the inner protocol to see the close")
            # A client that does not read its answers: aiohttp's flow control takes over.
            r, w = await sv.connect()
            await _until(lambda: len(sv.conns) == 2 and sv.inners[1].transport is not None, "the second connection")
            sv.conns[1].pause_writing()
            w.write(req())
            await _until(lambda: sv.inners[1].data == [req()], "the pass-through while paused")
            # After stop() (shutdown) nothing is answered here.
            sv.fast.stop()
            r, w = await sv.connect()
            w.write(req())
            await _until(lambda: len(sv.inners) == 3 and sv.inners[2].data == [req()], "the pass-through after stop")
            assert len(sv.done) == 1

    _run(main())


def test_idle_connection_closed_after_the_keepalive_timeout() -> None:
    async def main() -> None:
        async with serving(keepalive_s=0.3) as sv:
            r, w = await sv.connect()
            for i in range(3):  # each answer restarts the idle time: 0.2 s gaps are not idle
                if i:
                    await asyncio.sleep(0.2)
                w.write(req())
                await _read_answer(r)
            last = time.monotonic()
            assert await asyncio.wait_for(r.read(), 5) == b""
            assert time.monotonic() - last >= 0.25
            # After a pass-through whose request never completes, the same timer closes it.
            r, w = await sv.connect()
            w.write(req())
            await _read_answer(r)
            w.write(b"GET /health HTTP/1.1\r\n")
            assert await asyncio.wait_for(r.read(), 5) == b""
            assert sv.inners[1].data == [b"GET /health HTTP/1.1\r\n"]

    _run(main())


# --- the real supervisor ------------------------------------------------------------------------

WORKER = {"health_interval_s": 0.2, "health_timeout_s": 1.0, "stop_timeout_s": 3.0}


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervisor]:
    tmp = tmp_path_factory.mktemp("fastpath")
    # With CORS on, every answer says Vary: Origin, the fast one included (issue 25).
    server = {"api_keys_file": str(key_file(tmp, INF, ADMIN)), "keepalive_timeout_s": 1.0,
              "cors_origins": ["https://app.example"]}
    s = Supervisor(tmp, {"worker": WORKER, "server": server}, args=["--log-format", "json"], fake_worker=True)
    s.api_key = ADMIN
    with ready_supervisor(s) as ready:
        yield ready


def exchange(s: Supervisor, *requests: bytes) -> list[tuple[bytes, bytes]]:
    """Each request in its own write on one connection, each answer read whole."""
    out = []
    with socket.create_connection(("127.0.0.1", s.port), timeout=10) as c:
        f = c.makefile("rb")
        for r in requests:
            c.sendall(r)
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                line = f.readline()
                assert line, "closed before an answer"
                head += line
            length = int(next(ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length:")).split(b":")[1])
            out.append((head, f.read(length)))
    return out


def headers_of(head: bytes) -> list[tuple[str, str]]:
    return [(k.decode(), v.strip().decode()) for k, _, v in (ln.partition(b":") for ln in head.split(b"\r\n")[1:] if ln)]


def _auth(key: str = INF) -> bytes:
    return f"Authorization: Bearer {key}\r\n".encode()


def test_the_fast_answer_is_the_routes_answer(sup: Supervisor) -> None:
    mid = sup.get("/v1/models")[1]["data"][0]["id"]
    for path in (b"/v1/models", b"/v1/models/" + mid.encode()):
        h = H + _auth() + b"X-Request-Id: same-id\r\n"
        (fast_head, fast_body), = exchange(sup, req(b"GET " + path + b" HTTP/1.1", h))
        (slow_head, slow_body), = exchange(sup, req(b"GET " + path + b"?x=1 HTTP/1.1", h))  # aiohttp's
        assert fast_body == slow_body and json.loads(fast_body)
        assert fast_head.split(b"\r\n")[0] == slow_head.split(b"\r\n")[0] == b"HTTP/1.1 200 OK"
        fast_h, slow_h = headers_of(fast_head), headers_of(slow_head)
        assert [k for k, _ in fast_h] == [k for k, _ in slow_h]  # the same headers, in the same order
        assert {k: v for k, v in fast_h if k != "Date"} == {k: v for k, v in slow_h if k != "Date"}
        assert dict(fast_h)["X-Request-Id"] == "same-id"
        assert dict(fast_h)["Vary"] == "Origin" and "Access-Control-Allow-Origin" not in dict(fast_h)


def test_keys_are_enforced(sup: Supervisor) -> None:
    for h in (H, H + _auth("wrong-key-0123456789abcdef"), H + b"X-Api-Key: \r\n"):
        (head, body), = exchange(sup, req(headers=h))
        assert head.startswith(b"HTTP/1.1 401 ") and json.loads(body)["error"]["code"] == "invalid_api_key"
    for h in (H + _auth(), H + f"X-Api-Key: {ADMIN}\r\n".encode()):
        (head, body), = exchange(sup, req(headers=h))
        assert head.startswith(b"HTTP/1.1 200 ") and json.loads(body)["object"] == "list"


def test_one_connection_mixes_fast_and_proxied_requests(sup: Supervisor) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", sup.port, timeout=30)
    try:
        auth = {"Authorization": f"Bearer {INF}"}
        socks = []
        for method, path, body in [
            ("GET", "/v1/models", None),
            ("POST", "/v1/completions", json.dumps({"prompt": "hi", "max_tokens": 3})),
            ("GET", "/v1/models", None),
            ("GET", "/v1/models", None),
        ]:
            conn.request(method, path, body=body, headers={**auth, "Content-Type": "application/json"})
            r = conn.getresponse()
            data = json.loads(r.read())
            assert r.status == 200, data
            assert ("object" in data) if method == "GET" else ("choices" in data)
            socks.append(conn.sock)
        assert all(s is socks[0] for s in socks), "the connection was not kept alive"
    finally:
        conn.close()


def test_access_line_metrics_and_request_id(sup: Supervisor) -> None:
    def count() -> float:
        (_, text), = exchange(sup, req(b"GET /metrics HTTP/1.1", H + _auth(ADMIN)))
        samples = {
            (smp.name, tuple(sorted(smp.labels.items()))): smp.value
            for fam in text_string_to_metric_families(text.decode())
            for smp in fam.samples
        }
        return total(samples, "vram_llm_http_requests_total", path="/v1", code="200")

    before = count()
    answers = exchange(sup, *(req(headers=H + _auth() + f"X-Request-Id: fast-log-{i}\r\n".encode()) for i in range(3)))
    assert [dict(headers_of(h))["X-Request-Id"] for h, _ in answers] == [f"fast-log-{i}" for i in range(3)]
    (head, _), = exchange(sup, req(headers=H + _auth() + b"X-Request-Id: not sane!\r\n"))
    assert dict(headers_of(head))["X-Request-Id"] != "not sane!"
    assert count() == before + 4

    def access(rid: str) -> dict[str, Any] | None:
        for ln in sup.log().splitlines():
            if ln.startswith("{"):
                x = json.loads(ln)
                if x["logger"] == "vram_llm.access" and x.get("request_id") == rid:
                    return x  # type: ignore[no-any-return]
        return None

    line = poll(lambda: access("fast-log-2"), 10, "the access line")
    assert (line["method"], line["path"], line["status"], line["key"], line["client"]) == (
        "GET", "/v1/models", 200, "app", "127.0.0.1",
    )
    assert line["duration_ms"] >= 0


def test_connection_close_and_idle_keepalive(sup: Supervisor) -> None:
    with socket.create_connection(("127.0.0.1", sup.port), timeout=10) as c:
        c.sendall(req(headers=H + _auth() + b"Connection: close\r\n"))
        got = b""
        while chunk := c.recv(65536):
            got += chunk  # until the server closes
        assert got.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nConnection: close\r\n" in got
    # server.keepalive_timeout_s is 1 s here: an idle connection after fast answers is closed.
    with socket.create_connection(("127.0.0.1", sup.port), timeout=10) as c:
        for _ in range(2):
            c.sendall(req(headers=H + _auth()))
            assert c.recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")
        t0 = time.monotonic()
        assert c.recv(65536) == b""  # closed by the server
        assert 0.5 < time.monotonic() - t0 < 8

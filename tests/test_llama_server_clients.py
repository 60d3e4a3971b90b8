"""Issue 25, the supervisor's side: llama-server's clients against a running supervisor (the
fake worker: what is checked here is routing, keys, metrics, CORS and listening, not generation).

- Root paths: the openai SDK with a base URL without /v1; llama-server's native paths go
  to the worker by "model" under their own path, the /v1 aliases under the /v1 path (the
  fake worker names the path it was asked for in X-Fake-Worker-Path).
- The same API keys as /v1, the access log and metrics with a bounded path label.
- CORS: preflights without a key, refused origins never echoed, headers on every answer.
- Several listen addresses, IPv6 included.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.supervisor_harness import REPO, Supervisor, key_file, poll, ready_supervisor, scrape, total

INF = "inference-key-0123456789"
ADMIN = "admin-key-0123456789abc"
ORIGIN = "https://app.example"
WORKER = {"health_interval_s": 0.2, "health_timeout_s": 1.0, "stop_timeout_s": 3.0}


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervisor]:
    tmp = tmp_path_factory.mktemp("llama-clients")
    server = {"api_keys_file": str(key_file(tmp, INF, ADMIN)), "cors_origins": [ORIGIN, "http://localhost:3000"]}
    s = Supervisor(tmp, {"worker": WORKER, "server": server}, args=["--log-format", "json"], fake_worker=True)
    s.api_key = ADMIN
    with ready_supervisor(s) as ready:
        yield ready


def call(
    s: Supervisor, method: str, path: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    data = None if body is None else json.dumps(body).encode()
    h = {"Content-Type": "application/json", **(headers or {})}
    req = urllib.request.Request(s.base + path, data=data, headers=h, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def bearer(key: str = INF) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_openai_sdk_with_a_base_url_without_v1(sup: Supervisor) -> None:
    client = openai.OpenAI(base_url=sup.base, api_key=INF, max_retries=0, timeout=30)
    models = client.models.list()
    mid = models.data[0].id
    assert client.models.retrieve(mid).id == mid
    chat = client.chat.completions.create(model=mid, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert chat.choices[0].message.content
    done = client.completions.create(model=mid, prompt="hi", max_tokens=3)
    assert done.choices[0].text
    stream = client.chat.completions.create(
        model=mid, messages=[{"role": "user", "content": "hi"}], max_tokens=3, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=sup.base, api_key="wrong-key-0123456789", max_retries=0).models.list()


@pytest.mark.parametrize(
    ("method", "path", "upstream"),
    [
        ("POST", "/chat/completions", "/v1/chat/completions"),
        ("POST", "/completions", "/v1/completions"),
        ("POST", "/embeddings", "/v1/embeddings"),
        ("POST", "/chat/completions/input_tokens", "/v1/chat/completions/input_tokens"),
        ("POST", "/completion", "/completion"),
        ("GET", "/props", "/props"),
        ("POST", "/props", "/props"),
        ("POST", "/infill", "/infill"),
        ("POST", "/rerank", "/rerank"),
        ("POST", "/reranking", "/reranking"),
        ("POST", "/v1/rerank", "/v1/rerank"),
        ("POST", "/v1/reranking", "/v1/reranking"),
        ("POST", "/slots/0?action=save", "/slots/0?action=save"),
        ("POST", "/tokenize", "/tokenize"),
    ],
)
def test_llama_server_paths_reach_the_worker(sup: Supervisor, method: str, path: str, upstream: str) -> None:
    body = None if method == "GET" else {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    code, headers, _ = call(sup, method, path, body, bearer())
    assert headers.get("X-Fake-Worker-Path") == upstream, (code, headers)
    # The same keys as /v1: none is a 401 from the supervisor, before any worker.
    code, headers, raw = call(sup, method, path, body)
    assert code == 401 and "X-Fake-Worker-Path" not in headers
    assert json.loads(raw)["error"]["code"] == "invalid_api_key"


def test_a_root_path_is_routed_by_model_like_v1(sup: Supervisor) -> None:
    # One model serves any name (the fleet of one's fallback): the request reaches it.
    _, headers, _ = call(sup, "POST", "/completion", {"model": "anything", "prompt": "x"}, bearer())
    assert headers.get("X-Fake-Worker-Path") == "/completion"


def test_v1_health_is_open_as_health(sup: Supervisor) -> None:
    code, h, raw = call(sup, "GET", "/v1/health")
    assert code == 200 and json.loads(raw) == {"status": "ok"} and "X-Fake-Worker-Path" not in h


def test_get_slots_is_the_supervisors_and_admin_routes_stay(sup: Supervisor) -> None:
    code, headers, _ = call(sup, "GET", "/slots", None, bearer(INF))
    # supervisor/balancer.py answers it from the ready worker, not through the proxy.
    assert code == 200 and "X-Fake-Worker-Path" not in headers
    mid = sup.get("/models")[1]["data"][0]["id"]
    code, _, raw = call(sup, "POST", f"/models/{mid}/load", None, bearer(ADMIN))
    assert code == 202 and json.loads(raw) == {"id": mid, "requested": "load"}
    assert call(sup, "POST", f"/models/{mid}/load", None, bearer(INF))[0] == 403  # still admin
    code, _, raw = call(sup, "GET", f"/models/{mid}", None, bearer(INF))
    assert code == 200 and json.loads(raw)["id"] == mid
    assert call(sup, "GET", "/models/nope", None, bearer(INF))[0] == 404


def test_root_paths_are_counted_under_a_bounded_path_label(sup: Supervisor) -> None:
    before = scrape(sup)
    for path in ("/chat/completions", "/completion", "/slots/7?action=erase", "/no-such-path-1", "/no-such-path-2"):
        call(sup, "POST", path, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}, bearer(ADMIN))

    def counted() -> bool:
        after = scrape(sup)
        delta = {
            g: total(after, "vram_llm_http_requests_total", path=g) - total(before, "vram_llm_http_requests_total", path=g)
            for g in ("/v1", "native", "other")
        }
        return delta["/v1"] >= 1 and delta["native"] >= 2 and delta["other"] >= 2

    poll(counted, 10, "the root paths in vram_llm_http_requests_total")
    labels = {dict(lbl)["path"] for (n, lbl) in scrape(sup) if n == "vram_llm_http_requests_total"}
    assert labels <= {"/v1", "native", "/health", "/status", "/metrics", "other"}, labels
    access = [json.loads(ln) for ln in sup.log().splitlines() if '"vram_llm.access"' in ln]
    seen = {(a["method"], a["path"], a["status"]) for a in access}
    assert {("POST", "/completion", 404), ("POST", "/chat/completions", 200)} <= seen


# --- CORS -------------------------------------------------------------------------------------

def preflight_of(s: Supervisor, path: str, origin: str, method: str = "POST") -> tuple[int, dict[str, str], bytes]:
    return call(s, "OPTIONS", path, None, {
        "Origin": origin, "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-lang",
    })


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/chat/completions", "/v1/models", "/completion", "/status"])
def test_preflight_needs_no_key(sup: Supervisor, path: str) -> None:
    code, h, _ = preflight_of(sup, path, ORIGIN)
    assert code == 204, h
    assert h["Access-Control-Allow-Origin"] == ORIGIN and h["Access-Control-Allow-Credentials"] == "true"
    assert "POST" in h["Access-Control-Allow-Methods"] and "x-stainless-lang" in h["Access-Control-Allow-Headers"]
    assert int(h["Access-Control-Max-Age"]) > 0 and "Origin" in h["Vary"]
    assert "X-Fake-Worker-Path" not in h  # answered by the supervisor, not proxied
    assert "Access-Control-Allow-Private-Network" not in h  # not asked for


def test_private_network_preflight(sup: Supervisor) -> None:
    code, h, _ = call(sup, "OPTIONS", "/v1/models", None, {
        "Origin": ORIGIN, "Access-Control-Request-Method": "GET", "Access-Control-Request-Private-Network": "true",
    })
    assert code == 204 and h["Access-Control-Allow-Private-Network"] == "true"


def test_preflights_are_counted_not_timed(sup: Supervisor) -> None:
    before = scrape(sup)
    for _ in range(3):
        assert preflight_of(sup, "/v1/chat/completions", ORIGIN)[0] == 204

    def counted() -> bool:
        n = total(scrape(sup), "vram_llm_http_requests_total", path="/v1", code="204")
        return n - total(before, "vram_llm_http_requests_total", path="/v1", code="204") == 3

    poll(counted, 10, "3 preflights counted")
    durations = "vram_llm_request_duration_seconds_count"
    assert total(scrape(sup), durations) == total(before, durations)


@pytest.mark.parametrize("origin", ["https://evil.example", "http://app.example", "null", ORIGIN + ".evil.example"])
def test_a_refused_origin_is_never_echoed(sup: Supervisor, origin: str) -> None:
    code, h, raw = preflight_of(sup, "/v1/chat/completions", origin)
    assert code == 403 and json.loads(raw)["error"]["code"] == "cors_origin_not_allowed"
    assert not any(k.lower().startswith("access-control-allow") for k in h), h
    code, h, _ = call(sup, "POST", "/v1/chat/completions", {"max_tokens": 1}, {**bearer(), "Origin": origin})
    assert "Access-Control-Allow-Origin" not in h and h["Vary"] == "Origin"


def test_actual_answers_carry_cors_headers(sup: Supervisor) -> None:
    o = {"Origin": ORIGIN}
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    answers = {
        "ok": call(sup, "POST", "/v1/chat/completions", body, {**bearer(), **o}),
        "root alias": call(sup, "POST", "/chat/completions", body, {**bearer(), **o}),
        "streamed": call(sup, "POST", "/v1/chat/completions", {**body, "stream": True}, {**bearer(), **o}),
        "401": call(sup, "POST", "/v1/chat/completions", body, o),
        "404": call(sup, "GET", "/nowhere", None, {**bearer(ADMIN), **o}),
        "models (not the fast path)": call(sup, "GET", "/v1/models", None, {**bearer(), **o}),
    }
    assert answers["ok"][0] == 200 and answers["401"][0] == 401 and answers["404"][0] == 404
    assert b"data: [DONE]" in answers["streamed"][2]
    for what, (_, h, _) in answers.items():
        assert h.get("Access-Control-Allow-Origin") == ORIGIN, what
        assert h.get("Access-Control-Allow-Credentials") == "true", what
        assert h.get("Vary") == "Origin", what
        assert "X-Request-Id" in h["Access-Control-Expose-Headers"] and h.get("X-Request-Id"), what
    # Without an Origin (not a browser): no Allow-Origin, but the answer says it varies by it.
    _, h, _ = call(sup, "POST", "/v1/chat/completions", body, bearer())
    assert "Access-Control-Allow-Origin" not in h and h["Vary"] == "Origin"


def test_the_second_origin_and_a_sighup_change(sup: Supervisor) -> None:
    assert preflight_of(sup, "/v1/models", "http://localhost:3000", "GET")[0] == 204
    original = sup.config_path.read_text()
    sup.config_path.write_text(original.replace(f'"{ORIGIN}", ', ""))
    try:
        sup.proc.send_signal(signal.SIGHUP)
        poll(lambda: preflight_of(sup, "/v1/models", ORIGIN)[0] == 403, 10, "the origin removed by SIGHUP to be refused")
        assert preflight_of(sup, "/v1/models", "http://localhost:3000", "GET")[0] == 204
    finally:
        sup.config_path.write_text(original)
        sup.proc.send_signal(signal.SIGHUP)
        poll(lambda: preflight_of(sup, "/v1/models", ORIGIN)[0] == 204, 10, "the origin to be back")


# --- several listen addresses -------------------------------------------------------------------

def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _health(host: str, port: int) -> int:
    url = f"http://[{host}]:{port}/health" if ":" in host else f"http://{host}:{port}/health"
    with urllib.request.urlopen(url, timeout=10) as r:
        return int(r.status)


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="this machine has no IPv6 loopback (::1 cannot be bound)")
def test_listens_on_ipv4_and_ipv6_and_status_asks_the_first(tmp_path: Path) -> None:
    s = Supervisor(tmp_path, {"worker": WORKER}, args=["--host", "::1,127.0.0.1"], fake_worker=True)
    try:
        s.wait_ready(60)
        assert _health("127.0.0.1", s.port) == 200 and _health("::1", s.port) == 200
        # `vram-llm status` with the same flags asks the first address, [::1].
        r = subprocess.run(
            [sys.executable, "-m", "supervisor", "status", "--config", str(s.config_path), "--host", "::1,127.0.0.1",
             "--json"],
            capture_output=True, text=True, timeout=60, cwd=str(REPO),
        )
        assert r.returncode == 0 and json.loads(r.stdout)["state"] == "ready", r.stderr
        assert s.stop() == 0  # every site closed, nothing left behind
        with pytest.raises(OSError):
            _health("::1", s.port)
    finally:
        s.kill_hard()


def test_an_address_that_cannot_be_bound_ends_the_start(tmp_path: Path) -> None:
    # 192.0.2.1 (TEST-NET-1) is on no interface of this machine: bind fails, exit 1.
    s = Supervisor(tmp_path, {"worker": WORKER}, args=["--host", "127.0.0.1", "--host", "192.0.2.1"], fake_worker=True)
    try:
        code = poll(lambda: s.proc.poll() is not None and (s.proc.returncode,), 60, "the supervisor to exit")[0]
        assert code == 1, s.log()
        assert not list(s.runtime.iterdir())
        with pytest.raises(OSError):
            _health("127.0.0.1", s.port)  # the first address is closed again
    finally:
        s.kill_hard()

"""Issue 25, the supervisor's side: llama-server's clients against a running supervisor (the
fake worker: what is checked here is routing, keys and metrics, not generation).

- Root paths: the openai SDK with a base URL without /v1; llama-server's native paths go
  to the worker by "model" under their own path, the /v1 aliases under the /v1 path (the
  fake worker names the path it was asked for in X-Fake-Worker-Path).
- The same API keys as /v1, the access log and metrics with a bounded path label.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from tests.supervisor_harness import Supervisor, key_file, poll, scrape, serving, total

INF = "inference-key-0123456789"
ADMIN = "admin-key-0123456789abc"
WORKER = {"health_interval_s": 0.2, "health_timeout_s": 1.0, "stop_timeout_s": 3.0}


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervisor]:
    tmp = tmp_path_factory.mktemp("llama-clients")
    server = {"api_keys_file": str(key_file(tmp, INF, ADMIN))}
    s = Supervisor(tmp, {"worker": WORKER, "server": server}, args=["--log-format", "json"], fake_worker=True)
    s.api_key = ADMIN
    with serving(s) as ready:
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


def test_get_slots_is_not_routed_here_and_admin_routes_stay(sup: Supervisor) -> None:
    code, headers, _ = call(sup, "GET", "/slots", None, bearer(ADMIN))
    assert code == 404 and "X-Fake-Worker-Path" not in headers  # issue 26 routes GET /slots
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

"""Request ids, access lines and the JSON log format (supervisor/access_log.py), and the
worker's usage trailer (worker/protocol.py): tables, then the supervisor with the fake worker."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import httpx
import pytest

from supervisor.access_log import JsonFormatter, RequestRecord, request_id_for
from tests.supervisor_harness import REPO, Supervisor, poll
from worker.protocol import STREAM_DONE, StreamUsage, split_usage_trailer, usage_trailer

FAST = {"worker": {"health_interval_s": 0.2, "health_timeout_s": 1.0, "stop_timeout_s": 3.0}}


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        ("abc-123", True),
        ("a.b_c:D-9", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("", False),
        ("has space", False),
        ("new\nline", False),
        ('quote"', False),
        (None, False),
    ],
)
def test_request_id_is_the_clients_only_when_sane(given: str | None, kept: bool) -> None:
    rid = request_id_for(given)
    assert (rid == given) is kept
    assert 1 <= len(rid) <= 128


def test_usage_trailer_round_trip_and_absent() -> None:
    body = b'data: {"choices":[]}\n\n'
    usage = StreamUsage(prompt_tokens=7, completion_tokens=3, ttft_s=0.5, gen_s=0.2)
    rest, got = split_usage_trailer(body + usage_trailer(usage) + STREAM_DONE)
    assert rest == body + STREAM_DONE and got == usage
    assert split_usage_trailer(body + STREAM_DONE) == (body + STREAM_DONE, None)
    # A damaged trailer is cut out all the same, and reports nothing.
    rest, got = split_usage_trailer(body + b": vram-llm-usage {oops\n\n" + STREAM_DONE)
    assert rest == body + STREAM_DONE and got is None


def test_json_formatter_one_object_with_request_fields() -> None:
    rec = logging.LogRecord("vram_llm.access", logging.INFO, __file__, 1, "a %s", ("line",), None)
    rec.request = {"request_id": "r1", "status": 200}
    out = json.loads(JsonFormatter().format(rec))
    assert out["message"] == "a line" and out["logger"] == "vram_llm.access" and out["level"] == "INFO"
    assert out["request_id"] == "r1" and out["status"] == 200 and out["time"].endswith("+00:00")


@pytest.mark.parametrize(("journal", "stamped"), [(True, False), (False, True)])
def test_no_timestamp_of_ours_under_systemd(journal: bool, stamped: bool) -> None:
    code = (
        "import logging, sys; from supervisor.cli import configure_logging\n"
        f"configure_logging('INFO', 'text', {{'JOURNAL_STREAM': '8:1'}} if {journal} else {{}})\n"
        "logging.getLogger('vram_llm').info('hello')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    line = r.stderr.strip()
    assert line.endswith("vram_llm: hello")
    assert line.startswith("INFO ") is not stamped


def _access(lines: list[dict[str, Any]], rid: str) -> dict[str, Any]:
    found = [x for x in lines if x["logger"] == "vram_llm.access" and x.get("request_id") == rid]
    assert len(found) == 1, f"{len(found)} access lines for {rid}"
    return found[0]


def test_ids_access_lines_and_json_logs(tmp_path: Path) -> None:
    s = Supervisor(tmp_path, FAST, args=["--log-format", "json"], fake_worker=True)
    try:
        s.wait_ready(60)
        body = {"model": "x", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        with httpx.Client(base_url=s.base, timeout=30) as c:
            r = c.post("/v1/chat/completions", json=body, headers={"X-Request-Id": "client-id-1"})
            assert r.status_code == 200 and r.headers["X-Request-Id"] == "client-id-1"
            with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True},
                          headers={"X-Request-Id": "not sane!"}) as st:
                raw = b"".join(st.iter_bytes())
                stream_id = st.headers["X-Request-Id"]
            assert stream_id != "not sane!"
            assert b"vram-llm-usage" not in raw and raw.endswith(STREAM_DONE)
            r404 = c.get("/nope")
            assert r404.status_code == 404

        def lines() -> list[dict[str, Any]]:
            text = s.log_path.read_text(errors="replace")
            return [json.loads(ln) for ln in text.splitlines() if ln.strip()]  # every line is JSON

        poll(lambda: any(x.get("request_id") == r404.headers["X-Request-Id"] for x in lines()), 10, "the 404's line")
        assert s.stop() == 0
        out = lines()
        plain = _access(out, "client-id-1")
        assert (plain["method"], plain["path"], plain["status"]) == ("POST", "/v1/chat/completions", 200)
        assert (plain["prompt_tokens"], plain["completion_tokens"]) == (1, 3)
        assert plain["client"] == "127.0.0.1" and plain["key"] is None and plain["duration_ms"] > 0
        assert plain["model"]
        streamed = _access(out, stream_id)
        assert (streamed["completion_tokens"], streamed["status"], streamed["model"]) == (3, 200, plain["model"])
        assert streamed["ttft_ms"] is not None and streamed["ttft_ms"] <= streamed["duration_ms"]
        assert _access(out, r404.headers["X-Request-Id"])["status"] == 404
        # The worker's own line for each request names the same id.
        for rid in ("client-id-1", stream_id):
            assert any(x["logger"].startswith("vram_llm") and "worker[" in x["message"]
                       and f"request {rid}:" in x["message"] for x in out), rid
        assert {"time", "level", "logger", "message"} <= set(out[0])
    finally:
        s.kill_hard()


def test_worker_logs_the_request_id(tmp_path: Path) -> None:
    """The real worker's middleware (worker/server.py) logs the id the supervisor sends."""
    pytest.importorskip("llama_cpp")
    s = Supervisor(tmp_path, FAST)
    try:
        s.wait_ready(180)
        # A proxied route (the supervisor answers /v1/models itself).
        req = urllib.request.Request(
            s.base + "/tokenize", data=b'{"content": "hi"}',
            headers={"X-Request-Id": "real-worker-id", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.headers["X-Request-Id"] == "real-worker-id"
        poll(lambda: "request real-worker-id: POST /tokenize -> 200" in s.log(), 10, "the worker's line")
        assert s.stop() == 0
    finally:
        s.kill_hard()


def test_body_usage_reads_openai_and_llama_server_answers() -> None:
    cases = [
        (b'{"model": "m", "usage": {"prompt_tokens": 5, "completion_tokens": 2}}', (5, 2)),
        (b'{"model": "m", "usage": {"input_tokens": 7, "output_tokens": 3}}', (7, 3)),
        # llama-server's native /completion: no usage block, its own counters.
        (b'{"model": "m", "content": "x", "tokens_evaluated": 9, "tokens_predicted": 4}', (9, 4)),
        (b'{"content": "x"}', (None, None)),
    ]
    for body, counts in cases:
        rec = RequestRecord("r", 0.0)
        rec.body_usage(body)
        assert (rec.prompt_tokens, rec.completion_tokens) == counts, body

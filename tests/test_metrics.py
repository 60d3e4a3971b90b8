"""Serving metrics (supervisor/metrics.py): the real worker's usage adds up in the token
counters, and a real Prometheus server scrapes /metrics and answers a PromQL query."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.supervisor_harness import PER_MODEL_SERIES, Supervisor, free_port, models_by_series, poll, scrape, total

FAST = {"worker": {"health_interval_s": 0.2, "health_timeout_s": 1.0, "stop_timeout_s": 3.0}}
SIM = [{"index": 0, "uuid": "GPU-12345678-aaaa-bbbb-cccc-000000000000", "name": "Sim", "total_mib": 8192,
        "free_mib": 8000}]


@pytest.mark.model
def test_token_counters_equal_the_sum_of_usage(tmp_path: Path) -> None:
    """The real worker on the real model: plain answers (usage in the body) and streamed ones
    (usage from the worker's trailer) both count."""
    sims = tmp_path / "gpus.json"
    sims.write_text(json.dumps(SIM))
    s = Supervisor(tmp_path, {**FAST, "model": {"ctx_size": 1024}, "gpu": {"simulate_gpus": str(sims)}})
    try:
        s.wait_ready(180)
        client = openai.OpenAI(base_url=s.base + "/v1", api_key="unused", max_retries=0, timeout=120)
        prompt, completion, n = 0, 0, 0
        for i in range(2):
            ans = client.chat.completions.create(
                model="x", messages=[{"role": "user", "content": f"Count to {i + 3}."}], max_tokens=4
            )
            assert ans.usage is not None
            prompt += ans.usage.prompt_tokens
            completion += ans.usage.completion_tokens
            n += 1
        ans2 = client.completions.create(model="x", prompt="The sky is", max_tokens=3)
        assert ans2.usage is not None
        prompt += ans2.usage.prompt_tokens
        completion += ans2.usage.completion_tokens
        n += 1
        chunks = list(client.chat.completions.create(
            model="x", messages=[{"role": "user", "content": "Count from 1 to 20."}], max_tokens=5, stream=True,
            stream_options={"include_usage": True}, temperature=0,
        ))
        usage = chunks[-1].usage
        assert usage is not None
        prompt += usage.prompt_tokens
        completion += usage.completion_tokens
        n += 1
        client.close()

        def counted() -> dict[Any, float] | None:
            m = scrape(s)
            return m if total(m, "vram_llm_request_duration_seconds_count") == n else None

        m = poll(counted, 10, f"{n} requests in the duration histogram")
        assert total(m, "vram_llm_prompt_tokens_total") == prompt
        assert total(m, "vram_llm_completion_tokens_total") == completion
        # Plain and streamed answers count under the same model label.
        assert len({dict(lbl)["model"] for (name, lbl) in m if name == "vram_llm_completion_tokens_total"}) == 1
        # The streamed answer gives the timings: TTFT from its first token, ITL from its second.
        assert total(m, "vram_llm_time_to_first_token_seconds_count") == (usage.completion_tokens >= 1)
        assert total(m, "vram_llm_inter_token_latency_seconds_count") == (usage.completion_tokens >= 2)
        assert total(m, "vram_llm_queue_wait_seconds_count") == n
        codes = {dict(lbl)["code"]: v for (name, lbl), v in m.items()
                 if name == "vram_llm_http_requests_total" and dict(lbl)["path"] == "/v1"}
        assert codes == {"200": n}
        assert total(m, "vram_llm_worker_resident_memory_bytes") > 10 * 2**20
        # Busy slots come from the worker's last /health (read every 0.2 s here).
        poll(lambda: total(scrape(s), "vram_llm_slots_busy") == 0, 10, "no busy slot")
        assert ("vram_llm_gpu_memory_free_bytes", (("gpu", "0"), ("uuid", SIM[0]["uuid"]))) in m
        assert s.stop() == 0
    finally:
        s.kill_hard()


def test_one_model_every_series_carries_its_name(tmp_path: Path) -> None:
    """One model: the worker-lifecycle series carry the same model label as the token
    counters (its alias, else the file stem); /status's health verdict is /health's."""
    s = Supervisor(tmp_path, FAST, fake_worker=True)
    try:
        s.wait_ready(60)
        code, ans = s.post("/v1/chat/completions", {"model": "x", "messages": [{"role": "user", "content": "hi"}],
                                                    "max_tokens": 4})
        assert code == 200
        m = poll(lambda: (m := scrape(s)) and total(m, "vram_llm_requests_served_total") == 1 and m, 10, "1 served")
        have = models_by_series(m)
        assert {name: have.get(name) for name in PER_MODEL_SERIES} == {name: {ans["model"]} for name in PER_MODEL_SERIES}
        assert total(m, "vram_llm_worker_state", model=ans["model"], state="ready") == 1
        assert s.status()["health"] == {"ok": True, "status": "ok"}
        assert s.stop() == 0
    finally:
        s.kill_hard()


# --- a real Prometheus server ------------------------------------------------------------------

PROMETHEUS = shutil.which("prometheus")


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[Any, int]]:
    if PROMETHEUS is None:
        pytest.skip("the prometheus binary is not installed (Debian: apt-get install prometheus; .ci/run tries)")
    port = free_port()
    targets: list[str] = []

    def start(target_port: int) -> int:
        targets.append(f"127.0.0.1:{target_port}")
        cfg = tmp_path / "prometheus.yml"
        cfg.write_text(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
            "scrape_configs:\n  - job_name: vram-llm\n    static_configs:\n"
            f"      - targets: ['{targets[0]}']\n"
        )
        with open(tmp_path / "prometheus.log", "wb") as log:
            procs.append(subprocess.Popen(
                [PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                stdout=subprocess.DEVNULL, stderr=log,
            ))
        return port

    procs: list[subprocess.Popen[bytes]] = []
    yield start, port
    for p in procs:
        p.terminate()
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


def promql(port: int, query: str) -> list[dict[str, Any]]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=5) as r:
        ans = json.loads(r.read())
    assert ans["status"] == "success", ans
    return ans["data"]["result"]  # type: ignore[no-any-return]


def test_real_prometheus_scrapes_and_answers_promql(tmp_path: Path, prometheus: tuple[Any, int]) -> None:
    start, _ = prometheus
    s = Supervisor(tmp_path, FAST, fake_worker=True)
    try:
        s.wait_ready(60)
        for _ in range(3):  # the fake worker: 1 prompt token, max_tokens completion tokens
            code, _ans = s.post("/v1/chat/completions", {"model": "x", "messages": [{"role": "user", "content": "hi"}],
                                                         "max_tokens": 4})
            assert code == 200
        port = start(s.port)

        def answered() -> bool:
            res = promql(port, "sum(vram_llm_completion_tokens_total)")
            return bool(res) and float(res[0]["value"][1]) == 12.0

        poll(answered, 60, "Prometheus to scrape 12 completion tokens", interval=0.5)
        up = promql(port, 'up{job="vram-llm"}')
        assert up and up[0]["value"][1] == "1"
        rate = promql(port, 'sum by (code) (vram_llm_http_requests_total{path="/v1"})')
        assert {r["metric"]["code"]: r["value"][1] for r in rate} == {"200": "3"}
        assert s.stop() == 0
    finally:
        s.kill_hard()

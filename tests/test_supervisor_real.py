"""Client tests: `vram-llm serve` on the real SmolLM2 model, with real clients.

One supervisor for the module (the model loads once); tests that kill the worker run last
and leave the supervisor serving again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import openai
import psutil
import pytest

from tests.supervisor_harness import Supervisor, poll, scrape, total

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def sup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervisor]:
    tmp = tmp_path_factory.mktemp("real-supervisor")
    sims = tmp / "gpus.json"
    # A simulated GPU: the worker gets the plan's CUDA environment (and ignores it, as a
    # CPU build of llama.cpp does), so the test can check what reaches the worker.
    sims.write_text(
        json.dumps([{"index": 0, "uuid": "GPU-12345678-aaaa-bbbb-cccc-000000000000", "name": "Sim", "total_mib": 8192, "free_mib": 8000}])
    )
    s = Supervisor(
        tmp,
        {
            "model": {"ctx_size": 2048},
            "gpu": {"simulate_gpus": str(sims)},
            "worker": {"health_interval_s": 1.0},
            "restart": {"backoff_initial_s": 0.1},
            # A reload lets answers in flight finish for this long: on a busy CI box a
            # 24-token answer has taken over 30 s (the default), and a cut one is a loss.
            "shutdown": {"grace_s": 120.0},
        },
    )
    try:
        s.wait_ready(180)
        yield s
        assert s.stop() == 0
    finally:
        s.kill_hard()


@pytest.fixture(scope="module")
def client(sup: Supervisor) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=sup.base + "/v1", api_key="unused", max_retries=0, timeout=120)
    yield c
    c.close()


def test_health_and_models(sup: Supervisor, client: openai.OpenAI) -> None:
    assert sup.get("/health") == (200, {"status": "ok"})
    models = client.models.list()
    assert [m.id for m in models.data] == ["SmolLM2-135M-Instruct.Q4_1"]


def test_worker_log_lines_carry_one_prefix(sup: Supervisor) -> None:
    pid = sup.status()["worker"]["pid"]
    lines = [ln for ln in sup.log().splitlines() if f"worker[{pid}]" in ln]
    ready = [ln for ln in lines if ln.endswith("ready: model SmolLM2-135M-Instruct.Q4_1")]
    # The supervisor's prefix, then the worker's level and message: not the worker's own
    # "worker[PID] INFO" a second time.
    assert ready and ready[0].split(" INFO ", 1)[1] == (
        f"vram_llm.worker: worker[{pid}]: INFO ready: model SmolLM2-135M-Instruct.Q4_1"
    )
    assert not [ln for ln in lines if ln.count(f"worker[{pid}]") > 1]


def test_chat_completion(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(
        model="any",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        temperature=0,
        seed=1,
    )
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage is not None and r.usage.completion_tokens <= 8


def test_completion(client: openai.OpenAI) -> None:
    r = client.completions.create(model="any", prompt="The capital of France is", max_tokens=5, temperature=0)
    assert r.choices[0].text
    assert r.choices[0].finish_reason == "length"
    assert r.usage is not None and r.usage.completion_tokens == 5


def test_extension_fields_through_the_proxy(client: openai.OpenAI) -> None:
    # How an SDK user sends other servers' fields: extra_body. Known ones are honoured,
    # unknown ones ignored and named in a header the proxy passes on.
    raw = client.completions.with_raw_response.create(
        model="any", prompt="The capital of France is", max_tokens=4, temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True, "some_other_servers_field": 1},
    )
    assert raw.headers["X-Ignored-Params"] == "some_other_servers_field"
    r = raw.parse()
    assert r.usage is not None and r.usage.completion_tokens == 4
    assert len(r.choices[0].model_extra["token_ids"]) == 4  # type: ignore[index]


def test_tokenizer_endpoints_through_the_proxy(sup: Supervisor, client: openai.OpenAI) -> None:
    def post(path: str, body: dict[str, Any]) -> Any:
        req = urllib.request.Request(
            sup.base + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            return json.loads(r.read())

    prompt = "The capital of France is"
    tokens = post("/tokenize", {"content": prompt, "add_special": True})["tokens"]
    assert post("/detokenize", {"tokens": tokens})["content"] == prompt
    r = client.completions.create(model="any", prompt=prompt, max_tokens=1, temperature=0)
    assert r.usage is not None and r.usage.prompt_tokens == len(tokens)
    messages = [{"role": "user", "content": "Hi"}]
    assert "Hi" in post("/apply-template", {"messages": messages})["prompt"]


def test_streaming_chat(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="any",
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    text = ""
    usage = None
    finish = None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert text and finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens <= 10


def test_responses_and_messages_through_the_proxy(sup: Supervisor, client: openai.OpenAI) -> None:
    # The supervisor forwards every /v1 path: the Responses and Messages dialects included.
    r = client.responses.create(model="any", input="Count to five.", max_output_tokens=5, temperature=0)
    assert r.output_text and r.usage is not None and r.usage.output_tokens <= 5
    events = [e.type for e in client.responses.create(model="any", input="Count to five.", max_output_tokens=5, stream=True)]
    assert events[0] == "response.created" and events[-1] in ("response.completed", "response.incomplete")
    assert client.responses.retrieve(r.id).id == r.id
    code, body = sup.post("/v1/messages", {"max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
    assert code == 200 and body["type"] == "message" and body["usage"]["output_tokens"] <= 3
    code, body = sup.post("/v1/messages", {"messages": [{"role": "user", "content": "hi"}]})
    assert code == 400 and body["type"] == "error" and body["error"]["type"] == "invalid_request_error"


def test_responses_and_messages_streams_are_counted_like_chat(sup: Supervisor, client: openai.OpenAI) -> None:
    # Their streams end with the worker's usage trailer too: the supervisor cuts it out and
    # counts the tokens (metrics, access log), as for chat; non-streamed answers count too.
    before = total(scrape(sup), "vram_llm_completion_tokens_total")
    events = list(client.responses.create(model="any", input="Count to five.", max_output_tokens=5, stream=True))
    last = events[-1]
    assert last.type in ("response.completed", "response.incomplete")
    used = last.response.usage.output_tokens  # type: ignore[union-attr]
    body = {"max_tokens": 4, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    req = urllib.request.Request(sup.base + "/v1/messages", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        lines = r.read().decode().splitlines()
    assert not [x for x in lines if "vram-llm-usage" in x]  # the trailer never reaches the client
    delta = next(json.loads(x[6:]) for x in lines if x.startswith("data: ") and '"message_delta"' in x)
    used += delta["usage"]["output_tokens"]
    code, answer = sup.post("/v1/messages", {"max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
    assert code == 200
    used += answer["usage"]["output_tokens"]
    assert used > 0
    poll(lambda: total(scrape(sup), "vram_llm_completion_tokens_total") >= before + used, 30,
         "the completion tokens of both dialects counted")
    assert total(scrape(sup), "vram_llm_completion_tokens_total") == before + used


def test_llama_servers_native_routes_through_the_proxy(sup: Supervisor) -> None:
    # Issue 25: /completion (its stream has no [DONE]: the trailer comes after the last event),
    # /props and the chat token count, through the supervisor to the real worker; the
    # trailer never reaches the client and both /completion answers' tokens are counted.
    before = total(scrape(sup), "vram_llm_completion_tokens_total")
    code, answer = sup.post("/completion", {"prompt": "The capital of France is", "n_predict": 3, "temperature": 0})
    assert code == 200 and answer["stop"] is True and answer["tokens_predicted"] == 3
    body = {"prompt": "The capital of France is", "n_predict": 4, "stream": True}
    req = urllib.request.Request(sup.base + "/completion", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        lines = r.read().decode().splitlines()
    assert not [x for x in lines if "vram-llm-usage" in x or x == "data: [DONE]"]
    events = [json.loads(x[6:]) for x in lines if x.startswith("data: ")]
    assert events[-1]["stop"] is True and events[-1]["tokens_predicted"] == 4
    poll(lambda: total(scrape(sup), "vram_llm_completion_tokens_total") >= before + 7, 30,
         "both /completion answers' tokens counted")
    with urllib.request.urlopen(sup.base + "/props", timeout=60) as r:
        props = json.loads(r.read())
    assert props["default_generation_settings"]["n_ctx"] == 2048 and props["total_slots"] >= 1
    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    counted = [sup.post(p, chat) for p in ("/v1/chat/completions/input_tokens", "/chat/completions/input_tokens")]
    assert counted[0] == counted[1] and counted[0][0] == 200 and counted[0][1]["input_tokens"] > 0
    # Slot files: the action travels in the query string.
    code, saved = sup.post("/slots/0?action=save", {"filename": "through-proxy.bin"})
    assert code == 200 and saved["filename"] == "through-proxy.bin", saved
    code, erased = sup.post("/slots/0?action=erase", {})
    assert code == 200 and erased["n_erased"] == saved["n_saved"], erased


def test_bad_request_is_a_4xx_through_the_proxy(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="any", messages=[], max_tokens=5)


def test_worker_gets_the_plan(sup: Supervisor) -> None:
    st = sup.status()
    plan = st["plan"]
    params = _worker_params(sup)
    assert params["cuda_visible_devices"] == plan["env"]["CUDA_VISIBLE_DEVICES"]
    assert params["cuda_device_order"] == "PCI_BUS_ID"
    assert params["n_gpu_layers"] == plan["n_gpu_layers"]
    assert params["tensor_split"] == pytest.approx(plan["tensor_split"]) or (
        not params["tensor_split"] and not plan["tensor_split"]
    )
    assert params["n_ctx"] == plan["n_ctx"] == 2048


def _worker_params(sup: Supervisor) -> dict[str, Any]:
    """The parameters the worker reports it applied."""
    return _worker_health(sup)["params"]  # type: ignore[no-any-return]


def _worker_health(sup: Supervisor) -> dict[str, Any]:
    """The worker's own /health, read over its Unix socket (not through the supervisor)."""
    import http.client
    import socket

    sock_dir = next(sup.runtime.iterdir())
    sock_path = next(p for p in sock_dir.iterdir() if p.suffix == ".sock")

    class UnixConn(http.client.HTTPConnection):
        def connect(self) -> None:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(10)
            self.sock.connect(str(sock_path))

    conn = UnixConn("worker")
    try:
        conn.request("GET", "/health")
        body: dict[str, Any] = json.loads(conn.getresponse().read())
    finally:
        conn.close()
    return body


def test_prompt_cache_counters_in_status_and_metrics(sup: Supervisor, client: openai.OpenAI) -> None:
    prompt = "A question about the moon, asked twice by the same user: how far is it?"
    client.completions.create(model="any", prompt=prompt, max_tokens=2)
    client.completions.create(model="any", prompt=prompt, max_tokens=2)
    worker = poll(lambda: (w := sup.status()["worker"]).get("cache_hits") and w, 30,
                  "the worker's cache counters in /status")
    assert worker["cache_tokens_reused"] > 0
    assert set(worker["ram_cache"]) == {"entries", "bytes", "hits", "tokens_saved"}
    samples = scrape(sup)
    names = {name for name, _ in samples}
    assert {"vram_llm_prompt_cache_hits_total", "vram_llm_ram_cache_bytes"} <= names
    # The slots keep the prompt cached: the KV cache holds its tokens.
    assert total(samples, "vram_llm_kv_cache_tokens") > 0
    assert 0 < total(samples, "vram_llm_kv_cache_usage_ratio") <= 1


def test_client_disconnect_stops_the_generation(sup: Supervisor, client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model="any", prompt="Once upon a time, in a land far away,", max_tokens=2000, stream=True
    )
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()  # the client goes away mid-generation
    # The worker stops within a token: it reports no active generation long before 2000
    # tokens could have been produced, and the next request is served right away.
    poll(lambda: not _worker_health(sup).get("active"), 30, "the worker to stop generating")
    r = client.completions.create(model="any", prompt="Hello", max_tokens=3)
    assert r.usage is not None and r.usage.completion_tokens == 3


def test_kill9_idle_worker_is_restarted(sup: Supervisor, client: openai.OpenAI) -> None:
    before = sup.status()
    pid = before["worker"]["pid"]
    os.kill(pid, signal.SIGKILL)
    st = sup.wait_state("ready", 120, lambda st: st["worker"]["pid"] != pid)
    assert st["restarts"] == before["restarts"] + 1
    assert st["restart_history"][-1]["kind"] == "crash"
    r = client.completions.create(model="any", prompt="Hello", max_tokens=3)
    assert r.choices[0].text is not None


def test_kill9_mid_stream_gives_error_event(sup: Supervisor, client: openai.OpenAI) -> None:
    pid = sup.status()["worker"]["pid"]
    stream = client.completions.create(
        model="any", prompt="Once upon a time, in a land far away,", max_tokens=400, stream=True
    )
    got = 0
    with pytest.raises(openai.APIError):
        for _ in stream:
            got += 1
            if got == 3:
                os.kill(pid, signal.SIGKILL)
    assert got >= 3
    sup.wait_state("ready", 120, lambda st: st["worker"]["pid"] != pid)
    r = client.completions.create(model="any", prompt="Hello", max_tokens=3)
    assert r.choices[0].text is not None


def test_kill9_with_four_streams_in_flight_gives_each_one_error_event(sup: Supervisor) -> None:
    import httpx

    pid = sup.status()["worker"]["pid"]
    n = 4
    events: list[list[Any]] = [[] for _ in range(n)]
    flowing = [threading.Event() for _ in range(n)]
    body = {"model": "any", "max_tokens": 1500, "stream": True, "temperature": 0,
            "logit_bias": {"0": -100, "2": -100}}

    def read(i: int) -> None:
        with httpx.Client(base_url=sup.base, timeout=120) as c, c.stream(
            "POST", "/v1/completions", json={**body, "prompt": f"Story number {i}:"}
        ) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    data = line[len("data: "):]
                    events[i].append(data if data == "[DONE]" else json.loads(data))
                    if len(events[i]) >= 3:
                        flowing[i].set()

    threads = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    # All four stream at once (the worker's 4 slots), then the worker dies.
    poll(lambda: all(f.is_set() for f in flowing), 120, "four streams to flow")
    os.kill(pid, signal.SIGKILL)
    for t in threads:
        t.join(timeout=60)
    for i in range(n):
        errors = [e for e in events[i] if isinstance(e, dict) and "error" in e]
        assert len(errors) == 1 and errors[0]["error"]["code"] == "worker_failed", events[i][-3:]
        assert events[i][-1] is errors[0]  # the error event ends the stream, no [DONE]
    sup.wait_state("ready", 120, lambda st: st["worker"]["pid"] != pid)


# Bans SmolLM2's end tokens so a generation runs to max_tokens: a short answer can only be a cut.
NO_EOS = {"0": -100, "2": -100}


def _long_completion(sup: Supervisor, stream: bool, max_tokens: int) -> tuple[int, bytes]:
    body: dict[str, Any] = {"model": "any", "prompt": "1, 2, 3, 4,", "max_tokens": max_tokens, "temperature": 0,
            "logit_bias": NO_EOS, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    req = urllib.request.Request(
        sup.base + "/v1/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _complete_or_error(status: int, raw: bytes, stream: bool, max_tokens: int) -> str:
    """'complete', 'error' or 'truncated' (a short answer passed off as finished)."""
    if status >= 500:
        return "error"
    assert status == 200, raw
    if stream:
        events = [line[6:] for line in raw.splitlines() if line.startswith(b"data: ")]
        if events[-1] != b"[DONE]":
            return "error" if "error" in json.loads(events[-1]) else "truncated"
        chunks = [json.loads(e) for e in events[:-1]]
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        usage = [c["usage"] for c in chunks if c.get("usage")]
        done = finish == ["length"] and usage and usage[-1]["completion_tokens"] == max_tokens
        return "complete" if done else "truncated"
    answer = json.loads(raw)
    done = answer["choices"][0]["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == max_tokens
    return "complete" if done else "truncated"


@pytest.mark.parametrize("stream", [False, True], ids=["non-streamed", "streamed"])
def test_sighup_during_a_long_generation_never_cuts_it_short(sup: Supervisor, stream: bool) -> None:
    before = sup.status()
    out: list[tuple[int, bytes]] = []
    t = threading.Thread(target=lambda: out.append(_long_completion(sup, stream, 300)))
    t.start()
    poll(lambda: _worker_health(sup).get("active") == 1, 30, "the generation to start")
    sup.proc.send_signal(signal.SIGHUP)
    t.join(120)
    # The old worker finishes it (shutdown.grace_s is 120 s here): complete, not a short "stop".
    assert _complete_or_error(*out[0], stream, 300) == "complete"
    sup.wait_state("ready", 120, lambda st: st["worker"]["generation"] > before["worker"]["generation"])


def test_two_sighups_under_four_looping_clients_lose_nothing(sup: Supervisor) -> None:
    outcomes: list[str] = []
    stop = threading.Event()

    def client_loop(i: int) -> None:
        while not stop.is_set():
            stream = i % 2 == 1
            outcomes.append(_complete_or_error(*_long_completion(sup, stream, 24), stream, 24))

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        for _ in range(2):
            gen = sup.status()["worker"]["generation"]
            poll(lambda: len(outcomes) >= 4, 240, "requests to be answered")
            sup.proc.send_signal(signal.SIGHUP)
            sup.wait_state("ready", 120, lambda st: st["worker"]["generation"] > gen)
        n = len(outcomes)
        poll(lambda: len(outcomes) >= n + 4, 240, "requests after the reloads")
    finally:
        stop.set()
        for t in threads:
            t.join(300)
    assert outcomes.count("truncated") == 0 and outcomes.count("error") == 0, outcomes
    assert len(outcomes) >= 8


def test_worker_dies_with_a_killed_supervisor(tmp_path: Path) -> None:
    """kill -9 of the supervisor itself: the worker's parent-death signal takes it down."""
    s = Supervisor(tmp_path, {"model": {"ctx_size": 512}})
    try:
        st = s.wait_ready(180)
        pid = st["worker"]["pid"]
        s.proc.kill()
        s.proc.wait(10)
        poll(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
             30, f"worker {pid} to exit after its supervisor was killed")
    finally:
        s.kill_hard()
        for d in s.runtime.iterdir():  # a SIGKILLed supervisor cannot clean up; the test does
            subprocess.run(["rm", "-rf", str(d)], check=False)

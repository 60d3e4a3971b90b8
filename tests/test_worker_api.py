"""The worker's OpenAI API against the real SmolLM2 model (loaded once per session)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.conftest import WorkerProcess, sse_events

pytestmark = pytest.mark.model

MODEL_ID = "smollm2-test"
# SmolLM2's ChatML template, written out by hand to prove the worker applies the GGUF one.
CHATML_PROMPT = (
    "<|im_start|>system\nYou are a terse assistant.<|im_end|>\n"
    "<|im_start|>user\nName three colors.<|im_end|>\n"
    "<|im_start|>assistant\n"
)
CHAT_MESSAGES = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name three colors."},
]
COUNTING = "1, 2, 3, 4, 5, 6,"


def chat(client: httpx.Client, **body: Any) -> dict[str, Any]:
    body.setdefault("messages", CHAT_MESSAGES)
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def complete(client: httpx.Client, **body: Any) -> dict[str, Any]:
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def counts(usage: dict[str, Any]) -> dict[str, Any]:
    """Usage less prompt_tokens_details: how much of a prompt was cached depends on the
    requests before it, not on the request."""
    return {k: v for k, v in usage.items() if k != "prompt_tokens_details"}


def stream(client: httpx.Client, path: str, body: dict[str, Any]) -> list[Any]:
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return list(sse_events(r.iter_lines()))


def test_health_reports_model_and_applied_params(worker: WorkerProcess, client: httpx.Client) -> None:
    body = client.get("/health").json()
    assert body["status"] == "ok"
    assert body["model"] == MODEL_ID
    assert body["pid"] == worker.pid
    params = body["params"]
    assert params["n_ctx"] == 1024
    assert params["n_threads"] == 2
    assert params["model_path"].endswith(".gguf")
    assert params["llama_cpp_version"]


def test_models_lists_the_loaded_model(client: httpx.Client) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == [MODEL_ID]
    assert client.get(f"/v1/models/{MODEL_ID}").json()["id"] == MODEL_ID
    missing = client.get("/v1/models/nope")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


def test_chat_completion_shape_and_usage(client: httpx.Client) -> None:
    body = chat(client, model="gpt-4o", max_tokens=8, temperature=0)
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == MODEL_ID  # whatever the client named, we echo our id
    (choice,) = body["choices"]
    assert choice["index"] == 0
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str) and choice["message"]["content"]
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 10
    assert 1 <= usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_chat_applies_the_gguf_chat_template(client: httpx.Client) -> None:
    via_chat = chat(client, max_tokens=12, temperature=0)
    via_raw = complete(client, prompt=CHATML_PROMPT, max_tokens=12, temperature=0)
    assert via_chat["choices"][0]["message"]["content"] == via_raw["choices"][0]["text"]
    assert counts(via_chat["usage"]) == counts(via_raw["usage"])


def test_max_tokens_gives_finish_reason_length(client: httpx.Client) -> None:
    body = complete(client, prompt=COUNTING, max_tokens=3, temperature=0)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 3
    body = chat(client, max_completion_tokens=2, temperature=0)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2


def test_completion_shape(client: httpx.Client) -> None:
    body = complete(client, prompt=COUNTING, max_tokens=6, temperature=0, model="anything")
    assert body["id"].startswith("cmpl-")
    assert body["object"] == "text_completion"
    assert body["model"] == MODEL_ID
    text = body["choices"][0]["text"]
    assert "7" in text
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 6


def test_completion_accepts_token_ids_and_a_one_element_list(client: httpx.Client) -> None:
    as_text = complete(client, prompt=COUNTING, max_tokens=4, temperature=0)
    as_list = complete(client, prompt=[COUNTING], max_tokens=4, temperature=0)
    assert as_list["choices"][0]["text"] == as_text["choices"][0]["text"]
    ids = complete(client, prompt=[33, 28, 216, 34], max_tokens=2, temperature=0)
    assert ids["usage"]["prompt_tokens"] == 4


def test_stop_string_cuts_the_output(client: httpx.Client) -> None:
    full = complete(client, prompt=COUNTING, max_tokens=12, temperature=0)["choices"][0]["text"]
    assert " 9" in full, full
    cut = complete(client, prompt=COUNTING, max_tokens=12, temperature=0, stop=[" 9", "zzz"])
    assert cut["choices"][0]["text"] == full[: full.index(" 9")]
    assert cut["choices"][0]["finish_reason"] == "stop"
    # A single string works too, and streaming never leaks a held-back stop prefix.
    events = stream(client, "/v1/completions",
                    {"prompt": COUNTING, "max_tokens": 12, "temperature": 0, "stop": " 9"})
    text = "".join(e["choices"][0]["text"] for e in events[:-1] if e["choices"])
    assert text == full[: full.index(" 9")]


def test_streaming_chat_matches_non_streaming(client: httpx.Client) -> None:
    request = {"max_tokens": 10, "temperature": 0, "messages": CHAT_MESSAGES}
    whole = chat(client, **request)
    events = stream(client, "/v1/chat/completions",
                    {**request, "stream_options": {"include_usage": True}})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL_ID for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == []
    assert counts(usage_chunk["usage"]) == counts(whole["usage"])
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])
    assert content == whole["choices"][0]["message"]["content"]
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])


def test_streaming_without_usage_has_no_usage_chunk(client: httpx.Client) -> None:
    events = stream(client, "/v1/chat/completions",
                    {"max_tokens": 4, "temperature": 0, "messages": CHAT_MESSAGES})
    assert events[-1] == "[DONE]"
    assert all(c["choices"] and "usage" not in c for c in events[:-1])


def test_streaming_completion(client: httpx.Client) -> None:
    whole = complete(client, prompt=COUNTING, max_tokens=8, temperature=0)
    events = stream(client, "/v1/completions", {
        "prompt": COUNTING, "max_tokens": 8, "temperature": 0,
        "stream_options": {"include_usage": True},
    })
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert counts(chunks[-1]["usage"]) == counts(whole["usage"])
    text = "".join(c["choices"][0]["text"] for c in chunks[:-1])
    assert text == whole["choices"][0]["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_seed_makes_sampling_reproducible(client: httpx.Client) -> None:
    req = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0.9, "seed": 1234}
    a = complete(client, **req)["choices"][0]["text"]
    b = complete(client, **req)["choices"][0]["text"]
    assert a == b
    g1 = complete(client, **{**req, "temperature": 0})["choices"][0]["text"]
    g2 = complete(client, **{**req, "temperature": 0, "seed": 99})["choices"][0]["text"]
    assert g1 == g2


def test_sampling_parameters_are_accepted(client: httpx.Client) -> None:
    body = complete(
        client, prompt="The weather today", max_tokens=4, temperature=0.7, top_p=0.9, top_k=20,
        min_p=0.1, presence_penalty=0.5, frequency_penalty=0.5, repeat_penalty=1.1, seed=7,
    )
    assert body["usage"]["completion_tokens"] >= 1


def test_logit_bias_forces_a_token(client: httpx.Client) -> None:
    # Token 28 is "," in SmolLM2's vocabulary; +100 makes it win every step.
    body = complete(client, prompt="Hello", max_tokens=3, temperature=0, logit_bias={"28": 100})
    assert body["choices"][0]["text"] == ",,,"


def test_response_format_json_object_returns_json(client: httpx.Client) -> None:
    body = chat(
        client, temperature=0, max_tokens=60,
        # A prompt whose greedy object closes within max_tokens ('Reply with the JSON object
        # {"a": 1}.' nests keys until the limit with flash attention on).
        messages=[{"role": "user", "content": 'Give me a JSON object with the key "name" set to "Ada".'}],
        response_format={"type": "json_object"},
    )
    assert body["choices"][0]["finish_reason"] == "stop"
    assert isinstance(json.loads(body["choices"][0]["message"]["content"]), dict)


def test_response_format_json_schema_is_followed(client: httpx.Client) -> None:
    schema = {
        "type": "object",
        "properties": {"answer": {"type": "integer"}},
        "required": ["answer"],
        "additionalProperties": False,
    }
    body = chat(
        client, temperature=0, max_tokens=40,
        messages=[{"role": "user", "content": "What is 2 + 2? Answer in JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "sum", "schema": schema}},
    )
    value = json.loads(body["choices"][0]["message"]["content"])
    assert set(value) == {"answer"} and isinstance(value["answer"], int)


def test_content_parts_and_developer_role(client: httpx.Client) -> None:
    body = chat(client, max_tokens=4, temperature=0, messages=[
        {"role": "developer", "content": "You are terse."},
        {"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "hi"}]},
    ])
    assert body["choices"][0]["message"]["content"]


def test_second_turn_is_served_from_the_slot_cache(client: httpx.Client) -> None:
    turn1 = "A talk about rivers. User: where do rivers begin? Assistant:"
    first = complete(client, prompt=turn1, max_tokens=6, temperature=0)
    before = client.get("/health").json()
    turn2 = turn1 + first["choices"][0]["text"] + " User: and where do they end? Assistant:"
    complete(client, prompt=turn2, max_tokens=2, temperature=0)
    after = client.get("/health").json()
    # Read from the counters, not the clock: one hit that skipped at least the first turn.
    assert after["cache_hits"] == before.get("cache_hits", 0) + 1
    reused = after["cache_tokens_reused"] - before.get("cache_tokens_reused", 0)
    assert reused >= first["usage"]["prompt_tokens"] - 1

"""llama-server's own endpoints and fields on the real worker (SmolLM2): POST /completion in
its native shape, grammar / json_schema / response_format.schema, assistant prefill,
/v1/chat/completions/input_tokens, GET/POST /props, /rerank, and the [model] chat_template
override. Field names are llama-server's (tools/server: server-task.cpp, server-context.cpp,
server-common.cpp)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import WorkerProcess, own_worker, sse_events

pytestmark = pytest.mark.model

CHAT = "/v1/chat/completions"
PROMPT = "The capital of France is"

# server_task_result_cmpl_final::to_json_non_oaicompat's keys (completion_probabilities
# only with n_probs, outside a stream).
FINAL_KEYS = {
    "index", "content", "tokens", "id_slot", "stop", "model", "tokens_predicted", "tokens_evaluated",
    "generation_settings", "prompt", "has_new_line", "truncated", "stop_type", "stopping_word",
    "tokens_cached", "timings",
}
PARTIAL_KEYS = {"index", "content", "tokens", "stop", "id_slot", "tokens_predicted", "tokens_evaluated"}
TIMINGS_KEYS = {
    "cache_n", "prompt_n", "prompt_ms", "prompt_per_token_ms", "prompt_per_second",
    "predicted_n", "predicted_ms", "predicted_per_token_ms", "predicted_per_second",
}
# task_params::to_json (only_metrics=false) keys a client reads most.
SETTINGS_KEYS = {
    "seed", "temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_last_n", "repeat_penalty",
    "presence_penalty", "frequency_penalty", "mirostat", "stop", "max_tokens", "n_predict", "n_keep",
    "ignore_eos", "stream", "logit_bias", "n_probs", "min_keep", "grammar", "samplers",
    "timings_per_token", "post_sampling_probs",
}


def completion(client: httpx.Client, **body: Any) -> dict[str, Any]:
    r = client.post("/completion", json=body)
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def stream_completion(client: httpx.Client, **body: Any) -> list[dict[str, Any]]:
    with client.stream("POST", "/completion", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r.iter_lines()))
    assert "[DONE]" not in events  # llama-server's native stream has no [DONE]
    return events


# --- POST /completion -----------------------------------------------------------------------


def test_completion_has_llama_servers_shape(client: httpx.Client) -> None:
    body = completion(client, prompt=PROMPT, n_predict=6, temperature=0, return_tokens=True)
    assert set(body) == FINAL_KEYS
    assert body["stop"] is True and body["index"] == 0 and body["truncated"] is False
    assert body["model"] == "smollm2-test"
    assert body["stop_type"] == "limit" and body["stopping_word"] == ""
    assert body["tokens_predicted"] == len(body["tokens"]) == 6
    # The KV cache holds all but the last sampled token (never decoded), as llama-server counts.
    assert body["tokens_evaluated"] > 3 and body["tokens_cached"] == body["tokens_evaluated"] + 5
    assert body["prompt"].endswith(PROMPT)
    assert 0 <= body["id_slot"] < 4
    assert set(body["timings"]) == TIMINGS_KEYS and body["timings"]["predicted_n"] == 6
    assert body["timings"]["prompt_n"] + body["timings"]["cache_n"] == body["tokens_evaluated"]
    settings = body["generation_settings"]
    assert SETTINGS_KEYS <= set(settings)
    assert (settings["n_predict"], settings["temperature"], settings["seed"]) == (6, 0.0, 0xFFFFFFFF)
    # return_tokens off: the field is there, empty, as llama-server sends it.
    assert completion(client, prompt=PROMPT, n_predict=2, temperature=0)["tokens"] == []


def test_completion_prompt_as_tokens_or_mixed_gives_the_same_answer(client: httpx.Client) -> None:
    text = completion(client, prompt=PROMPT, n_predict=5, temperature=0)
    ids = client.post("/tokenize", json={"content": PROMPT, "add_special": True}).json()["tokens"]
    by_ids = completion(client, prompt=ids, n_predict=5, temperature=0)
    tail = client.post("/tokenize", json={"content": " of France is"}).json()["tokens"]
    mixed = completion(client, prompt=["The capital", *tail], n_predict=5, temperature=0)
    assert by_ids["content"] == text["content"]
    assert by_ids["prompt"] == text["prompt"] == mixed["prompt"]


def test_completion_stop_word_and_eos_stop_types(client: httpx.Client) -> None:
    full = completion(client, prompt=PROMPT, n_predict=8, temperature=0)["content"]
    word = full.split()[1]  # the second word of the greedy answer
    stopped = completion(client, prompt=PROMPT, n_predict=8, temperature=0, stop=[word])
    assert (stopped["stop_type"], stopped["stopping_word"]) == ("word", word)
    assert word not in stopped["content"] and full.startswith(stopped["content"])
    chat_like = completion(client, prompt="<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
                           n_predict=60, temperature=0)
    assert chat_like["stop_type"] == "eos"


def test_completion_stream_chunks_and_final_event(client: httpx.Client) -> None:
    whole = completion(client, prompt=PROMPT, n_predict=6, temperature=0)
    events = stream_completion(client, prompt=PROMPT, n_predict=6, temperature=0, timings_per_token=True,
                               return_progress=True, return_tokens=True)
    *parts, last = events
    assert parts[0]["prompt_progress"]["total"] == whole["tokens_evaluated"]
    assert set(parts[0]["prompt_progress"]) == {"total", "cache", "processed", "time_ms"}
    for p in parts:
        assert PARTIAL_KEYS <= set(p) and p["stop"] is False
        assert set(p["timings"]) == TIMINGS_KEYS  # timings_per_token
    assert "".join(p["content"] for p in parts) == whole["content"]
    assert sum(len(p["tokens"]) for p in parts) == 6
    assert set(last) == FINAL_KEYS and last["stop"] is True and last["content"] == ""
    assert last["tokens_predicted"] == 6 and last["timings"]["predicted_n"] == 6
    # Without the options: no timings or progress in the pieces.
    plain = stream_completion(client, prompt=PROMPT, n_predict=3, temperature=0)
    assert all(set(p) == PARTIAL_KEYS for p in plain[:-1])


def test_completion_n_probs(client: httpx.Client) -> None:
    body = completion(client, prompt=PROMPT, n_predict=3, temperature=0, n_probs=2, return_tokens=True)
    probs = body["completion_probabilities"]
    assert [p["id"] for p in probs] == body["tokens"]
    for p in probs:
        assert set(p) == {"id", "token", "bytes", "logprob", "top_logprobs"}
        assert len(p["top_logprobs"]) == 2
        assert all(set(t) == {"id", "token", "bytes", "logprob"} and t["id"] >= 0 for t in p["top_logprobs"])
        assert p["top_logprobs"][0]["id"] == p["id"]  # greedy: the best is the one sampled
    # OpenAI's logprobs stands for n_probs when n_probs is not sent (llama-server's rule).
    alias = completion(client, prompt=PROMPT, n_predict=3, temperature=0, logprobs=2, return_tokens=True)
    assert [p["id"] for p in alias["completion_probabilities"]] == body["tokens"]
    assert alias["generation_settings"]["n_probs"] == 2


# --- grammar, json_schema, response_format.schema ---------------------------------------------


YES_NO = 'root ::= "yes" | "no"'
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": False}


def test_grammar_constrains_every_route(client: httpx.Client) -> None:
    native = completion(client, prompt="Is the sky blue?", n_predict=5, grammar=YES_NO)
    assert native["content"] in ("yes", "no") and native["generation_settings"]["grammar"] == YES_NO
    r = client.post("/v1/completions", json={"prompt": "Is the sky blue?", "max_tokens": 5, "grammar": YES_NO})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] in ("yes", "no")
    r = client.post(CHAT, json={"messages": [{"role": "user", "content": "Is the sky blue?"}],
                                "max_tokens": 5, "grammar": YES_NO})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] in ("yes", "no")


@pytest.mark.parametrize("fmt", [
    {"json_schema": SCHEMA},
    {"response_format": {"type": "json_object", "schema": SCHEMA}},
    {"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},  # no name
], ids=["json_schema", "json_object-schema", "json_schema-no-name"])
def test_json_schema_forms_on_chat_and_completions(client: httpx.Client, fmt: dict[str, Any]) -> None:
    r = client.post(CHAT, json={"messages": [{"role": "user", "content": "Give a number as JSON."}],
                                "max_tokens": 30, "temperature": 0, **fmt})
    assert r.status_code == 200, r.text
    value = json.loads(r.json()["choices"][0]["message"]["content"])
    assert set(value) == {"n"} and isinstance(value["n"], int)
    r = client.post("/v1/completions", json={"prompt": "A number as JSON:", "max_tokens": 30, "temperature": 0, **fmt})
    assert r.status_code == 200, r.text
    assert set(json.loads(r.json()["choices"][0]["text"])) == {"n"}
    if "json_schema" in fmt:  # llama-server's /completion takes the top-level json_schema
        native = completion(client, prompt="A number as JSON:", n_predict=30, temperature=0, **fmt)
        assert set(json.loads(native["content"])) == {"n"}


@pytest.mark.parametrize("path,base", [
    (CHAT, {"messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/completions", {"prompt": "hi"}),
    ("/completion", {"prompt": "hi"}),
])
@pytest.mark.parametrize("bad", ['root ::= ("yes"', "root ::= undefined_rule", 'start ::= "a"'])
def test_invalid_grammar_is_a_400_naming_grammar(client: httpx.Client, path: str, base: dict[str, Any], bad: str) -> None:
    r = client.post(path, json={**base, "max_tokens": 2, "grammar": bad})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["type"]) == ("grammar", "invalid_request_error")


# --- assistant prefill --------------------------------------------------------------------------


USER_TURN = {"role": "user", "content": "Introduce yourself."}
PREFILL = {"role": "assistant", "content": "Hello! My name is"}


def count(client: httpx.Client, body: dict[str, Any], path: str = CHAT + "/input_tokens") -> int:
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    assert set(r.json()) <= {"input_tokens", "object"}
    return int(r.json()["input_tokens"])


def test_prefill_continues_the_last_assistant_message(client: httpx.Client) -> None:
    prefill_ids = client.post("/tokenize", json={"content": PREFILL["content"]}).json()["tokens"]
    alone = count(client, {"messages": [USER_TURN]})
    for flags in ({"continue_final_message": True}, {"add_generation_prompt": False},
                  {"continue_final_message": True, "add_generation_prompt": False}):
        assert count(client, {"messages": [USER_TURN, PREFILL], **flags}) == alone + len(prefill_ids)
    # Without the flags the assistant message is a finished turn and a new one starts.
    assert count(client, {"messages": [USER_TURN, PREFILL]}) > alone + len(prefill_ids)
    r = client.post(CHAT, json={"messages": [USER_TURN, PREFILL], "continue_final_message": True,
                                "max_tokens": 4, "temperature": 0})
    assert r.status_code == 200, r.text
    assert "<|im_start|>" not in r.json()["choices"][0]["message"]["content"]
    # Anthropic's Messages API: a final assistant turn is a prefill by definition.
    n = count(client, {"messages": [USER_TURN, PREFILL]}, "/v1/messages/count_tokens")
    assert n == alone + len(prefill_ids)


@pytest.mark.parametrize("flags,param", [
    ({"continue_final_message": True, "add_generation_prompt": True}, "continue_final_message"),
    ({"add_generation_prompt": False, "messages": [USER_TURN]}, "add_generation_prompt"),
    ({"continue_final_message": True, "messages": [USER_TURN]}, "continue_final_message"),
])
def test_prefill_mistakes_are_400s(client: httpx.Client, flags: dict[str, Any], param: str) -> None:
    r = client.post(CHAT, json={"messages": [USER_TURN, PREFILL], "max_tokens": 2, **flags})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


def test_input_tokens_match_the_chat_usage(client: httpx.Client) -> None:
    body = {"messages": [USER_TURN], "max_tokens": 1}
    n = count(client, body)
    r = client.post(CHAT, json=body)
    assert r.json()["usage"]["prompt_tokens"] == n


# --- /props -----------------------------------------------------------------------------------------


def test_props_has_llama_servers_shape(worker: WorkerProcess, client: httpx.Client) -> None:
    r = client.get("/props")
    assert r.status_code == 200, r.text
    props = r.json()
    assert {"default_generation_settings", "total_slots", "model_alias", "model_path", "modalities",
            "endpoint_slots", "endpoint_props", "endpoint_metrics", "chat_template", "bos_token",
            "eos_token", "build_info"} <= set(props)
    dgs = props["default_generation_settings"]
    assert dgs["n_ctx"] == 1024 and dgs["params"]["temperature"] == 0.8 and dgs["params"]["n_predict"] == -1
    assert "stop" not in dgs["params"]  # /props shows the metrics-only settings
    assert props["total_slots"] == 4 and props["model_alias"] == "smollm2-test"
    assert props["modalities"] == {"vision": False, "video": False, "audio": False}
    assert props["model_ftype"] == "Q4_1"
    assert props["chat_template_caps"]["supports_tools"] is False  # SmolLM2's template has no tool markup
    assert "<|im_start|>" in props["chat_template"] and props["eos_token"] == "<|im_end|>"
    r = client.post("/props", json={"n_ctx": 8})
    assert r.status_code == 501
    assert r.json()["error"]["type"] == "not_supported_error"


# --- /rerank and the chat_template override: a worker of their own --------------------------------

TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[ASSISTANT] {% endif %}"
)


def _template_file(workdir: Path) -> str:
    (workdir / "tmpl.jinja").write_text(TEMPLATE)
    return str(workdir / "tmpl.jinja")


@pytest.fixture(scope="module")
def rerank_worker() -> Iterator[WorkerProcess]:
    yield from own_worker(model_alias="ranker", reranking=True, parallel=1, chat_template=_template_file)


def test_rerank_shape_order_and_top_n(rerank_worker: WorkerProcess) -> None:
    docs = ["Paris is the capital of France.", "Bananas are yellow.", "The Eiffel Tower is in Paris."]
    with rerank_worker.client() as c:
        for path in ("/rerank", "/v1/rerank", "/reranking", "/v1/reranking"):
            r = c.post(path, json={"query": "capital of France", "documents": docs})
            assert r.status_code == 200, r.text
        body = r.json()
        assert set(body) == {"model", "object", "usage", "results"}
        assert body["object"] == "list" and body["model"] == "ranker"
        assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
        results = body["results"]
        assert sorted(x["index"] for x in results) == [0, 1, 2]
        assert all(set(x) == {"index", "relevance_score"} for x in results)
        scores = [x["relevance_score"] for x in results]
        assert scores == sorted(scores, reverse=True)  # SmolLM2 is no reranker: only the order is checked
        top = c.post("/rerank", json={"query": "capital of France", "documents": docs, "top_n": 1,
                                      "return_documents": True}).json()["results"]
        assert len(top) == 1 and top[0]["index"] == results[0]["index"]
        assert top[0]["document"] == {"text": docs[top[0]["index"]]}
        r = c.post("/rerank", json={"query": "q", "documents": []})
        assert r.status_code == 400 and r.json()["error"]["param"] == "documents"


def test_rerank_without_the_setting_names_it(client: httpx.Client) -> None:
    r = client.post("/rerank", json={"query": "q", "documents": ["a"]})
    assert r.status_code == 400
    err = r.json()["error"]
    assert (err["param"], err["code"]) == ("model", "reranking_disabled") and "reranking = true" in err["message"]


def test_chat_template_file_overrides_the_ggufs_everywhere(rerank_worker: WorkerProcess) -> None:
    msgs = [{"role": "user", "content": "hi"}]
    with rerank_worker.client() as c:
        prompt = c.post("/apply-template", json={"messages": msgs}).json()["prompt"]
        assert prompt.endswith("[USER] hi\n[ASSISTANT] ") and "<|im_start|>" not in prompt
        assert c.get("/props").json()["chat_template"] == TEMPLATE
        assert c.get("/health").json()["params"]["tool_format"] == "generic"  # no tool markup
        r = c.post(CHAT, json={"messages": msgs, "max_tokens": 2})
        assert r.status_code == 200, r.text


def test_builtin_chat_template_renders_with_llama_cpp() -> None:
    from worker.engine.load import _builtin_handler, builtin_templates

    assert "chatml" in builtin_templates() and "llama3" in builtin_templates()

    class Capture:
        prompt = ""

        def create_completion(self, prompt: str, stop: list[str]) -> None:
            Capture.prompt = prompt

    _builtin_handler("chatml")(llama=Capture(), messages=[{"role": "user", "content": "hi"}])
    assert Capture.prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_timings_per_token_on_openai_streams(client: httpx.Client) -> None:
    for path, body in ((CHAT, {"messages": [USER_TURN]}), ("/v1/completions", {"prompt": PROMPT})):
        with client.stream("POST", path, json={**body, "max_tokens": 4, "temperature": 0, "stream": True,
                                               "timings_per_token": True}) as r:
            assert r.status_code == 200, r.read()
            events = list(sse_events(r.iter_lines()))
        assert events[-1] == "[DONE]"
        timed = [e for e in events[:-1] if "timings" in e]
        assert timed and all(set(e["timings"]) == TIMINGS_KEYS for e in timed)
        assert timed[-1]["timings"]["predicted_n"] == 4
        # Not asked: OpenAI's chunks, nothing added.
        with client.stream("POST", path, json={**body, "max_tokens": 2, "stream": True}) as r:
            assert all("timings" not in e for e in list(sse_events(r.iter_lines()))[:-1])


@pytest.fixture(scope="module")
def bert_reranker() -> Iterator[WorkerProcess]:
    from tests.gguf_factory import write_reranker

    yield from own_worker(model_path=lambda d: str(write_reranker(d / "reranker.gguf")), model_alias="bert-ranker",
                          reranking=True, parallel=1, n_ctx=512)


def test_rerank_on_a_bert_reranker_gguf(bert_reranker: WorkerProcess) -> None:
    """A real classification head (cls, cls.output; llama.cpp's RANK pooling): one raw score
    per document, and BOS query EOS document EOS tokens per pair (the vocabulary asks for
    them), as llama-server's format_prompt_rerank builds them."""
    docs = ["Paris is the capital of France.", "Bananas are yellow.", "Paris"]
    with bert_reranker.client() as c:
        r = c.post("/v1/rerank", json={"model": "bert-ranker", "query": "capital of France", "documents": docs})
        assert r.status_code == 200, r.text
        body = r.json()
        pair = [len(c.post("/tokenize", json={"content": x}).json()["tokens"]) for x in ("capital of France", *docs)]
    results = body["results"]
    assert sorted(x["index"] for x in results) == [0, 1, 2]
    assert [x["relevance_score"] for x in results] == sorted((x["relevance_score"] for x in results), reverse=True)
    assert len({x["relevance_score"] for x in results}) == 3  # a different pair, a different score
    assert body["usage"]["prompt_tokens"] == sum(pair[0] + n + 3 for n in pair[1:])


def test_completion_logit_bias_in_llama_servers_forms(client: httpx.Client) -> None:
    # Token 28 is "," in SmolLM2's vocabulary (test_worker_api's logit_bias test).
    for bias in ([[28, 100]], [[",", 100]], {",": 100}, {"28": 100}):
        body = completion(client, prompt="Hello", n_predict=3, temperature=0, logit_bias=bias)
        assert body["content"] == ",,,", bias
        assert body["generation_settings"]["logit_bias"] == [{"bias": 100.0, "token": 28}]
    # false bans: the greedy first token never comes back.
    first = completion(client, prompt=PROMPT, n_predict=1, temperature=0, return_tokens=True)["tokens"][0]
    banned = completion(client, prompt=PROMPT, n_predict=1, temperature=0, return_tokens=True,
                        logit_bias=[[first, False]])
    assert banned["tokens"][0] != first
    # SillyTavern sends an empty list when it has no biases.
    assert completion(client, prompt=PROMPT, n_predict=1, logit_bias=[])["tokens_predicted"] == 1


# --- POST /slots/{id}?action=save|restore|erase -------------------------------------------------


def test_slot_save_erase_restore(client: httpx.Client) -> None:
    completion(client, prompt="Slot files keep a conversation: " + PROMPT, n_predict=4, temperature=0)
    saved = [client.post(f"/slots/{i}?action=save", json={"filename": f"slot{i}.bin"}).json() for i in range(4)]
    used = next(s for s in saved if s["n_saved"] > 0)  # the slot that served it
    assert set(used) == {"id_slot", "filename", "n_saved", "n_written", "timings"}
    assert used["n_written"] > 0 and set(used["timings"]) == {"save_ms"}
    i, name = used["id_slot"], used["filename"]
    erased = client.post(f"/slots/{i}?action=erase").json()
    assert erased == {"id_slot": i, "n_erased": used["n_saved"]}
    r = client.post(f"/slots/{i}?action=restore", json={"filename": name})
    assert r.status_code == 200, r.text
    restored = r.json()
    assert set(restored) == {"id_slot", "filename", "n_restored", "n_read", "timings"}
    assert (restored["n_restored"], restored["n_read"]) == (used["n_saved"], used["n_written"])
    # The restored slot serves the same prompt again from its cache.
    again = completion(client, prompt="Slot files keep a conversation: " + PROMPT, n_predict=1, temperature=0,
                       cache_prompt=True)
    assert again["timings"]["cache_n"] > 0


@pytest.mark.parametrize("path,body,status,param", [
    ("/slots/0?action=save", {"filename": "../escape.bin"}, 400, "filename"),
    ("/slots/0?action=save", {"filename": "dir/file.bin"}, 400, "filename"),
    ("/slots/0?action=save", {"filename": ".hidden"}, 400, "filename"),
    ("/slots/0?action=save", {}, 400, "filename"),
    ("/slots/0?action=restore", {"filename": "never-saved.bin"}, 404, "filename"),
    ("/slots/0?action=copy", {"filename": "a.bin"}, 400, "action"),
    ("/slots/0", {"filename": "a.bin"}, 400, "action"),
    ("/slots/99?action=erase", {}, 400, "id_slot"),
    ("/slots/-1?action=erase", {}, 400, "id_slot"),
    ("/slots/x?action=erase", {}, 400, "id_slot"),
])
def test_slot_action_mistakes(client: httpx.Client, path: str, body: dict[str, Any], status: int, param: str) -> None:
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param


def test_slot_action_on_a_generating_slot_is_409(worker: WorkerProcess) -> None:
    with worker.client() as c, worker.client() as other:
        with c.stream("POST", "/completion", json={"prompt": PROMPT, "n_predict": 400, "ignore_eos": True,
                                                   "stream": True}) as r:
            # The first event that carries a token: the generation is decoding in its slot.
            events = (json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: "))
            first = next(e for e in events if e["content"])
            assert first["id_slot"] >= 0
            busy = other.post(f"/slots/{first['id_slot']}?action=save", json={"filename": "busy.bin"})
        # Leaving the stream closes it: the worker cancels the generation.
    assert busy.status_code == 409, busy.text
    assert (busy.json()["error"]["code"], busy.json()["error"]["param"]) == ("slot_busy", "id_slot")


@pytest.fixture(scope="module")
def chatml_worker() -> Iterator[WorkerProcess]:
    yield from own_worker(model_alias="builtin", parallel=1, chat_template="llama3")


def test_builtin_chat_template_overrides_the_ggufs(chatml_worker: WorkerProcess) -> None:
    """A llama.cpp built-in name: llama.cpp's own formatter renders chat and /apply-template
    (SmolLM2's ChatML replaced by Llama 3's headers), /props names it, tools go generic."""
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    with chatml_worker.client() as c:
        prompt = c.post("/apply-template", json={"messages": msgs}).json()["prompt"]
        assert "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>" in prompt
        assert prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n") and "<|im_start|>" not in prompt
        assert c.get("/props").json()["chat_template"] == "llama3"
        assert c.get("/health").json()["params"]["tool_format"] == "generic"
        r = c.post(CHAT, json={"messages": msgs, "max_tokens": 2})
        assert r.status_code == 200, r.text

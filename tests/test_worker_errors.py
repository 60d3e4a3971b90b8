"""A corpus of bad requests: each gets a 4xx in OpenAI's error shape, none kills the worker."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.conftest import WorkerProcess

pytestmark = pytest.mark.model

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
RESPONSES = "/v1/responses"
MESSAGES = "/v1/messages"
NATIVE = "/completion"  # llama-server's own shape
FN = {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {}}}
USER = [{"role": "user", "content": "hi"}]
HUGE_TEXT = "hello " * 3000  # ~3000 tokens, the test worker's context is 1024


def chat(**fields: Any) -> bytes:
    return json.dumps({"messages": USER, "max_tokens": 2, **fields}).encode()


def comp(**fields: Any) -> bytes:
    return json.dumps({"prompt": "hi", "max_tokens": 2, **fields}).encode()


def resp(**fields: Any) -> bytes:
    return json.dumps({"input": "hi", "max_output_tokens": 2, **fields}).encode()


def msg(**fields: Any) -> bytes:
    return json.dumps({"messages": USER, "max_tokens": 2, **fields}).encode()


def native(**fields: Any) -> bytes:
    return json.dumps({"prompt": "hi", "n_predict": 2, **fields}).encode()


def raw(obj: Any) -> bytes:
    return json.dumps(obj).encode()


# (id, method, path, body, expected status, expected param or None, expected code or None)
CASES: list[tuple[str, str, str, bytes | None, int, str | None, str | None]] = [
    ("malformed-json", "POST", CHAT, b'{"messages": [', 400, None, "invalid_json"),
    ("trailing-garbage", "POST", CHAT, chat() + b"}", 400, None, "invalid_json"),
    ("empty-body", "POST", CHAT, b"", 400, None, "invalid_json"),
    ("json-null", "POST", CHAT, b"null", 400, None, None),
    ("json-array", "POST", CHAT, b"[]", 400, None, None),
    ("json-string", "POST", CHAT, b'"hi"', 400, None, None),
    ("invalid-utf8", "POST", CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, None, None),
    ("missing-messages", "POST", CHAT, raw({"max_tokens": 2}), 400, "messages", None),
    ("messages-not-list", "POST", CHAT, raw({"messages": "hi"}), 400, "messages", None),
    ("messages-empty", "POST", CHAT, raw({"messages": []}), 400, "messages", None),
    ("message-not-object", "POST", CHAT, raw({"messages": ["hi"]}), 400, "messages[0]", None),
    ("message-missing-role", "POST", CHAT, raw({"messages": [{"content": "hi"}]}), 400, "messages[0].role", None),
    ("unknown-role", "POST", CHAT, raw({"messages": [{"role": "wizard", "content": "hi"}]}), 400, "messages[0].role", None),
    ("role-not-string", "POST", CHAT, raw({"messages": [{"role": 3, "content": "hi"}]}), 400, "messages[0].role", None),
    ("content-int", "POST", CHAT, raw({"messages": [{"role": "user", "content": 5}]}), 400, "messages[0].content", None),
    ("content-object", "POST", CHAT, raw({"messages": [{"role": "user", "content": {"x": 1}}]}), 400, "messages[0].content", None),
    ("content-image", "POST", CHAT, raw({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]}), 400, "messages[0].content[0].type", "unsupported"),
    ("content-part-unknown-type", "POST", CHAT, raw({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}), 400, "messages[0].content[0].type", None),
    ("content-part-no-text", "POST", CHAT, raw({"messages": [{"role": "user", "content": [{"type": "text"}]}]}), 400, "messages[0].content[0].text", None),
    ("user-content-null", "POST", CHAT, raw({"messages": [{"role": "user", "content": None}]}), 400, "messages[0].content", None),
    ("max-tokens-string", "POST", CHAT, chat(max_tokens="10"), 400, "max_tokens", None),
    ("max-tokens-zero", "POST", CHAT, chat(max_tokens=0), 400, "max_tokens", None),
    ("max-tokens-negative", "POST", CHAT, chat(max_tokens=-5), 400, "max_tokens", None),
    ("max-tokens-huge", "POST", CHAT, chat(max_tokens=10**12), 400, "max_tokens", None),
    ("max-tokens-float", "POST", CHAT, chat(max_tokens=1.5), 400, "max_tokens", None),
    ("max-completion-tokens-negative", "POST", CHAT, chat(max_completion_tokens=-1), 400, "max_completion_tokens", None),
    ("temperature-negative", "POST", CHAT, chat(temperature=-1), 400, "temperature", None),
    ("temperature-huge", "POST", CHAT, chat(temperature=100), 400, "temperature", None),
    ("temperature-string", "POST", CHAT, chat(temperature="hot"), 400, "temperature", None),
    ("top-p-above-one", "POST", CHAT, chat(top_p=1.5), 400, "top_p", None),
    ("top-p-negative", "POST", CHAT, chat(top_p=-0.1), 400, "top_p", None),
    ("top-k-negative", "POST", CHAT, chat(top_k=-2), 400, "top_k", None),
    ("min-p-above-one", "POST", CHAT, chat(min_p=2), 400, "min_p", None),
    ("presence-penalty-huge", "POST", CHAT, chat(presence_penalty=5), 400, "presence_penalty", None),
    ("frequency-penalty-low", "POST", CHAT, chat(frequency_penalty=-3), 400, "frequency_penalty", None),
    ("repeat-penalty-zero", "POST", CHAT, chat(repeat_penalty=0), 400, "repeat_penalty", None),
    ("n-two", "POST", CHAT, chat(n=2), 400, "n", None),
    ("n-zero", "POST", CHAT, chat(n=0), 400, "n", None),
    ("stream-not-bool", "POST", CHAT, chat(stream="yes"), 400, "stream", None),
    ("stream-options-without-stream", "POST", CHAT, chat(stream_options={"include_usage": True}), 400, "stream_options", None),
    ("stream-options-unknown", "POST", CHAT, chat(stream=True, stream_options={"foo": 1}), 400, "stream_options.foo", None),
    ("stop-int", "POST", CHAT, chat(stop=5), 400, "stop", None),
    ("stop-too-many", "POST", CHAT, chat(stop=[f"s{i}" for i in range(20)]), 400, "stop", None),
    ("stop-empty-string", "POST", CHAT, chat(stop=[""]), 400, "stop[0]", None),
    ("logit-bias-list", "POST", CHAT, chat(logit_bias=[1, 2]), 400, "logit_bias", None),
    ("logit-bias-bad-key", "POST", CHAT, chat(logit_bias={"cat": 1}), 400, "logit_bias", None),
    ("logit-bias-huge-value", "POST", CHAT, chat(logit_bias={"5": 1000}), 400, "logit_bias", None),
    ("logit-bias-unknown-token", "POST", CHAT, chat(logit_bias={"99999999": 1}), 400, "logit_bias", None),
    ("response-format-unknown", "POST", CHAT, chat(response_format={"type": "xml"}), 400, "response_format.type", None),
    ("response-format-schema-missing", "POST", CHAT, chat(response_format={"type": "json_schema"}), 400, "response_format.json_schema", None),
    ("response-format-not-object", "POST", CHAT, chat(response_format="json"), 400, "response_format", None),
    # An unknown top-level field is ignored unless [server] strict_params is set (issue 16;
    # tests/test_worker_extensions.py); one inside a nested object is still an error.
    ("response-format-unknown-field", "POST", CHAT, chat(response_format={"type": "json_object", "foo": 1}), 400, "response_format.foo", None),
    ("content-part-unknown-field", "POST", CHAT, raw({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "foo": 1}]}]}), 400, "messages[0].content[0].foo", None),
    ("seed-string", "POST", CHAT, chat(seed="abc"), 400, "seed", None),
    ("seed-huge", "POST", CHAT, chat(seed=2**70), 400, "seed", None),
    # The default model's template renders no tools (issue 15: tools need a template that does).
    # (tools on SmolLM2's own template are served by the generic format: not an error)
    ("tools-schema-no-grammar", "POST", CHAT, chat(tool_choice="required", tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}]), 400, "tools", None),
    # logprobs are served since issue 15; their ranges are OpenAI's.
    ("top-logprobs-without-logprobs", "POST", CHAT, chat(top_logprobs=3), 400, "top_logprobs", "invalid_value"),
    ("top-logprobs-too-many", "POST", CHAT, chat(logprobs=True, top_logprobs=21), 400, "top_logprobs", None),
    ("completion-logprobs-too-many", "POST", COMPLETIONS, raw({"prompt": "hi", "logprobs": 6}), 400, "logprobs", None),
    ("completion-logprobs-bool", "POST", COMPLETIONS, raw({"prompt": "hi", "logprobs": True}), 400, "logprobs", None),
    ("chat-context-exceeded", "POST", CHAT, raw({"messages": [{"role": "user", "content": HUGE_TEXT}]}), 400, "messages", "context_length_exceeded"),
    ("oversized-body", "POST", CHAT, raw({"messages": [{"role": "user", "content": "x" * (2 * 1024 * 1024)}]}), 413, None, "request_too_large"),
    # Extensions of llama-server and vLLM: as strict as our own fields.
    ("ignore-eos-string", "POST", CHAT, chat(ignore_eos="yes"), 400, "ignore_eos", None),
    ("ignore-eos-null", "POST", CHAT, chat(ignore_eos=None), 400, "ignore_eos", None),
    ("min-tokens-negative", "POST", CHAT, chat(min_tokens=-1), 400, "min_tokens", None),
    ("min-tokens-float", "POST", CHAT, chat(min_tokens=2.5), 400, "min_tokens", None),
    ("min-tokens-above-max-tokens", "POST", CHAT, chat(min_tokens=5), 400, "min_tokens", None),
    ("repetition-penalty-zero", "POST", CHAT, chat(repetition_penalty=0), 400, "repetition_penalty", None),
    ("repetition-penalty-string", "POST", CHAT, chat(repetition_penalty="high"), 400, "repetition_penalty", None),
    ("repetition-penalty-disagrees", "POST", CHAT, chat(repeat_penalty=1.1, repetition_penalty=1.3), 400, "repetition_penalty", None),
    ("ignore-eos-with-json", "POST", CHAT, chat(ignore_eos=True, response_format={"type": "json_object"}), 400, "ignore_eos", None),
    ("min-tokens-with-json-schema", "POST", COMPLETIONS, comp(min_tokens=1, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}), 400, "min_tokens", None),
    ("typical-p-above-one", "POST", CHAT, chat(typical_p=1.5), 400, "typical_p", None),
    ("n-predict-zero", "POST", COMPLETIONS, comp(max_tokens=None, n_predict=0), 400, "n_predict", "unsupported"),
    ("n-predict-below-minus-two", "POST", COMPLETIONS, comp(n_predict=-3), 400, "n_predict", None),
    ("n-predict-string", "POST", COMPLETIONS, comp(n_predict="10"), 400, "n_predict", None),
    ("n-predict-disagrees", "POST", COMPLETIONS, comp(max_tokens=2, n_predict=5), 400, "n_predict", None),
    ("stop-token-ids-not-list", "POST", CHAT, chat(stop_token_ids=2), 400, "stop_token_ids", None),
    ("stop-token-ids-negative", "POST", CHAT, chat(stop_token_ids=[-1]), 400, "stop_token_ids[0]", None),
    ("stop-token-ids-string", "POST", CHAT, chat(stop_token_ids=["2"]), 400, "stop_token_ids[0]", None),
    ("stop-token-ids-out-of-vocab", "POST", COMPLETIONS, comp(stop_token_ids=[2, 10**9]), 400, "stop_token_ids[1]", None),
    ("stop-token-ids-too-many", "POST", CHAT, chat(stop_token_ids=list(range(100))), 400, "stop_token_ids", None),
    ("cache-prompt-string", "POST", COMPLETIONS, comp(cache_prompt="false"), 400, "cache_prompt", None),
    ("return-token-ids-int", "POST", CHAT, chat(return_token_ids=1), 400, "return_token_ids", None),
    ("include-stop-str-string", "POST", CHAT, chat(include_stop_str_in_output="true"), 400, "include_stop_str_in_output", None),
    ("skip-special-tokens-int", "POST", CHAT, chat(skip_special_tokens=0), 400, "skip_special_tokens", None),
    ("id-slot-string", "POST", COMPLETIONS, comp(id_slot="0"), 400, "id_slot", None),
    ("id-slot-below-minus-one", "POST", COMPLETIONS, comp(id_slot=-2), 400, "id_slot", None),
    ("n-keep-below-minus-one", "POST", COMPLETIONS, comp(n_keep=-5), 400, "n_keep", None),
    ("samplers-int", "POST", COMPLETIONS, comp(samplers=3), 400, "samplers", None),
    ("samplers-list-of-ints", "POST", COMPLETIONS, comp(samplers=[1, 2]), 400, "samplers[0]", None),
    ("prompt-missing", "POST", COMPLETIONS, raw({"max_tokens": 2}), 400, "prompt", None),
    ("prompt-int", "POST", COMPLETIONS, comp(prompt=5), 400, "prompt", None),
    ("prompt-empty-list", "POST", COMPLETIONS, comp(prompt=[]), 400, "prompt", None),
    ("prompt-two-strings", "POST", COMPLETIONS, comp(prompt=["a", "b"]), 400, "prompt", "unsupported"),
    ("prompt-mixed-list", "POST", COMPLETIONS, comp(prompt=["a", 1]), 400, "prompt", None),
    ("prompt-token-out-of-range", "POST", COMPLETIONS, comp(prompt=[1, 10**9]), 400, "prompt[1]", None),
    ("prompt-token-negative", "POST", COMPLETIONS, comp(prompt=[-1]), 400, "prompt[0]", None),
    ("echo", "POST", COMPLETIONS, comp(echo=True), 400, "echo", "unsupported"),
    ("best-of", "POST", COMPLETIONS, comp(best_of=2), 400, "best_of", None),
    ("completion-context-exceeded", "POST", COMPLETIONS, comp(prompt=HUGE_TEXT), 400, "prompt", "context_length_exceeded"),
    ("completion-json-schema-bad", "POST", COMPLETIONS, comp(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}), 400, None, None),
    ("get-on-post-route", "GET", CHAT, None, 405, None, "method_not_allowed"),
    ("delete-models", "DELETE", "/v1/models", None, 405, None, "method_not_allowed"),
    ("put-health", "PUT", "/health", None, 405, None, "method_not_allowed"),
    ("unknown-v1-route", "POST", "/v1/nope", b"{}", 404, None, "not_found"),
    ("unknown-route", "GET", "/nope", None, 404, None, "not_found"),
    # /v1/responses (OpenAI's Responses API): the same error shape.
    ("responses-malformed-json", "POST", RESPONSES, b'{"input": [', 400, None, "invalid_json"),
    ("responses-empty-body", "POST", RESPONSES, b"", 400, None, "invalid_json"),
    ("responses-json-array", "POST", RESPONSES, b"[]", 400, None, None),
    ("responses-input-int", "POST", RESPONSES, resp(input=5), 400, "input", None),
    ("responses-item-unknown-type", "POST", RESPONSES, resp(input=[{"type": "item_reference", "id": "x"}]), 400, "input[0].type", "unsupported"),
    ("responses-item-not-object", "POST", RESPONSES, resp(input=["hi"]), 400, "input[0]", None),
    ("responses-message-no-role", "POST", RESPONSES, resp(input=[{"type": "message", "content": "hi"}]), 400, "input[0].role", None),
    ("responses-message-bad-role", "POST", RESPONSES, resp(input=[{"role": "wizard", "content": "hi"}]), 400, "input[0].role", None),
    ("responses-image-part", "POST", RESPONSES, resp(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]), 400, "input[0].content[0].type", "unsupported"),
    ("responses-call-no-call-id", "POST", RESPONSES, resp(input=[{"type": "function_call", "name": "f", "arguments": "{}"}]), 400, "input[0].call_id", None),
    ("responses-output-no-output", "POST", RESPONSES, resp(input=[{"type": "function_call_output", "call_id": "c"}]), 400, "input[0].output", None),
    ("responses-tool-custom", "POST", RESPONSES, resp(tools=[{"type": "custom", "name": "apply_patch"}]), 400, "tools[0].type", "unsupported"),
    ("responses-tool-bad-name", "POST", RESPONSES, resp(tools=[{"type": "function", "name": "bad name"}]), 400, "tools[0].name", None),
    ("responses-tool-not-object", "POST", RESPONSES, resp(tools=["f"]), 400, "tools[0]", None),
    ("responses-tool-choice-unknown", "POST", RESPONSES, resp(tools=[FN], tool_choice={"type": "function", "name": "g"}), 400, "tool_choice.name", None),
    ("responses-tool-choice-hosted", "POST", RESPONSES, resp(tools=[FN], tool_choice={"type": "web_search"}), 400, "tool_choice", "unsupported"),
    ("responses-required-no-tools", "POST", RESPONSES, resp(tool_choice="required"), 400, "tool_choice", None),
    ("responses-max-output-zero", "POST", RESPONSES, resp(max_output_tokens=0), 400, "max_output_tokens", None),
    ("responses-temperature-high", "POST", RESPONSES, resp(temperature=3), 400, "temperature", None),
    ("responses-format-no-schema", "POST", RESPONSES, resp(text={"format": {"type": "json_schema", "name": "x"}}), 400, "text.format.schema", None),
    ("responses-format-unknown", "POST", RESPONSES, resp(text={"format": {"type": "yaml"}}), 400, "text.format.type", None),
    ("responses-background", "POST", RESPONSES, resp(background=True), 400, "background", "unsupported"),
    ("responses-previous-unknown", "POST", RESPONSES, resp(previous_response_id="resp_nope"), 404, "previous_response_id", "not_found"),
    ("responses-context-exceeded", "POST", RESPONSES, resp(input=HUGE_TEXT), 400, "input", "context_length_exceeded"),
    ("responses-get-unknown", "GET", RESPONSES + "/resp_nope", None, 404, None, "not_found"),
    ("responses-delete-unknown", "DELETE", RESPONSES + "/resp_nope", None, 404, None, "not_found"),
    ("responses-put", "PUT", RESPONSES, resp(), 405, None, "method_not_allowed"),
    ("responses-count-bad", "POST", RESPONSES + "/input_tokens", resp(input=5), 400, "input", None),
    # llama-server's routes and fields (issue 25).
    ("native-no-prompt", "POST", NATIVE, raw({"n_predict": 2}), 400, "prompt", None),
    ("native-prompt-int", "POST", NATIVE, raw({"prompt": 5}), 400, "prompt", None),
    ("native-prompt-bool", "POST", NATIVE, native(prompt=["a", True]), 400, "prompt[1]", None),
    ("native-two-prompts", "POST", NATIVE, native(prompt=["a", "b"]), 400, "prompt", "unsupported"),
    ("native-token-outside-vocab", "POST", NATIVE, native(prompt=[10**9]), 400, "prompt[0]", None),
    ("native-n-probs-high", "POST", NATIVE, native(n_probs=50), 400, "n_probs", None),
    ("native-n-predict-zero", "POST", NATIVE, native(n_predict=0), 400, "n_predict", "unsupported"),
    ("native-logprobs-high", "POST", NATIVE, native(logprobs=9), 400, "logprobs", None),
    ("native-temperature-high", "POST", NATIVE, native(temperature=9), 400, "temperature", None),
    ("native-grammar-bad", "POST", NATIVE, native(grammar="root ::= ("), 400, "grammar", None),
    ("native-json-schema-bad-ref", "POST", NATIVE, native(json_schema={"$ref": "#/nope"}), 400, "json_schema", None),
    ("native-grammar-and-schema", "POST", NATIVE, native(grammar='root ::= "a"', json_schema={}), 400, "grammar", None),
    ("native-context-exceeded", "POST", NATIVE, native(prompt=HUGE_TEXT), 400, "prompt", "context_length_exceeded"),
    ("native-logit-bias-pair-short", "POST", NATIVE, native(logit_bias=[[28]]), 400, "logit_bias[0]", None),
    ("native-logit-bias-too-high", "POST", NATIVE, native(logit_bias={"28": 500}), 400, "logit_bias", None),
    ("native-stream-grammar-bad", "POST", NATIVE, native(stream=True, grammar="root ::= nope"), 400, "grammar", None),
    ("chat-grammar-bad", "POST", CHAT, chat(grammar='root ::= "a'), 400, "grammar", None),
    ("chat-grammar-not-string", "POST", CHAT, chat(grammar=5), 400, "grammar", None),
    ("chat-grammar-and-format", "POST", CHAT, chat(grammar='root ::= "a"', response_format={"type": "json_object"}), 400, "grammar", None),
    ("chat-json-object-schema-int", "POST", CHAT, chat(response_format={"type": "json_object", "schema": 5}), 400, "response_format.schema", None),
    ("chat-json-object-schema-bad-ref", "POST", CHAT, chat(response_format={"type": "json_object", "schema": {"$ref": "#/x"}}), 400, "response_format.schema", None),
    ("chat-json-schema-top-level-bad", "POST", CHAT, chat(json_schema={"type": 5}), 400, "json_schema", None),
    ("completions-grammar-bad", "POST", COMPLETIONS, comp(grammar="root ::= undefined"), 400, "grammar", None),
    ("chat-prefill-both-flags", "POST", CHAT, chat(continue_final_message=True, add_generation_prompt=True), 400, "continue_final_message", None),
    ("chat-prefill-no-assistant", "POST", CHAT, chat(continue_final_message=True), 400, "continue_final_message", None),
    ("chat-prefill-flag-not-bool", "POST", CHAT, chat(add_generation_prompt="no"), 400, "add_generation_prompt", None),
    ("input-tokens-no-messages", "POST", CHAT + "/input_tokens", raw({}), 400, "messages", None),
    ("input-tokens-grammar-bad", "POST", CHAT + "/input_tokens", chat(grammar="root ::= ("), 400, "grammar", None),
    ("rerank-not-configured", "POST", "/rerank", raw({"query": "q", "documents": ["a"]}), 400, "model", "reranking_disabled"),
    ("rerank-no-query", "POST", "/v1/rerank", raw({"documents": ["a"]}), 400, "query", None),
    ("rerank-documents-empty", "POST", "/rerank", raw({"query": "q", "documents": []}), 400, "documents", None),
    ("rerank-document-int", "POST", "/reranking", raw({"query": "q", "documents": [1]}), 400, "documents[0]", None),
    ("rerank-top-n-negative", "POST", "/rerank", raw({"query": "q", "documents": ["a"], "top_n": -1}), 400, "top_n", None),
    ("props-put", "PUT", "/props", raw({}), 405, None, "method_not_allowed"),
    ("slots-save-traversal", "POST", "/slots/0?action=save", raw({"filename": "../../etc/x"}), 400, "filename", None),
    ("slots-save-no-filename", "POST", "/slots/0?action=save", raw({}), 400, "filename", None),
    ("slots-filename-int", "POST", "/slots/0?action=restore", raw({"filename": 5}), 400, "filename", None),
    ("slots-restore-missing", "POST", "/slots/0?action=restore", raw({"filename": "nope.bin"}), 404, "filename", "not_found"),
    ("slots-bad-action", "POST", "/slots/0?action=load", raw({"filename": "a"}), 400, "action", None),
    ("slots-bad-id", "POST", "/slots/12?action=erase", None, 400, "id_slot", None),
]


@pytest.mark.parametrize(
    "method,path,body,status,param,code", [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_request_gets_openai_error(
    client: httpx.Client, method: str, path: str, body: bytes | None, status: int,
    param: str | None, code: str | None,
) -> None:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    r = client.request(method, path, content=body, headers=headers)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in err["message"]
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err


# Anthropic's Messages API: the same promise in Anthropic's error shape (no param, no code).
MESSAGES_CASES: list[tuple[str, str, str, bytes | None, int]] = [
    ("messages-malformed-json", "POST", MESSAGES, b'{"messages": [', 400),
    ("messages-empty-body", "POST", MESSAGES, b"", 400),
    ("messages-json-null", "POST", MESSAGES, b"null", 400),
    ("messages-no-max-tokens", "POST", MESSAGES, raw({"messages": USER}), 400),
    ("messages-max-tokens-zero", "POST", MESSAGES, msg(max_tokens=0), 400),
    ("messages-empty", "POST", MESSAGES, msg(messages=[]), 400),
    ("messages-role-system", "POST", MESSAGES, msg(messages=[{"role": "system", "content": "hi"}]), 400),
    ("messages-content-int", "POST", MESSAGES, msg(messages=[{"role": "user", "content": 5}]), 400),
    ("messages-block-unknown", "POST", MESSAGES, msg(messages=[{"role": "user", "content": [{"type": "audio"}]}]), 400),
    ("messages-block-image", "POST", MESSAGES, msg(messages=[{"role": "user", "content": [{"type": "image", "source": {}}]}]), 400),
    ("messages-text-no-text", "POST", MESSAGES, msg(messages=[{"role": "user", "content": [{"type": "text"}]}]), 400),
    ("messages-tool-use-in-user", "POST", MESSAGES, msg(messages=[{"role": "user", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]), 400),
    ("messages-tool-result-no-id", "POST", MESSAGES, msg(messages=[{"role": "user", "content": [{"type": "tool_result", "content": "x"}]}]), 400),
    ("messages-tool-no-schema", "POST", MESSAGES, msg(tools=[{"name": "f"}]), 400),
    ("messages-tool-server-type", "POST", MESSAGES, msg(tools=[{"type": "web_search_20250305", "name": "web_search"}]), 400),
    ("messages-tool-bad-name", "POST", MESSAGES, msg(tools=[{"name": "bad name", "input_schema": {}}]), 400),
    ("messages-tool-choice-unknown-type", "POST", MESSAGES, msg(tool_choice={"type": "maybe"}), 400),
    ("messages-tool-choice-unknown-name", "POST", MESSAGES, msg(tools=[{"name": "f", "input_schema": {"type": "object"}}], tool_choice={"type": "tool", "name": "g"}), 400),
    ("messages-any-no-tools", "POST", MESSAGES, msg(tool_choice={"type": "any"}), 400),
    ("messages-temperature-high", "POST", MESSAGES, msg(temperature=1.5), 400),
    ("messages-stop-not-list", "POST", MESSAGES, msg(stop_sequences=5), 400),
    ("messages-system-int", "POST", MESSAGES, msg(system=5), 400),
    ("messages-context-exceeded", "POST", MESSAGES, msg(messages=[{"role": "user", "content": HUGE_TEXT}]), 400),
    ("messages-count-malformed", "POST", MESSAGES + "/count_tokens", b"{", 400),
    ("messages-count-no-messages", "POST", MESSAGES + "/count_tokens", raw({}), 400),
    ("messages-get", "GET", MESSAGES, None, 405),
    ("messages-unknown-subroute", "POST", MESSAGES + "/batches", raw({}), 404),
]


@pytest.mark.parametrize("method,path,body,status", [c[1:] for c in MESSAGES_CASES], ids=[c[0] for c in MESSAGES_CASES])
def test_bad_messages_request_gets_anthropic_error(
    client: httpx.Client, method: str, path: str, body: bytes | None, status: int,
) -> None:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    r = client.request(method, path, content=body, headers=headers)
    assert r.status_code == status, r.text
    got = r.json()
    assert set(got) == {"type", "error"} and got["type"] == "error"
    assert set(got["error"]) == {"type", "message"} and got["error"]["message"]
    assert "Traceback" not in got["error"]["message"]
    assert got["error"]["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 40


def test_worker_still_serves_after_the_corpus(worker: WorkerProcess, client: httpx.Client) -> None:
    # Runs after the parametrized cases (file order): the same process is alive and answers.
    assert worker.proc.poll() is None
    r = client.post(CHAT, json={"messages": USER, "max_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] >= 1

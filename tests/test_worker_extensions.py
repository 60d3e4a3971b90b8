"""Request extensions of llama-server and vLLM, sent as raw HTTP bodies as their clients
send them, against the real worker on the real SmolLM2 model (loaded once per session).

SmolLM2's vocabulary: token 2 is <|im_end|> (its EOS, an end-of-generation token), 28 is ",".
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import llama_cpp
import pytest

from tests.conftest import (
    WorkerProcess,
    default_model,
    own_worker,
)
from tests.conftest import (
    stream_json as stream,
)

pytestmark = pytest.mark.model

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
COUNTING = "1, 2, 3, 4, 5, 6,"
EOS = 2
EOS_MOST_LIKELY = {str(EOS): 100}  # without help, every step would end the generation
MESSAGES = [{"role": "user", "content": "Name three colors."}]


def post(client: httpx.Client, path: str, body: dict[str, Any]) -> httpx.Response:
    """The body exactly as written (raw JSON), not through an SDK's parameter list."""
    r = client.post(path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    return r


@pytest.fixture(scope="module")
def vocab() -> Iterator[llama_cpp.Llama]:
    """The model's own tokenizer, in the test process (vocabulary only: no weights)."""
    llama = llama_cpp.Llama(str(default_model()), vocab_only=True, verbose=False)
    yield llama
    llama.close()


# --- ignore_eos / min_tokens ----------------------------------------------------------------


def test_ignore_eos_generates_exactly_max_tokens_with_eos_most_likely(client: httpx.Client) -> None:
    # llama-server's own client (its /completion examples, llama-bench-style tools) body.
    body = {
        "prompt": "Hello", "n_predict": 12, "temperature": 0, "logit_bias": EOS_MOST_LIKELY,
        "cache_prompt": True, "id_slot": -1, "n_keep": 0,
        "samplers": ["top_k", "typ_p", "top_p", "min_p", "temperature"],
    }
    ended = post(client, COMPLETIONS, body).json()
    assert ended["usage"]["completion_tokens"] == 0  # the EOS bias alone ends it at once
    assert ended["choices"][0]["finish_reason"] == "stop"
    full = post(client, COMPLETIONS, {**body, "ignore_eos": True}).json()
    assert full["usage"]["completion_tokens"] == 12
    assert full["choices"][0]["finish_reason"] == "length"
    # vLLM's benchmark client body, on the chat endpoint.
    chat = post(client, CHAT, {
        "model": "smollm2", "messages": MESSAGES, "max_tokens": 9, "ignore_eos": True,
        "temperature": 0, "logit_bias": EOS_MOST_LIKELY, "stream": False,
    }).json()
    assert chat["usage"]["completion_tokens"] == 9
    assert chat["choices"][0]["finish_reason"] == "length"


def test_min_tokens_holds_back_stop_strings_and_eos(client: httpx.Client) -> None:
    body = {"prompt": COUNTING, "max_tokens": 30, "temperature": 0, "stop": [","]}
    early = post(client, COMPLETIONS, body).json()
    assert early["choices"][0]["finish_reason"] == "stop"
    assert early["usage"]["completion_tokens"] < 10  # " 7," matches the stop string at once
    late = post(client, COMPLETIONS, {**body, "min_tokens": 10}).json()
    assert late["usage"]["completion_tokens"] >= 10
    assert late["choices"][0]["text"].startswith(early["choices"][0]["text"] + ",")
    # The EOS token waits for min_tokens too, and ends the generation right after.
    eos = post(client, COMPLETIONS, {
        "prompt": "Hello", "max_tokens": 20, "min_tokens": 5, "temperature": 0,
        "logit_bias": EOS_MOST_LIKELY,
    }).json()
    assert eos["usage"]["completion_tokens"] == 5
    assert eos["choices"][0]["finish_reason"] == "stop"


# --- return_token_ids -------------------------------------------------------------------------


def test_return_token_ids_match_the_tokenizer_and_usage(client: httpx.Client, vocab: llama_cpp.Llama) -> None:
    body = {"model": "m", "prompt": COUNTING, "max_tokens": 8, "temperature": 0, "return_token_ids": True}
    r = post(client, COMPLETIONS, body).json()
    (choice,) = r["choices"]
    assert choice["prompt_token_ids"] == vocab.tokenize(COUNTING.encode(), add_bos=True, special=True)
    assert len(choice["prompt_token_ids"]) == r["usage"]["prompt_tokens"]
    assert len(choice["token_ids"]) == r["usage"]["completion_tokens"] == 8
    assert vocab.detokenize(choice["token_ids"]).decode() == choice["text"]
    # The same prompt sent as the token ids we returned gives the same tokens back.
    again = post(client, COMPLETIONS, {**body, "prompt": choice["prompt_token_ids"]}).json()
    assert again["choices"][0]["prompt_token_ids"] == choice["prompt_token_ids"]
    assert again["choices"][0]["token_ids"] == choice["token_ids"]
    # Without the flag, none of these fields.
    plain = post(client, COMPLETIONS, {k: v for k, v in body.items() if k != "return_token_ids"}).json()
    assert "token_ids" not in plain["choices"][0] and "prompt_token_ids" not in plain["choices"][0]


def test_return_token_ids_on_chat_and_every_streamed_chunk(client: httpx.Client, vocab: llama_cpp.Llama) -> None:
    body = {"messages": MESSAGES, "max_tokens": 10, "temperature": 0, "return_token_ids": True}
    whole = post(client, CHAT, body).json()
    ids = whole["choices"][0]["token_ids"]
    assert len(ids) == whole["usage"]["completion_tokens"]
    assert len(whole["prompt_token_ids"]) == whole["usage"]["prompt_tokens"]
    assert vocab.detokenize(ids).decode() == whole["choices"][0]["message"]["content"]

    chunks = stream(client, CHAT, {**body, "stream_options": {"include_usage": True}})
    assert chunks[0]["prompt_token_ids"] == whole["prompt_token_ids"]
    assert all("prompt_token_ids" not in c for c in chunks[1:])
    with_choice = [c for c in chunks if c["choices"]]
    assert all("token_ids" in c["choices"][0] for c in with_choice)
    assert [t for c in with_choice for t in c["choices"][0]["token_ids"]] == ids
    assert chunks[-1]["usage"]["completion_tokens"] == len(ids)

    text_chunks = stream(client, COMPLETIONS, {"prompt": COUNTING, "max_tokens": 8, "temperature": 0,
                                               "return_token_ids": True, "stop": [" 9"]})
    assert "prompt_token_ids" in text_chunks[0]["choices"][0]
    streamed = [t for c in text_chunks for t in c["choices"][0]["token_ids"]]
    cut = post(client, COMPLETIONS, {"prompt": COUNTING, "max_tokens": 8, "temperature": 0,
                                     "return_token_ids": True, "stop": [" 9"]}).json()
    # Tokens whose text a stop string cut are still listed: the ids add up to usage.
    assert streamed == cut["choices"][0]["token_ids"]
    assert len(streamed) == cut["usage"]["completion_tokens"]


# --- cache_prompt -----------------------------------------------------------------------------


def test_cache_prompt_false_reuses_no_cached_prefix(client: httpx.Client, ensure_idle: Any) -> None:
    ensure_idle()
    body = {"prompt": "The cache test: " + COUNTING, "max_tokens": 4, "temperature": 0}
    first = post(client, COMPLETIONS, body).json()
    cached = post(client, COMPLETIONS, body).json()
    n_prompt = cached["usage"]["prompt_tokens"]
    assert cached["usage"]["prompt_tokens_details"]["cached_tokens"] == n_prompt - 1
    uncached = post(client, COMPLETIONS, {**body, "cache_prompt": False}).json()
    assert uncached["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert first["choices"][0]["text"] == cached["choices"][0]["text"] == uncached["choices"][0]["text"]


# --- stop_token_ids, include_stop_str_in_output, skip_special_tokens --------------------------


def test_stop_token_ids_end_the_generation(client: httpx.Client, vocab: llama_cpp.Llama) -> None:
    body = {"prompt": COUNTING, "max_tokens": 8, "temperature": 0, "return_token_ids": True}
    ids = post(client, COMPLETIONS, body).json()["choices"][0]["token_ids"]
    stop_at = next(i for i in range(1, len(ids)) if ids[i] not in ids[:i])
    cut = post(client, COMPLETIONS, {**body, "stop_token_ids": [ids[stop_at]]}).json()
    assert cut["choices"][0]["token_ids"] == ids[:stop_at]
    assert cut["choices"][0]["finish_reason"] == "stop"
    kept = post(client, COMPLETIONS, {**body, "stop_token_ids": [ids[stop_at]],
                                      "include_stop_str_in_output": True}).json()
    assert kept["choices"][0]["token_ids"] == ids[: stop_at + 1]
    assert kept["choices"][0]["text"] == vocab.detokenize(ids[: stop_at + 1]).decode()


def test_include_stop_str_in_output_keeps_the_stop_string(client: httpx.Client) -> None:
    body = {"prompt": COUNTING, "max_tokens": 12, "temperature": 0}
    full = post(client, COMPLETIONS, body).json()["choices"][0]["text"]
    kept = post(client, COMPLETIONS, {**body, "stop": [" 9"], "include_stop_str_in_output": True}).json()
    assert kept["choices"][0]["text"] == full[: full.index(" 9") + 2]
    assert kept["choices"][0]["finish_reason"] == "stop"


def test_skip_special_tokens_false_shows_special_tokens(client: httpx.Client) -> None:
    # The EOS token (special) kept as a stop token: its text shows only when asked.
    body = {"prompt": "Hello", "max_tokens": 4, "temperature": 0, "logit_bias": EOS_MOST_LIKELY,
            "stop_token_ids": [EOS], "include_stop_str_in_output": True}
    hidden = post(client, COMPLETIONS, body).json()["choices"][0]["text"]
    shown = post(client, COMPLETIONS, {**body, "skip_special_tokens": False}).json()["choices"][0]["text"]
    assert (hidden, shown) == ("", "<|im_end|>")


# --- renamed sampling fields ------------------------------------------------------------------


def test_repetition_penalty_is_repeat_penalty_and_n_predict_is_max_tokens(client: httpx.Client) -> None:
    body = {"prompt": "one one one one one", "max_tokens": 8, "temperature": 0}
    ours = post(client, COMPLETIONS, {**body, "repeat_penalty": 1.8}).json()["choices"][0]["text"]
    vllm = post(client, COMPLETIONS, {**body, "repetition_penalty": 1.8}).json()["choices"][0]["text"]
    assert ours == vllm
    n_predict = post(client, COMPLETIONS, {"prompt": COUNTING, "n_predict": 3, "temperature": 0}).json()
    assert n_predict["usage"]["completion_tokens"] == 3


def test_typical_p_is_applied(client: httpx.Client) -> None:
    # A tiny typical_p keeps one candidate per step: the seed no longer matters.
    body = {"prompt": "Once upon a time", "max_tokens": 10, "temperature": 1.0, "typical_p": 0.001}
    a = post(client, COMPLETIONS, {**body, "seed": 1}).json()["choices"][0]["text"]
    b = post(client, COMPLETIONS, {**body, "seed": 2}).json()["choices"][0]["text"]
    assert a == b


def test_top_k_minus_one_is_vllms_disabled(client: httpx.Client) -> None:
    # vLLM's clients send top_k -1 for "no top-k"; llama-server's send 0: both mean all tokens.
    body = {"prompt": "Once upon a time", "max_tokens": 6, "temperature": 0}
    base = post(client, COMPLETIONS, body).json()["choices"][0]["text"]
    for k in (-1, 0):
        assert post(client, COMPLETIONS, {**body, "top_k": k}).json()["choices"][0]["text"] == base


# --- unknown fields ---------------------------------------------------------------------------


def test_unknown_fields_are_ignored_named_in_a_header_and_logged_once(
    worker: WorkerProcess, client: httpx.Client
) -> None:
    name = f"unknown_{uuid.uuid4().hex[:8]}"
    body = {"messages": MESSAGES, "max_tokens": 2, name: {"any": "thing"}, "chat_template_kwargs": {}}
    for _ in range(3):
        r = post(client, CHAT, body)
        assert r.headers["X-Ignored-Params"] == f"{name}, chat_template_kwargs"
    lines = [line for line in worker.stderr().splitlines() if name in line]
    assert len(lines) == 1 and "WARNING" in lines[0], lines
    # Streamed answers carry the header too; a request without unknown fields does not.
    with client.stream("POST", COMPLETIONS, json={"prompt": "Hi", "max_tokens": 2, "stream": True, name: 1}) as s:
        assert s.status_code == 200 and s.headers["X-Ignored-Params"] == name
        s.read()
    assert "X-Ignored-Params" not in post(client, COMPLETIONS, {"prompt": "Hi", "max_tokens": 2}).headers


def test_unknown_field_names_cannot_break_the_header(client: httpx.Client) -> None:
    body = {"prompt": "Hi", "max_tokens": 2, "a, b\r\nX-Evil: 1": 1, "é" * 500: 2}
    r = post(client, COMPLETIONS, body)
    shown = r.headers["X-Ignored-Params"]
    assert shown.isascii() and "\n" not in shown and len(shown) < 2000
    assert "X-Evil" not in r.headers
    assert shown.startswith("a%2C%20b%0D%0AX-Evil:%201, ")


def test_unknown_fields_inside_nested_objects_stay_errors(client: httpx.Client) -> None:
    r = client.post(CHAT, json={"messages": MESSAGES, "response_format": {"type": "json_object", "foo": 1}})
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "response_format.foo"


@pytest.fixture(scope="module")
def strict_worker() -> Iterator[WorkerProcess]:
    yield from own_worker(strict_params=True)


def test_strict_params_rejects_unknown_fields(strict_worker: WorkerProcess) -> None:
    name = f"unknown_{uuid.uuid4().hex[:8]}"
    with strict_worker.client() as c:
        r = c.post(CHAT, json={"messages": MESSAGES, "max_tokens": 2, name: 1})
        assert r.status_code == 400
        assert "X-Ignored-Params" not in r.headers
        err = r.json()["error"]
        assert (err["param"], err["type"]) == (name, "invalid_request_error")
        # The extensions vram-llm knows are not unknown fields.
        ok = c.post(COMPLETIONS, json={"prompt": "Hi", "max_tokens": 2, "return_token_ids": True,
                                       "cache_prompt": False, "ignore_eos": True})
        assert ok.status_code == 200, ok.text
        assert len(ok.json()["choices"][0]["token_ids"]) == 2
    assert name not in strict_worker.stderr()  # a rejected field is not "ignored"

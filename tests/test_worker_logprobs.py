"""logprobs / top_logprobs on the real worker and SmolLM2: OpenAI's shapes, streamed and
not, and the values checked against log-softmax of the model's own logits row."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from typing import Any

import httpx
import llama_cpp
import numpy as np
import openai
import pytest

from tests.conftest import WorkerProcess, default_model
from tests.conftest import stream_json as stream

pytestmark = pytest.mark.model

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "Name three colors."}]
PROMPT = "The capital of France is"


def post(client: httpx.Client, path: str, body: dict[str, Any]) -> Any:
    r = client.post(path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    assert r.status_code == 200, r.text
    return r.json()


def test_chat_top_logprobs_five_entries_per_token_sampled_one_first(client: httpx.Client) -> None:
    body = {"messages": MESSAGES, "max_tokens": 8, "temperature": 0, "logprobs": True, "top_logprobs": 5}
    r = post(client, CHAT, body)
    choice = r["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == r["usage"]["completion_tokens"] == 8
    assert "".join(e["token"] for e in content) == choice["message"]["content"]
    for e in content:
        assert len(e["top_logprobs"]) == 5
        assert e["logprob"] <= 0 and bytes(e["bytes"]).decode() == e["token"]
        values = [t["logprob"] for t in e["top_logprobs"]]
        assert values == sorted(values, reverse=True)
        # temperature 0: the sampled token is the most likely one
        assert e["top_logprobs"][0]["token"] == e["token"]
        assert e["top_logprobs"][0]["logprob"] == pytest.approx(e["logprob"])
    # Streamed: the chunks' entries add up to the same tokens and values.
    chunks = stream(client, CHAT, body)
    streamed = [e for c in chunks for ch in c["choices"] if ch.get("logprobs") for e in ch["logprobs"]["content"]]
    assert [e["token"] for e in streamed] == [e["token"] for e in content]
    assert [e["logprob"] for e in streamed] == pytest.approx([e["logprob"] for e in content], abs=1e-4)
    # A request that does not ask gets none (and computes none).
    assert post(client, CHAT, {**body, "logprobs": False, "top_logprobs": None})["choices"][0]["logprobs"] is None


def test_chat_logprobs_without_top(client: httpx.Client) -> None:
    r = post(client, CHAT, {"messages": MESSAGES, "max_tokens": 3, "temperature": 0, "logprobs": True})
    content = r["choices"][0]["logprobs"]["content"]
    assert len(content) == 3 and all(e["top_logprobs"] == [] for e in content)


def test_completion_logprobs_shape_streamed_and_not(client: httpx.Client) -> None:
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 3}
    r = post(client, COMPLETIONS, body)
    choice = r["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(6)]
    for tok, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert len(top) <= 3 and max(top, key=top.get) == tok and top[tok] == pytest.approx(value)
    chunks = stream(client, COMPLETIONS, body)
    parts = [c["choices"][0]["logprobs"] for c in chunks if c["choices"] and c["choices"][0].get("logprobs")]
    assert [t for p in parts for t in p["tokens"]] == lp["tokens"]
    assert [o for p in parts for o in p["text_offset"]] == lp["text_offset"]


def test_openai_sdk_reads_the_logprobs(worker: WorkerProcess) -> None:
    transport = httpx.HTTPTransport(uds=worker.socket_path)
    with httpx.Client(transport=transport) as http, openai.OpenAI(
        base_url="http://worker/v1", api_key="x", http_client=http, max_retries=0
    ) as sdk:
        r = sdk.chat.completions.create(
            model="m", messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2  # type: ignore[arg-type]
        )
    assert r.choices[0].logprobs is not None and r.choices[0].logprobs.content is not None
    assert len(r.choices[0].logprobs.content) == 4
    assert len(r.choices[0].logprobs.content[0].top_logprobs) == 2


@pytest.fixture(scope="module")
def model_logits() -> Iterator[llama_cpp.Llama]:
    llama = llama_cpp.Llama(str(default_model()), n_ctx=512, logits_all=True, flash_attn=True, verbose=False)
    yield llama
    llama.close()


def test_values_are_log_softmax_of_the_raw_logits_row(
    client: httpx.Client, model_logits: llama_cpp.Llama
) -> None:
    tokens = post(client, "/tokenize", {"content": PROMPT, "add_special": True})["tokens"]
    # The worker reads the prompt's last token with the rest where that gives the same
    # logits (flash attention on the CPU, batch.py): one batch here, with flash attention.
    model_logits.reset()
    model_logits.eval(tokens)
    row = np.asarray(model_logits.scores[len(tokens) - 1], dtype=np.float64)
    expected = row - (row.max() + math.log(np.exp(row - row.max()).sum()))
    best = np.argsort(-expected)[:5]
    # top_k / min_p / temperature transforms would change these: the values are the raw row's.
    r = post(client, COMPLETIONS, {"prompt": PROMPT, "max_tokens": 1, "temperature": 0.7, "top_k": 2,
                                   "min_p": 0.5, "logprobs": 5, "seed": 1})
    top = r["choices"][0]["logprobs"]["top_logprobs"][0]
    assert len(top) == 5
    for tid in best:
        piece = model_logits.detokenize([int(tid)], special=True).decode("utf-8", errors="replace")
        assert top[piece] == pytest.approx(expected[tid], abs=2e-3)

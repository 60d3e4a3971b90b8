"""llama-server's tokenizer endpoints (/tokenize, /detokenize, /apply-template) on the real
worker and SmolLM2, as its clients send them (raw JSON bodies)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.model

TEXT = "Hello world, ünïcödé and <|im_end|> too."
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colors."}]


def post(client: httpx.Client, path: str, body: dict[str, Any], status: int = 200) -> Any:
    r = client.post(path, content=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    return r.json()


def test_tokenize_then_detokenize_gives_the_text_back(client: httpx.Client) -> None:
    tokens = post(client, "/tokenize", {"content": TEXT})["tokens"]
    assert tokens and all(isinstance(t, int) for t in tokens)
    assert post(client, "/detokenize", {"tokens": tokens})["content"] == TEXT
    # parse_special (on by default, as in llama-server): "<|im_end|>" is one special token.
    assert 2 in tokens
    plain = post(client, "/tokenize", {"content": TEXT, "parse_special": False})["tokens"]
    assert 2 not in plain and len(plain) > len(tokens)


def test_with_pieces_gives_each_tokens_text(client: httpx.Client) -> None:
    tokens = post(client, "/tokenize", {"content": TEXT})["tokens"]
    pieces = post(client, "/tokenize", {"content": TEXT, "with_pieces": True})["tokens"]
    assert [p["id"] for p in pieces] == tokens
    # A piece that is not valid UTF-8 alone (half a character) comes as its bytes.
    joined = b"".join(
        p["piece"].encode() if isinstance(p["piece"], str) else bytes(p["piece"]) for p in pieces
    )
    assert joined.decode() == TEXT


def test_token_count_matches_the_completions_prompt_tokens(client: httpx.Client) -> None:
    prompt = "The capital of France is"
    tokens = post(client, "/tokenize", {"content": prompt, "add_special": True})["tokens"]
    done = post(client, "/v1/completions", {"prompt": prompt, "max_tokens": 1, "temperature": 0})
    assert done["usage"]["prompt_tokens"] == len(tokens)


def test_apply_template_is_the_chat_requests_prompt(client: httpx.Client) -> None:
    prompt = post(client, "/apply-template", {"messages": MESSAGES, "model": "x"})["prompt"]
    assert "Name three colors." in prompt and "<|im_start|>assistant" in prompt
    n = len(post(client, "/tokenize", {"content": prompt})["tokens"])
    done = post(client, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 1, "temperature": 0})
    assert done["usage"]["prompt_tokens"] == n


def test_bad_bodies_are_400s_naming_the_field(client: httpx.Client) -> None:
    err = post(client, "/detokenize", {"tokens": [1, 10**8]}, 400)["error"]
    assert err["param"] == "tokens[1]"
    err = post(client, "/detokenize", {"tokens": ["a"]}, 400)["error"]
    assert err["param"] == "tokens[0]"
    err = post(client, "/tokenize", {"text": "x"}, 400)["error"]
    assert err["param"] in ("text", "content")
    err = post(client, "/apply-template", {"messages": []}, 400)["error"]
    assert err["param"] == "messages"

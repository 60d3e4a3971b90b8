"""The official ``openai`` SDK talking to the worker over its Unix socket."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import WorkerProcess

pytestmark = pytest.mark.model

MESSAGES: list[Any] = [{"role": "user", "content": "Name a fruit."}]


@pytest.fixture
def sdk(worker: WorkerProcess) -> Iterator[openai.OpenAI]:
    assert worker.socket_path is not None
    http = httpx.Client(transport=httpx.HTTPTransport(uds=worker.socket_path), timeout=60)
    client = openai.OpenAI(
        base_url="http://worker/v1", api_key="unused", http_client=http, max_retries=0,  # type: ignore[arg-type]
    )
    try:
        yield client
    finally:
        client.close()


def test_sdk_lists_models(sdk: openai.OpenAI) -> None:
    assert [m.id for m in sdk.models.list()] == ["smollm2-test"]


def test_sdk_chat_completion(sdk: openai.OpenAI) -> None:
    r = sdk.chat.completions.create(model="whatever", messages=MESSAGES, max_tokens=6, temperature=0)  # type: ignore[arg-type]
    assert r.model == "smollm2-test"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage is not None and r.usage.completion_tokens <= 6


def test_sdk_chat_streaming_with_usage(sdk: openai.OpenAI) -> None:
    whole = sdk.chat.completions.create(model="m", messages=MESSAGES, max_tokens=6, temperature=0)  # type: ignore[arg-type]
    chunks = list(sdk.chat.completions.create(  # type: ignore[call-overload]
        model="m", messages=MESSAGES, max_tokens=6, temperature=0,
        stream=True, stream_options={"include_usage": True},
    ))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens  # type: ignore[union-attr]


def test_sdk_completion_and_streaming(sdk: openai.OpenAI) -> None:
    whole = sdk.completions.create(model="m", prompt="1, 2, 3,", max_tokens=5, temperature=0)
    assert whole.choices[0].finish_reason == "length"
    pieces = [c.choices[0].text for c in sdk.completions.create(
        model="m", prompt="1, 2, 3,", max_tokens=5, temperature=0, stream=True,
    ) if c.choices]
    assert "".join(pieces) == whole.choices[0].text


def test_sdk_json_mode(sdk: openai.OpenAI) -> None:
    r = sdk.chat.completions.create(
        model="m", temperature=0, max_tokens=60,
        messages=[{"role": "user", "content": 'Give me a JSON object with the key "name" set to "Ada".'}],
        response_format={"type": "json_object"},
    )
    import json

    assert isinstance(json.loads(r.choices[0].message.content or ""), dict)


def test_sdk_sees_openai_errors(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model="m", messages=MESSAGES, n=2)  # type: ignore[arg-type]
    assert info.value.status_code == 400
    body = info.value.body
    assert isinstance(body, dict) and body.get("param") == "n"
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi " * 3000}])
    assert info.value.code == "context_length_exceeded"

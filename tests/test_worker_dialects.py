"""The Responses and Anthropic Messages dialects, the tool-call rules and the generic tool
format, through the real SDKs (openai, anthropic, openai-agents, pydantic-ai) against the
real worker on SmolLM2: its own template (no tool markup: the generic format) and a copy
with a Qwen-style template (``<tool_call>``).

A random-ish 135M model does not follow instructions: tool calls are forced with
``tool_choice`` required/named (the grammar makes them) and the tests assert on shapes.
An SDK that is not installed skips its tests, saying which (pyproject's ``test`` extras).
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import WorkerProcess, default_model, short_tmpdir, sse_events, worker_spec
from tests.test_worker_tools import QWEN_TEMPLATE, _model_with_template

pytestmark = pytest.mark.model

PARAMS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
FN = {"type": "function", "name": "get_weather", "description": "The weather in a city", "parameters": PARAMS}
CHAT_FN = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": PARAMS}}
ANTHROPIC_FN = {"name": "get_weather", "description": "The weather in a city", "input_schema": PARAMS}
ASK = "What is the weather in Paris?"


@pytest.fixture(scope="module")
def qwen() -> Iterator[WorkerProcess]:
    d = short_tmpdir()
    try:
        model = _model_with_template(d, "qwen", QWEN_TEMPLATE)
        proc = WorkerProcess(d, worker_spec(d, model_path=str(model), model_alias="qwen", n_ctx=2048))
        try:
            proc.wait_ready(timeout=240)
            yield proc
        finally:
            proc.stop()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _openai(worker: WorkerProcess) -> openai.OpenAI:
    assert worker.socket_path is not None
    http = httpx.Client(transport=httpx.HTTPTransport(uds=worker.socket_path), timeout=300)
    return openai.OpenAI(base_url="http://worker/v1", api_key="x", http_client=http, max_retries=0)


def _anthropic(worker: WorkerProcess) -> Any:
    anthropic = pytest.importorskip("anthropic", reason="the anthropic SDK is not installed (pip install -e .[test])")
    assert worker.socket_path is not None
    try:  # anthropic >= 2 runs on httpx2, earlier releases on httpx
        import httpx2

        http: Any = httpx2.Client(transport=httpx2.HTTPTransport(uds=worker.socket_path), timeout=300)
    except ImportError:
        http = httpx.Client(transport=httpx.HTTPTransport(uds=worker.socket_path), timeout=300)
    return anthropic.Anthropic(base_url="http://worker", api_key="x", http_client=http, max_retries=0)


# --- OpenAI Responses -------------------------------------------------------------------------


def test_responses_plain_and_streamed(worker: WorkerProcess) -> None:
    with _openai(worker) as sdk:
        r = sdk.responses.create(model="m", input="Name a fruit.", max_output_tokens=6, temperature=0)
        assert r.object == "response" and r.status in ("completed", "incomplete") and r.output_text
        assert r.usage is not None and r.usage.output_tokens <= 6
        assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
        events = list(sdk.responses.create(model="m", input="Name a fruit.", max_output_tokens=6, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          f"response.{r.status}"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = next(e for e in events if e.type == "response.output_text.done")
    assert deltas == done.text == r.output_text  # greedy: the same text streamed or not
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == r.output_text and final.usage is not None


def test_responses_tool_round_trip_previous_response_and_store(qwen: WorkerProcess) -> None:
    with _openai(qwen) as sdk:
        r = sdk.responses.create(model="m", input=ASK, tools=[FN], tool_choice="required",  # type: ignore[list-item]
                                 max_output_tokens=60, temperature=0)
        calls = [o for o in r.output if o.type == "function_call"]
        assert r.status == "completed" and len(calls) == 1, r.output
        assert calls[0].name == "get_weather" and set(json.loads(calls[0].arguments)) == {"city"}
        assert calls[0].call_id and calls[0].id
        # The tool's output fed back with previous_response_id: the history comes from the store.
        second = sdk.responses.create(
            model="m", previous_response_id=r.id, tools=[FN], max_output_tokens=5, temperature=0,  # type: ignore[list-item]
            input=[{"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"sky": "sunny"}'}],
        )
        assert second.previous_response_id == r.id and second.usage is not None and r.usage is not None
        assert second.usage.input_tokens > r.usage.input_tokens
        # The same turn sent whole (no store) is the same prompt.
        whole = sdk.responses.create(
            model="m", tools=[FN], max_output_tokens=5, temperature=0, store=False,  # type: ignore[list-item]
            input=[{"role": "user", "content": ASK}, calls[0].model_dump(exclude_none=True),  # type: ignore[list-item]
                   {"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"sky": "sunny"}'}],
        )
        assert whole.usage is not None and whole.usage.input_tokens == second.usage.input_tokens
        assert sdk.responses.retrieve(r.id).output[0].type == "function_call"
        with pytest.raises(openai.NotFoundError):
            sdk.responses.retrieve(whole.id)  # store: false is never kept
        with pytest.raises(openai.NotFoundError) as info:
            sdk.responses.create(model="m", input="hi", previous_response_id="resp_nope")
        assert info.value.body["param"] == "previous_response_id"  # type: ignore[index]
        # Streamed: the call's arguments as delta and done events.
        events = list(sdk.responses.create(model="m", input=ASK, tools=[FN], tool_choice="required",  # type: ignore[list-item]
                                           max_output_tokens=60, temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds and kinds[-1] == "response.completed"
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert done.arguments == calls[0].arguments  # type: ignore[union-attr]


def test_responses_input_tokens_and_ignored_tools(qwen: WorkerProcess) -> None:
    with _openai(qwen) as sdk:
        counted = sdk.responses.input_tokens.count(model="m", input=ASK, instructions="Be brief.", tools=[FN])  # type: ignore[list-item]
        r = sdk.responses.create(model="m", input=ASK, instructions="Be brief.", tools=[FN], max_output_tokens=1)  # type: ignore[list-item]
        assert r.usage is not None and counted.input_tokens == r.usage.input_tokens
        # Codex sends web_search beside its function tools: ignored, named in a header.
        raw = sdk.responses.with_raw_response.create(model="m", input="hi", max_output_tokens=1,
                                                     tools=[FN, {"type": "web_search"}])  # type: ignore[list-item]
        assert "web_search" in raw.headers["X-Ignored-Params"]
        with pytest.raises(openai.BadRequestError) as info:
            sdk.responses.create(model="m", input="hi", tools=[{"type": "custom", "name": "apply_patch"}])  # type: ignore[list-item]
        assert info.value.body["param"] == "tools[0].type" and "custom" in info.value.body["message"]  # type: ignore[index]
        # Codex's probe: no input at all, one token.
        probe = sdk.responses.create(model="m", input=[], max_output_tokens=1)
        assert probe.usage is not None and probe.usage.output_tokens <= 1


# --- Anthropic Messages -----------------------------------------------------------------------


def test_messages_plain_streamed_and_count_tokens(worker: WorkerProcess) -> None:
    client = _anthropic(worker)
    hi = [{"role": "user", "content": "Name a fruit."}]
    with client:
        m = client.messages.create(model="m", max_tokens=6, messages=hi, system="Be brief.", extra_body={"temperature": 0})
        assert m.type == "message" and m.role == "assistant" and m.stop_reason in ("end_turn", "max_tokens")
        assert m.content[0].type == "text" and m.content[0].text
        counted = client.messages.count_tokens(model="m", messages=hi, system="Be brief.")
        assert counted.input_tokens == m.usage.input_tokens and m.usage.output_tokens <= 6
        with client.messages.stream(model="m", max_tokens=6, messages=hi, system="Be brief.",
                                    extra_body={"temperature": 0}) as stream:
            kinds = [e.type for e in stream]
            final = stream.get_final_message()
        assert final.content[0].text == m.content[0].text and final.stop_reason == m.stop_reason
        m = client.messages.create(model="m", max_tokens=40, messages=hi, stop_sequences=["a", "e", "i", "o", "u"])
        assert m.stop_reason == "stop_sequence" and m.stop_sequence in "aeiou"
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "message_delta" in kinds
    assert "content_block_start" in kinds and "content_block_stop" in kinds


def test_messages_tool_use_round_trip_and_stream(qwen: WorkerProcess) -> None:
    client = _anthropic(qwen)
    ask = [{"role": "user", "content": ASK}]
    with client:
        m = client.messages.create(model="m", max_tokens=60, messages=ask, tools=[ANTHROPIC_FN],
                                   tool_choice={"type": "any"}, extra_body={"temperature": 0})
        assert m.stop_reason == "tool_use"
        uses = [b for b in m.content if b.type == "tool_use"]
        assert uses and uses[0].name == "get_weather" and set(uses[0].input) == {"city"}
        second = client.messages.create(model="m", max_tokens=5, tools=[ANTHROPIC_FN], messages=[
            *ask, {"role": "assistant", "content": m.content},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "sunny"}]},
        ])
        assert second.usage.input_tokens > m.usage.input_tokens
        with client.messages.stream(model="m", max_tokens=60, messages=ask, tools=[ANTHROPIC_FN],
                                    tool_choice={"type": "tool", "name": "get_weather"}, extra_body={"temperature": 0}) as stream:
            deltas = [e.delta.type for e in stream if e.type == "content_block_delta"]
            final = stream.get_final_message()
    assert "input_json_delta" in deltas and final.stop_reason == "tool_use"
    assert [b.input for b in final.content if b.type == "tool_use"] == [uses[0].input]


def test_messages_errors_are_anthropic_shaped(worker: WorkerProcess) -> None:
    with worker.client() as c:
        r = c.post("/v1/messages", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 400
        assert r.json() == {"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"}}
        r = c.post("/v1/messages", json={"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
                                         "tools": [{"type": "bash_20250124", "name": "bash"}]})
        assert r.status_code == 400 and "bash_20250124" in r.json()["error"]["message"]
        r = c.get("/v1/messages")
        assert r.status_code == 405 and r.json()["type"] == "error"
    client = _anthropic(worker)
    anthropic = pytest.importorskip("anthropic")
    with client, pytest.raises(anthropic.BadRequestError) as info:
        client.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "hi " * 3000}])
    assert "context length" in str(info.value)


# --- the tool-call rules (chat completions) ---------------------------------------------------


def test_required_with_parallel_calls_stops_on_a_repeat_and_never_leaks(qwen: WorkerProcess) -> None:
    # pydantic-ai and openai-agents send tool_choice "required" without parallel_tool_calls:
    # the grammar allows many calls and a small model repeats its call up to max_tokens.
    body = {"messages": [{"role": "user", "content": ASK}], "tools": [CHAT_FN], "tool_choice": "required",
            "max_tokens": 300, "temperature": 0}
    with qwen.client(timeout=180) as c:
        r = c.post("/v1/chat/completions", json=body).json()
        with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
            chunks = [e for e in sse_events(s.iter_lines()) if e != "[DONE]"]
    choice = r["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and not choice["message"]["content"]
    calls = [(t["function"]["name"], t["function"]["arguments"]) for t in choice["message"]["tool_calls"]]
    assert calls and len(set(calls)) == len(calls)  # the repeat ended the answer, not max_tokens
    assert r["usage"]["completion_tokens"] < 300
    deltas = [ch["delta"] for e in chunks for ch in e["choices"]]
    assert not any("<tool" in (d.get("content") or "") for d in deltas)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    streamed = [(t["function"]["name"], t["function"]["arguments"]) for d in deltas for t in d.get("tool_calls") or ()]
    assert streamed == calls


def test_a_call_cut_off_by_max_tokens_is_dropped_not_shown(qwen: WorkerProcess) -> None:
    body = {"messages": [{"role": "user", "content": ASK}], "tools": [CHAT_FN], "tool_choice": "required",
            "parallel_tool_calls": False, "max_tokens": 6, "temperature": 0}
    with qwen.client() as c:
        r = c.post("/v1/chat/completions", json=body).json()
        with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as s:
            chunks = [e for e in sse_events(s.iter_lines()) if e != "[DONE]"]
    choice = r["choices"][0]
    assert choice["finish_reason"] == "length" and not choice["message"]["content"], choice
    assert "tool_calls" not in choice["message"]
    text = "".join(ch["delta"].get("content") or "" for e in chunks for ch in e["choices"])
    assert text == "" and chunks[-1]["choices"][0]["finish_reason"] == "length"


# --- the generic format (SmolLM2's own template has no tool markup) ---------------------------


def test_generic_tool_call_on_a_template_without_tool_markup(worker: WorkerProcess) -> None:
    with worker.client() as c:
        params = c.get("/health").json()["params"]
        assert params["tool_format"] == "generic"
    with _openai(worker) as sdk:
        r = sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": ASK}], tools=[CHAT_FN],  # type: ignore[list-item]
                                        tool_choice="required", max_tokens=80, temperature=0)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.tool_calls, choice
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_weather" and set(json.loads(call.function.arguments)) == {"city"}  # type: ignore[union-attr]
        # The call and its result go back as the generic format's JSON; auto answers with
        # a JSON "response" whose text is the content (or another call): never raw JSON.
        second = sdk.chat.completions.create(model="m", tools=[CHAT_FN], max_tokens=30, temperature=0, messages=[  # type: ignore[list-item]
            {"role": "user", "content": ASK}, choice.message.model_dump(exclude_none=True),  # type: ignore[list-item]
            {"role": "tool", "tool_call_id": call.id, "content": "sunny"}])
        content = second.choices[0].message.content or ""
        assert not content.lstrip().startswith("{"), content
        streamed = sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": ASK}], tools=[CHAT_FN],  # type: ignore[list-item]
                                               tool_choice="required", max_tokens=80, temperature=0, stream=True)
        chunks = list(streamed)
    tool_deltas = [t for ch in chunks for t in ch.choices[0].delta.tool_calls or ()] if chunks else []
    assert [t.function.arguments for t in tool_deltas] == [call.function.arguments]  # type: ignore[union-attr]


def test_tools_refuse_setting_is_a_400(tmpdir_short: Path) -> None:
    proc = WorkerProcess(tmpdir_short, worker_spec(tmpdir_short, model_path=str(default_model()), tools="refuse"))
    try:
        proc.wait_ready(timeout=240)
        with proc.client() as c:
            assert c.get("/health").json()["params"].get("tool_format") is None
            r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": ASK}], "tools": [CHAT_FN]})
            assert r.status_code == 400 and r.json()["error"]["code"] == "tools_unsupported"
            r = c.post("/v1/responses", json={"input": ASK, "tools": [FN]})
            assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    finally:
        proc.stop()


# --- agent frameworks -------------------------------------------------------------------------


def test_openai_agents_runs_a_function_tool_over_responses(qwen: WorkerProcess) -> None:
    agents = pytest.importorskip("agents", reason="openai-agents is not installed (pip install -e .[test])")
    assert qwen.socket_path is not None
    agents.set_tracing_disabled(True)
    seen: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        seen.append(city)
        return f"sunny in {city}"

    async def main() -> Any:
        http = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=qwen.socket_path), timeout=300)
        client = openai.AsyncOpenAI(base_url="http://worker/v1", api_key="x", http_client=http, max_retries=0)
        async with client:
            agent = agents.Agent(
                name="weather", instructions="Answer with the tool.", tools=[get_weather],
                model=agents.OpenAIResponsesModel(model="qwen", openai_client=client),
                model_settings=agents.ModelSettings(tool_choice="required", temperature=0, max_tokens=60),
                tool_use_behavior="stop_on_first_tool",
            )
            return await agents.Runner.run(agent, ASK, max_turns=3)

    result = asyncio.run(main())
    assert seen and isinstance(seen[0], str)
    assert result.final_output == f"sunny in {seen[0]}"


def test_pydantic_ai_with_required_tool_choice_gets_no_leaked_markup(qwen: WorkerProcess) -> None:
    pytest.importorskip("pydantic_ai", reason="pydantic-ai-slim[openai] is not installed (pip install -e .[test])")
    import pydantic
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    assert qwen.socket_path is not None

    class City(pydantic.BaseModel):
        city: str = pydantic.Field(max_length=20)

    async def main() -> Any:
        http = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=qwen.socket_path), timeout=300)
        client = openai.AsyncOpenAI(base_url="http://worker/v1", api_key="x", http_client=http, max_retries=0)
        async with client:
            # A structured output_type is an output tool that pydantic-ai forces with
            # tool_choice "required" (parallel_tool_calls left at OpenAI's default).
            agent = Agent(OpenAIChatModel("qwen", provider=OpenAIProvider(openai_client=client)), output_type=City)
            return await agent.run(ASK, model_settings={"temperature": 0, "max_tokens": 200})

    result = asyncio.run(main())
    assert isinstance(result.output, City)
    texts = [p.content for m in result.all_messages() for p in m.parts if type(p).__name__ == "TextPart"]
    assert not any("<tool_call>" in t for t in texts)

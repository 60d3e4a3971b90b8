"""Tool calling with the openai SDK against the real worker, on SmolLM2 copies whose GGUF
carries a Qwen-style (Hermes <tool_call>) or a Llama-3.1-style (JSON) chat template,
written by the test with gguf-new-metadata. The plain SmolLM2 template has no tool support.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import WorkerProcess, default_model, short_tmpdir, sse_events, worker_spec
from worker.engine.tools import (
    HERMES,
    LLAMA3,
    MISTRAL,
    ToolRequest,
    call_grammar,
    detect_format,
    parse_calls,
)

pytestmark = pytest.mark.model

QWEN_TEMPLATE = """{%- if tools %}<|im_start|>system
You may call functions. Signatures:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
For each call return <tool_call>{"name": <name>, "arguments": <args-json-object>}</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|im_start|>assistant
{%- for tc in message.tool_calls %}
<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

LLAMA_TEMPLATE = """{{- bos_token }}
{%- if tools %}<|start_header_id|>system<|end_header_id|>

Environment: ipython
Respond with a JSON function call {"name": function name, "parameters": dictionary of argument name and its value}.
{%- for t in tools %}
{{ t | tojson }}
{%- endfor %}<|eot_id|>
{%- endif %}
{%- for message in messages %}
{%- if message.role == "assistant" and message.tool_calls %}<|start_header_id|>assistant<|end_header_id|>

{%- for tc in message.tool_calls %}<|python_tag|>{"name": "{{ tc.function.name }}", "parameters": {{ tc.function.arguments | tojson }}}{% endfor %}<|eot_id|>
{%- elif message.role == "tool" %}<|start_header_id|>ipython<|end_header_id|>

{{ message.content }}<|eot_id|>
{%- else %}<|start_header_id|>{{ message.role }}<|end_header_id|>

{{ message.content }}<|eot_id|>
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "days": {"type": "integer"}},
            "required": ["city", "days"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "What is the weather in Paris for the next 2 days?"}]


# --- pure: format detection, parsing, grammar ------------------------------------------------


def test_detect_format_from_the_template() -> None:
    assert detect_format(QWEN_TEMPLATE) == HERMES
    assert detect_format(LLAMA_TEMPLATE) == LLAMA3
    assert detect_format("{% if tools %}[AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]") == MISTRAL
    assert detect_format("{% for m in messages %}{{ m.content }}{% endfor %}") is None
    assert detect_format(None) is None


def test_parse_calls_of_each_format() -> None:
    content, calls = parse_calls(HERMES, 'Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>')
    assert content == "Sure." and [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"a": 1})]
    _, calls = parse_calls(LLAMA3, '<|python_tag|>{"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {}}')
    assert [c.name for c in calls] == ["f", "g"]
    content, calls = parse_calls(MISTRAL, '[TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}]')
    assert content is None and calls[0].name == "f"
    assert parse_calls(HERMES, "no call here") == ("no call here", [])
    assert parse_calls(HERMES, "<tool_call>{broken</tool_call>")[1] == []
    assert parse_calls(LLAMA3, '{"not": "a call"}')[1] == []


def test_call_grammar_compiles_for_each_format() -> None:
    from llama_cpp.llama_grammar import LlamaGrammar

    for fmt in (HERMES, LLAMA3, MISTRAL):
        for choice in ("required", "function:get_time"):
            LlamaGrammar.from_string(call_grammar(fmt, ToolRequest([WEATHER, TIME], choice)), verbose=False)


# --- the real worker ----------------------------------------------------------------------


def _model_with_template(d: Path, name: str, template: str) -> Path:
    out = d / f"{name}.gguf"
    subprocess.run(
        [sys.executable, "-m", "gguf.scripts.gguf_new_metadata", str(default_model()), str(out),
         "--chat-template", template, "--force"],
        check=True, capture_output=True, timeout=120,
    )
    return out


@pytest.fixture(scope="module", params=["qwen", "llama31"])
def tool_worker(request: pytest.FixtureRequest) -> Iterator[WorkerProcess]:
    d = short_tmpdir()
    template = QWEN_TEMPLATE if request.param == "qwen" else LLAMA_TEMPLATE
    try:
        model = _model_with_template(d, request.param, template)
        proc = WorkerProcess(d, worker_spec(d, model_path=str(model), model_alias=request.param))
        try:
            proc.wait_ready(timeout=180)
            yield proc
        finally:
            proc.stop()
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _sdk(worker: WorkerProcess) -> tuple[httpx.Client, openai.OpenAI]:
    assert worker.socket_path is not None
    http = httpx.Client(transport=httpx.HTTPTransport(uds=worker.socket_path), timeout=120)
    return http, openai.OpenAI(base_url="http://worker/v1", api_key="x", http_client=http, max_retries=0)


def _check_weather_args(arguments: str) -> dict[str, Any]:
    args = json.loads(arguments)
    assert set(args) == {"city", "days"}
    assert isinstance(args["city"], str) and isinstance(args["days"], int)
    return args


def test_required_tool_call_parsed_streamed_and_not_then_second_turn(tool_worker: WorkerProcess) -> None:
    http, sdk = _sdk(tool_worker)
    with http, sdk:
        r = sdk.chat.completions.create(
            model="m", messages=ASK, tools=[WEATHER], tool_choice="required",  # type: ignore[arg-type]
            temperature=0, max_tokens=80, parallel_tool_calls=False,
        )
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        calls = choice.message.tool_calls
        assert calls is not None and len(calls) == 1
        call = calls[0]
        assert call.type == "function" and call.id and call.function.name == "get_weather"
        _check_weather_args(call.function.arguments)
        # Streamed: delta.tool_calls chunks, the SDK's stream helper accumulates them.
        with sdk.beta.chat.completions.stream(
            model="m", messages=ASK, tools=[WEATHER], tool_choice="required",  # type: ignore[arg-type]
            temperature=0, max_tokens=80, parallel_tool_calls=False,
        ) as stream:
            final = stream.get_final_completion()
        streamed = final.choices[0]
        assert streamed.finish_reason == "tool_calls"
        assert streamed.message.tool_calls and streamed.message.tool_calls[0].function.name == "get_weather"
        assert streamed.message.tool_calls[0].function.arguments == call.function.arguments
        # A second turn with the tool's result is accepted (the assistant's call in the history).
        second = sdk.chat.completions.create(
            model="m", temperature=0, max_tokens=8, tools=[WEATHER],  # type: ignore[arg-type]
            messages=[*ASK, choice.message.model_dump(exclude_none=True),  # type: ignore[list-item]
                      {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sunny"}'}],
        )
        assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_named_function_is_the_one_called(tool_worker: WorkerProcess) -> None:
    http, sdk = _sdk(tool_worker)
    with http, sdk:
        r = sdk.chat.completions.create(
            model="m", messages=ASK, tools=[WEATHER, TIME], temperature=0, max_tokens=40,  # type: ignore[arg-type]
            tool_choice={"type": "function", "function": {"name": "get_time"}},
        )
    calls = r.choices[0].message.tool_calls
    assert r.choices[0].finish_reason == "tool_calls" and calls is not None
    assert [c.function.name for c in calls] == ["get_time"] and json.loads(calls[0].function.arguments) == {}


def test_tools_reach_the_template(tool_worker: WorkerProcess) -> None:
    with tool_worker.client() as c:
        without = c.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 1}).json()
        with_tools = c.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 1, "tools": [WEATHER]}).json()
        none = c.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 1, "tools": [WEATHER], "tool_choice": "none"}).json()
    assert with_tools["usage"]["prompt_tokens"] > without["usage"]["prompt_tokens"]
    assert none["usage"]["prompt_tokens"] == without["usage"]["prompt_tokens"]
    with tool_worker.client() as c:
        prompt = c.post("/apply-template", json={"messages": ASK, "tools": [WEATHER]}).json()["prompt"]
        n = len(c.post("/tokenize", json={"content": prompt}).json()["tokens"])
    assert "get_weather" in prompt and n == with_tools["usage"]["prompt_tokens"]


def test_malformed_tools_are_400s(client: httpx.Client) -> None:
    # (The plain SmolLM2 template renders no tools: it is served by the generic format, or
    # refused with tools = "refuse": tests/test_worker_dialects.py.)
    ok = client.post("/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER], "tool_choice": "none", "max_tokens": 1})
    assert ok.status_code == 200
    for tools, param in [
        ([{"type": "function", "function": {"name": "bad name"}}], "tools[0].function.name"),
        ([{"type": "retrieval"}], "tools[0].type"),
        ([{"type": "function", "function": {"name": "f", "parameters": "x"}}], "tools[0].function.parameters"),
        ([{"type": "function"}], "tools[0].function"),
    ]:
        r = client.post("/v1/chat/completions", json={"messages": ASK, "tools": tools})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = client.post("/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER],
                                                  "tool_choice": {"type": "function", "function": {"name": "nope"}}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice.function.name"


def test_stream_split_streams_text_and_holds_calls() -> None:
    from worker.engine.tools import StreamSplit

    s = StreamSplit(HERMES)
    out = [s.feed(p) for p in ["Let me ", "check.<tool", "_call>", '{"name": "f"', "}</tool_call>"]]
    assert out == ["Let me ", "check.", "", "", ""]
    assert s.holding and s.held == '<tool_call>{"name": "f"}</tool_call>'
    s = StreamSplit(HERMES)
    assert s.feed("a <to") + s.feed("ol at hand") == "a <tool at hand" and not s.holding
    s = StreamSplit(LLAMA3)
    assert s.feed(" ") == "" and s.feed('{"na') == "" and s.holding
    s = StreamSplit(LLAMA3)
    assert s.feed("<|py") == "" and s.feed("Hello") == "<|pyHello" and s.feed(" world") == " world"


def test_auto_streams_plain_text_as_content(tool_worker: WorkerProcess) -> None:
    # tool_choice auto, and the model answers in words: content chunks, no tool_calls;
    # the streamed text equals the non-streamed answer.
    body = {"messages": [{"role": "user", "content": "Say hello."}], "tools": [WEATHER],
            "temperature": 0, "max_tokens": 12,
            # SmolLM2's tokens for "<", "{", " {", " <" and '{"': no call can start.
            "logit_bias": {str(t): -100 for t in (44, 107, 1662, 2067, 39428)}}
    with tool_worker.client() as c:
        whole = c.post("/v1/chat/completions", json=body).json()["choices"][0]
        with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            events = [e for e in sse_events(r.iter_lines()) if e != "[DONE]"]
    deltas = [ch["delta"] for e in events for ch in e["choices"]]
    text = "".join(d.get("content") or "" for d in deltas)
    assert whole["finish_reason"] in ("stop", "length") and whole["message"]["content"]
    assert text == whole["message"]["content"] and not any(d.get("tool_calls") for d in deltas)
    assert sum(1 for d in deltas if d.get("content")) > 1  # it streamed, not one chunk at the end


# --- the leak rule, the repeat rule and the generic format (pure) ------------------------------


def test_complete_calls_are_parsed_and_a_cut_off_call_is_dropped() -> None:
    from worker.engine.tools import GENERIC

    one = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    # finish_reason "length" in the middle of the second call: the first is a call, the rest is gone.
    assert parse_calls(HERMES, f'Sure. {one}\n<tool_call>\n{{"name": "f", "argu') == ("Sure.", [parse_calls(HERMES, one)[1][0]])
    assert parse_calls(HERMES, '<tool_call>\n{"name": "f", "argu') == (None, [])
    assert parse_calls(HERMES, f"{one}\n<tool")[0] is None  # a marker cut as it began
    assert parse_calls(HERMES, '<tool_call>{"name": "f", "arguments": {}}')[1][0].name == "f"  # no end tag (EOS)
    _, calls = parse_calls(MISTRAL, '[TOOL_CALLS][{"name": "f", "arguments": {}}, {"name": "g", "argu')
    assert [c.name for c in calls] == ["f"]
    assert parse_calls(LLAMA3, '{"name": "f", "parameters": {}}; {"name": "g"') == (None, [parse_calls(LLAMA3, '{"name": "f", "parameters": {}}')[1][0]])
    assert [c.name for c in parse_calls(GENERIC, '{"tool_calls": [{"name": "f", "arguments": {}}, {"na')[1]] == ["f"]
    assert parse_calls(GENERIC, '{"response": "Hi \\u00e9') == ("Hi é", [])
    assert parse_calls(GENERIC, '{"response": "ok"}') == ("ok", [])


def test_call_stream_holds_markup_and_stops_on_a_repeat() -> None:
    from worker.engine.tools import CallStream

    call = '<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>'
    s = CallStream(HERMES, stop_on_repeat=True)
    shown = "".join(s.feed(p) for p in ["Ok ", call[:5], call[5:], "\n", call[:20]])
    assert shown == "Ok " and not s.repeated
    s.feed(call[20:])
    assert s.repeated  # the same name and arguments again: the caller stops the generation
    assert s.finish() == ("", [parse_calls(HERMES, call)[1][0]])
    # Without the rule (auto, or parallel_tool_calls false) both calls are returned.
    s = CallStream(HERMES)
    s.feed(call + "\n" + call)
    assert not s.repeated and len(s.finish()[1]) == 2
    # A tail that may start a marker: text when the answer ended, dropped when max_tokens cut it.
    s = CallStream(HERMES)
    assert s.feed("hello <tool_") == "hello " and s.finish() == ("<tool_", [])
    s = CallStream(HERMES)
    s.feed("hello <tool_")
    assert s.finish(cut_off=True) == ("", [])


def test_generic_format_streams_the_response_text_and_holds_calls() -> None:
    from worker.engine.tools import GENERIC, CallStream, ToolRequest, generic_grammar
    from llama_cpp.llama_grammar import LlamaGrammar

    s = CallStream(GENERIC)
    shown = [s.feed(p) for p in ['{', '"response', '": "Hel', 'lo \\', 'n\\u00', 'e9"', "}"]]
    assert shown == ["", "", "Hel", "lo ", "\n", "é", ""] and s.finish() == ("", [])
    s = CallStream(GENERIC)  # cut by max_tokens before the JSON said which: nothing shown
    assert s.feed('{"tool') == "" and s.finish(cut_off=True) == ("", [])
    s = CallStream(GENERIC, stop_on_repeat=True)
    call = '{"name": "f", "arguments": {}}'
    assert s.feed('{"tool_calls": [' + call) == "" and not s.repeated
    s.feed(", " + call)
    assert s.repeated and [c.name for c in s.finish()[1]] == ["f"]
    for choice in ("auto", "required", "function:get_time"):
        LlamaGrammar.from_string(generic_grammar(ToolRequest([WEATHER, TIME], choice)), verbose=False)


def test_response_store_is_bounded_and_expires() -> None:
    from worker.api.responses import ResponseStore

    store = ResponseStore(size=2, ttl_s=10.0)
    for i, rid in enumerate(["a", "b", "c"]):
        store.put(rid, {"id": rid}, [], now=float(i))
    assert store.get("a", 3.0) is None and store.get("b", 3.0) is not None  # the oldest went first
    assert store.get("c", 12.5) is None  # past its TTL
    assert store.delete("b") and not store.delete("b")
    assert ResponseStore(size=0, ttl_s=10.0).get("x", 0.0) is None


def test_tool_schemas_with_defs_compile() -> None:
    # pydantic writes nested models as $defs + "#/$defs/X"; the call schema wraps the
    # parameters, so the definitions must follow them to its root.
    from llama_cpp.llama_grammar import LlamaGrammar

    from worker.engine.tools import generic_grammar

    params = {"type": "object", "properties": {"inner": {"$ref": "#/$defs/Inner"}}, "required": ["inner"],
              "$defs": {"Inner": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}
    req = ToolRequest([{"type": "function", "function": {"name": "f", "parameters": params}}, TIME], "required")
    for grammar in (generic_grammar(req), call_grammar(HERMES, req), call_grammar(LLAMA3, req)):
        LlamaGrammar.from_string(grammar, verbose=False)

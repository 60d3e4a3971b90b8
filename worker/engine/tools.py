"""Tool calling: the model's tool-call format, the grammar that forces a call, the parser.

Rules for this module:
- The format is read from the model's own chat template (the text a template writes
  around a call is the text the model was trained to produce): Hermes/Qwen
  ``<tool_call>{"name": ..., "arguments": ...}</tool_call>``, Llama 3.1+ JSON
  ``{"name": ..., "parameters": ...}`` (optionally after ``<|python_tag|>``) and Mistral
  ``[TOOL_CALLS][{"name": ..., "arguments": ...}]``. A template that mentions none of
  them has no tool support (``detect_format`` returns None).
- ``call_grammar`` builds a GBNF grammar from the tools' JSON schemas (llama.cpp's
  json-schema-to-grammar) wrapped in the format's markers: ``tool_choice`` "required" or a
  named function then always yields a well-formed call, even from a small model.
- ``parse_calls`` is pure text processing: the server turns its result into OpenAI's
  ``tool_calls``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from llama_cpp.llama_grammar import json_schema_to_gbnf

HERMES = "hermes"
LLAMA3 = "llama3"
MISTRAL = "mistral"
GENERIC = "generic"  # no tool markup in the template: JSON constrained by a grammar


@dataclass(frozen=True)
class ToolRequest:
    """The request's tools (OpenAI dicts) and its tool_choice ("auto", "required" or a name)."""

    tools: list[dict[str, Any]]
    choice: str  # "auto" | "required" | "function:NAME"
    parallel: bool = True


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str  # a JSON object, as a string (OpenAI's shape)


def detect_format(template: str | None) -> str | None:
    """The tool-call format a chat template writes, or None (no tool support)."""
    if not template or "tools" not in template:
        return None
    if "<tool_call>" in template:
        return HERMES
    if "[TOOL_CALLS]" in template:
        return MISTRAL
    if "<|python_tag|>" in template or ("ipython" in template and '"parameters"' in template):
        return LLAMA3
    return None


def _with_defs(schema: dict[str, Any], tools: list[dict[str, Any]]) -> dict[str, Any]:
    """``schema`` with the tools' ``$defs``/``definitions`` at its root: a tool's parameters
    (pydantic's, say) refer to them as ``#/$defs/X``, and the call schema wraps the
    parameters, so the references resolve against the wrapper."""
    for key in ("$defs", "definitions"):
        merged: dict[str, Any] = {}
        for t in tools:
            merged.update((t["function"].get("parameters") or {}).get(key) or {})
        if merged:
            schema = {**schema, key: merged}
    return schema


def _call_schema(fmt: str, tool: dict[str, Any]) -> dict[str, Any]:
    fn = tool["function"]
    params = fn.get("parameters") or {"type": "object", "properties": {}}
    key = "parameters" if fmt == LLAMA3 else "arguments"
    return {
        "type": "object",
        "properties": {"name": {"const": fn["name"]}, key: params},
        "required": ["name", key],
    }


_ROOT = re.compile(r"^root ::= ", re.MULTILINE)


def call_grammar(fmt: str, req: ToolRequest) -> str:
    """A GBNF grammar: exactly one call (several when parallel and "required") of the tools."""
    tools = req.tools
    if req.choice.startswith("function:"):
        name = req.choice[len("function:") :]
        tools = [t for t in tools if t["function"]["name"] == name]
    schemas = [_call_schema(fmt, t) for t in tools]
    schema = _with_defs(schemas[0] if len(schemas) == 1 else {"anyOf": schemas}, tools)
    body = _ROOT.sub("toolcall0 ::= ", json_schema_to_gbnf(json.dumps(schema)))
    many = req.parallel and not req.choice.startswith("function:")
    if fmt == HERMES:
        one = '"<tool_call>\\n" toolcall0 "\\n</tool_call>"'
        root = f'{one} ("\\n" {one})*' if many else one
    elif fmt == MISTRAL:
        root = '"[TOOL_CALLS][" toolcall0 ("," space toolcall0)* "]"' if many else '"[TOOL_CALLS][" toolcall0 "]"'
    else:
        root = 'toolcall0 (";" space toolcall0)*' if many else "toolcall0"
    return f"root ::= {root}\n{body}"


def _generic_schema(req: ToolRequest) -> dict[str, Any]:
    """The generic format's JSON: ``{"tool_calls": [{"name", "arguments"}, ...]}``, or with
    "auto" also ``{"response": "..."}`` (a message to the user)."""
    tools = req.tools
    named = req.choice.startswith("function:")
    if named:
        tools = [t for t in tools if t["function"]["name"] == req.choice[len("function:") :]]
    schemas = [_call_schema(GENERIC, t) for t in tools]
    calls: dict[str, Any] = {"type": "array", "items": schemas[0] if len(schemas) == 1 else {"anyOf": schemas}, "minItems": 1}
    if named or not req.parallel:
        calls["maxItems"] = 1
    call_obj = {"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"]}
    if req.choice != "auto":
        return _with_defs(call_obj, tools)
    answer = {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"]}
    return _with_defs({"anyOf": [call_obj, answer]}, tools)


def generic_grammar(req: ToolRequest) -> str:
    """The generic format's grammar: the answer is always one of its JSON objects."""
    return json_schema_to_gbnf(json.dumps(_generic_schema(req)))


def generic_instructions(req: ToolRequest) -> str:
    """The system text that describes the tools to a model whose template has no tool markup
    (as llama.cpp's generic format does): the grammar makes the shape, this says the meaning."""
    lines = ["You can call these tools (JSON Schema of each one's arguments):"]
    for t in req.tools:
        fn = t["function"]
        desc = {"name": fn["name"], "description": fn.get("description") or "", "parameters": fn.get("parameters") or {}}
        lines.append(json.dumps(desc, ensure_ascii=False))
    calls = '{"tool_calls": [{"name": <tool name>, "arguments": <arguments object>}]}'
    if req.choice == "auto":
        lines.append(f'Answer with a JSON object: {calls} to call tools, or {{"response": <your answer as a string>}} to reply to the user.')
    else:
        lines.append(f"Answer with a JSON object that calls tools: {calls}.")
    return "\n".join(lines)


def generic_history_call(calls: list[dict[str, Any]]) -> str:
    """An assistant's earlier calls (OpenAI's shape) as the generic format writes them."""
    out = []
    for c in calls:
        fn = c.get("function") or {}
        args: Any = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except ValueError:
                pass
        out.append({"name": fn.get("name", ""), "arguments": args})
    return json.dumps({"tool_calls": out}, ensure_ascii=False)


def generic_history_result(name: str | None, call_id: str | None, content: str) -> str:
    """A tool's result, for a template that has no tool role (sent as a user message)."""
    body: dict[str, Any] = {"tool_response": {"content": content}}
    if name:
        body["tool_response"]["name"] = name
    if call_id:
        body["tool_response"]["id"] = call_id
    return json.dumps(body, ensure_ascii=False)


def _calls_from(objs: Any, key: str) -> list[ParsedCall] | None:
    if isinstance(objs, dict):
        objs = [objs]
    if not isinstance(objs, list) or not objs:
        return None
    out = []
    for o in objs:
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            return None
        args = o.get(key, o.get("arguments", o.get("parameters", {})))
        if isinstance(args, str):  # some models write the arguments as a JSON string
            try:
                args = json.loads(args)
            except ValueError:
                return None
        if not isinstance(args, dict):
            return None
        out.append(ParsedCall(o["name"], json.dumps(args, ensure_ascii=False)))
    return out


_DEC = json.JSONDecoder()


def _json_prefix(text: str, i: int = 0, seps: str = " \t\r\n;") -> tuple[list[Any], bool]:
    """The JSON values at ``text[i:]`` separated by ``seps``; False when a value was cut
    off (or is not JSON): the complete ones before it are returned."""
    out: list[Any] = []
    n = len(text)
    while True:
        while i < n and text[i] in seps:
            i += 1
        if i >= n:
            return out, True
        try:
            value, i = _DEC.raw_decode(text, i)
        except ValueError:
            return out, False
        out.append(value)


def _json_array_prefix(text: str) -> list[Any]:
    """The complete elements of a JSON array at the start of ``text`` (which may be cut off)."""
    body = text.lstrip()
    if not body.startswith("["):
        return []
    values, _ = _json_prefix(body, 1, " \t\r\n,")
    return values


def _parse_hermes(text: str) -> tuple[str | None, list[ParsedCall]]:
    calls: list[ParsedCall] = []
    content: list[str] = []
    pos = 0
    while True:
        at = text.find(_OPEN, pos)
        if at < 0:
            content.append(text[pos:])
            break
        content.append(text[pos:at])
        close = text.find(_CLOSE, at)
        body = text[at + len(_OPEN) : close if close >= 0 else len(text)]
        values, whole = _json_prefix(body)
        parsed = _calls_from(values[0], "arguments") if whole and len(values) == 1 else None
        if close < 0:
            # Unclosed: a whole call whose end tag never came (end of generation) counts;
            # a call cut off by max_tokens is dropped, never shown as text.
            calls.extend(parsed or ())
            break
        if parsed is None:
            content.append(text[at : close + len(_CLOSE)])  # a malformed call: the model's text
        else:
            calls.extend(parsed)
        pos = close + len(_CLOSE)
    if not calls:
        return "".join(content) or None, []
    rest = _drop_marker_tail("".join(content), _OPEN).strip()
    return rest or None, calls


def _drop_marker_tail(text: str, marker: str) -> str:
    """``text`` less a tail that is the start of ``marker`` (a call cut off as it began)."""
    keep = next((k for k in range(min(len(marker) - 1, len(text)), 0, -1) if marker.startswith(text[-k:])), 0)
    return text[: len(text) - keep]


def _parse_generic(text: str) -> tuple[str | None, list[ParsedCall]]:
    try:
        obj = json.loads(text)
    except ValueError:
        obj = None
    if isinstance(obj, dict):
        if isinstance(obj.get("response"), str):
            return obj["response"], []
        calls = _calls_from(obj.get("tool_calls"), "arguments")
        if calls:
            return None, calls
        return text, []
    m = _GENERIC_CALLS.match(text)
    if m:  # cut off: the whole calls before the cut
        objs = [o for o in _json_array_prefix(text[m.end() :]) if isinstance(o, dict)]
        return None, (_calls_from(objs, "arguments") or []) if objs else []
    m = _GENERIC_RESPONSE.match(text)
    if m:
        return _json_string_prefix(text[m.end() :])[0] or None, []
    return text, []


def parse_calls(fmt: str, text: str) -> tuple[str | None, list[ParsedCall]]:
    """(content left outside the calls or None, the calls); no calls: (text, []).

    Whatever ended the generation: every complete call is parsed out, and a call cut off
    at the end (max_tokens) is dropped, never returned as text. A complete call that is not
    a call (bad JSON between the markers) stays text: it is what the model wrote.
    """
    if fmt == HERMES:
        return _parse_hermes(text)
    if fmt == GENERIC:
        return _parse_generic(text)
    if fmt == MISTRAL:
        head, sep, tail = text.partition("[TOOL_CALLS]")
        if not sep:
            return text, []
        objs = _json_array_prefix(tail)
        if tail.lstrip().startswith("{"):  # a single object, no list
            objs, _ = _json_prefix(tail)
        calls = _calls_from(objs, "arguments") if objs else []
        return head.strip() or None, calls or []
    # Llama 3.1+: the whole answer is the call(s), JSON, maybe after <|python_tag|>.
    body = text.strip()
    if body.startswith("<|python_tag|>"):
        body = body[len("<|python_tag|>") :]
    if not body.startswith("{"):
        return text, []
    values, whole = _json_prefix(body)
    if whole and not values:
        return text, []
    calls = []
    for v in values:
        parsed = _calls_from(v, "parameters")
        if parsed is None:
            return text, []
        calls.extend(parsed)
    return None, calls


_OPEN, _CLOSE = "<tool_call>", "</tool_call>"
_GENERIC_CALLS = re.compile(r'\s*\{\s*"tool_calls"\s*:\s*')
_GENERIC_RESPONSE = re.compile(r'\s*\{\s*"response"\s*:\s*"')
_GENERIC_HEADS = ('{"tool_calls":', '{"response":"')


def _json_string_prefix(raw: str) -> tuple[str, bool]:
    """The text of a JSON string's body ``raw`` (after its opening quote) decoded as far as it
    is whole; True once its closing quote was seen."""
    i, n = 0, len(raw)
    end = None
    while i < n:
        c = raw[i]
        if c == "\\":
            if i + 1 >= n or (raw[i + 1] == "u" and i + 6 > n):
                break  # an escape cut in two: wait for the rest
            i += 6 if raw[i + 1] == "u" else 2
            continue
        if c == '"':
            end = i
            break
        i += 1
    whole = raw[: end if end is not None else min(i, n)]
    try:
        return json.loads(f'"{whole}"'), end is not None
    except ValueError:
        return "", end is not None  # a lone surrogate escape, say: nothing certain to show


_MARKERS = {HERMES: _OPEN, MISTRAL: "[TOOL_CALLS]"}
_PYTHON_TAG = "<|python_tag|>"


class CallStream:
    """Splits a generated answer into text to show now and tool calls parsed at the end.

    Plain text streams as it comes; from a call's marker on (``<tool_call>``,
    ``[TOOL_CALLS]``; for Llama 3 an answer starting with ``{`` or ``<|python_tag|>``)
    everything is held and parsed by ``finish``. A tail that may be the start of a marker
    is held back until the next piece tells, so no markup ever reaches the text. The
    generic format's answer is JSON: a ``response`` string streams as its text, calls are
    held.

    ``stop_on_repeat`` (tool_choice "required" with parallel calls): ``repeated`` turns
    True when a complete call repeats an earlier one with identical arguments; the caller
    stops the generation, and ``finish`` returns the calls before the repeat. A small model
    forced to call tools otherwise repeats its call until max_tokens (issue 24).
    """

    def __init__(self, fmt: str, stop_on_repeat: bool = False) -> None:
        self.fmt = fmt
        self.held = ""
        self.holding = False  # a call started: hold everything from here
        self.repeated = False
        self._stop_on_repeat = stop_on_repeat
        self._text_only = False  # the answer did not start with a call (Llama 3, generic)
        self._shown = 0  # generic: characters of the response string shown so far

    def feed(self, text: str) -> str:
        if self.holding:
            self.held += text
            if self._stop_on_repeat and not self.repeated and any(c in text for c in ">}]"):
                _, calls = parse_calls(self.fmt, self.held)
                self.repeated = len(set(calls)) < len(calls)
            return ""
        buf = self.held + text
        if self._text_only:
            self.held = ""
            return buf
        if self.fmt == GENERIC:
            return self._feed_generic(buf)
        if self.fmt == LLAMA3:
            head = buf.lstrip()
            if head.startswith("{") or head.startswith(_PYTHON_TAG):
                self.holding, self.held = True, ""
                return self.feed(buf)
            if not head or _PYTHON_TAG.startswith(head):
                self.held = buf  # too short to tell
                return ""
            self._text_only, self.held = True, ""
            return buf
        marker = _MARKERS[self.fmt]
        at = buf.find(marker)
        if at >= 0:
            self.holding, self.held = True, ""
            self.feed(buf[at:])
            return buf[:at]
        shown = _drop_marker_tail(buf, marker)
        self.held = buf[len(shown) :]
        return shown

    def _feed_generic(self, buf: str) -> str:
        self.held = buf
        m = _GENERIC_RESPONSE.match(buf)
        if m:
            text, _ = _json_string_prefix(buf[m.end() :])
            out, self._shown = text[self._shown :], max(self._shown, len(text))
            return out
        if _GENERIC_CALLS.match(buf):
            self.holding, self.held = True, ""
            return self.feed(buf)
        squeezed = "".join(buf.split())
        if not any(h.startswith(squeezed[: len(h)]) for h in _GENERIC_HEADS):
            self._text_only, self.held = True, ""  # not the format (no grammar): plain text
            return buf
        return ""

    def finish(self, cut_off: bool = False) -> tuple[str, list[ParsedCall]]:
        """(text not shown yet, the calls): the held text parsed, a cut-off call dropped.

        ``cut_off``: the generation hit max_tokens, so a held tail that may be the start of
        a marker is dropped too (it ended naturally: the tail is text).
        """
        if self.fmt == GENERIC and not self.holding and not self._text_only:
            m = _GENERIC_RESPONSE.match(self.held)
            if m:
                text, _ = _json_string_prefix(self.held[m.end() :])
                return text[self._shown :], []
            return "", []  # the JSON's head, cut before it said call or response: markup
        if not self.holding:
            return ("" if cut_off else self.held), []
        content, calls = parse_calls(self.fmt, self.held)
        if self._stop_on_repeat:
            seen: list[ParsedCall] = []
            for c in calls:
                if c in seen:
                    break
                seen.append(c)
            calls = seen
        return content or "", calls


# The streaming splitter's earlier name.
StreamSplit = CallStream

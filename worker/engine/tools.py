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
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
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


_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def _json_values(text: str) -> list[Any] | None:
    """Consecutive JSON values separated by whitespace or ";" (Llama 3's parallel calls)."""
    dec = json.JSONDecoder()
    i, out = 0, []
    text = text.strip()
    while i < len(text):
        try:
            value, i = dec.raw_decode(text, i)
        except ValueError:
            return None
        out.append(value)
        while i < len(text) and text[i] in " \t\r\n;":
            i += 1
    return out


def parse_calls(fmt: str, text: str) -> tuple[str | None, list[ParsedCall]]:
    """(content left outside the calls or None, the calls); no calls: (text, [])."""
    if fmt == HERMES:
        calls: list[ParsedCall] = []
        for m in _HERMES_CALL.finditer(text):
            values = _json_values(m.group(1))
            parsed = _calls_from(values[0], "arguments") if values and len(values) == 1 else None
            if parsed is None:
                return text, []  # a malformed call: the text is the answer
            calls.extend(parsed)
        if not calls:
            return text, []
        rest = _HERMES_CALL.sub("", text).strip()
        return rest or None, calls
    if fmt == MISTRAL:
        head, sep, tail = text.partition("[TOOL_CALLS]")
        if not sep:
            return text, []
        values = _json_values(tail)
        parsed = _calls_from(values[0], "arguments") if values and len(values) == 1 else None
        if parsed is None:
            return text, []
        return head.strip() or None, parsed
    # Llama 3.1+: the whole answer is the call(s), JSON, maybe after <|python_tag|>.
    body = text.strip()
    if body.startswith("<|python_tag|>"):
        body = body[len("<|python_tag|>") :]
    if not body.startswith("{"):
        return text, []
    values = _json_values(body)
    calls = []
    for v in values or [None]:
        parsed = _calls_from(v, "parameters")
        if parsed is None:
            return text, []
        calls.extend(parsed)
    return None, calls


_MARKERS = {HERMES: "<tool_call>", MISTRAL: "[TOOL_CALLS]"}
_PYTHON_TAG = "<|python_tag|>"


class StreamSplit:
    """Splits a streamed answer into text that can go out now and text held for parsing.

    Plain text streams as it comes; from a call's marker on (``<tool_call>``,
    ``[TOOL_CALLS]``; for Llama 3 an answer starting with ``{`` or ``<|python_tag|>``)
    everything is held and parsed at the end (``parse_calls``). A tail that may be the
    start of a marker is held back until the next piece tells.
    """

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.held = ""
        self.holding = False  # a call started: hold everything from here
        self._text_only = False  # (Llama 3) the answer did not start with a call

    def feed(self, text: str) -> str:
        if self.holding:
            self.held += text
            return ""
        buf = self.held + text
        if self._text_only:
            self.held = ""
            return buf
        if self.fmt == LLAMA3:
            head = buf.lstrip()
            if head.startswith("{") or head.startswith(_PYTHON_TAG):
                self.holding, self.held = True, buf
                return ""
            if not head or _PYTHON_TAG.startswith(head):
                self.held = buf  # too short to tell
                return ""
            self._text_only, self.held = True, ""
            return buf
        marker = _MARKERS[self.fmt]
        at = buf.find(marker)
        if at >= 0:
            self.holding, self.held = True, buf[at:]
            return buf[:at]
        keep = next((k for k in range(min(len(marker) - 1, len(buf)), 0, -1) if marker.startswith(buf[-k:])), 0)
        self.held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep]

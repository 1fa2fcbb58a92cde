"""Tool calling for ``/v1/chat/completions``: the constraint a request's ``tools`` and ``tool_choice`` put on
the output, and the parsers that turn the model's text into OpenAI ``tool_calls``.

Formats (``--tool-call-parser``):

- ``hermes`` (Hermes, Qwen 2.5/3): ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``, one block
  per call;
- ``llama3`` (Llama 3.1+ JSON tool calls): ``{"name": ..., "parameters": {...}}``, calls separated by ``;``,
  optionally after ``<|python_tag|>``.

The constraint is an XGrammar structural tag: wherever the model opens a call (its trigger), the function name
must be one of the tools and the arguments must validate against that function's parameter schema.  ``auto``
leaves the model free to answer in text; ``required`` makes the output calls only (at least one); a named
function allows exactly one call of it; ``parallel_tool_calls: false`` stops after the first call.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from radixlm.errors import InvalidRequestError

TOOL_CALL_PARSERS = ("hermes", "llama3")


@dataclass(frozen=True)
class ToolFormat:
    trigger: str  # the text that opens a call
    begin: str  # before the arguments; {name} is the function name
    end: str  # after the arguments


FORMATS = {
    "hermes": ToolFormat("<tool_call>", '<tool_call>\n{{"name": "{name}", "arguments": ', "}\n</tool_call>"),
    "llama3": ToolFormat('{"name": ', '{{"name": "{name}", "parameters": ', "}"),
}


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        call: dict[str, Any] = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                                "function": {"name": self.name, "arguments": self.arguments}}
        if index is not None:
            call["index"] = index
        return call


def functions(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """name -> parameter schema of every function tool; InvalidRequestError for malformed tools."""
    out = {}
    for tool in tools:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type", "function") != "function" or not isinstance(fn, dict) or not fn.get("name"):
            raise InvalidRequestError("each tool must be {\"type\": \"function\", \"function\": {\"name\": ..., ...}}",
                                      "tools")
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise InvalidRequestError(f"tool {fn['name']!r}: parameters must be a JSON schema object", "tools")
        out[fn["name"]] = params
    return out


def chosen_function(tool_choice: str | dict[str, Any] | None, names: dict[str, Any]) -> str | None:
    """The function a ``{"type": "function", "function": {"name": ...}}`` tool_choice names, else None."""
    if tool_choice is None or isinstance(tool_choice, str):
        if tool_choice not in (None, "auto", "none", "required"):
            raise InvalidRequestError(f"tool_choice must be auto, none, required or a function; got {tool_choice!r}",
                                      "tool_choice")
        return None
    function = tool_choice.get("function")
    name = function.get("name") if isinstance(function, dict) else None
    if name not in names:
        raise InvalidRequestError(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
    return name


def structural_tag(tools: list[dict[str, Any]], tool_choice: str | dict[str, Any] | None, parallel: bool,
                   parser: str) -> str:
    """The structural-tag constraint (JSON text) for these tools, choice and parser."""
    schemas = functions(tools)
    named = chosen_function(tool_choice, schemas)
    fmt = FORMATS[parser]
    if named is not None:
        schemas = {named: schemas[named]}
    tags = [{"type": "tag", "begin": fmt.begin.format(name=name), "content": {"type": "json_schema",
             "json_schema": schema}, "end": fmt.end} for name, schema in schemas.items()]
    forced = named is not None or tool_choice == "required"
    if forced:
        # Calls only: a sequence of tags, no free text (separators between parallel calls are the format's).
        body: dict[str, Any] = {"type": "tags_with_separator", "tags": tags, "separator": "\n" if parser == "hermes"
                                else ";", "at_least_one": True, "stop_after_first": named is not None or not parallel}
    else:
        body = {"type": "triggered_tags", "triggers": [fmt.trigger], "tags": tags, "at_least_one": False,
                "stop_after_first": not parallel}
    return json.dumps({"type": "structural_tag", "format": body})


def parse_tool_calls(text: str, parser: str) -> tuple[str | None, list[ToolCall]]:
    """(the text outside tool calls, or None when empty; the calls) of a finished output."""
    if parser == "hermes":
        calls, rest = [], []
        pos = 0
        for m in re.finditer(r"<tool_call>\s*(.*?)\s*</tool_call>", text, re.DOTALL):
            call = _call_from_json(m.group(1))
            if call is None:
                continue
            rest.append(text[pos:m.start()])
            pos = m.end()
            calls.append(call)
        rest.append(text[pos:])
        content = "".join(rest).strip()
        return content or None, calls
    start = text.find("{")
    head, body = text[:start] if start >= 0 else text, text[start:] if start >= 0 else ""
    head = head.replace("<|python_tag|>", "")
    calls, decoder, pos = [], json.JSONDecoder(), 0
    while pos < len(body):
        try:
            obj, end = decoder.raw_decode(body, pos)
        except json.JSONDecodeError:
            break
        call = _call_from_obj(obj)
        if call is None:
            break
        calls.append(call)
        pos = end
        while pos < len(body) and body[pos] in " \n;":
            pos += 1
    if not calls:
        return text.strip() or None, []
    content = (head + body[pos:]).strip()
    return content or None, calls


def _call_from_json(text: str) -> ToolCall | None:
    try:
        return _call_from_obj(json.loads(text))
    except json.JSONDecodeError:
        return None


def _call_from_obj(obj: Any) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return ToolCall(obj["name"], args if isinstance(args, str) else json.dumps(args))


class ToolCallStreamer:
    """Streams the text before a tool call as content; holds everything from the first trigger (or a possible
    start of one) until the end, where the calls are parsed and sent as tool-call deltas."""

    def __init__(self, parser: str):
        self.parser = parser
        self.trigger = FORMATS[parser].trigger
        self.text = ""
        self.sent = 0  # characters of text already streamed as content
        self.held = False

    def feed(self, delta: str) -> str:
        """Content to stream now for this delta."""
        self.text += delta
        if self.held:
            return ""
        at = self.text.find(self.trigger, self.sent)
        if at >= 0:
            self.held = True
            out, self.sent = self.text[self.sent:at], at
            return out
        # Keep back a tail that could be the beginning of the trigger.
        safe = len(self.text)
        for k in range(min(len(self.trigger) - 1, len(self.text) - self.sent), 0, -1):
            if self.trigger.startswith(self.text[-k:]):
                safe = len(self.text) - k
                break
        out, self.sent = self.text[self.sent:safe], safe
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(remaining content, calls) at the end of the output."""
        rest = self.text[self.sent:]
        content, calls = parse_tool_calls(rest, self.parser)
        return (content or "") if calls else rest, calls

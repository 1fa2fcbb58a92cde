"""Tool-call parsing and streaming (no model): both formats, text around calls, split triggers."""

from __future__ import annotations

import json

import pytest

from radixlm.errors import InvalidRequestError
from radixlm.server.tool_calls import ToolCallStreamer, chosen_function, functions, parse_tool_calls

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def test_hermes_calls_and_content() -> None:
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>')
    content, calls = parse_tool_calls(text, "hermes")
    assert content == "Let me check."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Paris"}),
                                                                 ("get_weather", {"city": "Rome"})]


def test_hermes_without_calls_or_with_broken_json() -> None:
    assert parse_tool_calls("Just text.", "hermes") == ("Just text.", [])
    content, calls = parse_tool_calls("<tool_call>{not json}</tool_call>", "hermes")
    assert calls == [] and content == "<tool_call>{not json}</tool_call>"


def test_llama3_json_calls() -> None:
    text = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; {"name": "f", "parameters": {}}'
    content, calls = parse_tool_calls(text, "llama3")
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Oslo"}), ("f", {})]
    assert parse_tool_calls("The weather is fine.", "llama3") == ("The weather is fine.", [])


@pytest.mark.parametrize("cut", range(1, 40))
def test_streamer_holds_back_a_split_trigger(cut: int) -> None:
    text = 'Sure. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    streamer = ToolCallStreamer("hermes")
    streamed = streamer.feed(text[:cut]) + streamer.feed(text[cut:])
    rest, calls = streamer.finish()
    assert streamed + rest == "Sure. " and [c.name for c in calls] == ["get_weather"]


def test_streamer_plain_text_passes_through() -> None:
    streamer = ToolCallStreamer("hermes")
    out = "".join(streamer.feed(piece) for piece in ["a <", "b> c <tool", "s are fine"])
    rest, calls = streamer.finish()
    assert out + rest == "a <b> c <tools are fine" and calls == []


def test_tool_validation() -> None:
    """Malformed tools and tool choices are user errors naming the field."""
    assert list(functions([WEATHER])) == ["get_weather"]
    with pytest.raises(InvalidRequestError, match="each tool") as exc:
        functions([{"type": "function"}])
    assert exc.value.param == "tools"
    assert chosen_function({"type": "function", "function": {"name": "get_weather"}}, {"get_weather": {}}) \
        == "get_weather"
    for choice in ({"type": "function", "function": {"name": "nope"}}, {"type": "function", "function": "nope"}):
        with pytest.raises(InvalidRequestError, match="not among the tools") as exc:
            chosen_function(choice, {"get_weather": {}})
        assert exc.value.param == "tool_choice"
    with pytest.raises(InvalidRequestError, match="tool_choice"):
        chosen_function("sometimes", {})

"""Structured output and tool calls against a running server (`make serve`): run as
`.venv/bin/python examples/structured_output.py`."""

import json

from openai import OpenAI

client = OpenAI(base_url="http://127.0.0.1:30000/v1", api_key="none")

# A JSON schema: the answer always parses and validates.
schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
          "population_millions": {"type": "number", "minimum": 0, "maximum": 50}},
          "required": ["city", "population_millions"], "additionalProperties": False}
out = client.chat.completions.create(
    model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Describe Paris as JSON."}],
    max_tokens=100, temperature=0,
    response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}})
print(json.loads(out.choices[0].message.content))

# A tool call: with tool_choice "required" or a named function the arguments always match the parameters.
tools = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
          "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                         "required": ["city"], "additionalProperties": False}}}]
out = client.chat.completions.create(
    model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "What is the weather in Rome?"}],
    tools=tools, tool_choice="required", parallel_tool_calls=False, max_tokens=100, temperature=0)
call = out.choices[0].message.tool_calls[0]
print(out.choices[0].finish_reason, call.function.name, json.loads(call.function.arguments))

"""Structured output end to end (embedded model, live server): JSON schemas through /generate and the openai
client, regexes, EBNF grammars checked by an independent parser, bad grammars, and unconstrained neighbours."""

from __future__ import annotations

import concurrent.futures
import json
import re

import jsonschema
import openai
import pytest
from schemas import SCHEMAS
from server_harness import LiveServer

MAX_TOKENS = 200


@pytest.fixture(scope="module")
def server():
    s = LiveServer("--max-total-tokens", "32768")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=300)


def assert_valid(text: str, schema: dict) -> None:
    value = json.loads(text)
    jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
                                    ).validate(value)


def generate(server, texts: list[str], params: list[dict]) -> list[dict]:
    status, out = server.request("POST", "/generate", {"text": texts, "sampling_params": params}, timeout=600)
    assert status == 200, out
    return out


def test_json_schemas_through_native_generate(server):
    prompts = [f"{title} as JSON:" for title, _ in SCHEMAS]
    params = [{"json_schema": json.dumps(schema), "max_new_tokens": MAX_TOKENS, "temperature": 0.7, "seed": i}
              for i, (_, schema) in enumerate(SCHEMAS)]
    outs = generate(server, prompts, params)
    for out, (title, schema) in zip(outs, SCHEMAS):
        assert out["meta_info"]["finish_reason"]["type"] == "stop", (title, out)
        assert_valid(out["text"], schema)


def test_json_schemas_through_openai_client(client):
    def ask(item):
        title, schema = item
        out = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": f"Reply with {title.lower()} as JSON."}],
            max_tokens=MAX_TOKENS, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}})
        return out.choices[0]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        choices = list(pool.map(ask, SCHEMAS))
    for choice, (title, schema) in zip(choices, SCHEMAS):
        assert choice.finish_reason == "stop", (title, choice)
        assert_valid(choice.message.content, schema)


def test_json_object_and_streaming(client):
    """A streamed constrained answer is the same text as the non-streamed one; json_object gives an object."""
    schema = SCHEMAS[1][1]
    kwargs = dict(model="m", messages=[{"role": "user", "content": "Describe Paris as JSON."}], max_tokens=MAX_TOKENS,
                  temperature=0, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = client.chat.completions.create(**kwargs, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert_valid(whole, schema)
    out = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Give the name and age of a person as a JSON object."}],
        max_tokens=MAX_TOKENS, temperature=0, frequency_penalty=1.0, response_format={"type": "json_object"})
    assert out.choices[0].finish_reason == "stop", out
    assert isinstance(json.loads(out.choices[0].message.content), dict)


REGEXES = {
    "date": r"(19|20)\d{2}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])",
    "email": r"[a-z]{2,10}\.[a-z]{2,10}@[a-z]{3,10}\.(com|org|net)",
    "ipv4": r"((25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)",
    "phone": r"\(\d{3}\) \d{3}-\d{4}",
}


def test_regexes_fully_match(server):
    names = list(REGEXES)
    outs = generate(server, [f"My {name} is " for name in names] * 2,
                    [{"regex": REGEXES[name], "max_new_tokens": 40, "temperature": t, "seed": 1}
                     for t in (0.0, 1.0) for name in names])
    for out, name in zip(outs, names * 2):
        assert out["meta_info"]["finish_reason"]["type"] == "stop", out
        assert re.fullmatch(REGEXES[name], out["text"]), (name, out["text"])


ARITHMETIC = r'''
root ::= expr
expr ::= term (("+" | "-") term){0,3}
term ::= factor (("*" | "/") factor){0,2}
factor ::= number | "(" expr ")"
number ::= [1-9] [0-9]{0,2}
'''

SQL = r'''
root ::= "SELECT " columns " FROM " name where? ";"
columns ::= "*" | name (", " name){0,3}
where ::= " WHERE " name " " op " " value
op ::= "=" | "<" | ">"
value ::= [0-9]{1,4} | "'" [a-z]{1,8} "'"
name ::= [a-z] [a-z_]{0,9}
'''


def parse_arithmetic(text: str) -> None:
    """Recursive-descent check of ARITHMETIC, written independently of the grammar engine."""
    pos = 0

    def number():
        nonlocal pos
        m = re.match(r"[1-9][0-9]{0,2}", text[pos:])
        assert m, (text, pos)
        pos += m.end()

    def factor():
        nonlocal pos
        if text[pos:pos + 1] == "(":
            pos += 1
            expr()
            assert text[pos:pos + 1] == ")", (text, pos)
            pos += 1
        else:
            number()

    def term():
        nonlocal pos
        factor()
        while text[pos:pos + 1] in ("*", "/") and pos < len(text):
            pos += 1
            factor()

    def expr():
        nonlocal pos
        term()
        while text[pos:pos + 1] in ("+", "-") and pos < len(text):
            pos += 1
            term()

    expr()
    assert pos == len(text), (text, pos)


def parse_sql(text: str) -> None:
    name = r"[a-z][a-z_]{0,9}"
    pattern = (rf"SELECT (\*|{name}(, {name}){{0,3}}) FROM {name}"
               rf"( WHERE {name} [=<>] ([0-9]{{1,4}}|'[a-z]{{1,8}}'))?;")
    assert re.fullmatch(pattern, text), text


def test_ebnf_grammars_parse(server):
    prompts = ["Compute: ", "A calculation: ", "Query all users: ", "SQL to list products: "]
    grammars = [ARITHMETIC, ARITHMETIC, SQL, SQL]
    outs = generate(server, prompts, [{"ebnf": g, "max_new_tokens": 96, "temperature": 0.8, "seed": 3}
                                      for g in grammars])
    for out, check in zip(outs, [parse_arithmetic] * 2 + [parse_sql] * 2):
        assert out["meta_info"]["finish_reason"]["type"] == "stop", out
        check(out["text"])


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("json_schema", '{"type": "foo"}', "invalid json_schema"),
    ("json_schema", "{not json", "not JSON"),
    ("regex", "([a-z]", "invalid regex"),
    ("ebnf", "root ::= ", "invalid ebnf"),
    ("ebnf", 'start ::= "a"', "invalid ebnf"),
])
def test_invalid_grammar_is_a_400(server, field, value, needle):
    status, body = server.request("POST", "/generate", {"text": "x", "sampling_params": {field: value}})
    assert status == 400 and needle in body["error"]["message"] and body["error"]["param"] == field, body
    if field != "json_schema":  # regex and ebnf are extra body fields of the OpenAI API too
        status, body = server.request("POST", "/v1/completions", {"model": "m", "prompt": "x", field: value})
        assert status == 400 and needle in body["error"]["message"] and body["error"]["param"] == field, body
    assert server.request("GET", "/health")[0] == 200


def test_bad_response_format_is_a_400(client):
    with pytest.raises(openai.BadRequestError, match="invalid json_schema"):
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}})


def test_unconstrained_neighbours_unchanged_and_n_copies(server):
    """Greedy output of unconstrained requests is the same alone and next to constrained ones; n > 1 copies of
    a constrained request each validate."""
    plain = ["The capital of France is", "Water boils at"]
    params = {"max_new_tokens": 24, "temperature": 0}
    alone = [o["output_ids"] for o in generate(server, plain, [params] * 2)]
    schema = SCHEMAS[0][1]
    mixed = generate(server, plain + ["A person as JSON:"] * 2,
                     [params, params] + [{"json_schema": json.dumps(schema), "max_new_tokens": MAX_TOKENS,
                                          "temperature": 1.0, "n": 2, "seed": 5}] * 2)
    assert len(mixed) == 6  # two plain prompts, then two constrained prompts x n = 2
    assert [o["output_ids"] for o in mixed[:2]] == alone
    constrained = mixed[2:]
    for out in constrained:
        assert_valid(out["text"], schema)


def test_stop_string_inside_a_constrained_output(server):
    """Stop strings apply to constrained text like any other: the output ends before the stop string."""
    schema = SCHEMAS[0][1]
    free, stopped = generate(server, ["A person as JSON:"] * 2, [
        {"json_schema": json.dumps(schema), "max_new_tokens": MAX_TOKENS, "temperature": 0},
        {"json_schema": json.dumps(schema), "max_new_tokens": MAX_TOKENS, "temperature": 0, "stop": ['"age"']}])
    assert stopped["meta_info"]["finish_reason"] == {"type": "stop", "matched": '"age"'}
    assert stopped["text"] == free["text"][: free["text"].index('"age"')]


# ---------------------------------------------------------------------------------------------------- tool calls
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
     "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                    "unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["city", "unit"],
                    "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "description": "Add two integers",
     "parameters": {"type": "object", "properties": {"a": {"type": "integer", "minimum": -1000, "maximum": 1000},
                    "b": {"type": "integer", "minimum": -1000, "maximum": 1000}}, "required": ["a", "b"],
                    "additionalProperties": False}}},
]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def ask_tools(client, content: str, **kwargs):
    kwargs.setdefault("max_tokens", MAX_TOKENS)
    return client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}],
                                          tools=TOOLS, **kwargs)


def assert_calls_valid(calls, names=None) -> None:
    assert calls, "no tool call"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert call.function.name in (names or PARAMS)
        assert_valid(call.function.arguments, PARAMS[call.function.name])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_required_tool_calls_validate(client, seed):
    # One call: a 135M model sampling at temperature 1 could keep adding parallel calls until max_tokens.
    out = ask_tools(client, "What is the weather in Paris, and what is 2 + 3?", tool_choice="required",
                    temperature=1.0, seed=seed, parallel_tool_calls=False)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert_calls_valid(choice.message.tool_calls)


def test_named_function_and_no_parallel_calls(client):
    out = ask_tools(client, "Add 20 and 22.", temperature=0,
                    tool_choice={"type": "function", "function": {"name": "add"}})
    calls = out.choices[0].message.tool_calls
    assert len(calls) == 1
    assert_calls_valid(calls, ["add"])
    out = ask_tools(client, "Weather in Rome and in Oslo?", tool_choice="required", temperature=0,
                    parallel_tool_calls=False)
    assert len(out.choices[0].message.tool_calls) == 1


def test_tool_calls_stream_as_deltas(client):
    kwargs = dict(temperature=0, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    whole = ask_tools(client, "Weather in Lisbon?", **kwargs).choices[0].message.tool_calls
    chunks = list(ask_tools(client, "Weather in Lisbon?", stream=True, **kwargs))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(d.function.name, d.function.arguments) for d in deltas] == \
        [(w.function.name, w.function.arguments) for w in whole]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_auto_parses_the_models_own_tool_calls(client):
    """Shown a few calls in the conversation, the model opens calls on its own under tool_choice auto; they come
    back parsed as tool_calls (the structural tag keeps their arguments valid)."""
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "%s", "unit": "celsius"}}\n</tool_call>'
    shots = []
    for city in ("Berlin", "Madrid", "Rome"):
        shots += [{"role": "user", "content": f"What is the weather in {city}?"},
                  {"role": "assistant", "content": call % city}]
    for city in ("Paris", "Tokyo"):
        out = client.chat.completions.create(
            model="m", messages=shots + [{"role": "user", "content": f"What is the weather in {city}?"}],
            tools=TOOLS, tool_choice="auto", temperature=0, max_tokens=60)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert_calls_valid(choice.message.tool_calls, ["get_weather"])
        assert json.loads(choice.message.tool_calls[0].function.arguments)["city"] == city


def test_auto_and_none_answer_in_text(client):
    """The embedded model was not trained on tool calls: with auto it answers in text (any call it did open
    would be constrained and parsed); with none the tools are not even rendered."""
    for choice in ("auto", "none"):
        out = ask_tools(client, "Say hello.", tool_choice=choice, temperature=0, max_tokens=16)
        message = out.choices[0].message
        assert message.content and not message.tool_calls


def test_bad_tools_are_a_400(client):
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        ask_tools(client, "x", tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError, match="each tool"):
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                       tools=[{"type": "function"}], tool_choice="required")

"""Tool calls: how tools and earlier calls are written into a prompt, and how answers are read."""

from __future__ import annotations

import json

from corolla.api.tools import call_schema, parse_call, prompt_messages
from helpers.tools import WEATHER_TOOL as WEATHER

TIME = {"type": "function", "function": {"name": "get_time"}}
NAMES = ["get_weather", "get_time"]
PARIS_CALL = {
    "id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}
}  # fmt: skip


def test_calls_are_read_bare_fenced_or_tagged_and_only_for_given_tools() -> None:
    for text in (
        '{"name": "get_weather", "arguments": {"city": "Paris"}}',
        '```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```',
        '<tool_call>\n{"name": "get_weather", "parameters": {"city": "Paris"}}\n</tool_call>',
    ):
        call = parse_call(text, [WEATHER, TIME], NAMES)
        assert (
            call is not None
            and call.name == "get_weather"
            and json.loads(call.arguments) == {"city": "Paris"}
        )
    not_calls = (
        "It is sunny in Paris.",
        '{"name": "launch_rocket", "arguments": {}}',
        '{"name": "get_time"',
        '{"name": "get_weather", "arguments": "Paris"}',
        'Sure: {"name": "get_time", "arguments": {}}',
    )
    for text in not_calls:
        assert parse_call(text, [WEATHER, TIME], NAMES) is None, text
    assert parse_call('{"name": "get_time", "arguments": {}}', [WEATHER, TIME], ["get_weather"]) is None


def test_the_call_schema_names_one_allowed_tool_with_its_parameters() -> None:
    one = call_schema([WEATHER, TIME], ["get_weather"])
    assert one["properties"]["name"] == {"const": "get_weather"}
    assert one["properties"]["arguments"] == WEATHER["function"]["parameters"]
    both = call_schema([WEATHER, TIME], NAMES)
    assert [option["properties"]["name"]["const"] for option in both["anyOf"]] == NAMES
    assert both["anyOf"][1]["properties"]["arguments"] == {"type": "object"}  # no parameters given


def test_a_template_without_tools_gets_them_and_the_calls_in_plain_messages() -> None:
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [PARIS_CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]  # fmt: skip
    messages, native = prompt_messages(conversation, [WEATHER], native=False)
    assert native is None and [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0]["content"].startswith("Be brief.") and '"get_weather"' in messages[0]["content"]
    assert messages[2]["content"] == 'I called get_weather({"city": "Paris"}).'
    assert messages[3]["content"] == "get_weather returned: sunny, 21 C"
    alone, _ = prompt_messages([{"role": "user", "content": "Hi"}], [WEATHER], native=False)
    assert alone[0]["role"] == "system" and alone[1] == {"role": "user", "content": "Hi"}


def test_a_template_that_knows_tools_gets_them_its_own_way() -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    conversation = [{"role": "assistant", "content": None, "tool_calls": [call]}]
    messages, native = prompt_messages(conversation, [WEATHER], native=True)
    assert native == [WEATHER]
    assert messages[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": {"city": "Oslo"}}

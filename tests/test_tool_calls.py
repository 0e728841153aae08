"""Unit tests of the framework-free tool-call and structured-output policy (no models)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from specfuse.errors import ConfigError
from specfuse.tool_calls import (
    TOOL_RESPONSE_STOP,
    ParseRules,
    ToolPlan,
    extract_json,
    json_instruction,
    parse_tool_calls,
    tool_choice_instruction,
    unwrap_schema_echo,
    with_system_instruction,
)

NAMES = ["multiply", "search"]


def test_hermes_tags_are_parsed_and_removed_from_the_text() -> None:
    text = 'Let me compute.\n<tool_call>\n{"name": "multiply", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
    parsed = parse_tool_calls(text, NAMES)
    assert [(c.name, c.arguments) for c in parsed.calls] == [("multiply", {"a": 2, "b": 3})]
    assert parsed.text == "Let me compute."
    assert parsed.calls[0].id.startswith("call_")


def test_unclosed_last_tag_counts_since_max_tokens_may_cut_it() -> None:
    calls, text = parse_tool_calls('<tool_call>{"name": "search", "arguments": {"q": "x"}}', NAMES)
    assert [(c.name, c.arguments) for c in calls] == [("search", {"q": "x"})]
    assert text == ""


def test_several_tagged_calls_get_distinct_ids() -> None:
    text = (
        '<tool_call>{"name": "multiply", "arguments": {"a": 1, "b": 2}}</tool_call>'
        '<tool_call>{"name": "search", "arguments": {"q": "y"}}</tool_call>'
    )
    calls, _ = parse_tool_calls(text, NAMES)
    assert [c.name for c in calls] == ["multiply", "search"]
    assert calls[0].id != calls[1].id


def test_arguments_sent_as_a_json_string_are_decoded() -> None:
    calls, _ = parse_tool_calls(
        '<tool_call>{"name": "multiply", "arguments": "{\\"a\\": 4}"}</tool_call>', NAMES
    )
    assert calls[0].arguments == {"a": 4}


def test_json_fence() -> None:
    text = 'Sure:\n```json\n{"name": "multiply", "arguments": {"a": 5, "b": 6}}\n```\nDone.'
    parsed = parse_tool_calls(text, NAMES)
    assert [(c.name, c.arguments) for c in parsed.calls] == [("multiply", {"a": 5, "b": 6})]
    assert "```" not in parsed.text and "Sure:" in parsed.text and "Done." in parsed.text


def test_bare_json_as_written_when_the_tokenizer_drops_the_tags() -> None:
    parsed = parse_tool_calls('{"name": "multiply", "arguments": {"a": 123, "b": 456}}', NAMES)
    assert [(c.name, c.arguments) for c in parsed.calls] == [("multiply", {"a": 123, "b": 456})]
    assert parsed.text == ""


def test_openai_function_shape_and_parameters_key() -> None:
    calls, _ = parse_tool_calls(
        '{"type": "function", "function": {"name": "search", "parameters": {"q": "z"}}}', NAMES
    )
    assert [(c.name, c.arguments) for c in calls] == [("search", {"q": "z"})]


def test_list_of_calls() -> None:
    calls, _ = parse_tool_calls(
        '[{"name": "multiply", "arguments": {"a": 1, "b": 1}}, {"name": "search", "arguments": {}}]', NAMES
    )
    assert [c.name for c in calls] == ["multiply", "search"]


def test_json_that_is_not_a_call_stays_prose() -> None:
    text = 'The answer is {"name": "Alice", "age": 3}.'
    parsed = parse_tool_calls(text, NAMES)
    assert parsed.calls == [] and parsed.invalid == []
    assert parsed.text == text


def test_plain_prose_has_no_calls() -> None:
    parsed = parse_tool_calls("123 times 456 is 56088.", NAMES)
    assert parsed.calls == [] and parsed.text == "123 times 456 is 56088."


def test_tagged_unknown_tool_or_broken_json_is_reported_invalid() -> None:
    parsed = parse_tool_calls('<tool_call>{"name": "launch", "arguments": {}}</tool_call>', NAMES)
    assert parsed.calls == [] and parsed.invalid[0].name == "launch"
    parsed = parse_tool_calls("<tool_call>{not json</tool_call>", NAMES)
    assert parsed.calls == [] and "not JSON" in parsed.invalid[0].error


def test_non_object_arguments_are_invalid() -> None:
    parsed = parse_tool_calls('<tool_call>{"name": "search", "arguments": [1, 2]}</tool_call>', NAMES)
    assert parsed.calls == [] and parsed.invalid[0].name == "search"


def test_forced_tool_accepts_a_bare_argument_object() -> None:
    calls, _ = parse_tool_calls('{"a": 7, "b": 8}', NAMES, forced="multiply")
    assert [(c.name, c.arguments) for c in calls] == [("multiply", {"a": 7, "b": 8})]


def test_instruction_merges_into_the_leading_system_message() -> None:
    merged = with_system_instruction([{"role": "system", "content": "be brief"}], "call a tool")
    assert merged == [{"role": "system", "content": "be brief\n\ncall a tool"}]
    added = with_system_instruction([{"role": "user", "content": "hi"}], "call a tool")
    assert added[0] == {"role": "system", "content": "call a tool"}


# -- tool-call parsing ------------------------------------------------------------------------


def test_parses_hermes_tagged_calls_and_strips_them_from_content() -> None:
    text = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    parsed = parse_tool_calls(text, ["get_weather"])
    assert parsed.text == "Checking."
    assert [(c.name, c.arguments) for c in parsed.calls] == [("get_weather", {"city": "Paris"})]
    assert parsed.calls[0].id.startswith("call_")
    assert parsed.invalid == []


def test_parses_several_tags_string_arguments_and_an_unclosed_last_tag() -> None:
    text = (
        '<tool_call>{"name": "a", "arguments": "{\\"x\\": 1}"}</tool_call>\n'
        '<tool_call>{"name": "b", "parameters": {"y": 2}}'
    )
    parsed = parse_tool_calls(text, ["a", "b"])
    assert [(c.name, c.arguments) for c in parsed.calls] == [("a", {"x": 1}), ("b", {"y": 2})]


def test_parses_json_fences_and_bare_json() -> None:
    fenced = 'Sure:\n```json\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n```'
    parsed = parse_tool_calls(fenced, ["get_weather"])
    assert parsed.calls[0].arguments == {"city": "Oslo"} and parsed.text == "Sure:"
    bare = 'I will call {"name": "get_weather", "arguments": {"city": "Rome"}} now'
    assert parse_tool_calls(bare, ["get_weather"]).calls[0].arguments == {"city": "Rome"}
    openai_style = '{"function": {"name": "get_weather", "arguments": {"city": "Bern"}}}'
    assert parse_tool_calls(openai_style, ["get_weather"]).calls[0].arguments == {"city": "Bern"}


def test_unparsable_or_unknown_tagged_calls_become_invalid_tool_calls() -> None:
    parsed = parse_tool_calls(
        '<tool_call>{"name": "get_weather", "arguments": {"ci</tool_call>', ["get_weather"]
    )
    assert parsed.calls == [] and len(parsed.invalid) == 1
    assert "not JSON" in parsed.invalid[0].error
    unknown = parse_tool_calls('<tool_call>{"name": "launch", "arguments": {}}</tool_call>', ["get_weather"])
    assert unknown.invalid[0].name == "launch"
    assert "unknown tool" in unknown.invalid[0].error
    bad_args = parse_tool_calls(
        '<tool_call>{"name": "get_weather", "arguments": [1]}</tool_call>', ["get_weather"]
    )
    assert "JSON object" in bad_args.invalid[0].error


def test_identical_repeated_calls_are_merged() -> None:
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    other = '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
    parsed = parse_tool_calls(call + call + other, ["get_weather"])
    assert [c.arguments["city"] for c in parsed.calls] == ["Paris", "Rome"]


def test_no_argument_calls_parse_to_empty_args() -> None:
    for text in (
        '<tool_call>{"name": "ping", "arguments": {}}</tool_call>',
        '<tool_call>{"name": "ping"}</tool_call>',
        '{"name": "ping", "arguments": "{}"}',
    ):
        parsed = parse_tool_calls(text, ["ping"], forced="ping")
        assert [(c.name, c.arguments) for c in parsed.calls] == [("ping", {})], text


def test_unicode_arguments_survive_parsing() -> None:
    text = '<tool_call>{"name": "unicode_customer", "arguments": {"customer_name": "你好啊集团"}}</tool_call>'
    assert parse_tool_calls(text, ["unicode_customer"]).calls[0].arguments == {"customer_name": "你好啊集团"}


def test_plain_prose_and_non_call_json_are_left_alone() -> None:
    text = 'The config is {"debug": true}.'
    parsed = parse_tool_calls(text, ["get_weather"])
    assert parsed.text == text and parsed.calls == [] and parsed.invalid == []


def test_forced_tool_takes_a_bare_argument_object_only_when_it_is_the_whole_answer() -> None:
    assert parse_tool_calls('{"city": "Lima"}', ["get_weather"], forced="get_weather").calls[0].arguments == {
        "city": "Lima"
    }
    # A misnamed call of the forced tool (the model wrote the "name" argument there).
    misnamed = parse_tool_calls(
        '{"name": "Ada", "arguments": {"name": "Ada", "age": 36}}', ["Person"], "Person"
    )
    assert [(c.name, c.arguments) for c in misnamed.calls] == [("Person", {"name": "Ada", "age": 36})]
    assert parse_tool_calls('{"name": "Ada", "arguments": {"age": 36}}', ["Person"]).calls == []
    # Nested objects of a truncated call are not arguments.
    cut = '{"name": "get_weather", "arguments": {"city": {"type": "string"}'
    assert parse_tool_calls(cut, ["get_weather"], forced="get_weather").calls == []


def test_tool_choice_instruction_shows_the_call_shape() -> None:
    tools = [
        {"type": "function", "function": {"name": "a", "parameters": {"properties": {"x": {}}}}},
        {"type": "function", "function": {"name": "b", "parameters": {"properties": {}}}},
    ]
    assert tool_choice_instruction(None, tools) is None
    assert tool_choice_instruction("auto", tools) is None
    only_b = tool_choice_instruction("b", tools)
    assert only_b is not None and '"name": "b"' in only_b and '"name": "a"' not in only_b
    anyone = tool_choice_instruction("any", tools)
    assert anyone is not None and '{"x": "..."}' in anyone and "one of the tools" in anyone
    typed = [
        {
            "type": "function",
            "function": {"name": "f", "parameters": {"properties": {"n": {"type": "integer"}}}},
        }
    ]
    shown = tool_choice_instruction("f", typed)
    assert shown is not None and '<tool_call>{"name": "f", "arguments": {"n": 1}}</tool_call>' in shown


def test_extract_json_unwraps_fences_and_prose() -> None:
    assert extract_json('Here:\n```json\n{"a": 1}\n```') == '{"a": 1}'
    assert extract_json('Sure! {"a": [1, 2]} Hope it helps') == '{"a": [1, 2]}'
    assert extract_json("no json at all") == "no json at all"


# -- the per-request plan ------------------------------------------------------------------


def _tool(name: str, **properties: dict[str, str]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {"name": name, "parameters": {"type": "object", "properties": properties}},
    }


WEATHER = _tool("get_weather", city={"type": "string"})
SEARCH = _tool("search", q={"type": "string"})


@pytest.mark.parametrize(
    ("choice", "tools", "forced"),
    [
        (None, [WEATHER], None),
        ("auto", [WEATHER, SEARCH], None),
        ("any", [WEATHER], "get_weather"),
        ("required", [WEATHER], "get_weather"),
        (True, [WEATHER], "get_weather"),
        ("any", [WEATHER, SEARCH], None),
        ("search", [WEATHER, SEARCH], "search"),
        ({"type": "function", "function": {"name": "search"}}, [WEATHER, SEARCH], "search"),
        ({"name": "search"}, [WEATHER, SEARCH], "search"),
    ],
)
def test_plan_resolves_the_forced_tool(choice: Any, tools: list[dict[str, Any]], forced: str | None) -> None:
    plan = ToolPlan.build(tools, choice)
    assert plan.forced == forced
    assert plan.tools == tools
    assert (plan.instruction is not None) == (choice not in (None, "auto"))


def test_plan_with_tool_choice_none_hides_the_tools() -> None:
    plan = ToolPlan.build([WEATHER], "none")
    assert plan.tools is None and plan.instruction is None and plan.overrides({}) == {}
    assert plan.parse('{"name": "get_weather", "arguments": {"city": "Rome"}}').calls == []


def test_plan_refuses_a_choice_it_cannot_honour() -> None:
    with pytest.raises(ConfigError, match=r"'launch' is not among the tools offered \['get_weather'\]"):
        ToolPlan.build([WEATHER], "launch")
    with pytest.raises(ConfigError, match="not understood"):
        ToolPlan.build([WEATHER], 3)
    with pytest.raises(ConfigError, match="not an OpenAI function tool"):
        ToolPlan.build([{"name": "get_weather"}])


def test_plan_merges_its_instruction_into_the_first_system_message_and_stops_at_tool_responses() -> None:
    plan = ToolPlan.build([WEATHER], "get_weather")
    messages = plan.messages(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Rome?"}]
    )
    assert [m["role"] for m in messages] == ["system", "user"]
    assert messages[0]["content"].startswith("Be brief.\n\nYou must answer by calling the tool now")
    assert (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "..."}}</tool_call>'
        in messages[0]["content"]
    )
    assert plan.overrides({"stop": ["END"], "seed": 1}) == {"stop": ["END", TOOL_RESPONSE_STOP], "seed": 1}
    # Offered but not required: no instruction, the stop still applies.
    free = ToolPlan.build([WEATHER])
    assert free.messages([{"role": "user", "content": "hi"}]) == [{"role": "user", "content": "hi"}]
    assert free.overrides({}) == {"stop": [TOOL_RESPONSE_STOP]}


def test_plan_for_json_output_asks_for_json_and_extracts_it() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    plan = ToolPlan.build(response_format={"type": "json_schema", "schema": schema})
    assert plan.tools is None and plan.json_output
    [system] = plan.messages([])
    assert system["content"] == json_instruction(schema) and json.dumps(schema) in system["content"]
    assert plan.parse('Sure:\n```json\n{"a": 1}\n```').text == '{"a": 1}'
    assert ToolPlan.build().parse('{"a": 1} and more').text == '{"a": 1} and more'


def test_plan_unwraps_a_schema_echo_unless_the_tool_has_a_properties_parameter() -> None:
    echoed = '{"name": "get_weather", "arguments": {"properties": {"city": "Lisbon"}}}'
    assert ToolPlan.build([WEATHER]).parse(echoed).calls[0].arguments == {"city": "Lisbon"}
    real = _tool("configure", properties={"type": "object"})
    kept = '{"name": "configure", "arguments": {"properties": {"k": 1}}}'
    assert ToolPlan.build([real]).parse(kept).calls[0].arguments == {"properties": {"k": 1}}
    assert unwrap_schema_echo({"properties": {"k": 1}}, None) == {"k": 1}


def test_a_list_of_calls_inside_one_tag_is_read() -> None:
    calls = '[{"name": "multiply", "arguments": {"a": 1}}, {"name": "search", "arguments": {}}]'
    text = f"<tool_call>{calls}</tool_call>"
    assert [c.name for c in parse_tool_calls(text, NAMES).calls] == ["multiply", "search"]


def test_each_parse_rule_can_be_switched_off() -> None:
    repeated = '<tool_call>{"name": "search", "arguments": {"q": "x"}}</tool_call>' * 2
    assert len(parse_tool_calls(repeated, NAMES).calls) == 1
    assert len(parse_tool_calls(repeated, NAMES, rules=ParseRules(drop_repeats=False)).calls) == 2

    misnamed = '{"name": "Ada", "arguments": {"a": 2}}'
    assert parse_tool_calls(misnamed, NAMES, "multiply").calls[0].arguments == {"a": 2}
    assert (
        parse_tool_calls(misnamed, NAMES, "multiply", rules=ParseRules(forced_claims_misnamed=False)).calls
        == []
    )

    nested = 'I would pass {"a": 7} to it.'
    assert parse_tool_calls(nested, NAMES, "multiply").calls == []
    loose = ParseRules(bare_arguments_whole_only=False)
    assert parse_tool_calls(nested, NAMES, "multiply", rules=loose).calls[0].arguments == {"a": 7}

    echoed = '{"name": "search", "arguments": {"properties": {"q": "x"}}}'
    assert parse_tool_calls(echoed, NAMES).calls[0].arguments == {"q": "x"}
    raw = parse_tool_calls(echoed, NAMES, rules=ParseRules(unwrap_schema_echo=False))
    assert raw.calls[0].arguments == {"properties": {"q": "x"}}

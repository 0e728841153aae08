"""Unit tests of the framework-free tool-call parser (no models)."""

from __future__ import annotations

from specfuse.tool_calls import parse_tool_calls

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

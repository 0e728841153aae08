"""LangChain and LlamaIndex give the same request and the same calls for the same prompt and tools.

Both adapters build their request with specfuse.tool_calls.ToolPlan and only map
types. The unit tests drive the real adapter classes with member outputs fed
through each adapter's own mapping; the last test runs one real ensemble
through both frameworks.
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.messages import HumanMessage, SystemMessage
from langchain_core.messages.ai import AIMessage
from llama_index.core.base.llms.types import ChatMessage, MessageRole
from llama_index.core.tools import FunctionTool

from langchain_specfuse import ChatSpecFuse
from llama_index_specfuse import SpecFuseLLM
from specfuse import ConfigError, FusionResult, FusionTrace, Usage
from specfuse.config import ADAPTER_FIELD_SETTINGS
from specfuse.tool_calls import TOOL_RESPONSE_STOP

PAIR = ["smollm2-135m", "gemma3-270m"]


def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return f"sunny in {city}"


def multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


TOOLS = [FunctionTool.from_defaults(fn=get_weather), FunctionTool.from_defaults(fn=multiply)]
#: The same tools as OpenAI specs: what LlamaIndex hands the adapter, bound as-is to LangChain.
SPECS = [t.metadata.to_openai_tool() for t in TOOLS]

#: Member outputs that exercise every parsing rule.
OUTPUTS = [
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>',
    'Let me see.\n<tool_call>\n{"name": "multiply", "arguments": "{\\"a\\": 2, \\"b\\": 3}"}\n</tool_call>',
    '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>' * 2,
    '```json\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n```',
    '{"name": "multiply", "parameters": {"a": 4, "b": 5}}',
    '{"city": "Lima"}',
    'I would pass {"city": "Lima"} to it.',
    '{"name": "Lima", "arguments": {"city": "Lima"}}',
    '{"name": "get_weather", "arguments": {"properties": {"city": "Bern"}}}',
    '<tool_call>{"name": "launch", "arguments": {}}</tool_call>',
    "<tool_call>{not json",
    "It is sunny.",
]

CHOICES: list[Any] = [None, "auto", "get_weather", "any", "none"]


def _result(text: str) -> FusionResult:
    return FusionResult(text=text, finish_reason="stop", trace=FusionTrace(members=["m"]), usage=Usage(1, 1))


def _langchain(choice: Any) -> tuple[ChatSpecFuse, Any]:
    llm = ChatSpecFuse.local(PAIR, stop=["END"])
    request = llm._request(
        [SystemMessage("Be brief."), HumanMessage("Weather in Paris?")],
        None,
        {"tools": SPECS, "tool_choice": choice},
    )
    return llm, request


def _llama_index(choice: Any) -> tuple[SpecFuseLLM, Any]:
    llm = SpecFuseLLM.local(PAIR, stop=["END"])
    kwargs = llm._prepare_chat_with_tools(
        TOOLS,
        user_msg="Weather in Paris?",
        chat_history=[ChatMessage(role=MessageRole.SYSTEM, content="Be brief.")],
        tool_choice=choice,
    )
    return llm, llm._request(kwargs.pop("messages"), kwargs)


#: (calls, names of invalid calls, content) as each framework shows them.
Seen = tuple[list[tuple[str, Any]], list[str | None], str]


def _lc_calls(
    llm: ChatSpecFuse, request: Any, text: str
) -> tuple[list[tuple[str, Any]], list[str | None], str]:
    message: AIMessage = llm._message(_result(text), request)
    calls = [(c["name"], c["args"]) for c in message.tool_calls]
    return calls, [c["name"] for c in message.invalid_tool_calls], str(message.content)


def _li_calls(llm: SpecFuseLLM, call: Any, text: str) -> Seen:
    response = llm._chat_response(text, None, _result(text), call.plan)
    selections = llm.get_tool_calls_from_response(response, error_on_no_tool_call=False)
    invalid = [c["name"] for c in response.message.additional_kwargs.get("invalid_tool_calls", [])]
    return [(s.tool_name, s.tool_kwargs) for s in selections], invalid, str(response.message.content)


@pytest.mark.parametrize("choice", CHOICES)
def test_same_prompt_and_tools_make_the_same_engine_request(choice: Any) -> None:
    _, lc = _langchain(choice)
    _, li = _llama_index(choice)
    assert lc.messages == li.messages
    assert lc.plan == li.plan
    assert lc.overrides == li.overrides
    if choice == "none":
        assert (
            lc.plan.tools is None
            and "stop" in lc.overrides
            and TOOL_RESPONSE_STOP not in lc.overrides["stop"]
        )
    else:
        assert lc.overrides["stop"] == ["END", TOOL_RESPONSE_STOP]


@pytest.mark.parametrize("choice", CHOICES)
@pytest.mark.parametrize("text", OUTPUTS)
def test_same_member_output_gives_the_same_calls_through_either_framework(choice: Any, text: str) -> None:
    lc_llm, lc = _langchain(choice)
    li_llm, li = _llama_index(choice)
    assert _lc_calls(lc_llm, lc, text) == _li_calls(li_llm, li, text)


def test_the_rules_that_used_to_be_langchain_only_now_hold_in_llama_index() -> None:
    llm, call = _llama_index("get_weather")
    repeated = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>' * 2
    assert _li_calls(llm, call, repeated)[0] == [("get_weather", {"city": "Oslo"})]
    misnamed = '{"name": "Lima", "arguments": {"city": "Lima"}}'
    assert _li_calls(llm, call, misnamed)[0] == [("get_weather", {"city": "Lima"})]
    assert _li_calls(llm, call, 'I would pass {"city": "Lima"} to it.')[0] == []
    assert TOOL_RESPONSE_STOP in call.overrides["stop"]
    assert "<tool_call>" in call.messages[0]["content"]  # the example-based instruction


def test_schema_echo_unwrapping_that_used_to_be_llama_index_only_now_holds_in_langchain() -> None:
    llm, request = _langchain(None)
    echoed = '{"name": "get_weather", "arguments": {"properties": {"city": "Bern"}}}'
    assert _lc_calls(llm, request, echoed)[0] == [("get_weather", {"city": "Bern"})]


def test_tool_choice_none_hides_the_tools_in_llama_index_too() -> None:
    _, call = _llama_index("none")
    assert call.plan.tools is None and call.messages[0] == {"role": "system", "content": "Be brief."}


def test_an_unknown_forced_tool_is_refused_by_both() -> None:
    with pytest.raises(ConfigError, match="not among the tools offered"):
        _llama_index("launch")
    with pytest.raises(ConfigError, match="not among the tools offered"):
        ChatSpecFuse.local(PAIR).bind_tools(SPECS, tool_choice="launch")


# -- settings -------------------------------------------------------------------------


def test_both_adapters_take_the_same_setting_names_with_the_same_effect() -> None:
    settings: dict[str, Any] = {
        "temperature": 0.2,
        "max_tokens": 9,
        "top_p": 0.8,
        "seed": 3,
        "segment_tokens": 5,
        "stop": ["END"],
        "timeout": 30.0,
    }
    assert set(settings) == set(ADAPTER_FIELD_SETTINGS)
    lc = ChatSpecFuse.local(PAIR, fusion={"lam": 0.0}, **settings)
    li = SpecFuseLLM.local(PAIR, fusion={"lam": 0.0}, **settings)
    expected = {**settings, "lam": 0.0, "request_deadline": 30.0}
    del expected["timeout"]
    assert lc._overrides(None, {}) == li._overrides({}) == expected
    assert lc._overrides(None, {"tau": 0.5, "stop": ["X"]}) == li._overrides({"tau": 0.5, "stop": ["X"]})


def test_both_adapters_refuse_an_unknown_per_call_keyword_naming_the_valid_ones() -> None:
    lc = ChatSpecFuse.local(PAIR)
    li = SpecFuseLLM.local(PAIR)
    messages = [ChatMessage(role=MessageRole.USER, content="hi")]
    valid = r"unknown fusion setting 'temprature'; valid settings: \[.*'temperature'"
    with pytest.raises(ConfigError, match=valid):
        lc._request([HumanMessage("hi")], None, {"temprature": 0.1})
    with pytest.raises(ConfigError, match=valid):
        li._request(messages, {"temprature": 0.1})


def test_an_unknown_fusion_setting_fails_at_construction_in_both() -> None:
    # pydantic wraps the ConfigError of a validator in its ValidationError (both are ValueErrors).
    with pytest.raises(ValueError, match="unknown fusion setting 'taus'"):
        ChatSpecFuse(fusion={"taus": 1})
    with pytest.raises(ValueError, match="unknown fusion setting 'taus'"):
        SpecFuseLLM(fusion={"taus": 1})


# -- one real ensemble through both frameworks ------------------------------------------


TOOL_MEMBERS: list[dict[str, Any]] = [
    {"model": "qwen2.5-coder-0.5b"},
    {"model": "smollm2-135m", "roles": ["draft"]},
]


def test_a_real_fusion_gives_the_same_call_through_either_framework() -> None:
    lc = ChatSpecFuse(members=TOOL_MEMBERS, temperature=0.0, max_tokens=48, seed=7)
    li = SpecFuseLLM(fuse=lc.engine, temperature=0.0, max_tokens=48, seed=7)
    prompt = "What is the weather in Paris?"
    message = lc.bind_tools([SPECS[0]], tool_choice="get_weather").invoke(prompt)
    response = li.chat_with_tools([TOOLS[0]], user_msg=prompt, tool_choice="get_weather")
    selections = li.get_tool_calls_from_response(response, error_on_no_tool_call=False)
    # One engine, one prompt, one tool, greedy: the same fused text, so the same calls.
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [
        (s.tool_name, s.tool_kwargs) for s in selections
    ]

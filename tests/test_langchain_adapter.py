"""The LangChain adapter: its pure logic, then its behaviour against real local models.

Pure parts (message conversion, tool-call parsing, settings, serialisation)
need no model. Behaviour tests run real ensembles: the smollm2 + gemma pair
(fastest, two tokenizers, two templates) for streaming, stops, usage,
callbacks and batching; qwen (the one embedded model with a tool template,
verifying) + smollm2 (drafting) for tools and structured output.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.load import dumpd, dumps, load
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage, ToolMessage
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.tools import tool
from pydantic import BaseModel, Field

from langchain_specfuse import ChatSpecFuse, SpecFuseLLM
from langchain_specfuse._convert import (
    extract_json,
    parse_tool_calls,
    to_core_messages,
    tool_choice_instruction,
    with_system_instruction,
)
from specfuse import MemberConfig

PAIR = ["smollm2-135m", "gemma3-270m"]
TOOL_MEMBERS: list[dict[str, Any]] = [
    {"model": "qwen2.5-coder-0.5b"},
    {"model": "smollm2-135m", "roles": ["draft"]},
]


@tool
def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return f"sunny in {city}"


class Person(BaseModel):
    """A person."""

    name: str = Field(description="The person's name")
    age: int = Field(description="The person's age in years")


# -- message conversion ----------------------------------------------------------------


def test_messages_convert_to_core_chat_dicts() -> None:
    messages = [
        SystemMessage("be brief"),
        HumanMessage("What is 1 + 2?"),
        AIMessage(
            [
                {"type": "text", "text": "Let me add."},
                {"type": "tool_use", "id": "c1", "name": "add", "input": {}},
            ],
            tool_calls=[{"name": "add", "args": {"a": 1, "b": 2}, "id": "c1", "type": "tool_call"}],
        ),
        ToolMessage('{"result": 3}', tool_call_id="c1", name="add"),
        AIMessage("It is 3."),
    ]
    assert to_core_messages(messages) == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "What is 1 + 2?"},
        {
            "role": "assistant",
            "content": "Let me add.",
            "tool_calls": [
                {"type": "function", "id": "c1", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}
            ],
        },
        {"role": "tool", "content": '{"result": 3}', "tool_call_id": "c1", "name": "add"},
        {"role": "assistant", "content": "It is 3."},
    ]


def test_non_text_content_is_refused_with_a_clear_error() -> None:
    image = HumanMessage(
        [{"type": "text", "text": "what is this?"}, {"type": "image", "url": "http://x/y.png"}]
    )
    with pytest.raises(ValueError, match="'image' is not supported"):
        to_core_messages([image])


def test_instruction_merges_into_the_leading_system_message() -> None:
    merged = with_system_instruction([{"role": "system", "content": "be brief"}], "call a tool")
    assert merged == [{"role": "system", "content": "be brief\n\ncall a tool"}]
    added = with_system_instruction([{"role": "user", "content": "hi"}], "call a tool")
    assert added[0] == {"role": "system", "content": "call a tool"}


# -- tool-call parsing ------------------------------------------------------------------------


def test_parses_hermes_tagged_calls_and_strips_them_from_content() -> None:
    text = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    parsed = parse_tool_calls(text, ["get_weather"])
    assert parsed.content == "Checking."
    assert [(c["name"], c["args"]) for c in parsed.tool_calls] == [("get_weather", {"city": "Paris"})]
    assert parsed.tool_calls[0]["id"].startswith("call_")
    assert parsed.invalid_tool_calls == []


def test_parses_several_tags_string_arguments_and_an_unclosed_last_tag() -> None:
    text = (
        '<tool_call>{"name": "a", "arguments": "{\\"x\\": 1}"}</tool_call>\n'
        '<tool_call>{"name": "b", "parameters": {"y": 2}}'
    )
    parsed = parse_tool_calls(text, ["a", "b"])
    assert [(c["name"], c["args"]) for c in parsed.tool_calls] == [("a", {"x": 1}), ("b", {"y": 2})]


def test_parses_json_fences_and_bare_json() -> None:
    fenced = 'Sure:\n```json\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n```'
    parsed = parse_tool_calls(fenced, ["get_weather"])
    assert parsed.tool_calls[0]["args"] == {"city": "Oslo"} and parsed.content == "Sure:"
    bare = 'I will call {"name": "get_weather", "arguments": {"city": "Rome"}} now'
    assert parse_tool_calls(bare, ["get_weather"]).tool_calls[0]["args"] == {"city": "Rome"}
    openai_style = '{"function": {"name": "get_weather", "arguments": {"city": "Bern"}}}'
    assert parse_tool_calls(openai_style, ["get_weather"]).tool_calls[0]["args"] == {"city": "Bern"}


def test_unparsable_or_unknown_tagged_calls_become_invalid_tool_calls() -> None:
    parsed = parse_tool_calls(
        '<tool_call>{"name": "get_weather", "arguments": {"ci</tool_call>', ["get_weather"]
    )
    assert parsed.tool_calls == [] and len(parsed.invalid_tool_calls) == 1
    assert "not JSON" in parsed.invalid_tool_calls[0]["error"]
    unknown = parse_tool_calls('<tool_call>{"name": "launch", "arguments": {}}</tool_call>', ["get_weather"])
    assert unknown.invalid_tool_calls[0]["name"] == "launch"
    assert "unknown tool" in unknown.invalid_tool_calls[0]["error"]
    bad_args = parse_tool_calls(
        '<tool_call>{"name": "get_weather", "arguments": [1]}</tool_call>', ["get_weather"]
    )
    assert "JSON object" in bad_args.invalid_tool_calls[0]["error"]


def test_identical_repeated_calls_are_merged() -> None:
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    other = '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>'
    parsed = parse_tool_calls(call + call + other, ["get_weather"])
    assert [c["args"]["city"] for c in parsed.tool_calls] == ["Paris", "Rome"]


def test_no_argument_calls_parse_to_empty_args() -> None:
    for text in (
        '<tool_call>{"name": "ping", "arguments": {}}</tool_call>',
        '<tool_call>{"name": "ping"}</tool_call>',
        '{"name": "ping", "arguments": "{}"}',
    ):
        parsed = parse_tool_calls(text, ["ping"], forced="ping")
        assert [(c["name"], c["args"]) for c in parsed.tool_calls] == [("ping", {})], text


def test_unicode_arguments_survive_parsing_and_streaming() -> None:
    text = '<tool_call>{"name": "unicode_customer", "arguments": {"customer_name": "你好啊集团"}}</tool_call>'
    call = parse_tool_calls(text, ["unicode_customer"]).tool_calls[0]
    assert call["args"] == {"customer_name": "你好啊集团"}
    # The last streamed chunk carries the call as a tool_call_chunk, as ChatSpecFuse._chunk builds it.
    chunk = AIMessageChunk(
        content="",
        tool_call_chunks=[
            {
                "name": call["name"],
                "args": json.dumps(call["args"], ensure_ascii=False),
                "id": call["id"],
                "index": 0,
                "type": "tool_call_chunk",
            }
        ],
    )
    full = AIMessageChunk(content="こんにちは") + chunk
    assert full.tool_calls[0]["args"] == {"customer_name": "你好啊集团"}


def test_plain_prose_and_non_call_json_are_left_alone() -> None:
    text = 'The config is {"debug": true}.'
    parsed = parse_tool_calls(text, ["get_weather"])
    assert parsed.content == text and parsed.tool_calls == [] and parsed.invalid_tool_calls == []


def test_forced_tool_takes_a_bare_argument_object_only_when_it_is_the_whole_answer() -> None:
    assert parse_tool_calls('{"city": "Lima"}', ["get_weather"], forced="get_weather").tool_calls[0][
        "args"
    ] == {"city": "Lima"}
    # A misnamed call of the forced tool (the model wrote the "name" argument there).
    misnamed = parse_tool_calls(
        '{"name": "Ada", "arguments": {"name": "Ada", "age": 36}}', ["Person"], "Person"
    )
    assert [(c["name"], c["args"]) for c in misnamed.tool_calls] == [("Person", {"name": "Ada", "age": 36})]
    assert parse_tool_calls('{"name": "Ada", "arguments": {"age": 36}}', ["Person"]).tool_calls == []
    # Nested objects of a truncated call are not arguments.
    cut = '{"name": "get_weather", "arguments": {"city": {"type": "string"}'
    assert parse_tool_calls(cut, ["get_weather"], forced="get_weather").tool_calls == []


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


# -- settings, serialisation, tools binding ----------------------------------------------------------


def test_default_is_the_embedded_ensemble_and_names_it() -> None:
    llm = ChatSpecFuse()
    assert llm.ensemble_config().members[0].model == "smollm2-135m"
    assert llm.resolved_model_name.startswith("specfuse:smollm2-135m+")
    assert ChatSpecFuse.local(PAIR).resolved_model_name == "specfuse:smollm2-135m+gemma3-270m"
    assert ChatSpecFuse(model="my-fusion").resolved_model_name == "my-fusion"


def test_config_file_and_fusion_settings(tmp_path: Any) -> None:
    path = tmp_path / "ensemble.toml"
    path.write_text('members = [{model = "smollm2-135m", name = "small"}]\n[fusion]\ntau = 0.5\n')
    llm = ChatSpecFuse.from_file(str(path), temperature=0.0, stop=["\n\n"], fusion={"lam": 0.0})
    assert llm.resolved_model_name == "specfuse:small"
    assert llm.ensemble_config().fusion.tau == 0.5
    assert llm._overrides(["END"], {"seed": 3}) == {
        "lam": 0.0,
        "temperature": 0.0,
        "seed": 3,
        "stop": ["\n\n", "END"],
    }
    with pytest.raises(ValueError, match="unknown fusion setting"):
        ChatSpecFuse(fusion={"taus": 1})


def test_ls_params() -> None:
    llm = ChatSpecFuse.local(PAIR, temperature=0.2, max_tokens=9, stop=["x"])
    params = llm._get_ls_params(stop=["y"])
    assert params == {
        "ls_provider": "specfuse",
        "ls_model_name": "specfuse:smollm2-135m+gemma3-270m",
        "ls_model_type": "chat",
        "ls_temperature": 0.2,
        "ls_max_tokens": 9,
        "ls_stop": ["x", "y"],
    }


@pytest.mark.filterwarnings("ignore::langchain_core._api.beta_decorator.LangChainBetaWarning")
def test_serialisation_round_trip_without_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the xfailed standard test_serdes checks, with the class explicitly allowed."""
    monkeypatch.delenv("SPECFUSE_API_KEY", raising=False)
    llm = ChatSpecFuse(
        members=[
            MemberConfig(model="m1", backend="tgi", urls=["http://a:8080"], api_key="sk-member-secret"),
            {"model": "m2", "backend": "vllm", "urls": ["http://b:8000"], "api_key": "sk-dict-secret"},
        ],
        api_key="sk-top-secret",
        temperature=0.0,
        max_tokens=12,
    )
    text = dumps(llm)
    for secret in ("sk-member-secret", "sk-dict-secret", "sk-top-secret"):
        assert secret not in text
    assert dumpd(llm)["kwargs"]["api_key"] == {"lc": 1, "type": "secret", "id": ["SPECFUSE_API_KEY"]}
    # The member keys still reach the engine's config.
    keys = {m.display_name: m.api_key.get_secret_value() for m in llm.ensemble_config().members if m.api_key}
    assert keys == {"m1": "sk-member-secret", "m2": "sk-dict-secret"}
    monkeypatch.setenv("SPECFUSE_API_KEY", "sk-top-secret")
    revived = load(
        dumpd(llm),
        valid_namespaces=["langchain_specfuse"],
        allowed_objects=[ChatSpecFuse],
        secrets_from_env=True,
    )
    assert isinstance(revived, ChatSpecFuse)
    assert revived.api_key is not None and revived.api_key.get_secret_value() == "sk-top-secret"
    assert revived.members == llm.members and revived.max_tokens == 12


def test_bind_tools_converts_tools_and_checks_tool_choice() -> None:
    llm = ChatSpecFuse.local(PAIR)
    bound = llm.bind_tools(
        [get_weather, Person], tool_choice={"type": "function", "function": {"name": "Person"}}
    )
    kwargs = bound.kwargs  # type: ignore[attr-defined]
    assert [t["function"]["name"] for t in kwargs["tools"]] == ["get_weather", "Person"]
    assert kwargs["tool_choice"] == "Person"
    assert llm.bind_tools([get_weather], tool_choice=True).kwargs["tool_choice"] == "any"  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="not among the bound tools"):
        llm.bind_tools([get_weather], tool_choice="nope")


def test_structured_output_parsers_validate_and_report_errors() -> None:
    llm = ChatSpecFuse.local(PAIR)
    chain = llm.with_structured_output(Person, method="json_schema")
    parser = chain.last  # type: ignore[attr-defined]
    assert isinstance(parser, PydanticOutputParser)
    assert parser.invoke(AIMessage('{"name": "Ada", "age": 36}')) == Person(name="Ada", age=36)
    with pytest.raises(Exception, match="age"):
        parser.invoke(AIMessage('{"name": "Ada"}'))
    assert isinstance(llm.with_structured_output(None, method="json_mode").last, JsonOutputParser)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="needs a schema"):
        llm.with_structured_output(None, method="json_schema")


# -- behaviour against real models --------------------------------------------------------------


class _Tokens(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        self.tokens.append(token)


@pytest.fixture(scope="module")
def pair_llm() -> ChatSpecFuse:
    return ChatSpecFuse.local(PAIR, temperature=0.0, max_tokens=16, seed=7)


@pytest.fixture(scope="module")
def tool_llm() -> ChatSpecFuse:
    return ChatSpecFuse(members=TOOL_MEMBERS, temperature=0.0, max_tokens=48, seed=7)


def test_invoke_reports_usage_model_summary_and_trace(pair_llm: ChatSpecFuse) -> None:
    msg = pair_llm.invoke("Name a fruit.")
    meta = msg.response_metadata
    trace = meta["specfuse_trace"]
    called = {c["member"] for r in trace["rounds"] for c in r["calls"]}
    assert msg.usage_metadata == {
        "input_tokens": sum(n for m, n in trace["prompt_tokens"].items() if m in called),
        "output_tokens": meta["specfuse_summary"]["completion_tokens"],
        "total_tokens": msg.usage_metadata["input_tokens"] + msg.usage_metadata["output_tokens"],  # type: ignore[index]
    }
    assert meta["model_name"] == "specfuse:smollm2-135m+gemma3-270m"
    assert meta["finish_reason"] in {"stop", "length"}
    assert set(meta["specfuse_member_usage"]) == set(PAIR)
    assert "".join(s["text"] for s in meta["specfuse_segments"]) == msg.content
    assert json.dumps(trace)  # the full trace is plain JSON data


def test_stream_yields_one_chunk_per_accepted_segment(pair_llm: ChatSpecFuse) -> None:
    handler = _Tokens()
    chunks = list(pair_llm.stream("Name a fruit.", config={"callbacks": [handler]}))
    assert chunks[-1].chunk_position == "last"
    assert all(c.chunk_position is None for c in chunks[:-1])
    # Usage and model_name on exactly one chunk, so aggregation neither double counts nor concatenates.
    assert [c.usage_metadata is not None for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert ["model_name" in c.response_metadata for c in chunks].count(True) == 1
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    assert isinstance(full, AIMessageChunk)
    segments = full.response_metadata["specfuse_segments"]
    assert len(segments) == len(chunks) and [s["text"] for s in segments] == [c.content for c in chunks]
    assert all(s["member"] in PAIR for s in segments)
    # BaseChatModel.stream reports each chunk to callbacks: one token event per segment.
    assert handler.tokens == [c.content for c in chunks]
    # Greedy decoding: the stream and invoke fuse the same answer.
    assert full.content == pair_llm.invoke("Name a fruit.").content
    assert full.usage_metadata is not None and full.usage_metadata["output_tokens"] > 0
    assert full.response_metadata["model_name"] == pair_llm.resolved_model_name


async def test_astream_and_streaming_invoke_report_segments(pair_llm: ChatSpecFuse) -> None:
    chunks = [c async for c in pair_llm.astream("Name a fruit.")]
    assert chunks[-1].chunk_position == "last"
    handler = _Tokens()
    streaming = pair_llm.model_copy(update={"streaming": True})
    msg = await streaming.ainvoke("Name a fruit.", config={"callbacks": [handler]})
    # invoke with streaming=True drives _astream with a run_manager, which reports each segment.
    assert handler.tokens == [c.content for c in chunks]
    assert msg.content == "".join(str(c.content) for c in chunks)


def test_stop_sequences_per_call_and_at_construction(pair_llm: ChatSpecFuse) -> None:
    # A lone drafter is not re-ranked, so greedy output with a stop is exactly the
    # stop-free output cut before the stop (in a fusion the stop also changes which
    # candidate wins: a draft cut by a stop competes as a finished answer).
    solo = ChatSpecFuse.local(["smollm2-135m"], temperature=0.0, max_tokens=16, seed=7)
    question = "Count from one to ten in words."
    free = str(solo.invoke(question).content)
    stop = free.split()[2]
    cut = solo.invoke(question, stop=[stop])
    assert cut.content == free[: free.index(stop)]
    assert cut.response_metadata["finish_reason"] == "stop"
    built = ChatSpecFuse.local(["smollm2-135m"], temperature=0.0, max_tokens=16, seed=7, stop=[stop])
    assert built.invoke(question).content == cut.content
    # Through the fusion: the stop sequence never appears in the answer, streamed or not.
    fused_free = str(pair_llm.invoke(question).content)
    fused_stop = fused_free.split()[1]
    assert fused_stop not in str(pair_llm.invoke(question, stop=[fused_stop]).content)
    streamed = "".join(str(c.content) for c in pair_llm.stream(question, stop=[fused_stop]))
    assert fused_stop not in streamed


def test_batch_and_abatch_match_single_calls(pair_llm: ChatSpecFuse) -> None:
    prompts = ["Name a fruit.", "Name a colour."]
    single = [pair_llm.invoke(p).content for p in prompts]
    assert [m.content for m in pair_llm.batch(prompts)] == single


async def test_abatch(pair_llm: ChatSpecFuse) -> None:
    results = await pair_llm.abatch(["Name a fruit.", "Name a colour."])
    assert len(results) == 2 and all(r.response_metadata["model_name"] for r in results)


def test_engine_is_built_once_and_shared_by_the_same_ensemble(pair_llm: ChatSpecFuse) -> None:
    assert pair_llm.engine is pair_llm.engine
    # Another object over the same members reuses it (settings are per request, not per engine).
    assert ChatSpecFuse.local(PAIR, temperature=0.9).engine is pair_llm.engine
    assert ChatSpecFuse.local(["smollm2-135m"]).engine is not pair_llm.engine


def test_completion_model_streams_and_reports_tokens_itself() -> None:
    llm = SpecFuseLLM.local(PAIR, temperature=0.0, max_tokens=12, seed=7)
    handler = _Tokens()
    chunks = list(llm.stream("Name a fruit.", config={"callbacks": [handler]}))
    # BaseLLM leaves token callbacks to the integration: exactly one per segment, not doubled.
    assert handler.tokens == chunks
    result = llm.generate(["Name a fruit."])
    assert result.generations[0][0].text == "".join(chunks)
    info = result.generations[0][0].generation_info or {}
    assert info["model_name"] == "specfuse:smollm2-135m+gemma3-270m"
    assert result.llm_output is not None and result.llm_output["token_usage"]["output_tokens"] > 0


# -- tools and structured output through the fusion (qwen verifies) -------------------------------------


def test_forced_tool_call_is_parsed_from_the_fusion(tool_llm: ChatSpecFuse) -> None:
    msg = tool_llm.bind_tools([get_weather], tool_choice="get_weather").invoke(
        "What is the weather in Paris?"
    )
    assert [(c["name"], c["args"]) for c in msg.tool_calls] == [("get_weather", {"city": "Paris"})]
    # And streamed: the last chunk carries the parsed call.
    full = None
    for chunk in tool_llm.bind_tools([get_weather], tool_choice="any").stream(
        "What is the weather in Paris?"
    ):
        full = chunk if full is None else full + chunk
    assert isinstance(full, AIMessageChunk)
    assert [(c["name"], c["args"]) for c in full.tool_calls] == [("get_weather", {"city": "Paris"})]


def test_tool_history_round_trips_into_the_members_template(tool_llm: ChatSpecFuse) -> None:
    history = [
        HumanMessage("What is the weather in Paris?"),
        AIMessage("", tool_calls=[{"name": "get_weather", "args": {"city": "Paris"}, "id": "c1"}]),
        ToolMessage("sunny in Paris", tool_call_id="c1", name="get_weather"),
    ]
    qwen = tool_llm.engine.start()[0]
    tools = tool_llm.bind_tools([get_weather]).kwargs["tools"]  # type: ignore[attr-defined]
    import asyncio

    prompt = asyncio.run(qwen.format.render(to_core_messages(history), tools))
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in prompt
    assert "<tool_response>\nsunny in Paris\n</tool_response>" in prompt
    # The 0.5B model often calls the tool again instead of answering; either way
    # the fused reply must come back parsed (a call or prose), never raw markup.
    answer = tool_llm.bind_tools([get_weather]).invoke(history)
    assert answer.tool_calls or answer.content
    assert "<tool_call>" not in str(answer.content)


def test_structured_output_methods(tool_llm: ChatSpecFuse) -> None:
    prompt = "Ada is 36 years old. Extract the person."
    for method in ("function_calling", "json_schema"):
        assert tool_llm.with_structured_output(Person, method=method).invoke(prompt) == Person(
            name="Ada", age=36
        )
    as_dict = tool_llm.with_structured_output(Person.model_json_schema(), method="json_mode").invoke(prompt)
    assert as_dict == {"name": "Ada", "age": 36}


def test_structured_output_include_raw_reports_parsing_errors(tool_llm: ChatSpecFuse) -> None:
    # Three tokens cannot hold the JSON object: the parser must fail, and include_raw reports it.
    short = tool_llm.model_copy(update={"max_tokens": 3})
    out = short.with_structured_output(Person, method="json_schema", include_raw=True).invoke("Ada is 36.")
    assert isinstance(out["raw"], AIMessage) and out["parsed"] is None
    assert out["parsing_error"] is not None

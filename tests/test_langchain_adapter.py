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
from langchain_specfuse._convert import to_core_messages, to_langchain_output
from specfuse import ConfigError, MemberConfig
from specfuse.tool_calls import parse_tool_calls

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


def test_parsed_answer_maps_to_langchain_tool_calls() -> None:
    # What counts as a call is specfuse.tool_calls' business (test_tool_calls.py); here only the mapping.
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    text = call + "<tool_call>{bad</tool_call>"
    parsed = to_langchain_output(parse_tool_calls(text, ["get_weather"]))
    assert parsed.content == ""
    [call] = parsed.tool_calls
    assert (call["name"], call["args"], call["type"]) == ("get_weather", {"city": "Paris"}, "tool_call")
    [bad] = parsed.invalid_tool_calls
    assert bad["type"] == "invalid_tool_call" and bad["args"] == "{bad" and "not JSON" in (bad["error"] or "")


def test_unicode_arguments_survive_parsing_and_streaming() -> None:
    text = '<tool_call>{"name": "unicode_customer", "arguments": {"customer_name": "你好啊集团"}}</tool_call>'
    call = to_langchain_output(parse_tool_calls(text, ["unicode_customer"])).tool_calls[0]
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


# -- settings, serialisation, tools binding ----------------------------------------------------------


def test_default_is_the_embedded_ensemble_and_names_it() -> None:
    llm = ChatSpecFuse()
    # The strongest alone first: it leads gated fusion (specfuse.config.DEFAULT_LOCAL_MODELS).
    assert llm.ensemble_config().members[0].model == "qwen2.5-coder-0.5b"
    assert llm.resolved_model_name == "specfuse:qwen2.5-coder-0.5b+smollm2-135m+gemma3-270m"
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
    # None in `fusion` is a value: no gate, every round fused (docs: `None` is the paper's loop).
    ungated = ChatSpecFuse.local(PAIR, fusion={"gate_logprob": None})
    assert ungated._overrides(None, {}) == {"gate_logprob": None}
    with pytest.raises(ValueError, match="temperature"):
        ChatSpecFuse(fusion={"temperature": None})


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
    with pytest.raises(ConfigError, match="not among the tools"):
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

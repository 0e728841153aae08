"""SpecFuseLLM's eight LlamaIndex methods, callbacks, instrumentation and tool plumbing.

Model tests run the conftest pair (two real small models, greedy, short); the
unit tests at the end need no model.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import pytest
from llama_index.core.base.llms.types import ChatMessage, ChatResponse, MessageRole, ToolCallBlock
from llama_index.core.bridge.pydantic import Field
from llama_index.core.callbacks import CallbackManager, CBEventType, LlamaDebugHandler, TokenCountingHandler
from llama_index.core.instrumentation import get_dispatcher
from llama_index.core.instrumentation.event_handlers import BaseEventHandler
from llama_index.core.instrumentation.events import BaseEvent
from llama_index.core.tools import FunctionTool

from llama_index_specfuse import SpecFuseLLM, to_specfuse_messages
from specfuse import DEFAULT_LOCAL_MODELS, FusionResult, FusionTrace, SpecFuse, ToolCallError, Usage

MAX_TOKENS = 12
PROMPT = "Name two colours."


@pytest.fixture(scope="session")
def llm(pair: SpecFuse) -> SpecFuseLLM:
    """The adapter over the conftest's started pair: no second model load."""
    return SpecFuseLLM(fuse=pair, max_tokens=MAX_TOKENS)


def _messages() -> list[ChatMessage]:
    return [ChatMessage(role=MessageRole.USER, content=PROMPT)]


def _segment_rounds(raw: dict[str, Any]) -> int:
    """Rounds whose accepted text is non-empty: each must be exactly one stream delta."""
    trace: FusionTrace = raw["specfuse_trace"]
    return sum(1 for r in trace.rounds if r.accepted_text)


def _check_raw(raw: dict[str, Any], text: str) -> None:
    assert raw["text"] == text
    assert raw["usage"]["prompt_tokens"] > 0 and raw["usage"]["completion_tokens"] > 0
    assert isinstance(raw["specfuse_trace"], FusionTrace)
    assert raw["summary"]["rounds"] == len(raw["specfuse_trace"].rounds) >= 1
    assert raw["summary"]["completion_tokens"] <= MAX_TOKENS


def _check_stream(chunks: list[Any], text_of: Any) -> None:
    assert chunks, "the stream yielded nothing"
    deltas = [c.delta for c in chunks if c.delta]
    final = chunks[-1]
    assert all(c.raw is None for c in chunks[:-1]), "only the last chunk carries the result"
    _check_raw(final.raw, text_of(final))
    assert "".join(c.delta or "" for c in chunks) == final.raw["text"]
    assert len(deltas) == _segment_rounds(final.raw)


# -- the eight methods -------------------------------------------------------------


def test_complete(llm: SpecFuseLLM) -> None:
    response = llm.complete(PROMPT)
    assert response.text.strip()
    _check_raw(response.raw, response.text)


def test_chat(llm: SpecFuseLLM) -> None:
    response = llm.chat(_messages())
    assert response.message.role == MessageRole.ASSISTANT
    assert response.message.content and response.message.content.strip()
    _check_raw(response.raw, response.message.content)
    assert "tool_calls" not in response.message.additional_kwargs  # no tools offered: no parsing


def test_stream_complete_one_delta_per_segment(llm: SpecFuseLLM) -> None:
    chunks = list(llm.stream_complete(PROMPT))
    _check_stream(chunks, lambda c: c.text)


def test_stream_chat_one_delta_per_segment(llm: SpecFuseLLM) -> None:
    chunks = list(llm.stream_chat(_messages()))
    _check_stream(chunks, lambda c: c.message.content)


async def _with_ticker(coro: Any) -> tuple[Any, int, float]:
    """Run coro while a 10 ms ticker runs on the same loop; a blocked loop stops the ticks."""
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    started = time.perf_counter()
    try:
        result = await coro
    finally:
        ticker.cancel()
    return result, ticks, time.perf_counter() - started


def _assert_loop_stayed_free(ticks: int, seconds: float) -> None:
    # A blocking call would let through ~0 ticks; allow a loaded machine plenty of slack.
    assert seconds > 0.2
    assert ticks >= seconds / 0.01 * 0.2, f"{ticks} ticks in {seconds:.2f}s: the event loop was blocked"


async def test_achat_does_not_block_the_loop(llm: SpecFuseLLM) -> None:
    response, ticks, seconds = await _with_ticker(llm.achat(_messages()))
    _assert_loop_stayed_free(ticks, seconds)
    _check_raw(response.raw, response.message.content)
    assert response.message.content == llm.chat(_messages()).message.content


async def test_acomplete_does_not_block_the_loop(llm: SpecFuseLLM) -> None:
    response, ticks, seconds = await _with_ticker(llm.acomplete(PROMPT))
    _assert_loop_stayed_free(ticks, seconds)
    _check_raw(response.raw, response.text)


async def test_astream_chat_one_delta_per_segment(llm: SpecFuseLLM) -> None:
    async def collect() -> list[ChatResponse]:
        return [chunk async for chunk in await llm.astream_chat(_messages())]

    chunks, ticks, seconds = await _with_ticker(collect())
    _assert_loop_stayed_free(ticks, seconds)
    _check_stream(chunks, lambda c: c.message.content)


async def test_astream_complete_one_delta_per_segment(llm: SpecFuseLLM) -> None:
    chunks = [chunk async for chunk in await llm.astream_complete(PROMPT)]
    _check_stream(chunks, lambda c: c.text)


# -- callbacks, token counting, instrumentation ----------------------------------------


@pytest.fixture
def counted(pair: SpecFuse) -> tuple[SpecFuseLLM, LlamaDebugHandler, TokenCountingHandler]:
    debug = LlamaDebugHandler()
    tokens = TokenCountingHandler()
    llm = SpecFuseLLM(fuse=pair, max_tokens=MAX_TOKENS, callback_manager=CallbackManager([debug, tokens]))
    return llm, debug, tokens


def test_callbacks_and_token_counts_from_chat(counted: Any) -> None:
    llm, debug, tokens = counted
    response = llm.chat(_messages())
    assert len(debug.get_event_pairs(CBEventType.LLM)) == 1
    usage = response.raw["usage"]
    # The handler took the ensemble's own counts from raw["usage"], not a tiktoken estimate.
    assert tokens.prompt_llm_token_count == usage["prompt_tokens"] > 0
    assert tokens.completion_llm_token_count == usage["completion_tokens"] > 0


def test_callbacks_and_token_counts_from_streams(counted: Any) -> None:
    llm, debug, tokens = counted
    chunks = list(llm.stream_complete(PROMPT))
    list(llm.stream_chat(_messages()))
    assert len(debug.get_event_pairs(CBEventType.LLM)) == 2
    assert len(tokens.llm_token_counts) == 2
    assert tokens.llm_token_counts[0].completion_token_count == chunks[-1].raw["usage"]["completion_tokens"]
    assert tokens.total_llm_token_count > 0


class _Collector(BaseEventHandler):
    events: list[str] = Field(default_factory=list)

    @classmethod
    def class_name(cls) -> str:
        return "Collector"

    def handle(self, event: BaseEvent, **kwargs: Any) -> None:
        self.events.append(event.class_name())


@pytest.fixture
def collector() -> Iterator[_Collector]:
    handler = _Collector(events=[])
    dispatcher = get_dispatcher()  # the root dispatcher sees every llama_index event
    dispatcher.add_event_handler(handler)
    try:
        yield handler
    finally:
        dispatcher.event_handlers.remove(handler)


async def test_instrumentation_events_fire(llm: SpecFuseLLM, collector: _Collector) -> None:
    llm.complete(PROMPT)
    [chunk async for chunk in await llm.astream_chat(_messages())]
    names = collector.events
    assert {"LLMCompletionStartEvent", "LLMCompletionEndEvent"} <= set(names)
    assert names.count("LLMChatStartEvent") == 1 and names.count("LLMChatEndEvent") == 1
    assert "LLMChatInProgressEvent" in names  # fired per streamed chunk


# -- metadata and construction -----------------------------------------------------


def test_metadata_comes_from_the_members(llm: SpecFuseLLM, pair: SpecFuse) -> None:
    meta = llm.metadata
    windows = [m.info.context_window for m in pair.start()]
    assert 1000 < meta.context_window < min(w for w in windows if w)
    assert meta.num_output == MAX_TOKENS
    assert meta.is_chat_model and meta.is_function_calling_model
    assert meta.model_name == "specfuse:smollm2-135m+gemma3-270m"


def test_engine_is_built_once_and_kept() -> None:
    llm = SpecFuseLLM.local(["smollm2-135m"], temperature=0.0)
    assert llm.engine is llm.engine


def test_constructors_need_no_model_load(tmp_path: Any) -> None:
    local = SpecFuseLLM.local(["smollm2-135m", "gemma3-270m"], max_tokens=8, segment_tokens=4)
    assert [m.model for m in local.ensemble.members] == ["smollm2-135m", "gemma3-270m"]
    assert local.max_tokens == 8 and local.segment_tokens == 4 and local._settings().segment_tokens == 4
    assert tuple(m.model for m in SpecFuseLLM().ensemble.members) == DEFAULT_LOCAL_MODELS
    remote = SpecFuseLLM.from_members(
        [{"model": "a", "backend": "tgi", "urls": "http://localhost:1"}, "smollm2-135m"], temperature=0.0
    )
    assert remote.ensemble.members[0].backend == "tgi"
    config = tmp_path / "ensemble.toml"
    config.write_text('members = [{model = "smollm2-135m"}]\n[fusion]\nmax_tokens = 5\n')
    from_file = SpecFuseLLM.from_file(config)
    assert from_file._settings().max_tokens == 5
    assert from_file._engine is None  # nothing built, nothing loaded


async def test_metadata_inside_a_running_loop_does_not_load_models() -> None:
    # An engine of its own: one from the shared pool (specfuse.engine_pool) may have been
    # started by another model object with the same ensemble.
    from specfuse import EnsembleConfig, SpecFuse

    llm = SpecFuseLLM(fuse=SpecFuse(EnsembleConfig.local(["smollm2-135m"])), max_tokens=7)
    meta = llm.metadata
    # The engine's estimate from the model registry until an async call has measured the real window.
    assert meta.context_window == llm.engine.usable_window(measure=False)
    assert 4096 < meta.context_window < 8192 and meta.num_output == 7
    assert not llm.engine.started


# -- tool plumbing (no model) --------------------------------------------------------


def _multiply(a: int, b: int) -> int:
    """Multiply two integers."""
    return a * b


def test_prepare_chat_with_tools_and_parse_the_calls() -> None:
    llm = SpecFuseLLM.local(["smollm2-135m"])
    tool = FunctionTool.from_defaults(fn=_multiply, name="multiply")
    kwargs = llm._prepare_chat_with_tools([tool], user_msg="2 times 3?", tool_required=True)
    assert kwargs["messages"][-1].content == "2 times 3?"
    assert kwargs["tools"][0]["function"]["name"] == "multiply"
    call = llm._request(kwargs.pop("messages"), kwargs)
    assert call.plan.forced == "multiply" and "must answer by calling" in call.messages[0]["content"]

    response = llm._chat_response(
        text="",
        delta=None,
        result=_result('<tool_call>{"name": "multiply", "arguments": {"a": 2, "b": 3}}</tool_call>'),
        plan=call.plan,
    )
    assert response.message.content == ""  # the call markup is not prose
    [selection] = llm.get_tool_calls_from_response(response)
    assert (selection.tool_name, selection.tool_kwargs) == ("multiply", {"a": 2, "b": 3})
    assert selection.tool_id == response.message.additional_kwargs["tool_calls"][0]["id"]


def test_no_tool_call_raises_only_when_asked() -> None:
    llm = SpecFuseLLM.local(["smollm2-135m"])
    response = ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content="six"))
    assert llm.get_tool_calls_from_response(response, error_on_no_tool_call=False) == []
    with pytest.raises(ToolCallError, match="no"):
        llm.get_tool_calls_from_response(response)


def test_messages_convert_with_tool_calls_and_results() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "multiply", "arguments": '{"a": 2, "b": 3}'}}
    messages = [
        ChatMessage(role=MessageRole.SYSTEM, content="Be brief."),
        ChatMessage(role=MessageRole.USER, content="2 times 3?"),
        ChatMessage(
            role=MessageRole.ASSISTANT,
            content='{"name": "multiply", "arguments": {"a": 2, "b": 3}}',
            additional_kwargs={"tool_calls": [call]},
        ),
        ChatMessage(role=MessageRole.TOOL, content="6", additional_kwargs={"tool_call_id": "c1"}),
        ChatMessage(
            role=MessageRole.ASSISTANT,
            blocks=[ToolCallBlock(tool_call_id="c2", tool_name="multiply", tool_kwargs={"a": 6, "b": 1})],
        ),
    ]
    out = to_specfuse_messages(messages)
    assert [m["role"] for m in out] == ["system", "user", "assistant", "tool", "assistant"]
    assert out[2]["content"] == ""  # the call is in tool_calls, not shown twice
    assert out[2]["tool_calls"][0]["function"] == {"name": "multiply", "arguments": {"a": 2, "b": 3}}
    assert out[3] == {"role": "tool", "content": "6", "tool_call_id": "c1"}
    assert out[4]["tool_calls"][0]["id"] == "c2"


def _result(text: str) -> FusionResult:
    """A real FusionResult around given text, to test parsing without running models."""
    return FusionResult(text=text, finish_reason="stop", trace=FusionTrace(members=["m"]), usage=Usage(1, 1))

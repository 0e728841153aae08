"""What a LlamaIndex user hits first: finish reasons in raw, copies, and formatted=True
completion, on the conftest pair (two real small models)."""

from __future__ import annotations

import asyncio
import copy
import pickle
from typing import Any

import pytest

from llama_index_specfuse import SpecFuseLLM
from specfuse import ConfigError, FormattedPrompt, SpecFuse

#: Written in SmolLM2's ChatML by hand: what a LlamaIndex prompt helper hands over with formatted=True.
CHATML = "<|im_start|>user\nName a fruit.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def llm(pair: SpecFuse) -> SpecFuseLLM:
    return SpecFuseLLM(fuse=pair, max_tokens=8)


def _check_finished(raw: dict[str, Any]) -> None:
    assert raw["finish_reason"] in {"stop", "length"}
    assert raw["summary"]["finish_reason"] == raw["finish_reason"]
    assert raw["specfuse_trace"].finish_reason == raw["finish_reason"]


def test_raw_summary_says_how_the_answer_finished(llm: SpecFuseLLM) -> None:
    _check_finished(llm.complete("Name a fruit.").raw)
    _check_finished(list(llm.stream_complete("Name a fruit."))[-1].raw)

    async def both() -> list[dict[str, Any]]:
        return [
            (await llm.acomplete("Name a fruit.")).raw,
            [r async for r in await llm.astream_complete("Hi")][-1].raw,
        ]

    for raw in asyncio.run(both()):
        _check_finished(raw)


def test_deep_copy_and_pickle_before_and_after_the_first_call() -> None:
    model = SpecFuseLLM.local(["smollm2-135m", "gemma3-270m"], temperature=0.0, max_tokens=6, seed=7)
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert copied.ensemble == model.ensemble and copied.max_tokens == 6
    answer = model.complete("Name a fruit.").text
    deep, unpickled = copy.deepcopy(model), pickle.loads(pickle.dumps(model))
    assert deep.engine is model.engine  # the loaded members are shared, not duplicated
    assert deep.complete("Name a fruit.").text == answer
    assert unpickled.complete("Name a fruit.").text == answer
    assert unpickled.metadata.context_window == model.metadata.context_window


def test_formatted_prompt_reaches_every_member_as_is(llm: SpecFuseLLM, pair: SpecFuse) -> None:
    members = pair.start()
    raw_counts = {m.name: asyncio.run(m.backend.count_tokens(CHATML)) for m in members}
    response = llm.complete(CHATML, formatted=True)
    # No member's template was wrapped around the text: each read exactly its tokens.
    assert response.raw["specfuse_trace"].prompt_tokens == raw_counts
    templated = llm.complete(CHATML).raw["specfuse_trace"].prompt_tokens
    assert all(templated[name] > raw_counts[name] for name in raw_counts)
    streamed = list(llm.stream_complete(CHATML, formatted=True))[-1]
    assert streamed.raw["specfuse_trace"].prompt_tokens == raw_counts
    assert streamed.text == response.text

    async def acomplete() -> dict[str, int]:
        return (await llm.acomplete(CHATML, formatted=True)).raw["specfuse_trace"].prompt_tokens

    assert asyncio.run(acomplete()) == raw_counts


def test_a_formatted_prompt_refuses_tools_and_blank_text(pair: SpecFuse) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(ConfigError, match="FormattedPrompt"):
        pair.generate(FormattedPrompt(CHATML), tools=[tool])
    with pytest.raises(ConfigError, match="empty"):
        pair.generate(FormattedPrompt("  "))


# -- ReAct: the text protocol passes through the fusion -------------------------------------------

#: The one embedded model with a tool template verifies; smollm2 drafts too.
REACT_MEMBERS: list[dict[str, Any]] = [
    {"model": "qwen2.5-coder-0.5b"},
    {"model": "smollm2-135m", "roles": ["draft"]},
]


def test_the_fused_model_gives_a_react_agent_its_final_answer_after_a_tool_result() -> None:
    from llama_index.core.agent.react.formatter import ReActChatFormatter
    from llama_index.core.agent.react.output_parser import ReActOutputParser
    from llama_index.core.agent.react.types import ActionReasoningStep, ObservationReasoningStep
    from llama_index.core.base.llms.types import ChatMessage
    from llama_index.core.tools import FunctionTool

    def multiply(a: int, b: int) -> int:
        """Multiply two integers and return the product."""
        return a * b

    # The transcript a ReActAgent sends after its tool ran: the ReAct header, the question,
    # the model's Thought/Action/Action Input turn, and the tool's Observation.
    messages = ReActChatFormatter.from_defaults().format(
        [FunctionTool.from_defaults(fn=multiply)],
        chat_history=[ChatMessage(role="user", content="What is 123 times 456?")],
        current_reasoning=[
            ActionReasoningStep(
                thought="I need to multiply 123 by 456.", action="multiply", action_input={"a": 123, "b": 456}
            ),
            ObservationReasoningStep(observation="56088"),
        ],
    )
    llm = SpecFuseLLM.from_members(REACT_MEMBERS, temperature=0.0, max_tokens=48, seed=7)
    content = llm.chat(messages).message.content or ""
    step = ReActOutputParser().parse(content)
    assert step.is_done, content
    assert "56088" in step.response, content  # type: ignore[attr-defined]

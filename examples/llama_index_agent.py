"""A LlamaIndex FunctionAgent whose LLM is a specfuse ensemble, calling a real tool.

Run: .venv/bin/python examples/llama_index_agent.py

Tool calling with sub-1B models is fragile, so the members are chosen for it:
Qwen2.5-Coder-0.5B is the one embedded model with a tool-calling chat template
(SmolLM2's template ignores tools, and in a fused pair its plain-text guess of
the product wins the first segment), and decoding is greedy (temperature 0), so
the run is deterministic. Once it has a tool result, the 0.5B model calls the
tool again instead of answering, whatever the system prompt says; so the tool
is `return_direct`: the agent ends with the tool's output as its answer. With
larger members, drop `return_direct` and the agent answers in its own words.
"""

# No `from __future__ import annotations`: FunctionTool writes the tool's signature
# into its description, and postponed annotations would show as quoted strings
# ('int'), a prompt the small model no longer answers with a call.
import asyncio
import os
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llama_index.core.agent.workflow import FunctionAgent, ToolCall, ToolCallResult
from llama_index.core.tools import FunctionTool

from llama_index_specfuse import SpecFuseLLM

#: Members for tool calling: the one model with a tool template.
AGENT_MODELS = ("qwen2.5-coder-0.5b",)

SYSTEM_PROMPT = "You are a calculator assistant. To multiply, call the multiply tool."


@dataclass
class AgentRun:
    answer: str
    tool_calls: list[tuple[str, dict]] = field(default_factory=list)
    tool_outputs: list[str] = field(default_factory=list)
    executed: list[tuple[int, int]] = field(default_factory=list)


def make_llm() -> SpecFuseLLM:
    return SpecFuseLLM.local(AGENT_MODELS, temperature=0.0, max_tokens=48, seed=7)


async def run_agent(llm: SpecFuseLLM | None = None, question: str = "What is 123 times 456?") -> AgentRun:
    run = AgentRun(answer="")

    def multiply(a: int, b: int) -> int:
        """Multiply two integers and return the product."""
        run.executed.append((a, b))  # proof that the tool really ran, with these arguments
        return a * b

    agent = FunctionAgent(
        tools=[FunctionTool.from_defaults(fn=multiply, return_direct=True)],
        llm=llm or make_llm(),
        system_prompt=SYSTEM_PROMPT,
    )
    handler = agent.run(user_msg=question, max_iterations=4)
    async for event in handler.stream_events():
        if isinstance(event, ToolCallResult):
            run.tool_outputs.append(str(event.tool_output.content))
        elif isinstance(event, ToolCall):
            run.tool_calls.append((event.tool_name, dict(event.tool_kwargs)))
    result = await handler
    run.answer = str(result.response.content or "")
    return run


def main(llm: SpecFuseLLM | None = None) -> AgentRun:
    run = asyncio.run(run_agent(llm))
    print("tool calls:", run.tool_calls)
    print("tool outputs:", run.tool_outputs)
    print("answer:", run.answer)
    return run


if __name__ == "__main__":
    main()

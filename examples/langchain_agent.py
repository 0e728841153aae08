"""A LangChain agent (langchain.agents.create_agent) whose model is a fused ensemble.

Run: .venv/bin/python examples/langchain_agent.py

The ensemble: qwen2.5-coder-0.5b, whose chat template knows tools, drafts and
verifies; smollm2-135m drafts too. The tool call the fusion writes is parsed
into AIMessage.tool_calls and the agent runs the tool.
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from langchain.agents import create_agent
from langchain.agents.middleware import ToolCallLimitMiddleware
from langchain_core.messages import HumanMessage
from langchain_core.tools import tool

from langchain_specfuse import ChatSpecFuse

#: Each (city) the tool was called with, so a caller can check it really ran.
CALLS: list[str] = []


@tool
def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    CALLS.append(city)
    return f"It is sunny and 21 degrees Celsius in {city}."


AGENT_MEMBERS: list[dict[str, Any]] = [
    {"model": "qwen2.5-coder-0.5b"},
    {"model": "smollm2-135m", "roles": ["draft"]},
]

QUESTION = "What is the weather in Paris right now?"


def make_llm() -> ChatSpecFuse:
    return ChatSpecFuse(members=AGENT_MEMBERS, temperature=0.0, max_tokens=48, seed=7)


def main(llm: ChatSpecFuse | None = None, question: str = QUESTION) -> dict[str, Any]:
    agent = create_agent(
        llm or make_llm(),
        tools=[get_weather],
        # qwen2.5-coder-0.5b tends to call the tool again after reading its result
        # instead of answering; one call per run ends that loop (the middleware then
        # closes the run with its own message).
        middleware=[ToolCallLimitMiddleware(run_limit=1, exit_behavior="end")],
    )
    state = agent.invoke({"messages": [HumanMessage(question)]})
    for message in state["messages"]:
        calls = getattr(message, "tool_calls", None)
        print(f"{message.type}: {message.text!r}" + (f" tool_calls={calls}" if calls else ""))
    return state


if __name__ == "__main__":
    main()

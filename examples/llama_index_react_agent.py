"""A LlamaIndex ReActAgent whose LLM is a specfuse ensemble, calling a real tool.

Run: .venv/bin/python examples/llama_index_react_agent.py

ReAct is a text protocol: the model writes `Thought:` / `Action:` / `Action
Input: {...}` lines, the agent runs the tool and sends back `Observation: ...`,
and the model ends with `Answer: ...`. The adapter passes that text through
unchanged (segments are plain text and no tool parsing happens without tools).
Two settings matter with small members:

* `stop=["\\nObservation:"]`: LlamaIndex's ReActAgent sends no stop words, and a
  model that has written its `Action Input` goes on to invent the tool's
  observation itself. Stopping there hands the turn back to the agent.
* A tool whose one argument is called `input`, with a concrete call in its
  description: the 0.5B model copies key names from the ReAct header's format
  example, and shown only the JSON schema it copies `{"title": ..., "type": ...}`
  as the value. The header is LlamaIndex's own with `"num_beams": 5` taken out
  of that example, since the model passed `num_beams` to the tool as well.

With these, the agent calls the tool with "123 * 456", gets 56088 back as the
Observation, and the model answers `Answer: 56088`.
"""

# No `from __future__ import annotations`: FunctionTool writes the tool's signature
# into its description, and postponed annotations would show as quoted strings.
import asyncio
import os
import re
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llama_index.core.agent.react.formatter import ReActChatFormatter
from llama_index.core.agent.react.prompts import REACT_CHAT_SYSTEM_HEADER
from llama_index.core.agent.workflow import ReActAgent, ToolCall, ToolCallResult
from llama_index.core.tools import FunctionTool

from llama_index_specfuse import SpecFuseLLM

#: The one embedded model with a tool-calling template follows the ReAct format best.
REACT_MODELS = ("qwen2.5-coder-0.5b",)
#: The model stops where the agent's tool result will go.
REACT_STOP = ["\nObservation:"]
#: LlamaIndex's own ReAct header, but its format example has one key: the 0.5B model
#: copies the default example's `"num_beams": 5` into every call, and the tool rejects it.
_HEADER_EXAMPLE = '{{"input": "hello world", "num_beams": 5}}'
assert _HEADER_EXAMPLE in REACT_CHAT_SYSTEM_HEADER, "LlamaIndex changed its ReAct header"
REACT_HEADER = REACT_CHAT_SYSTEM_HEADER.replace(_HEADER_EXAMPLE, '{{"input": "hello world"}}')
#: A concrete call in the description: shown only the JSON schema in `Tool Args`, the
#: 0.5B model copies the schema's {"title": ..., "type": ...} as the argument's value.
TOOL_DESCRIPTION = (
    'Multiply the two whole numbers in an expression and return the product. '
    'Example Action Input: {"input": "2 * 3"}'
)


@dataclass
class ReActRun:
    answer: str
    tool_calls: list[tuple[str, dict]] = field(default_factory=list)
    tool_outputs: list[str] = field(default_factory=list)
    executed: list[str] = field(default_factory=list)


def make_llm() -> SpecFuseLLM:
    return SpecFuseLLM.local(REACT_MODELS, temperature=0.0, max_tokens=96, seed=7, stop=REACT_STOP)


async def run_agent(llm: SpecFuseLLM | None = None, question: str = "What is 123 times 456?") -> ReActRun:
    run = ReActRun(answer="")

    def calculate(input: str) -> str:
        """Multiply the two whole numbers in an expression such as "2 * 3" and return the product."""
        run.executed.append(input)  # proof that the tool really ran, with this argument
        numbers = [int(n) for n in re.findall(r"\d+", input)]
        if len(numbers) != 2:
            return "Error: give exactly two whole numbers, such as 2 * 3"
        return str(numbers[0] * numbers[1])

    tool = FunctionTool.from_defaults(fn=calculate, description=TOOL_DESCRIPTION)
    formatter = ReActChatFormatter(system_header=REACT_HEADER)
    agent = ReActAgent(tools=[tool], llm=llm or make_llm(), formatter=formatter)
    handler = agent.run(user_msg=question, max_iterations=4)
    async for event in handler.stream_events():
        if isinstance(event, ToolCallResult):
            run.tool_outputs.append(str(event.tool_output.content))
        elif isinstance(event, ToolCall):
            run.tool_calls.append((event.tool_name, dict(event.tool_kwargs)))
    result = await handler
    run.answer = str(result.response.content or "")
    return run


def main(llm: SpecFuseLLM | None = None) -> ReActRun:
    run = asyncio.run(run_agent(llm))
    print("tool calls:", run.tool_calls)
    print("tool outputs:", run.tool_outputs)
    print("answer:", run.answer)
    return run


if __name__ == "__main__":
    main()

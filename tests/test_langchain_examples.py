"""The LangChain examples run offline and do what they say."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from langchain_core.messages import AIMessage, ToolMessage

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_chain_example_answers_through_the_fusion() -> None:
    example = _load("langchain_chain")
    llm = example.make_llm()
    answer = example.main(llm)
    assert isinstance(answer, str) and answer.strip()
    # The chain's answer is exactly what the fused model says for that prompt.
    prompt = example.PROMPT.invoke({"question": example.QUESTION})
    assert llm.invoke(prompt).content == answer


def test_rag_example_retrieves_the_right_document_and_answers_from_it() -> None:
    example = _load("langchain_rag")
    out = example.main()
    assert [d.id for d in out["retrieved"]] == ["festival"]
    assert "june" in out["answer"].lower()


def test_agent_example_calls_the_tool() -> None:
    example = _load("langchain_agent")
    example.CALLS.clear()
    state = example.main()
    messages = state["messages"]
    # The tool really ran, once (the example's limit), for Paris.
    assert [c.lower() for c in example.CALLS] == ["paris"]
    calls = [m for m in messages if isinstance(m, AIMessage) and m.tool_calls]
    assert calls[0].tool_calls[0]["name"] == "get_weather"
    results = [m for m in messages if isinstance(m, ToolMessage)]
    assert results and "sunny" in results[0].text

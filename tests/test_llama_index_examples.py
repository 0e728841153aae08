"""The LlamaIndex examples, run for real: offline embeddings, real small models.

Each test imports an example's main function and checks what it claims: the
right document was retrieved, the tool really ran, the object validates.
"""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from llama_index.core import Settings

from llama_index_specfuse import LocalMiniLMEmbedding, SpecFuseLLM

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def rag_llm() -> SpecFuseLLM:
    """One LLM for the retrieval and structured examples: its engine (and models) load once."""
    return _example("llama_index_query_engine").make_llm()


@pytest.fixture(autouse=True)
def _restore_settings() -> Iterator[None]:
    # Examples set the global Settings; later tests must not inherit them.
    saved = (Settings._llm, Settings._embed_model)
    yield
    Settings._llm, Settings._embed_model = saved


def test_offline_embedding_is_normalised_and_semantic() -> None:
    embed = LocalMiniLMEmbedding()
    festival, mountain = embed.get_text_embedding_batch(
        ["A summer festival in town.", "A very high mountain."]
    )
    query = embed.get_query_embedding("When is the festival?")
    assert len(query) == 384
    assert math.isclose(sum(x * x for x in query), 1.0, rel_tol=1e-4)

    def dot(a: list[float], b: list[float]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert dot(query, festival) > dot(query, mountain)


def test_query_engine_retrieves_the_right_document(rag_llm: SpecFuseLLM) -> None:
    example = _example("llama_index_query_engine")
    response = example.main(rag_llm)
    assert response.source_nodes[0].node.ref_doc_id == "festival"
    assert Settings.llm is rag_llm  # usable as the global Settings.llm
    assert str(response).strip()


def test_chat_engine_streams_and_keeps_the_conversation(rag_llm: SpecFuseLLM) -> None:
    turns = _example("llama_index_chat_engine").main(rag_llm)
    first, second = turns
    assert first.sources == ["mountain"]
    # "How high is it?" only finds the mountain if the chat history was condensed into the query.
    assert second.sources == ["mountain"]
    # A gated round hands over up to gate_tokens (32) at once, so this 32-token answer may
    # arrive in one piece; the pieces always add up to the answer.
    assert len(first.deltas) >= 1 and "".join(first.deltas) == first.answer
    assert first.answer.strip() and second.answer.strip()


def test_agent_really_calls_the_tool() -> None:
    run = _example("llama_index_agent").main()
    assert run.executed == [(123, 456)]  # the Python function itself ran, with the right arguments
    assert run.tool_calls == [("multiply", {"a": 123, "b": 456})]
    assert run.tool_outputs == ["56088"]
    assert run.answer == "56088"


def test_react_agent_calls_the_tool_and_answers_with_its_result() -> None:
    run = _example("llama_index_react_agent").main()
    # The Python function itself ran once, on an expression with the question's two numbers.
    assert len(run.executed) == 1
    assert [int(n) for n in re.findall(r"\d+", run.executed[0])] == [123, 456]
    assert run.tool_calls == [("calculate", {"input": run.executed[0]})]
    assert run.tool_outputs == ["56088"]
    # No return_direct here: the final response is the model's own Answer after the Observation.
    assert "56088" in run.answer


def test_structured_predict_validates(rag_llm: SpecFuseLLM) -> None:
    example = _example("llama_index_structured")
    city = example.main(rag_llm)
    assert isinstance(city, example.City)
    # The fused answer may use the city's English or Portuguese name (both are right;
    # without self-votes the pair writes "Lisboa").
    assert city.name.lower() in {"lisbon", "lisboa"} and city.country.lower() == "portugal"


def test_schema_echoed_arguments_are_unwrapped_but_real_ones_kept() -> None:
    from specfuse.tool_calls import unwrap_schema_echo

    params: dict[str, Any] = {"properties": {"name": {}, "country": {}}}
    assert unwrap_schema_echo({"properties": {"name": "Lisbon"}}, params) == {"name": "Lisbon"}
    real = {"properties": {"properties": {}}}
    assert unwrap_schema_echo({"properties": {"k": 1}}, real) == {"properties": {"k": 1}}

"""Structured output never fails silently, and nested objects come back as objects (issue 23).

Real local models (the offline store), real LangChain and LlamaIndex classes.
"""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.exceptions import OutputParserException
from pydantic import BaseModel, Field

from specfuse.tool_calls import placeholder, tool_choice_instruction

TEXT = "Extract the person and their address: Ana Silva lives in Lisboa, Portugal."


class Address(BaseModel):
    """Where a person lives."""

    city: str = Field(description="The city.")
    country: str = Field(description="The country.")


class Person(BaseModel):
    """A person and their address."""

    name: str = Field(description="The person's name.")
    address: Address


def test_the_forced_call_example_spells_out_nested_objects() -> None:
    from llama_index.core.program.function_program import get_function_tool

    spec = get_function_tool(Person).metadata.to_openai_tool()
    instruction = tool_choice_instruction("Person", [spec])
    assert instruction is not None
    assert '"address": {"city": "...", "country": "..."}' in instruction
    # References inside lists and optional fields too; an unknown reference stays a placeholder.
    defs = {"A": {"type": "object", "properties": {"n": {"type": "integer"}}}}
    assert placeholder({"type": "array", "items": {"$ref": "#/$defs/A"}}, defs) == [{"n": 1}]
    assert placeholder({"anyOf": [{"type": "null"}, {"$ref": "#/$defs/A"}]}, defs) == {"n": 1}
    assert placeholder({"$ref": "#/$defs/Missing"}, defs) == "..."


def test_llama_index_fills_a_nested_model() -> None:
    from llama_index_specfuse import SpecFuseLLM

    # The stronger member first: it leads gated fusion (the default).
    llm = SpecFuseLLM.local(("qwen2.5-coder-0.5b", "smollm2-135m"), temperature=0.0, max_tokens=64, seed=7)
    person = llm.as_structured_llm(Person).complete(TEXT).raw
    assert isinstance(person, Person) and isinstance(person.address, Address)
    assert person.address.country == "Portugal" and "Lisb" in person.address.city


@pytest.fixture(scope="module")
def cut_short() -> Any:
    """An answer cut after two tokens holds no complete call."""
    from langchain_specfuse import ChatSpecFuse

    return ChatSpecFuse.local(["smollm2-135m"], temperature=0.0, max_tokens=2)


def test_langchain_function_calling_without_a_call_is_a_parsing_error(cut_short: Any) -> None:
    out = cut_short.with_structured_output(Person, include_raw=True).invoke(TEXT)
    assert out["parsed"] is None
    assert isinstance(out["parsing_error"], OutputParserException)
    assert "no valid call of the tool 'Person'" in str(out["parsing_error"])
    with pytest.raises(OutputParserException, match="no valid call"):
        cut_short.with_structured_output(Person).invoke(TEXT)
    schema = Person.model_json_schema()
    with pytest.raises(OutputParserException, match="no valid call"):
        cut_short.with_structured_output(schema).invoke(TEXT)

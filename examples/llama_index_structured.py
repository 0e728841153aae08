"""Structured output: `structured_predict` fills a pydantic object from a specfuse ensemble.

Run: .venv/bin/python examples/llama_index_structured.py

SpecFuseLLM is a function-calling LLM, so LlamaIndex offers the pydantic class
as a tool and validates the arguments of the call the members write.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llama_index.core.prompts import PromptTemplate
from pydantic import BaseModel, Field

from llama_index_specfuse import SpecFuseLLM

STRUCTURED_MODELS = ("qwen2.5-coder-0.5b", "smollm2-135m")


class City(BaseModel):
    """A city and the country it is in."""

    name: str = Field(description="The city's name.")
    country: str = Field(description="The country the city is in.")


PROMPT = PromptTemplate("Extract the city and its country from this text: {text}")
TEXT = "Last summer we took the train to Lisbon, the sunny capital of Portugal."


def make_llm() -> SpecFuseLLM:
    return SpecFuseLLM.local(STRUCTURED_MODELS, temperature=0.0, max_tokens=48, seed=7)


def main(llm: SpecFuseLLM | None = None, text: str = TEXT) -> City:
    city = (llm or make_llm()).structured_predict(City, PROMPT, text=text)
    print("text:", text)
    print("structured:", repr(city))
    return city


if __name__ == "__main__":
    main()

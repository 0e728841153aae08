"""A LangChain chain over a fused ensemble: prompt | ChatSpecFuse | StrOutputParser.

Run: .venv/bin/python examples/langchain_chain.py

Offline: two small local models (different tokenizers and templates) answer
as one, segment by segment. The fusion summary shows who won which rounds.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from langchain_specfuse import ChatSpecFuse

PROMPT = ChatPromptTemplate.from_messages(
    [
        ("system", "You are a concise assistant. Answer in one sentence."),
        ("human", "{question}"),
    ]
)

QUESTION = "What is the capital of France?"


def make_llm() -> ChatSpecFuse:
    return ChatSpecFuse.local(["smollm2-135m", "gemma3-270m"], temperature=0.0, max_tokens=32, seed=7)


def main(llm: ChatSpecFuse | None = None, question: str = QUESTION) -> str:
    chain = PROMPT | (llm or make_llm()) | StrOutputParser()
    answer = chain.invoke({"question": question})
    print("question:", question)
    print("answer:", answer.strip())
    return answer


if __name__ == "__main__":
    main()

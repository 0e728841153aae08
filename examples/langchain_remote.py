"""A LangChain chain over members on GPU servers (vLLM, TGI, SGLang), fused as one chat model.

Your servers (any of the three; keys from VLLM_API_KEY, HF_TOKEN, SGLANG_API_KEY):
    python examples/langchain_remote.py --vllm http://gpu-1:8000 --vllm-model Qwen/Qwen2.5-7B-Instruct \\
        --tgi http://gpu-2:8080 --tgi-model meta-llama/Llama-3.1-8B-Instruct
No servers: `python examples/langchain_remote.py` starts three `specfuse serve` imitations on
loopback (that needs the full install, scripts/setup.sh; your servers need only
`pip install "specfuse[langchain]"`).
"""

from __future__ import annotations

from typing import Any

from _remote import cli
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate

from langchain_specfuse import ChatSpecFuse

QUESTION = "Why do leaves change colour in autumn?"


def main(members: list[dict[str, Any]], question: str = QUESTION, max_tokens: int = 48) -> dict[str, Any]:
    chat = ChatSpecFuse(members=members, temperature=0, max_tokens=max_tokens)
    prompt = ChatPromptTemplate.from_messages(
        [("system", "You are a concise assistant."), ("human", "{question}")]
    )
    chain = prompt | chat | StrOutputParser()
    answer = chain.invoke({"question": question})
    # The same fused model, once more, with its trace: which member won which rounds.
    message = chat.invoke(prompt.invoke({"question": question}))
    trace = message.response_metadata["specfuse_trace"]
    print("answer:", answer.strip())
    for name, member in trace["summary"]["members"].items():
        print(f"{name}: {member['wins']} rounds won, {member['calls']} calls")
    return {"answer": answer, "message": message, "trace": trace}


if __name__ == "__main__":
    cli(main, __doc__)

"""LangChain adapters for specfuse: `ChatSpecFuse` (chat model) and `SpecFuseLLM` (completion model).

>>> from langchain_specfuse import ChatSpecFuse
>>> llm = ChatSpecFuse.local(["smollm2-135m", "gemma3-270m"], max_tokens=32)
>>> llm.invoke("Name a primary colour.").content
"""

from langchain_specfuse.chat_models import ChatSpecFuse
from langchain_specfuse.llms import SpecFuseLLM

__all__ = ["ChatSpecFuse", "SpecFuseLLM"]

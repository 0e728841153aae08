"""LlamaIndex integration of specfuse: a fused ensemble as a function-calling LLM."""

from llama_index_specfuse.base import SpecFuseLLM, to_specfuse_messages
from llama_index_specfuse.embeddings import LocalMiniLMEmbedding, minilm_path

__all__ = ["LocalMiniLMEmbedding", "SpecFuseLLM", "minilm_path", "to_specfuse_messages"]

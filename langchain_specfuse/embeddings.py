"""Offline sentence embeddings for LangChain: the core's local all-MiniLM-L6-v2.

A RAG chain needs an embedding model, and the usual ones call a hosted API;
this adapts :class:`specfuse.embeddings.MiniLMEncoder` (no hub, no
sentence-transformers) to LangChain's `Embeddings`.
"""

from __future__ import annotations

from pathlib import Path

from langchain_core.embeddings import Embeddings

from specfuse.embeddings import MiniLMEncoder, minilm_path

__all__ = ["LocalMiniLMEmbeddings", "minilm_path"]


class LocalMiniLMEmbeddings(Embeddings):
    """all-MiniLM-L6-v2 (384 dimensions, unit-length vectors) from a local directory."""

    def __init__(self, model_dir: str | Path | None = None, max_length: int = 256) -> None:
        self._encoder = MiniLMEncoder(model_dir, max_length)
        self.model_dir = self._encoder.model_dir
        self.max_length = max_length

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self._encoder.encode(list(texts))

    def embed_query(self, text: str) -> list[float]:
        return self._encoder.encode([text])[0]

"""Offline sentence embeddings for LlamaIndex: the core's local all-MiniLM-L6-v2.

LlamaIndex falls back to OpenAI embeddings when none are configured, which
fails offline; this adapts :class:`specfuse.embeddings.MiniLMEncoder` (no hub,
no sentence-transformers) to LlamaIndex's `BaseEmbedding`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from llama_index.core.bridge.pydantic import Field, PrivateAttr

from specfuse.embeddings import MiniLMEncoder, minilm_path

__all__ = ["LocalMiniLMEmbedding", "minilm_path"]


class LocalMiniLMEmbedding(BaseEmbedding):
    """all-MiniLM-L6-v2 (384 dimensions) from a local directory, with transformers."""

    model_dir: str = Field(default_factory=lambda: str(minilm_path()))
    max_length: int = Field(default=256, description="Tokens per text; the model was trained on 256.")

    _encoder: MiniLMEncoder = PrivateAttr()

    def __init__(self, **data: Any) -> None:
        data.setdefault("model_name", "sentence-transformers/all-MiniLM-L6-v2")
        super().__init__(**data)
        self._encoder = MiniLMEncoder(self.model_dir, self.max_length)

    @classmethod
    def class_name(cls) -> str:
        return "LocalMiniLMEmbedding"

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._encoder.encode([query])[0]

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._encoder.encode([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._encoder.encode(texts)

    # Torch work runs in a thread so async callers keep their event loop free.
    async def _aget_query_embedding(self, query: str) -> Embedding:
        return (await asyncio.to_thread(self._encoder.encode, [query]))[0]

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return (await asyncio.to_thread(self._encoder.encode, [text]))[0]

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return await asyncio.to_thread(self._encoder.encode, texts)

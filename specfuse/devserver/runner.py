"""The imitation's model: one embedded model with a prefix KV cache, and its decoding.

Like the real servers, it tokenizes inputs with the tokenizer's special
tokens added (a BOS where the model wants one). A generated token's text is
what it adds to the decoded answer ("" while a character is incomplete), as TGI
and vLLM report it; prompt tokens and SGLang's texts are each token decoded on
its own (a partial UTF-8 character comes back as U+FFFD).
Greedy decoding (`do_sample: false` / `temperature: 0`) is deterministic.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass
class GenToken:
    id: int
    text: str
    logprob: float
    special: bool


@dataclass
class Generation:
    tokens: list[GenToken]
    text: str
    #: "length" | "eos" | "stop"
    finish: str
    matched_stop: str | None = None

    @property
    def text_before_stop(self) -> str:
        """The text cut where the matched stop string begins: vLLM and SGLang return it
        so (the TGI routes keep the stop string in `generated_text`)."""
        if self.matched_stop is None:
            return self.text
        return self.text[: self.text.find(self.matched_stop)]


class Runner:
    """One loaded model with a prefix KV cache; every forward pass holds the model lock.

    The cache is the local backend's: SGLang's `logprob_start_len` and plain
    repeated prompts then reuse the shared prefix, as a real server's prefix
    cache would.
    """

    def __init__(self, model: str, dtype: str = "float32") -> None:
        from specfuse.backends.local import _KVCache, load_model
        from specfuse.models import resolve_model_path

        self.name = model
        self.path: Path = resolve_model_path(model)
        self.loaded = load_model(self.path, dtype)
        self.tokenizer = self.loaded.tokenizer
        self._kv = _KVCache()
        self._special_ids = set(self.tokenizer.all_special_ids)

    @property
    def context_window(self) -> int:
        return int(self.loaded.context_window or 8192)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def token_text(self, token_id: int) -> str:
        """The text of one token decoded alone, as TGI and vLLM report it."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def offsets(self, text: str) -> list[tuple[int, int, int]]:
        enc = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        return [
            (i, int(s), int(e)) for i, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
        ]

    # -- forward passes (call from a worker thread) -------------------------------

    def prompt_logprobs(self, ids: list[int], start: int = 0) -> list[float | None]:
        """log p(ids[j] | ids[:j]) for j >= start; position 0 has none (None)."""
        import torch

        start = max(0, min(start, len(ids)))
        with self.loaded.lock, torch.inference_mode():
            reuse = min(self._kv.reusable_prefix(ids), max(start - 1, 0), len(ids) - 1)
            reuse = max(reuse, 0)
            cache = self._kv.view(reuse)
            out = self.loaded.model(input_ids=torch.tensor([ids[reuse:]]), cache=cache, use_cache=True)
            logprobs = torch.log_softmax(out.logits[0].float(), dim=-1)
            self._kv.keep(cache, ids)
        result: list[float | None] = []
        for j in range(start, len(ids)):
            if j == 0:
                result.append(None)
            else:
                result.append(float(logprobs[j - 1 - reuse, ids[j]]))
        return result

    def generate(
        self,
        ids: list[int],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        stop: Sequence[str],
    ) -> Generation:
        """Decode like specfuse's local backend does, so greedy results match it token for token."""
        import torch

        from specfuse.backends.base import Sampling
        from specfuse.backends.local import _first_stop, _sample

        sampling = Sampling(temperature=temperature, top_p=top_p, seed=seed)
        generator = torch.Generator().manual_seed(seed if seed is not None else 0)
        out: list[GenToken] = []
        text = ""
        finish = "length"
        matched: str | None = None
        if max_new_tokens <= 0:
            return Generation([], "", "length")
        with self.loaded.lock, torch.inference_mode():
            reuse = min(self._kv.reusable_prefix(ids), len(ids) - 1)
            cache = self._kv.view(reuse)
            logits = (
                self.loaded.model(input_ids=torch.tensor([ids[reuse:]]), cache=cache, use_cache=True)
                .logits[0, -1]
                .float()
            )
            fed = list(ids)
            generated: list[int] = []
            while len(generated) < max_new_tokens:
                token, logprob = _sample(logits, sampling, generator)
                if token in self.loaded.stop_token_ids:
                    out.append(GenToken(token, self.token_text(token), logprob, True))
                    finish = "eos"
                    break
                generated.append(token)
                spelled = sum(len(t.text) for t in out)
                text = self.tokenizer.decode(generated, skip_special_tokens=False)
                # Each token's text as TGI and vLLM report it: what it adds to the decoded
                # text, "" while it ends inside a character (TGI:
                # server/text_generation_server/models/model.py, Model.decode_token; vLLM:
                # vllm/v1/engine/logprobs.py, LogprobsProcessor._verify_tokens).
                piece = "" if text.endswith("\ufffd") else text[spelled:]
                out.append(GenToken(token, piece, logprob, token in self._special_ids))
                hit = _first_stop(text, stop)
                if hit is not None:
                    finish = "stop"
                    matched = next(s for s in stop if text.find(s) == hit)
                    break
                if len(generated) >= max_new_tokens:
                    break
                logits = (
                    self.loaded.model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True)
                    .logits[0, -1]
                    .float()
                )
                fed.append(token)
            self._kv.keep(cache, fed)
        return Generation(out, text, finish, matched)

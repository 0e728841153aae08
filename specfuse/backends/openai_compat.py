"""vLLM (and other OpenAI-compatible completion servers) over `/v1/completions`.

Scoring asks for the prompt's own log-probs: `echo: true, logprobs: 1,
max_tokens: 0` returns them in `choices[0].logprobs` (first entry null).
Servers that cannot (they return no prompt log-probs) report
`can_score=False`, so such a member can draft but the engine refuses it as a
verifier with a clear message.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from specfuse.backends._http import RemoteError
from specfuse.backends._remote import RemoteBackend, cut_at_stop
from specfuse.backends.base import BackendInfo, CandidateScore, Draft, FinishReason, Sampling
from specfuse.errors import CapabilityError


class VLLMBackend(RemoteBackend):
    """A vLLM server (one or more replica URLs), OpenAI completions API."""

    protocol = "vllm"

    def _body(self, prompt: str, **fields: Any) -> dict[str, Any]:
        return {"model": self._served_model, "prompt": prompt, **fields}

    @property
    def _served_model(self) -> str:
        return self._info.model_id if self._info is not None else self.model

    async def info(self) -> BackendInfo:
        if self._info is not None:
            return self._info
        data = await self.call(
            "GET /v1/models", lambda url: self._post(url, "/v1/models", None, method="GET")
        )
        models = data.get("data") or []
        entry = next((m for m in models if m.get("id") == self.model), models[0] if models else {})
        model_id = str(entry.get("id") or self.model)
        # Probe: can this server return prompt log-probs?
        probe = await self.call(
            "probe POST /v1/completions",
            lambda url: self._post(
                url,
                "/v1/completions",
                {"model": model_id, "prompt": "Hello world", "max_tokens": 1, "echo": True, "logprobs": 1},
            ),
        )
        lp = (probe.get("choices") or [{}])[0].get("logprobs") or {}
        can_score = any(v is not None for v in (lp.get("token_logprobs") or [])[1:])
        extras = await asyncio.to_thread(self.text_extras)
        window = entry.get("max_model_len")
        self._info = BackendInfo(
            model_id=model_id,
            context_window=int(window) if window else None,
            can_score=can_score,
            concurrent_calls=True,
            max_stop_sequences=None,
            extra={**extras, "replicas": len(self.urls)},
        )
        return self._info

    async def draft(
        self, context: str, *, max_tokens: int, sampling: Sampling, stop: Sequence[str] = ()
    ) -> Draft:
        body = self._body(
            context,
            max_tokens=max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p if sampling.temperature > 0 else 1.0,
            logprobs=1,
        )
        if stop:
            body["stop"] = list(stop)
        if sampling.seed is not None and sampling.temperature > 0:
            body["seed"] = sampling.seed
        data = await self.call("POST /v1/completions", lambda url: self._post(url, "/v1/completions", body))
        choice = data["choices"][0]
        text, hit = cut_at_stop(choice.get("text") or "", stop)
        lps = [x for x in ((choice.get("logprobs") or {}).get("token_logprobs") or []) if x is not None]
        finish: FinishReason
        if hit or (choice.get("stop_reason") is not None and choice.get("finish_reason") == "stop"):
            finish = "stop"
        elif choice.get("finish_reason") == "stop":
            finish = "eos"
        else:
            finish = "length"
        count = len(lps) if lps else int((data.get("usage") or {}).get("completion_tokens") or 0)
        return Draft(
            text=text.rstrip("\ufffd"), token_count=count, finish_reason=finish, token_logprobs=tuple(lps)
        )

    async def score(self, context: str, candidates: Sequence[str]) -> list[CandidateScore]:
        return await self.gather_calls([self._score_one(context, c) for c in candidates])

    async def _score_one(self, context: str, candidate: str) -> CandidateScore:
        full = context + candidate
        body = self._body(full, max_tokens=0, echo=True, logprobs=1, temperature=0.0)
        # With a local tokenizer to align on, ask for token ids instead of per-token texts
        # ("token_id:N"; vLLM entrypoints/openai/protocol.py, return_tokens_as_token_ids).
        by_ids = await asyncio.to_thread(self.alignment_tokenizer) is not None
        if by_ids:
            body["return_tokens_as_token_ids"] = True
        data = await self.call(
            "POST /v1/completions (echo)", lambda url: self._post(url, "/v1/completions", body)
        )
        lp = data["choices"][0].get("logprobs") or {}
        tokens, values = lp.get("tokens") or [], lp.get("token_logprobs") or []
        if not tokens:
            raise CapabilityError(
                "the server returned no prompt log-probs for echo+logprobs",
                member=self.member_name,
                endpoint=self.endpoint,
            )
        ids = _token_ids(tokens) if by_ids else None
        return await self.pick_covering(full, len(context), tokens, values, ids)

    async def count_tokens(self, text: str) -> int:
        try:
            data = await self.call(
                "POST /tokenize", lambda url: self._post(url, "/tokenize", {"prompt": text})
            )
            return int(data.get("count") or len(data.get("tokens") or []))
        except RemoteError:
            body = self._body(text, max_tokens=1)
            data = await self.call(
                "POST /v1/completions", lambda url: self._post(url, "/v1/completions", body)
            )
            return int(data["usage"]["prompt_tokens"])


def _token_ids(tokens: Sequence[str]) -> list[int] | None:
    """Ids from vLLM's "token_id:N" strings, or None if the server ignored the request for them."""
    ids = []
    for token in tokens:
        head, _, number = str(token).partition("token_id:")
        if head or not number.isdigit():
            return None
        ids.append(int(number))
    return ids

"""Text Generation Inference and Hugging Face Inference Endpoints.

Every route is plain JSON through the shared HTTP stack (`_http.post_json`,
one error table for every protocol). Drafting and scoring post TGI's
`GenerateRequest` (`{"inputs", "parameters", "stream": false}`, see
tests/data/tgi-openapi-subset.json) to the endpoint URL itself, TGI's compat
route, as huggingface_hub's `text_generation()` does, so Inference Endpoints
that serve only that route work too; `/info`, `/tokenize` and
`/chat_tokenize` are the same plain calls. Scoring reads `prefill`
(`decoder_input_details: true`): TGI 3 returns it only when started with
`--enable-prefill-logprobs`, and otherwise an empty list without any error,
so the first `info()` probes one tiny scoring call and says exactly that.

Tokens: the member's api_key, or HF_TOKEN for Hugging Face hosted URLs only
(`_http.token_for`); no locally cached Hub token is ever attached.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from specfuse.backends._http import RemoteError
from specfuse.backends._remote import Attempts, RemoteBackend, count_from_offsets, cut_at_stop
from specfuse.backends.base import BackendInfo, CandidateScore, ChatToRender, Draft, FinishReason, Sampling
from specfuse.errors import BackendError, CapabilityError

_FINISH: dict[str, FinishReason] = {"length": "length", "eos_token": "eos", "stop_sequence": "stop"}


class TGIBackend(RemoteBackend):
    """A TGI server or HF Inference Endpoint (one or more replica URLs)."""

    protocol = "tgi"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._max_stops = 4

    async def _generate(self, url: str, prompt: str, **params: Any) -> dict[str, Any]:
        """One GenerateRequest to the URL itself; unset (None) parameters are left out.

        That is TGI's compat route, where an unset return_full_text means true for
        "text-generation" models (router/src/server.rs, compat_generate): the draft
        would start with the whole prompt, so it is always sent as false. The route
        answers a list of one GenerateResponse.
        """
        parameters = {
            k: v for k, v in {"details": True, "return_full_text": False, **params}.items() if v is not None
        }
        data = await self._post(url, "", {"inputs": prompt, "parameters": parameters, "stream": False})
        out = data[0] if isinstance(data, list) and data else data
        if not isinstance(out, dict) or "generated_text" not in out:
            raise BackendError(
                f"the server's answer is not a TGI GenerateResponse: {str(out)[:200]}",
                member=self.member_name,
                endpoint=self.endpoint,
            )
        return out

    # -- Backend ---------------------------------------------------------------------

    async def info(self) -> BackendInfo:
        if self._info is not None:
            return self._info
        data = await self.call("GET /info", lambda url: self._post(url, "/info", None, method="GET"))
        self._max_stops = int(data.get("max_stop_sequences") or 4)
        # The probe: a tiny scoring call. An empty prefill means the server drops prompt log-probs.
        out = await self.call(
            "probe POST /generate",
            lambda url: self._generate(url, "Hello world", max_new_tokens=1, decoder_input_details=True),
        )
        if not (out.get("details") or {}).get("prefill"):
            raise CapabilityError(
                "the TGI server returned no prompt log-probs (an empty `prefill`), so this member cannot "
                "verify: restart TGI with `--enable-prefill-logprobs` (env ENABLE_PREFILL_LOGPROBS=true), "
                "or give the member roles=['draft']",
                member=self.member_name,
                endpoint=self.endpoint,
            )
        extras = await asyncio.to_thread(self.text_extras)
        self._info = BackendInfo(
            model_id=str(data.get("model_id") or self.model),
            context_window=int(data["max_input_tokens"]) if data.get("max_input_tokens") else None,
            can_score=True,
            max_stop_sequences=self._max_stops,
            extra={
                **extras,
                "max_total_tokens": data.get("max_total_tokens"),
                "version": data.get("version"),
                "replicas": len(self.urls),
            },
        )
        return self._info

    async def draft(
        self, context: str, *, max_tokens: int, sampling: Sampling, stop: Sequence[str] = ()
    ) -> Draft:
        params: dict[str, Any] = {"max_new_tokens": max_tokens, "stop": list(stop)[: self._max_stops] or None}
        if sampling.temperature > 0:
            params["do_sample"] = True
            params["temperature"] = sampling.temperature
            if 0 < sampling.top_p < 1:
                params["top_p"] = sampling.top_p
            if sampling.seed:
                params["seed"] = sampling.seed
        tally = Attempts()
        out = await self.call("POST /generate", lambda url: self._generate(url, context, **params), tally)
        details = out.get("details") or {}
        text, hit = cut_at_stop(out.get("generated_text") or "", stop)
        finish: FinishReason = "stop" if hit else _FINISH.get(str(details.get("finish_reason")), "length")
        tokens = [t for t in details.get("tokens") or [] if not t.get("special")]
        if finish == "stop" and not hit:
            text, _ = cut_at_stop(text, stop)
        return Draft(
            text=text.rstrip("\ufffd"),
            token_count=len(tokens),
            finish_reason=finish,
            token_logprobs=tuple(float(t["logprob"]) for t in tokens if t.get("logprob") is not None),
            # Each token's text as TGI streams it (router/src/lib.rs, Token.text).
            token_texts=tuple(str(t.get("text") or "") for t in tokens if t.get("logprob") is not None),
            attempts=tally.most,
        )

    async def score(self, context: str, candidates: Sequence[str]) -> list[CandidateScore]:
        with Attempts() as tally:
            scores = await self.gather_calls([self._score_one(context, c, tally) for c in candidates])
        return tally.on(scores)

    async def _score_one(self, context: str, candidate: str, tally: Attempts) -> CandidateScore:
        full = context + candidate
        out = await self.call(
            "POST /generate (prefill)",
            lambda url: self._generate(url, full, max_new_tokens=1, decoder_input_details=True),
            tally,
        )
        prefill = (out.get("details") or {}).get("prefill") or []
        if not prefill:
            raise CapabilityError(
                "the TGI server returned an empty `prefill`: restart it with `--enable-prefill-logprobs`",
                member=self.member_name,
                endpoint=self.endpoint,
            )
        return await self.pick_covering(
            full,
            len(context),
            [p.get("text") for p in prefill],
            [p.get("logprob") for p in prefill],
            [int(p["id"]) for p in prefill],
            tally,
        )

    async def count_from_server(
        self, full_text: str, context_length: int, ids: Sequence[int], tally: Attempts | None = None
    ) -> int | None:
        # TGI's /tokenize gives each token's start/stop in bytes of the input
        # (router/src/server.rs, encoding_to_tokens): exact, unlike per-token texts.
        tokens = await self.call(
            "POST /tokenize", lambda url: self._post(url, "/tokenize", {"inputs": full_text}), tally
        )
        if not isinstance(tokens, list) or not all(isinstance(t, dict) and "stop" in t for t in tokens):
            return None
        boundary = len(full_text[:context_length].encode("utf-8"))
        return count_from_offsets(
            [int(t["id"]) for t in tokens], [(int(t["start"]), int(t["stop"])) for t in tokens], boundary, ids
        )

    async def count_tokens(self, text: str) -> int:
        data = await self.call("POST /tokenize", lambda url: self._post(url, "/tokenize", {"inputs": text}))
        return len(data)

    async def server_chat_template(self, chat: ChatToRender) -> str | None:
        # /chat_tokenize always adds the generation prompt (`ChatTemplate::apply` in
        # router/src/infer/chat_template.rs renders with add_generation_prompt: true):
        # render_chat cuts it off when it is not wanted.
        payload: dict[str, Any] = {"model": "tgi", "messages": chat.messages}
        if chat.tools:
            payload["tools"] = chat.tools
        try:
            data = await self.call(
                "POST /chat_tokenize", lambda url: self._post(url, "/chat_tokenize", payload)
            )
        except RemoteError as exc:
            if exc.status in (400, 404, 422):  # no chat template (a base model) or no such route
                return None
            raise
        return str(data["templated_text"])

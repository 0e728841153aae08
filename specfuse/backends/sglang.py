"""SGLang's native `/generate` API.

Scoring sets `logprob_start_len` at the shared context (in tokens), so the
server reuses its cached prefix and computes log-probs only over the tail:
the cheapest verification of the three protocols. The context's token count
is learnt once per context with a `max_new_tokens: 0` call (which also warms
the prefix cache); a margin of a few tokens before it lets the tail alignment
see the token that straddles the context boundary. A verifier scores all of
its candidates in one request (`text` a list of prompts), each exactly as
it would score alone.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from specfuse.backends._http import RemoteError
from specfuse.backends._remote import Attempts, RemoteBackend, cut_at_stop
from specfuse.backends.base import (
    BackendInfo,
    CandidateScore,
    Draft,
    FinishReason,
    Sampling,
    ServerUsage,
    total_usage,
)
from specfuse.errors import BackendError

#: Tokens before the context boundary whose log-probs are also requested (boundary merges).
_MARGIN = 3


class SGLangBackend(RemoteBackend):
    """An SGLang server (one or more replica URLs), native API."""

    protocol = "sglang"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._context_tokens: OrderedDict[str, int] = OrderedDict()
        #: What learning a context's token count cost, not yet charged to a score call.
        self._uncharged: ServerUsage | None = None

    async def _generate(
        self, payload: dict[str, Any], what: str = "POST /generate", tally: Attempts | None = None
    ) -> Any:
        return await self.call(what, lambda url: self._post(url, "/generate", payload), tally)

    async def info(self) -> BackendInfo:
        if self._info is not None:
            return self._info
        data = await self.call(
            "GET /get_model_info", lambda url: self._post(url, "/get_model_info", None, method="GET")
        )
        try:
            server = await self.call(
                "GET /get_server_info", lambda url: self._post(url, "/get_server_info", None, method="GET")
            )
        except RemoteError as exc:
            if exc.status != 404:
                raise
            server = {}  # a build without the route: the window stays unknown (checked by the server)
        # The native /generate serves its one model whatever a request names, so the
        # name is checked here: model_path, and served_model_name (a ServerArgs field,
        # which defaults to model_path) where /get_server_info gives it.
        served = [str(n) for n in (data.get("model_path"), server.get("served_model_name")) if n]
        if served:
            self.refuse_unserved(list(dict.fromkeys(served)))
        probe = await self._generate(
            {
                "text": "Hello world",
                "sampling_params": {"max_new_tokens": 0},
                "return_logprob": True,
                "logprob_start_len": 0,
            },
            "probe POST /generate",
        )
        lps = (probe.get("meta_info") or {}).get("input_token_logprobs") or []
        extras = await asyncio.to_thread(self.text_extras)
        window = context_window(server)
        self._info = BackendInfo(
            model_id=str(data.get("model_path") or self.model),
            context_window=int(window) if window else None,
            can_score=any(row and row[0] is not None for row in lps),
            extra={**extras, "replicas": len(self.urls), "version": server.get("version")},
        )
        return self._info

    async def draft(
        self, context: str, *, max_tokens: int, sampling: Sampling, stop: Sequence[str] = ()
    ) -> Draft:
        params: dict[str, Any] = {"max_new_tokens": max_tokens, "temperature": sampling.temperature}
        if sampling.temperature > 0:
            params["top_p"] = sampling.top_p
            if sampling.seed is not None:
                # SGLang's name; an unknown field such as `seed` fails the whole request
                # (python/sglang/srt/sampling/sampling_params.py, SamplingParams).
                params["sampling_seed"] = sampling.seed
        if stop:
            params["stop"] = list(stop)
        tally = Attempts()
        data = await self._generate(
            # Each token's text too, so the gate can cut the draft at a token
            # (python/sglang/srt/managers/tokenizer_manager.py, detokenize_logprob_tokens).
            {
                "text": context,
                "sampling_params": params,
                "return_logprob": True,
                "return_text_in_logprobs": True,
            },
            tally=tally,
        )
        meta = data.get("meta_info") or {}
        text, hit = cut_at_stop(data.get("text") or "", stop)
        reason = meta.get("finish_reason") or {}
        finish: FinishReason
        if hit or (reason.get("type") == "stop" and isinstance(reason.get("matched"), str)):
            finish = "stop"
        elif reason.get("type") == "stop":
            finish = "eos"
        else:
            finish = "length"
        out = meta.get("output_token_logprobs") or []
        count = int(meta.get("completion_tokens") or len(out)) - (1 if finish == "eos" else 0)
        return Draft(
            text=text.rstrip("\ufffd"),
            token_count=max(0, count),
            finish_reason=finish,
            token_logprobs=tuple(float(r[0]) for r in out if r and r[0] is not None),
            token_texts=tuple(str(r[2] or "") for r in out if r and r[0] is not None and len(r) > 2),
            usage=_usage(meta),
            attempts=tally.most,
        )

    async def _count_context(self, context: str, tally: Attempts | None = None) -> int:
        if context in self._context_tokens:
            self._context_tokens.move_to_end(context)
            return self._context_tokens[context]
        data = await self._generate({"text": context, "sampling_params": {"max_new_tokens": 0}}, tally=tally)
        meta = data.get("meta_info") or {}
        n = int(meta.get("prompt_tokens") or 0)
        self._uncharged = _usage(meta)
        self._context_tokens[context] = n
        while len(self._context_tokens) > 16:
            self._context_tokens.popitem(last=False)
        return n

    async def score(self, context: str, candidates: Sequence[str]) -> list[CandidateScore]:
        if not candidates:
            return []
        with Attempts() as tally:
            start = max(0, await self._count_context(context, tally) - _MARGIN)
            scores = await self._score_batch(context, candidates, start, tally)
        warm, self._uncharged = self._uncharged, None
        if warm is not None and scores[0].usage is not None:
            scores[0] = CandidateScore(scores[0].token_logprobs, usage=warm + scores[0].usage)
        return tally.on(scores)

    async def _score_batch(
        self, context: str, candidates: Sequence[str], start: int, tally: Attempts
    ) -> list[CandidateScore]:
        """All of a verifier's candidates in one request.

        SGLang's /generate takes a list of prompts in `text` and answers a list of
        results in the same order; `logprob_start_len` as one int applies to every
        prompt (python/sglang/srt/managers/io_struct.py, GenerateReqInput,
        _normalize_logprob_params). One candidate goes as a plain string.
        """
        fulls = [context + c for c in candidates]
        data = await self._generate(
            {
                "text": fulls[0] if len(fulls) == 1 else fulls,
                "sampling_params": {"max_new_tokens": 0},
                "return_logprob": True,
                "logprob_start_len": start,
                "return_text_in_logprobs": True,
            },
            "POST /generate (logprobs)",
            tally,
        )
        results = [data] if len(fulls) == 1 and isinstance(data, dict) else data
        if not isinstance(results, list) or len(results) != len(fulls):
            got = len(results) if isinstance(results, list) else type(results).__name__
            raise BackendError(
                f"the server answered {got} results for {len(fulls)} prompts",
                member=self.member_name,
                endpoint=self.endpoint,
            )
        picks: list[CandidateScore] = []
        usages: list[ServerUsage | None] = []
        for full, result in zip(fulls, results, strict=True):
            meta = (result.get("meta_info") if isinstance(result, dict) else None) or {}
            rows = meta.get("input_token_logprobs") or []
            picks.append(
                await self.pick_covering(
                    full,
                    len(context),
                    [r[2] for r in rows],
                    [r[0] for r in rows],
                    [int(r[1]) for r in rows],
                    tally,
                )
            )
            usages.append(_usage(meta))
        # One request: its usage (every prompt's tokens, summed) rides on the first candidate.
        total = total_usage(usages)
        scores = []
        for i, picked in enumerate(picks):
            usage = None
            if total is not None:
                usage = ServerUsage(
                    total.prompt_tokens if i == 0 else 0,
                    (total.cached_tokens if i == 0 else 0) if total.cached_tokens is not None else None,
                    requests=1 if i == 0 else 0,
                    path="logprob_start_len",
                )
            scores.append(CandidateScore(picked.token_logprobs, usage=usage))
        return scores

    async def count_tokens(self, text: str) -> int:
        return await self._count_context(text)


def context_window(server_info: dict[str, Any]) -> int | None:
    """The longest input an SGLang server accepts, from GET /get_server_info.

    /get_model_info carries no length at all (model_path, tokenizer_path,
    is_generation). /get_server_info is the ServerArgs (whose `context_length`
    is null unless set on the command line) merged with the scheduler's info,
    whose `max_req_input_len` is the limit the server enforces; newer versions
    nest the scheduler's part in `internal_states` (python/sglang/srt/entrypoints/
    http_server.py, get_server_info).
    """
    states = server_info.get("internal_states")
    nested = states[0] if isinstance(states, list) and states and isinstance(states[0], dict) else {}
    for value in (
        server_info.get("max_req_input_len"),
        nested.get("max_req_input_len"),
        server_info.get("context_length"),
    ):
        if isinstance(value, int) and value > 0:
            return value
    return None


def _usage(meta: dict[str, Any]) -> ServerUsage | None:
    """The cost SGLang reports in `meta_info` (`prompt_tokens`, `cached_tokens`)."""
    if "prompt_tokens" not in meta:
        return None
    cached = meta.get("cached_tokens")
    return ServerUsage(int(meta["prompt_tokens"]), int(cached) if cached is not None else None)

"""vLLM's token-in route (`/inference/v1/generate`): scoring that reads the prefix cache.

vLLM started with `--enable-scale-out` and `--enable-prompt-tokens-details`
takes token ids on this route with `skip_reading_prefix_cache: false`, so
only the uncached tail of a verifier's prompt is computed. Log-probs at
cached positions are never computed (`valid_from`), so the answer's
cached-token count must stop before the candidate; `VLLMBackend._score_tokens`
scores by echo a candidate for which it does not.

This module holds the route's own machinery: the probe that decides whether
a server offers it (`TokenRoute._choose_scoring_path`), the request with its
retries of vLLM's unencodable answers, the server's token ids, and the
warning when the route answers strangers. `VLLMBackend` (backends/vllm.py)
mixes it in.
"""

from __future__ import annotations

import secrets
import warnings
from collections.abc import Sequence
from typing import Any

from specfuse.backends._http import RemoteError, post_json, public_url
from specfuse.backends._remote import Attempts, RemoteBackend

#: vLLM's token-in route, served when it is started with --enable-scale-out
#: (vllm/entrypoints/scale_out/token_in_token_out/api_router.py).
TOKENS_ROUTE = "/inference/v1/generate"
#: Prompt length of the probe that checks the token-in route reads the prefix cache
#: and reports it: long enough to fill a whole cache block on GPU (16) and CPU (128) builds.
_PROBE_TOKENS = 300
#: Tries of a token-in request whose answer vLLM could not encode (see `_post_tokens`).
#: A try reads the cache, so it computes only the candidate and the tail of the last
#: cached block; the echo that follows the last lost try re-reads the whole context.
#: Measured on vLLM 0.32 (CPU, block 128, 1000-token contexts, 161 scorings): 17% of
#: tries lost, 2 scorings lost 3 tries in a row. Each retry asks for one more top
#: log-prob per position, which changes the shape of the buffer the cached positions
#: are read from (`benchmarks/vllm_lost_tries.py`: 2026-12-06, 280 scorings; of 26 first
#: tries lost, identical retries failed all 8 tries in 4 of 14, widened retries answered
#: on the second try in 12 of 12).
_UNENCODABLE_TRIES = 5
#: Replicas already warned about an open token-in route (once per process and URL).
_WARNED_OPEN_ROUTE: set[str] = set()


def reported_cached_tokens(data: dict[str, Any]) -> int | None:
    """`usage.prompt_tokens_details.cached_tokens` of a vLLM response, None when absent.

    vLLM fills it only when started with --enable-prompt-tokens-details
    (vllm/entrypoints/openai/completion/serving.py, `completion_full_generator`).
    """
    details = (data.get("usage") or {}).get("prompt_tokens_details") or {}
    value = details.get("cached_tokens")
    return int(value) if value is not None else None


def valid_from(cached_tokens: int) -> int:
    """First prompt position whose log-prob the server computed, given its cached-token count.

    vLLM's V1 model runner (`GPUModelRunner._get_prompt_logprobs_dict` in
    vllm/v1/worker/gpu_model_runner.py, which the CPU runner inherits) fills
    prompt log-probs from `start_tok = num_computed_tokens + 1`: the log-prob of
    token i needs the logits at i - 1, and positions read from the cache have
    none. Earlier entries are uninitialised memory, not log-probs.
    """
    return cached_tokens + 1


def row_offset(rows: int, prompt_tokens: int, cached_tokens: int) -> int | None:
    """How far token i's entry sits before i in a token-in answer's `prompt_logprobs`.

    Both of vLLM 0.32's model runners answer `[None, row, ...]`, but not with the
    same rows. The V1 runner (the CPU build's) gives a row for every position, the
    cached ones uninitialised (`valid_from`): token i is entry i. The V2 runner (the
    default of GPU builds with Triton, `VllmConfig.use_v2_model_runner` in
    vllm/config/vllm.py) gives rows only for the positions it computed
    (`PromptLogprobsWorker.compute_prompt_logprobs` in
    vllm/v1/worker/gpu/sample/prompt_logprob.py), which `LogprobsProcessor`
    appends after the None: token i is entry i - cached. None for any other length.
    """
    if rows == prompt_tokens:
        return 0
    if rows == prompt_tokens - cached_tokens:
        return cached_tokens
    return None


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token id sequences.

    By slice comparisons, which run in C: contexts are thousands of tokens and
    the store of known log-probs compares each candidate with dozens of them.
    """
    a, b = tuple(a), tuple(b)  # a list never equals a tuple, so compare like with like
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while lo < hi:  # invariant: a[:lo] == b[:lo], a[:hi + 1] != b[:hi + 1]
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class TokenRoute(RemoteBackend):
    """The token-in route of a vLLM member (mixed into VLLMBackend)."""

    #: The member's `scoring` setting ("auto", "echo" or "tokens").
    scoring: str

    async def _choose_scoring_path(
        self, model_id: str, can_score: bool, window: int | None
    ) -> tuple[str, str]:
        """The cheapest correct scoring path this server offers, and why."""
        if self.scoring == "echo":
            return "echo", "scoring='echo' was asked for"
        if not can_score:
            return "echo", "the server returns no prompt log-probs"
        # A probe text no earlier request sent (a fresh number first), so the first request
        # reads nothing from the cache and is always answered: only a cached position's
        # prompt log-prob can be the NaN that vLLM cannot encode (see `_post_tokens`).
        fresh = f"{secrets.randbelow(10**12)} "
        try:
            ids = await self._token_ids(fresh + "The quick brown fox jumps over the lazy dog. " * 40)
        except RemoteError as exc:
            return "echo", f"the server has no usable /tokenize ({exc})"
        length = min(_PROBE_TOKENS, (window or _PROBE_TOKENS + 2) - 2)
        ids = (ids * (length // max(1, len(ids)) + 1))[:length]
        body = self._tokens_body(model_id, ids)

        async def twice(url: str) -> tuple[Any, Any]:
            # Both on one replica: the second must find the first in that server's cache.
            return (await self._post_tokens(url, body))[0], (await self._post_tokens(url, body))[0]

        try:
            first, second = await self.call(f"probe POST {TOKENS_ROUTE}", twice)
        except RemoteError as exc:
            if exc.status in (404, 405):
                return "echo", (
                    f"the server has no {TOKENS_ROUTE} (start vLLM with --enable-scale-out "
                    "and --enable-prompt-tokens-details for verification that reuses its prefix cache)"
                )
            return "echo", f"the token-in route failed its probe ({exc})"
        if first is None:
            return "echo", "vLLM could not encode the token-in route's answer to an uncached prompt"
        if second is None and reported_cached_tokens(first) is not None:
            # Computed, then unencodable on every try: non-finite values sit only at
            # positions read from the cache, so the cache was read.
            return "tokens", (
                "token ids in, prefix cache read (the probe's second answer held log-probs "
                "of cached positions that vLLM could not encode)"
            )
        cached = reported_cached_tokens(second if second is not None else first)
        if cached is None:
            return "echo", (
                "the server does not report cached prompt tokens, so cached positions cannot be told "
                "apart (start vLLM with --enable-prompt-tokens-details)"
            )
        if cached == 0:
            return "echo", "the server's prefix cache is off: token ids in would cost as much as echo"
        await self._warn_if_route_open(self._tokens_body(model_id, ids[:4]))
        return "tokens", f"token ids in, prefix cache read ({cached} of {len(ids)} probe tokens cached)"

    async def _warn_if_route_open(self, body: dict[str, Any]) -> None:
        """Warn once when the token-in route answers a request that carries no key.

        vLLM's --api-key guards only some path prefixes (0.32: /v1, /v2, /inference
        and /cohere, GUARDED_PREFIX in vllm/entrypoints/serve/middleware/authenticate.py;
        not every release guards /inference). A member with a key expects the server to
        refuse strangers, so an answer without one means anyone who reaches the server
        can run prompts on it.
        """
        if not self._api_key:
            return
        url = self.pool.pick()
        if url in _WARNED_OPEN_ROUTE:
            return
        try:
            await post_json(self.clients.get(), url + TOKENS_ROUTE, body, token=None, timeout=self.timeout)
        except Exception:  # refused (401), or any other failure: nothing proves the route is open
            return
        _WARNED_OPEN_ROUTE.add(url)
        warnings.warn(
            f"member {self.member_name!r}: {public_url(url)}{TOKENS_ROUTE} answered a request without "
            "the member's api_key, so it is open to anyone who can reach the server; keep the server "
            "on a private network or behind a proxy that requires the key (README, 'Launch your servers')",
            UserWarning,
            stacklevel=2,
        )

    async def _post_tokens(self, url: str, body: dict[str, Any]) -> tuple[dict[str, Any] | None, int]:
        """One request to the token-in route, and how many earlier tries of it failed.

        The prompt log-probs of cached positions are uninitialised memory (see
        `valid_from`); when that memory happens to hold a NaN or an infinity,
        vLLM cannot encode its JSON answer and returns HTTP 400 "Out of range
        float values are not JSON compliant" after computing it. An identical try
        often gets the same freed buffer back, garbage and all, so each retry asks
        for one more top log-prob per position (`prompt_logprobs` = the try's
        index): a buffer of another shape. The prompt token's own log-prob is in
        every answer whatever that width. When every try fails, the answer is None
        and the caller scores by echo, which reads no cached position.
        """
        for attempt in range(_UNENCODABLE_TRIES):
            params = {**body["sampling_params"], "prompt_logprobs": attempt}
            try:
                return await self._post(url, TOKENS_ROUTE, {**body, "sampling_params": params}), attempt
            except RemoteError as exc:
                if exc.status != 400 or "JSON compliant" not in str(exc):
                    raise
        return None, _UNENCODABLE_TRIES

    def _tokens_body(self, model_id: str, ids: list[int]) -> dict[str, Any]:
        # The GenerateRequest of vllm/entrypoints/scale_out/token_in_token_out/protocol.py.
        # SamplingParams refuses max_tokens 0 (vllm/sampling_params.py, _verify_args).
        return {
            "model": model_id,
            "token_ids": ids,
            "sampling_params": {
                "max_tokens": 1,
                "temperature": 0.0,
                "prompt_logprobs": 0,
                "skip_reading_prefix_cache": False,
                "detokenize": False,
            },
        }

    async def _token_ids(self, text: str, tally: Attempts | None = None) -> list[int]:
        """The server's own token ids of text, with no special tokens added (attempts to `tally`)."""
        data = await self.call(
            "POST /tokenize",
            lambda url: self._post(url, "/tokenize", {"prompt": text, "add_special_tokens": False}),
            tally,
        )
        return [int(t) for t in data.get("tokens") or []]

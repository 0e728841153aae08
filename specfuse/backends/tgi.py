"""Text Generation Inference and Hugging Face Inference Endpoints.

Drafting and scoring go through huggingface_hub's `AsyncInferenceClient`
(`text_generation(details=True, ...)`), which speaks TGI's protocol and maps
its error types; `/info`, `/tokenize` and `/chat_tokenize` are plain JSON
calls. Scoring reads `prefill` (`decoder_input_details=True`): TGI 3 returns
it only when started with `--enable-prefill-logprobs`, and otherwise an empty
list without any error, so the first `info()` probes one tiny scoring call
and says exactly that.

Tokens: the member's api_key, or HF_TOKEN for Hugging Face hosted URLs only.
huggingface_hub would otherwise attach a locally cached token to any URL, so
the client always gets an explicit Authorization header (or none at all).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from specfuse.backends._http import RemoteError, RetryableError, env_client_options, error_from_status
from specfuse.backends._remote import RemoteBackend, count_from_offsets, cut_at_stop
from specfuse.backends.base import BackendInfo, CandidateScore, Draft, FinishReason, Sampling
from specfuse.errors import CapabilityError, ConfigError

_FINISH: dict[str, FinishReason] = {"length": "length", "eos_token": "eos", "stop_sequence": "stop"}


class TGIBackend(RemoteBackend):
    """A TGI server or HF Inference Endpoint (one or more replica URLs)."""

    protocol = "tgi"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _httpx2()  # fail at configuration time, not on the first request
        self._hub_clients: dict[tuple[int, str], tuple[asyncio.AbstractEventLoop, Any]] = {}
        self._max_stops = 4

    # -- clients ---------------------------------------------------------------------

    def hub_client(self, url: str) -> Any:
        """An AsyncInferenceClient for one replica on the running loop, with explicit auth."""
        from huggingface_hub import AsyncInferenceClient

        loop = asyncio.get_running_loop()
        for key, (old, _) in list(self._hub_clients.items()):
            if old.is_closed():
                del self._hub_clients[key]
        key = (id(loop), url)
        entry = self._hub_clients.get(key)
        if entry is None or entry[0] is not loop:
            token = self.token(url)
            # A None header value removes huggingface_hub's implicit (cached) token.
            headers = {"authorization": f"Bearer {token}" if token else None}
            client = AsyncInferenceClient(base_url=url, token=token, timeout=self.timeout, headers=headers)
            client._async_client = _session(client)
            entry = (loop, client)
            self._hub_clients[key] = entry
        return entry[1]

    async def _generate(self, url: str, prompt: str, **params: Any) -> Any:
        client = self.hub_client(url)
        try:
            # text_generation() posts to the URL itself, TGI's compat route, where an unset
            # return_full_text means true for "text-generation" models (router/src/server.rs,
            # compat_generate): the draft would start with the whole prompt.
            return await client.text_generation(prompt, details=True, return_full_text=False, **params)
        except Exception as exc:
            raise _as_remote_error(exc) from None

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
        if not out.details or not out.details.prefill:
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
            concurrent_calls=True,
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
        out = await self.call("POST /generate", lambda url: self._generate(url, context, **params))
        details = out.details
        text, hit = cut_at_stop(out.generated_text, stop)
        finish: FinishReason = "stop" if hit else _FINISH.get(str(details.finish_reason), "length")
        tokens = [t for t in details.tokens if not t.special]
        if finish == "stop" and not hit:
            text, _ = cut_at_stop(text, stop)
        return Draft(
            text=text.rstrip("\ufffd"),
            token_count=len(tokens),
            finish_reason=finish,
            token_logprobs=tuple(float(t.logprob) for t in tokens if t.logprob is not None),
        )

    async def score(self, context: str, candidates: Sequence[str]) -> list[CandidateScore]:
        return await self.gather_calls([self._score_one(context, c) for c in candidates])

    async def _score_one(self, context: str, candidate: str) -> CandidateScore:
        full = context + candidate
        out = await self.call(
            "POST /generate (prefill)",
            lambda url: self._generate(url, full, max_new_tokens=1, decoder_input_details=True),
        )
        prefill = out.details.prefill if out.details else []
        if not prefill:
            raise CapabilityError(
                "the TGI server returned an empty `prefill`: restart it with `--enable-prefill-logprobs`",
                member=self.member_name,
                endpoint=self.endpoint,
            )
        return await self.pick_covering(
            full,
            len(context),
            [p.text for p in prefill],
            [p.logprob for p in prefill],
            [p.id for p in prefill],
        )

    async def count_from_server(self, full_text: str, context_length: int, ids: Sequence[int]) -> int | None:
        # TGI's /tokenize gives each token's start/stop in bytes of the input
        # (router/src/server.rs, encoding_to_tokens): exact, unlike per-token texts.
        tokens = await self.call(
            "POST /tokenize", lambda url: self._post(url, "/tokenize", {"inputs": full_text})
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

    async def server_chat_template(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None,
        add_generation_prompt: bool,
    ) -> str | None:
        # /chat_tokenize always adds the generation prompt (`ChatTemplate::apply` in
        # router/src/infer/chat_template.rs renders with add_generation_prompt: true):
        # render_chat cuts it off when it is not wanted.
        payload: dict[str, Any] = {"model": "tgi", "messages": list(messages)}
        if tools:
            payload["tools"] = list(tools)
        try:
            data = await self.call(
                "POST /chat_tokenize", lambda url: self._post(url, "/chat_tokenize", payload)
            )
        except RemoteError as exc:
            if exc.status in (400, 404, 422):  # no chat template (a base model) or no such route
                return None
            raise
        return str(data["templated_text"])

    async def aclose(self) -> None:
        loop = asyncio.get_running_loop()
        for key, (old, client) in list(self._hub_clients.items()):
            if old is loop:
                del self._hub_clients[key]
                await client.close()
        await super().aclose()


def _httpx2() -> Any:
    """The httpx2 module that huggingface_hub >= 2.0 is built on, or a ConfigError saying how to get it."""
    try:
        import httpx2
    except ImportError:
        try:
            from importlib.metadata import version

            found = f"huggingface_hub {version('huggingface_hub')} is installed"
        except Exception:  # not installed at all, or no metadata
            found = "huggingface_hub is not installed"
        raise ConfigError(
            f"the TGI backend needs huggingface_hub >= 2.0 (which brings httpx2), but {found}: "
            "run `pip install -U 'huggingface_hub>=2.0,<3'`"
        ) from None
    return httpx2


def _session(client: Any) -> Any:
    """The HTTP session of one AsyncInferenceClient.

    huggingface_hub's default session refuses every request under
    HF_HUB_OFFLINE=1, which is meant for the Hub, not for the inference URL a
    user configured; it also follows redirects (carrying the token along). This
    session does not; it honours proxies and CA files from the environment but
    never its credentials (`_http.env_client_options`).
    """
    httpx2 = _httpx2()
    from huggingface_hub.utils._http import async_hf_response_event_hook

    session = httpx2.AsyncClient(
        event_hooks={"response": [async_hf_response_event_hook]},
        follow_redirects=False,
        timeout=None,
        **env_client_options(httpx2),
    )
    client.exit_stack.push_async_callback(session.aclose)
    return session


def _as_remote_error(exc: BaseException) -> BaseException:
    """huggingface_hub / httpx2 exceptions -> specfuse's (retryable or not), keeping the server's message."""
    httpx2 = _httpx2()

    if isinstance(exc, RemoteError):
        return exc
    response = getattr(exc, "response", None)
    cause = exc.__cause__
    if response is None and cause is not None:
        response = getattr(cause, "response", None)
    if response is not None and getattr(response, "status_code", None):
        try:
            body = response.text
        except Exception:  # a streamed body that was never read
            body = str(exc)
        return error_from_status(int(response.status_code), body or str(exc), dict(response.headers))
    if isinstance(exc, TimeoutError | httpx2.TimeoutException):
        return RetryableError(f"timed out: {type(exc).__name__}")
    if isinstance(exc, httpx2.TransportError | OSError):
        return RetryableError(f"could not reach the server: {type(exc).__name__}")
    return RemoteError(f"{type(exc).__name__}: {exc}")

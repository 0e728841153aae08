"""vLLM (and other OpenAI-compatible completion servers) over `/v1/completions`.

Scoring asks for the prompt's own log-probs: `echo: true, logprobs: 1,
max_tokens: 0` returns them in `choices[0].logprobs` (first entry null).
What real vLLM versions do with that request differs, and `info()` probes it
once:

* vLLM 0.32 runs such a request with max_tokens 1 and echoes only the prompt
  (`CompletionRequest.to_sampling_params`, `echo_without_generation`, in
  vllm/entrypoints/openai/completion/protocol.py); other versions refuse
  `max_tokens: 0` or echo the generated token too. Scoring therefore keeps
  only the first `usage.prompt_tokens` entries, and falls back to
  `max_tokens: 1` when 0 is refused.
* Some versions refuse prompt log-probs altogether (V1 with prefix caching).
  Such a server reports `can_score=False` with the server's reason, so the
  member can draft and the engine refuses it as a verifier with a clear
  message.

Prompts are sent with `add_special_tokens: false`: specfuse renders each
prompt as text with its special tokens (a template's literal BOS, or the BOS
the plain template adds), exactly as the in-process backend tokenizes it, and
vLLM's default (true) would add a second BOS.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from specfuse.backends._http import ContextWindowErrorRemote, RemoteError, RetryableError
from specfuse.backends._remote import RemoteBackend, cut_at_stop
from specfuse.backends.base import BackendInfo, CandidateScore, Draft, FinishReason, Sampling
from specfuse.errors import CapabilityError

#: What vLLM says when an input does not fit (vllm/renderers/params.py,
#: TokenizeParams._token_len_check and _text_len_check; older releases raise
#: the same sentence from serving_engine._validate_input).
_OVERFLOW_MARKERS = ("maximum context length", "exceeds model's maximum")
#: A short text for probes; any plain words do.
_PROBE_TEXT = "Hello world"


class VLLMBackend(RemoteBackend):
    """A vLLM server (one or more replica URLs), OpenAI completions API."""

    protocol = "vllm"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: max_tokens of a scoring call: 0 unless the server refuses it (see the module docstring).
        self._score_max_tokens = 0
        #: A BOS text to drop from the front of prompts, for servers that add it whatever we ask.
        self._strip_prefix = ""

    def _body(self, prompt: str, **fields: Any) -> dict[str, Any]:
        if self._strip_prefix and prompt.startswith(self._strip_prefix):
            prompt = prompt[len(self._strip_prefix) :]
        return {"model": self._served_model, "prompt": prompt, "add_special_tokens": False, **fields}

    @property
    def _served_model(self) -> str:
        return self._info.model_id if self._info is not None else self.model

    async def _post(self, url: str, path: str, payload: dict[str, Any] | None, method: str = "POST") -> Any:
        try:
            return await super()._post(url, path, payload, method)
        except RemoteError as exc:
            message = str(exc.args[0]) if exc.args else ""
            if exc.status == 400 and any(m in message for m in _OVERFLOW_MARKERS):
                raise ContextWindowErrorRemote(message, status=exc.status) from None
            raise

    async def info(self) -> BackendInfo:
        if self._info is not None:
            return self._info
        data = await self.call(
            "GET /v1/models", lambda url: self._post(url, "/v1/models", None, method="GET")
        )
        models = data.get("data") or []
        entry = next((m for m in models if m.get("id") == self.model), models[0] if models else {})
        model_id = str(entry.get("id") or self.model)
        cannot_score, prompt_tokens = await self._probe_scoring(model_id)
        bos = await self._special_prefix(model_id, prompt_tokens)
        extras = await asyncio.to_thread(self.text_extras)
        window = entry.get("max_model_len")
        extra: dict[str, Any] = {**extras, "bos_text": bos, "replicas": len(self.urls)}
        if cannot_score:
            extra["cannot_score"] = cannot_score
        self._info = BackendInfo(
            model_id=model_id,
            context_window=int(window) if window else None,
            can_score=not cannot_score,
            concurrent_calls=True,
            max_stop_sequences=None,
            extra=extra,
        )
        return self._info

    async def _probe_scoring(self, model_id: str) -> tuple[str, int | None]:
        """('' or why the server cannot score, in its words; the probe's prompt token count).

        Any refusal is an answer here, never a crash: the member may still draft.
        """
        for max_tokens in (0, 1):
            body = {
                "model": model_id,
                "prompt": _PROBE_TEXT,
                "max_tokens": max_tokens,
                "echo": True,
                "logprobs": 1,
                "temperature": 0.0,
                "add_special_tokens": False,
            }
            try:
                probe = await self.call(
                    "probe POST /v1/completions",
                    lambda url, body=body: self._post(url, "/v1/completions", body),
                )
            except RetryableError:
                raise  # down or overloaded after every retry: not an answer about scoring
            except RemoteError as exc:
                reason = str(exc.args[0]) if exc.args else f"HTTP {exc.status}"
                if max_tokens == 0 and "max_tokens" in reason:
                    continue  # this version wants at least one generated token
                return f"the server refused prompt log-probs: {reason}", None
            self._score_max_tokens = max_tokens
            used = (probe.get("usage") or {}).get("prompt_tokens")
            prompt_tokens = used if isinstance(used, int) else None
            try:
                values = self._prompt_logprobs(probe)[1]
            except (KeyError, IndexError, TypeError, ValueError) as exc:
                why = f"the server's echo+logprobs answer has no prompt log-probs ({type(exc).__name__})"
                return why, prompt_tokens
            if not any(v is not None for v in values[1:]):
                return "the server returned no prompt log-probs for echo+logprobs", prompt_tokens
            return "", prompt_tokens
        return "the server refused max_tokens 0 and 1 with echo+logprobs", None

    async def _special_prefix(self, model_id: str, probe_tokens: int | None) -> str:
        """The BOS text the plain template must write itself ('' when the server adds it or none).

        Asked of the server's own tokenizer: `/tokenize` with and without
        special tokens, then `/detokenize` of what the first adds (without
        those routes, the local tokenizer's answer). A server that ignores
        add_special_tokens (the field is newer than the route) adds that BOS
        itself: then prompts are sent without it, or it would be doubled.
        """

        async def tokenize(add: bool) -> list[int]:
            payload = {"model": model_id, "prompt": _PROBE_TEXT, "add_special_tokens": add}
            data = await self.call("POST /tokenize", lambda url: self._post(url, "/tokenize", payload))
            return [int(t) for t in data.get("tokens") or []]

        try:
            with_special, without = await tokenize(True), await tokenize(False)
        except RetryableError:
            raise
        except RemoteError:
            return await asyncio.to_thread(self._local_bos)
        added = with_special[: len(with_special) - len(without)]
        if not added or with_special[len(added) :] != without:
            return ""
        try:
            payload = {"model": model_id, "tokens": added}
            data = await self.call("POST /detokenize", lambda url: self._post(url, "/detokenize", payload))
            prefix = str(data.get("prompt") or "")
        except RetryableError:
            raise
        except RemoteError:
            prefix = await asyncio.to_thread(self._local_bos)
        if probe_tokens is None:
            body = {**self._body(_PROBE_TEXT, max_tokens=1, temperature=0.0), "model": model_id}
            data = await self.call(
                "POST /v1/completions", lambda url: self._post(url, "/v1/completions", body)
            )
            probe_tokens = int((data.get("usage") or {}).get("prompt_tokens") or len(without))
        if probe_tokens == len(with_special):
            self._strip_prefix = prefix
            return ""
        return prefix

    def _local_bos(self) -> str:
        tok = self.local_tokenizer()
        if tok is None or tok.bos_token_id is None:
            return ""
        adds = tok("x", add_special_tokens=True)["input_ids"][:1] == [tok.bos_token_id]
        return str(tok.bos_token) if adds else ""

    @staticmethod
    def _prompt_logprobs(data: dict[str, Any]) -> tuple[list[str | None], list[float | None]]:
        """Token texts and log-probs of the echoed prompt only.

        Versions that turn max_tokens 0 into 1 may echo the generated token
        after the prompt; usage.prompt_tokens says where the prompt ends.
        """
        lp = data["choices"][0].get("logprobs") or {}
        tokens, values = list(lp.get("tokens") or []), list(lp.get("token_logprobs") or [])
        prompt_tokens = (data.get("usage") or {}).get("prompt_tokens")
        if isinstance(prompt_tokens, int) and 0 < prompt_tokens <= len(tokens):
            tokens, values = tokens[:prompt_tokens], values[:prompt_tokens]
        return tokens, values

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
        body = self._body(full, max_tokens=self._score_max_tokens, echo=True, logprobs=1, temperature=0.0)
        data = await self.call(
            "POST /v1/completions (echo)", lambda url: self._post(url, "/v1/completions", body)
        )
        tokens, values = self._prompt_logprobs(data)
        if not tokens:
            raise CapabilityError(
                "the server returned no prompt log-probs for echo+logprobs",
                member=self.member_name,
                endpoint=self.endpoint,
            )
        return self.pick_covering(full, len(context), tokens, values)

    async def count_tokens(self, text: str) -> int:
        try:
            data = await self.call(
                "POST /tokenize",
                lambda url: self._post(
                    url,
                    "/tokenize",
                    {"model": self._served_model, "prompt": text, "add_special_tokens": False},
                ),
            )
            return int(data.get("count") or len(data.get("tokens") or []))
        except ContextWindowErrorRemote:
            raise
        except RemoteError:
            body = self._body(text, max_tokens=1)
            data = await self.call(
                "POST /v1/completions", lambda url: self._post(url, "/v1/completions", body)
            )
            return int(data["usage"]["prompt_tokens"])

    async def render_chat(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        *,
        add_generation_prompt: bool = True,
    ) -> str | None:
        local = await asyncio.to_thread(self.render_locally, messages, tools, add_generation_prompt)
        if local is not None:
            return local
        rendered = await self._server_render(messages, tools, add_generation_prompt)
        if rendered is None:
            self.warn_no_template()
        return rendered

    async def _server_render(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None,
        add_generation_prompt: bool,
    ) -> str | None:
        """The server's own chat template: `/tokenize` with messages, then `/detokenize`.

        vLLM renders exactly as its chat completions do (ServingTokenization.
        create_tokenize in vllm/entrypoints/serve/tokenize/serving.py), and
        detokenizing the ids gives the text back with its special tokens.
        None when the model has no chat template (vLLM answers 400) or the
        server has no such route.
        """
        payload: dict[str, Any] = {
            "model": self._served_model,
            "messages": list(messages),
            "add_generation_prompt": add_generation_prompt,
        }
        if tools:
            payload["tools"] = list(tools)
        try:
            data = await self.call("POST /tokenize (chat)", lambda url: self._post(url, "/tokenize", payload))
            ids = {"model": self._served_model, "tokens": [int(t) for t in data.get("tokens") or []]}
            text = await self.call("POST /detokenize", lambda url: self._post(url, "/detokenize", ids))
        except RemoteError as exc:
            if exc.status in (400, 404, 405, 422, 501):
                return None
            raise
        return str(text.get("prompt") or "") or None

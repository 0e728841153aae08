"""vLLM (and other OpenAI-compatible completion servers) over `/v1/completions`.

Scoring has two paths, chosen when the member is probed:

- "echo" (every OpenAI-compatible server): `echo: true, logprobs: 1,
  max_tokens: 0` returns the prompt's own log-probs in `choices[*].logprobs`
  (first entry null); all of a verifier's candidates go in one request. vLLM
  skips its prefix cache for any request with prompt log-probs
  (`SamplingParams.__post_init__` in vllm/sampling_params.py sets
  `skip_reading_prefix_cache`), so every candidate re-reads the whole context.
- "tokens" (vLLM started with `--enable-scale-out` and
  `--enable-prompt-tokens-details`): token ids go to `/inference/v1/generate`
  with `skip_reading_prefix_cache: false`, so only the uncached tail is
  computed (the route's machinery is backends/vllm_tokens.py). Log-probs at
  cached positions are never computed (see `_score_tokens`), so the
  response's cached-token count must stop before the candidate; a candidate
  for which it does not is scored by echo instead.

Servers that return no prompt log-probs report `can_score=False`, so such a
member can draft but the engine refuses it as a verifier with a clear message.

What real vLLM versions do with an echo request differs, and `info()` probes it
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
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import replace
from typing import Any, ClassVar

from specfuse.backends._http import (
    ContextWindowErrorRemote,
    RemoteError,
    RetryableError,
)
from specfuse.backends._remote import Attempts, cut_at_stop
from specfuse.backends.base import (
    BackendInfo,
    CandidateScore,
    ChatToRender,
    Draft,
    FinishReason,
    Sampling,
    ServerUsage,
)
from specfuse.backends.known_logprobs import KnownLogprobs, shared_store
from specfuse.backends.vllm_tokens import (
    TOKENS_ROUTE,
    TokenRoute,
    common_prefix,
    reported_cached_tokens,
    row_offset,
    valid_from,
)
from specfuse.config import MemberConfig
from specfuse.errors import BackendError, CapabilityError

#: Contexts whose token ids are kept (one per verifier and round is what scoring needs).
_CONTEXT_CACHE = 16


def draft_usage(data: dict[str, Any]) -> ServerUsage | None:
    """What a draft cost the server, from a /v1/completions answer (None without `usage`).

    With --enable-prompt-tokens-details vLLM says how much of the prompt it read
    from its prefix cache, and the rest is what it computed. Without it (the
    default) only `prompt_tokens` is known: the server computed between none of
    them (all cached) and all of them, so they are counted as unmetered, the
    trace's bound for a cost the server did not report exactly, instead of the
    draft recording no cost at all.
    """
    usage = data.get("usage") or {}
    if not usage:
        return None
    prompt_tokens = int(usage.get("prompt_tokens") or 0)
    cached = reported_cached_tokens(data)
    if cached is None:
        return ServerUsage(prompt_tokens=prompt_tokens, cached_tokens=0, unmetered_tokens=prompt_tokens)
    return ServerUsage(prompt_tokens=prompt_tokens, cached_tokens=cached)


#: A short text for probes; any plain words do.
_PROBE_TEXT = "Hello world"


class VLLMBackend(TokenRoute):
    """A vLLM server (one or more replica URLs), OpenAI completions API."""

    protocol = "vllm"

    def __init__(self, member: MemberConfig, **kwargs: Any) -> None:
        super().__init__(member, **kwargs)
        self.scoring = member.scoring
        self.scoring_path = "echo"
        self._context_ids: OrderedDict[str, list[int]] = OrderedDict()
        #: max_tokens of a scoring call: 0 unless the server refuses it (see the module docstring).
        self._score_max_tokens = 0
        #: A BOS text to drop from the front of prompts, for servers that add it whatever we ask.
        self._strip_prefix = ""
        #: Log-probs this server already computed (token path only): see known_logprobs.
        self._known: KnownLogprobs | None = None

    def _sent(self, prompt: str) -> str:
        """The prompt as sent: without the BOS a server adds whatever it is asked (see info())."""
        if self._strip_prefix and prompt.startswith(self._strip_prefix):
            return prompt[len(self._strip_prefix) :]
        return prompt

    def _body(self, prompt: str | list[str], **fields: Any) -> dict[str, Any]:
        sent = [self._sent(p) for p in prompt] if isinstance(prompt, list) else self._sent(prompt)
        return {"model": self._served_model, "prompt": sent, "add_special_tokens": False, **fields}

    @property
    def _served_model(self) -> str:
        return self._info.model_id if self._info is not None else self.served_model

    async def info(self) -> BackendInfo:
        if self._info is not None:
            return self._info
        data = await self.call(
            "GET /v1/models", lambda url: self._post(url, "/v1/models", None, method="GET")
        )
        entry = self._served_entry(data.get("data") or [])
        model_id = str(entry.get("id") or self.served_model)
        cannot_score, prompt_tokens = await self._probe_scoring(model_id)
        bos = await self._special_prefix(model_id, prompt_tokens)
        extras = await asyncio.to_thread(self.text_extras)
        window = entry.get("max_model_len")
        extra: dict[str, Any] = {**extras, "bos_text": bos, "replicas": len(self.urls)}
        if cannot_score:
            extra["cannot_score"] = cannot_score
        path, reason = await self._choose_scoring_path(
            model_id, not cannot_score, int(window) if window else None
        )
        if self.scoring == "tokens" and path != "tokens":
            raise CapabilityError(
                f"scoring='tokens' was asked for, but {reason}; use scoring='auto' or 'echo'",
                member=self.member_name,
                endpoint=self.endpoint,
            )
        self.scoring_path = path
        if path == "tokens":
            self._known = shared_store(self.urls, model_id)
        extra["scoring_path"] = path
        extra["scoring_path_reason"] = reason
        self._info = BackendInfo(
            model_id=model_id,
            context_window=int(window) if window else None,
            can_score=not cannot_score,
            max_stop_sequences=None,
            extra=extra,
        )
        return self._info

    def _served_entry(self, models: list[dict[str, Any]]) -> dict[str, Any]:
        """The /v1/models entry of the model this member names; a ConfigError when it is not served.

        vLLM answers a request for a name it does not serve with 404; falling back
        to the server's first model instead once let a typo in a model id answer,
        silently, with another model.
        """
        entry = next((m for m in models if m.get("id") == self.served_model), None)
        if entry is None:
            self.refuse_unserved([str(m.get("id")) for m in models if m.get("id")])
        assert entry is not None
        return entry

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

    async def _context_token_ids(self, context: str, tally: Attempts) -> list[int]:
        if context in self._context_ids:
            self._context_ids.move_to_end(context)
            return self._context_ids[context]
        ids = await self._token_ids(context, tally)
        self._context_ids[context] = ids
        while len(self._context_ids) > _CONTEXT_CACHE:
            self._context_ids.popitem(last=False)
        return ids

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
        if self._known is not None:
            # The prompt's and the draft's token ids, so that verification can reuse the
            # draft's log-probs where this draft put its tokens in the prefix cache.
            body["return_token_ids"] = True
        tally = Attempts()
        data = await self.call(
            "POST /v1/completions", lambda url: self._post(url, "/v1/completions", body), tally
        )
        choice = data["choices"][0]
        text, hit = cut_at_stop(choice.get("text") or "", stop)
        logprobs = choice.get("logprobs") or {}
        raw_lps = logprobs.get("token_logprobs") or []
        lps = [x for x in raw_lps if x is not None]
        # Each token's text, decoded on its own by the server (vllm/v1/engine/logprobs.py,
        # LogprobsProcessor: convert_ids_list_to_tokens, then _verify_tokens for bytes
        # that end inside a character); the gate cuts a draft at their boundaries.
        tokens = logprobs.get("tokens") or []
        pieces = [t for t, x in zip(tokens, raw_lps, strict=False) if x is not None]
        if self._known is not None:
            self._remember_draft(choice, raw_lps)
        finish: FinishReason
        if hit or (choice.get("stop_reason") is not None and choice.get("finish_reason") == "stop"):
            finish = "stop"
        elif choice.get("finish_reason") == "stop":
            finish = "eos"
        else:
            finish = "length"
        count = len(lps) if lps else int((data.get("usage") or {}).get("completion_tokens") or 0)
        return Draft(
            text=text.rstrip("\ufffd"),
            token_count=count,
            finish_reason=finish,
            token_logprobs=tuple(lps),
            token_texts=tuple(pieces) if len(pieces) == len(lps) else (),
            usage=draft_usage(data),
            attempts=tally.most,
        )

    async def score(self, context: str, candidates: Sequence[str]) -> list[CandidateScore]:
        with Attempts() as tally:
            if self.scoring_path == "tokens":
                scores = await self.gather_calls([self._score_tokens(context, c, tally) for c in candidates])
            elif self._score_max_tokens:
                # A server that generates while echoing: one prompt per request, so that
                # usage.prompt_tokens says where each echoed prompt ends.
                singles = await self.gather_calls([self._score_echo(context, [c], tally) for c in candidates])
                scores = [score for (score,) in singles]
            else:
                scores = await self._score_echo(context, candidates, tally)
        return tally.on(scores)

    async def _score_echo(
        self, context: str, candidates: Sequence[str], tally: Attempts
    ) -> list[CandidateScore]:
        """All candidates in one echo request (the completions API takes a list of prompts)."""
        fulls = [context + c for c in candidates]
        body = self._body(
            fulls if len(fulls) > 1 else fulls[0],
            max_tokens=self._score_max_tokens,
            echo=True,
            logprobs=1,
            temperature=0.0,
        )
        # With a local tokenizer to align on, ask for token ids instead of per-token texts
        # ("token_id:N"; vLLM entrypoints/openai/protocol.py, return_tokens_as_token_ids).
        by_ids = await asyncio.to_thread(self.alignment_tokenizer) is not None
        if by_ids:
            body["return_tokens_as_token_ids"] = True
        data = await self.call(
            "POST /v1/completions (echo)", lambda url: self._post(url, "/v1/completions", body), tally
        )
        choices = sorted(data.get("choices") or [], key=lambda c: int(c.get("index") or 0))
        if len(choices) != len(fulls):
            raise BackendError(
                f"the server answered {len(choices)} choices for {len(fulls)} prompts",
                member=self.member_name,
                endpoint=self.endpoint,
            )
        # Prompt log-probs make vLLM skip its prefix cache (vllm/sampling_params.py,
        # SamplingParams.__post_init__): every prompt token is computed, whether or not
        # the server reports it. The batch's usage rides on the first candidate.
        prompt_tokens = int((data.get("usage") or {}).get("prompt_tokens") or 0)
        scores = []
        for i, (full, choice) in enumerate(zip(fulls, choices, strict=True)):
            if len(fulls) == 1:
                tokens, values = self._prompt_logprobs(data)
            else:
                lp = choice.get("logprobs") or {}
                tokens, values = lp.get("tokens") or [], lp.get("token_logprobs") or []
            if not tokens:
                raise CapabilityError(
                    "the server returned no prompt log-probs for echo+logprobs",
                    member=self.member_name,
                    endpoint=self.endpoint,
                )
            ids = _token_ids(tokens) if by_ids else None
            sent = self._sent(full)
            picked = await self.pick_covering(
                sent, len(sent) - (len(full) - len(context)), tokens, values, ids, tally
            )
            usage = ServerUsage(
                prompt_tokens=prompt_tokens if i == 0 else 0,
                cached_tokens=0,
                requests=1 if i == 0 else 0,
                path="echo",
            )
            scores.append(CandidateScore(picked.token_logprobs, usage=usage))
        return scores

    async def _candidate_start(
        self, context: str, context_ids: list[int], full_ids: list[int], tally: Attempts
    ) -> int:
        """Index in full_ids of the first token covering the candidate (see Backend.score).

        When the context's token ids are a prefix of the full text's, that is where
        they end. Otherwise the context's last tokens merged with the candidate's
        first: the first differing token starts inside the context, and covers the
        candidate unless it still ends inside the context, which the server's own
        detokenizer decides.
        """
        start = common_prefix(context_ids, full_ids)
        while start < len(context_ids) and start < len(full_ids) - 1:
            head = await self.call(
                "POST /detokenize",
                lambda url, n=start + 1: self._post(url, "/detokenize", {"tokens": full_ids[:n]}),
                tally,
            )
            if not context.startswith(str(head.get("prompt") or "\ufffd")):
                break
            start += 1
        return start

    async def _score_tokens(self, context: str, candidate: str, tally: Attempts) -> CandidateScore:
        """One candidate through the token-in route, reading the prefix cache.

        A log-prob is used only where the server computed it, in this request or
        an earlier one: if the cached-token count the response reports reaches
        into the candidate (its own draft, or another request, put those tokens
        in the cache), the cached positions are taken from that earlier answer
        (`known_logprobs`); when one is not known, or the count is not reported,
        the candidate is scored by echo instead.
        """
        context_ids, full_ids = await asyncio.gather(
            self._context_token_ids(context, tally), self._token_ids(context + candidate, tally)
        )
        start = await self._candidate_start(context, context_ids, full_ids, tally)
        if start >= len(full_ids):
            raise BackendError(
                f"candidate {candidate!r} adds no token after the context",
                member=self.member_name,
                endpoint=self.endpoint,
            )
        body = self._tokens_body(self._served_model, full_ids)
        data, failed = await self.call(
            f"POST {TOKENS_ROUTE} (prompt log-probs)", lambda url: self._post_tokens(url, body), tally
        )
        cached = None if data is None else reported_cached_tokens(data)
        # A failed try was computed too, but its answer, and with it the count of
        # tokens it read from the cache, was lost: its tokens are unmetered, not guessed.
        usage = ServerUsage(
            prompt_tokens=len(full_ids) * failed,
            cached_tokens=0,
            requests=failed,
            path="tokens",
            unmetered_tokens=len(full_ids) * failed,
        )
        if data is not None:
            usage = usage + ServerUsage(
                prompt_tokens=len(full_ids), cached_tokens=cached, requests=1, path="tokens"
            )
        # Positions the cache covered were computed by an earlier request with the same
        # tokens (a draft, or a scoring): their log-probs may be known from its answer.
        first = start if cached is None else max(start, valid_from(cached))
        known = (
            self._known.lookup(full_ids, range(start, first))
            if data is not None and cached is not None and self._known is not None
            else None
        )
        if data is None:
            reason = "lost"
        elif cached is None:
            reason = "uncounted"
        elif first > start and known is None:
            reason = "unknown"
        else:
            reason = None
        if reason is not None:
            fallback = (await self._score_echo(context, [candidate], tally))[0]
            assert fallback.usage is not None
            total = replace(usage + fallback.usage, echo_fallbacks=(reason,))
            return CandidateScore(fallback.token_logprobs, usage=total)
        assert cached is not None  # the fallback above took the uncounted answers
        rows = data.get("prompt_logprobs") or []
        offset = row_offset(len(rows), len(full_ids), cached)
        if offset is None:
            raise BackendError(
                f"the server returned {len(rows)} prompt log-prob rows for {len(full_ids)} prompt "
                f"tokens of which {cached} were cached; expected {len(full_ids)} or "
                f"{len(full_ids) - cached} (set scoring='echo' for this member)",
                member=self.member_name,
                endpoint=self.endpoint,
            )
        computed: dict[int, float] = {}
        for i in range(first, len(full_ids)):
            entry = rows[i - offset] or {}
            # JSON object keys are strings: the dict[int, Logprob] of the response.
            found = entry.get(str(full_ids[i]))
            if found is None or found.get("logprob") is None:
                raise BackendError(
                    f"the server returned no log-prob for prompt token {i} of {len(full_ids)}",
                    member=self.member_name,
                    endpoint=self.endpoint,
                )
            computed[i] = float(found["logprob"])
        if self._known is not None:
            self._known.add(full_ids, computed, "score")
        values = [*(known or ()), *(computed[i] for i in range(first, len(full_ids)))]
        return CandidateScore(tuple(values), usage=usage)

    def _remember_draft(self, choice: dict[str, Any], logprobs: Sequence[float | None]) -> None:
        """Keep a draft's log-probs by token position (when the server returned the token ids)."""
        assert self._known is not None
        prompt_ids, ids = choice.get("prompt_token_ids"), choice.get("token_ids")
        if not isinstance(prompt_ids, list) or not isinstance(ids, list) or len(ids) < len(logprobs):
            return  # a server without return_token_ids: nothing to align on
        at = len(prompt_ids)
        values = {at + j: float(lp) for j, lp in enumerate(logprobs) if lp is not None}
        self._known.add([*prompt_ids, *ids], values, "draft")

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

    #: vLLM's /tokenize takes add_generation_prompt with the messages.
    server_template_omits_generation_prompt: ClassVar[bool] = True

    async def server_chat_template(self, chat: ChatToRender) -> str | None:
        """The server's own chat template: `/tokenize` with messages, then `/detokenize`.

        vLLM renders exactly as its chat completions do (ServingTokenization.
        create_tokenize in vllm/entrypoints/serve/tokenize/serving.py), and
        detokenizing the ids gives the text back with its special tokens.
        None when the model has no chat template (vLLM answers 400) or the
        server has no such route.
        """
        payload: dict[str, Any] = {
            "model": self._served_model,
            "messages": chat.messages,
            "add_generation_prompt": chat.add_generation_prompt,
        }
        if chat.tools:
            payload["tools"] = chat.tools
        try:
            data = await self.call("POST /tokenize (chat)", lambda url: self._post(url, "/tokenize", payload))
            ids = {"model": self._served_model, "tokens": [int(t) for t in data.get("tokens") or []]}
            text = await self.call("POST /detokenize", lambda url: self._post(url, "/detokenize", ids))
        except RemoteError as exc:
            if exc.status in (400, 404, 405, 422, 501):
                return None
            raise
        return str(text.get("prompt") or "") or None


def _token_ids(tokens: Sequence[str]) -> list[int] | None:
    """Ids from vLLM's "token_id:N" strings, or None if the server ignored the request for them."""
    ids = []
    for token in tokens:
        head, _, number = str(token).partition("token_id:")
        if head or not number.isdigit():
            return None
        ids.append(int(number))
    return ids

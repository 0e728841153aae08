"""The part of a remote backend that does not depend on the protocol.

Replicas, retries, tokens and the prompt-template choice are the same for
TGI, vLLM and SGLang; each protocol module only says how to draft, score and
describe the server.
"""

from __future__ import annotations

import asyncio
import re
import threading
import warnings
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from specfuse.backends._http import (
    LoopClients,
    ReplicaPool,
    RetryPolicy,
    covering_count,
    last_attempts,
    post_json,
    public_url,
    token_for,
    with_retries,
)
from specfuse.backends.base import Backend, BackendInfo, CandidateScore
from specfuse.config import MemberConfig
from specfuse.errors import BackendError, ConfigError

T = TypeVar("T")

#: Members probe concurrently, each loading its tokenizer in a worker thread; two
#: threads resolving transformers' lazy `AutoTokenizer` at once can fail with
#: "cannot import name 'AutoTokenizer'" (a member then silently lost its EOS text).
_TOKENIZER_LOCK = threading.Lock()

_FIRST_SPECIAL = re.compile(r"^\s*(<[^<>\s]{1,40}>|</s>)")


class RemoteBackend(Backend):
    """Shared machinery of the HTTP backends (see the module docstring)."""

    protocol = "remote"

    def __init__(
        self,
        member: MemberConfig,
        *,
        retry: RetryPolicy | None = None,
        cooldown: float = 10.0,
    ) -> None:
        self.member_name = member.display_name
        self.model = member.model
        self.urls = [u.rstrip("/") for u in member.urls]
        self.template = member.template
        self.tokenizer_name = member.tokenizer
        self.chat_template = member.chat_template
        self.timeout = member.timeout
        # The secret stays inside this object; only token_for() reads it, per URL.
        self._api_key = member.api_key.get_secret_value() if member.api_key is not None else None
        self.retry = retry or RetryPolicy(deadline=max(30.0, 4 * member.timeout))
        self.pool = ReplicaPool(self.urls, cooldown=cooldown)
        extra = f" (+{len(self.urls) - 1} replicas)" if len(self.urls) > 1 else ""
        self.endpoint = f"{self.protocol}:{public_url(self.urls[0])}{extra}"
        self.clients = LoopClients(self._new_client)
        self._info: BackendInfo | None = None
        self._tokenizer: Any = None
        self._tokenizer_checked = False
        self._warned_no_template = False

    # -- plumbing ------------------------------------------------------------------

    def _new_client(self) -> Any:
        import httpx

        # No env proxies or netrc credentials: a token goes exactly where we send it.
        return httpx.AsyncClient(timeout=self.timeout, trust_env=False, follow_redirects=False)

    def token(self, url: str) -> str | None:
        return token_for(url, self._api_key)

    async def _post(self, url: str, path: str, payload: dict[str, Any] | None, method: str = "POST") -> Any:
        """One JSON request to a replica, with this member's token (if that host may have it)."""
        return await post_json(
            self.clients.get(),
            url + path,
            payload,
            token=self.token(url),
            timeout=self.timeout,
            method=method,
        )

    async def call(self, what: str, fn: Callable[[str], Awaitable[T]]) -> T:
        """fn(url) on a replica with retries; errors name this member and the replica."""
        return await with_retries(fn, pool=self.pool, policy=self.retry, member=self.member_name, what=what)

    async def aclose(self) -> None:
        await self.clients.aclose()

    async def gather_calls(self, calls: Sequence[Awaitable[T]]) -> list[T]:
        """Run calls concurrently; `last_attempts` then holds the most attempts any one needed.

        (Each gathered call runs in its own task, whose context changes the
        caller would not see.)
        """

        async def one(call: Awaitable[T]) -> tuple[T | Exception, int]:
            # Failures too carry their attempt count out of the task (otherwise a score
            # call that failed after 3 attempts was recorded with attempts=1); and
            # every call is awaited, so none is left running after a sibling failed.
            try:
                return await call, last_attempts.get()
            except Exception as exc:
                return exc, last_attempts.get()

        pairs = await asyncio.gather(*(one(c) for c in calls))
        last_attempts.set(max((n for _, n in pairs), default=1))
        for result, _ in pairs:
            if isinstance(result, Exception):
                raise result
        return [r for r, _ in pairs]  # type: ignore[misc]

    # -- prompts ----------------------------------------------------------------------

    def local_tokenizer(self) -> Any:
        """The tokenizer the member names (`tokenizer=`, else `model` when it is local), or None.

        It gives the chat template (and end-of-sequence text) without a server
        round trip; template='server' skips it. A tokenizer named explicitly
        must load: failing to would silently change the prompts.
        """
        with _TOKENIZER_LOCK:
            return self._load_local_tokenizer()

    def _load_local_tokenizer(self) -> Any:
        if not self._tokenizer_checked:
            self._tokenizer_checked = True
            from transformers import AutoTokenizer

            from specfuse.models import resolve_model_path

            if self.tokenizer_name is not None:
                try:
                    self._tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(self.tokenizer_name))
                except Exception as exc:
                    raise ConfigError(
                        f"member {self.member_name!r}: cannot load tokenizer {self.tokenizer_name!r}: "
                        f"{exc}; name a local model or a directory holding a tokenizer"
                    ) from None
            elif self.template != "server":
                try:
                    self._tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(self.model))
                except Exception:  # not a local model: the server's template is used instead
                    self._tokenizer = None
        return self._tokenizer

    def render_locally(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None,
        add_generation_prompt: bool,
    ) -> str | None:
        """The chat rendered here: the member's own chat_template, else its local tokenizer's.

        None when neither exists (the server's rendering is asked for next).
        """
        if self.template == "server":
            return None
        tok = self.local_tokenizer()
        template = self.chat_template or (tok.chat_template if tok is not None else None)
        if not template:
            return None
        if tok is not None:
            return str(
                tok.apply_chat_template(
                    list(messages),
                    tools=list(tools) if tools else None,
                    chat_template=template,
                    tokenize=False,
                    add_generation_prompt=add_generation_prompt,
                )
            )
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template(
            [list(messages)],
            tools=list(tools) if tools else None,
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
        )
        return str(rendered[0])

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
        rendered = await self.server_chat_template(messages, tools)
        if rendered is None:
            self.warn_no_template()
        if rendered is None or add_generation_prompt:
            return rendered
        # Servers always add the generation prompt. Without one, only what ends the
        # last turn matters (prompts.ChatFormat looks for it): keep its first marker.
        last = str(messages[-1].get("content", "")) if messages else ""
        head, found, after = rendered.rpartition(last) if last else ("", "", rendered)
        if not found:
            return rendered
        marker = _FIRST_SPECIAL.match(after)
        return head + last + (marker.group(0) if marker else after)

    def warn_no_template(self) -> None:
        """Say so when the plain template will be used only because no chat template was found.

        A local tokenizer without a chat template means a base model: nothing
        to warn about. Without one, an instruct model behind a server would be
        prompted as a base model, answer worse, and nothing else would say why.
        """
        if self._tokenizer is None and self.template == "auto" and not self._warned_no_template:
            self._warned_no_template = True
            warnings.warn(
                f"member {self.member_name!r}: no chat template from a local tokenizer or from "
                f"{self.endpoint}; using the plain 'User:/Assistant:' template. Name one with "
                "tokenizer= or chat_template=, or set template='plain' if that is intended",
                UserWarning,
                stacklevel=2,
            )

    async def server_chat_template(
        self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None
    ) -> str | None:
        """The server's own rendering of a chat, when its protocol offers one."""
        return None

    def text_extras(self) -> dict[str, Any]:
        """bos/eos texts for the plain template: servers add BOS themselves, so bos is ''."""
        tok = self.local_tokenizer()
        eos = (tok.eos_token or "") if tok is not None else ""
        return {"bos_text": "", "eos_text": eos}

    # -- scoring helper ---------------------------------------------------------------

    def pick_covering(
        self,
        full_text: str,
        context_length: int,
        texts: Sequence[str | None],
        logprobs: Sequence[float | None],
    ) -> CandidateScore:
        """Log-probs of the trailing tokens that cover full_text[context_length:]."""
        try:
            n = covering_count(full_text, context_length, texts)
        except ValueError as exc:
            raise BackendError(
                f"cannot align the server's tokens with the text: {exc}",
                member=self.member_name,
                endpoint=self.endpoint,
            ) from None
        picked = list(logprobs[len(logprobs) - n :]) if n else []
        if not picked or any(lp is None for lp in picked):
            raise BackendError(
                f"the server returned no usable log-probs for candidate {full_text[context_length:]!r}",
                member=self.member_name,
                endpoint=self.endpoint,
            )
        return CandidateScore(tuple(float(lp) for lp in picked if lp is not None))


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Text up to the first stop sequence, and whether one was found."""
    hits = [i for s in stops if (i := text.find(s)) != -1]
    if not hits:
        return text, False
    return text[: min(hits)], True

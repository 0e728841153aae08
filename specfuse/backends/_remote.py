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
from dataclasses import replace
from types import TracebackType
from typing import Any, ClassVar, TypeVar

from specfuse.backends._http import (
    LoopClients,
    ReplicaPool,
    RetryPolicy,
    covering_count,
    env_client_options,
    post_json,
    public_url,
    token_for,
    with_retries,
)
from specfuse.backends.base import Backend, BackendInfo, CandidateScore, ChatToRender
from specfuse.config import MemberConfig
from specfuse.errors import BackendError, ConfigError

T = TypeVar("T")

#: Members probe concurrently, each loading its tokenizer in a worker thread; two
#: threads resolving transformers' lazy `AutoTokenizer` at once can fail with
#: "cannot import name 'AutoTokenizer'" (a member then silently lost its EOS text).
_TOKENIZER_LOCK = threading.Lock()

_FIRST_SPECIAL = re.compile(r"^\s*(<[^<>\s]{1,40}>|</s>)")


class Attempts:
    """The attempts of one draft or score: the most that any of its requests needed.

    A draft or score makes one, hands it to each `RemoteBackend.call` it makes
    (the call adds its attempts, retries included, whether it succeeds or fails)
    and puts `most` on what it returns (`Draft.attempts`, `CandidateScore.attempts`),
    which the engine records in the trace. Used as `with Attempts() as tally:`, a
    BackendError leaving the block carries `most` too, so a score that fails after
    a retried request, or beside one, records those attempts.
    """

    def __init__(self) -> None:
        self.most = 1

    def add(self, attempts: int) -> None:
        self.most = max(self.most, attempts)

    def on(self, scores: Sequence[CandidateScore]) -> list[CandidateScore]:
        """The scores with this call's attempts on each."""
        return [replace(s, attempts=self.most) for s in scores]

    def __enter__(self) -> Attempts:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if isinstance(exc, BackendError):
            exc.attempts = max(exc.attempts, self.most)


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
        #: The name sent to (and checked against) the server: `served_model`, else `model`.
        self.served_model = member.served_model or member.model
        self.urls = [u.rstrip("/") for u in member.urls]
        self.template = member.template
        self.tokenizer_name = member.tokenizer
        self.chat_template = member.chat_template
        self.timeout = member.timeout
        # The secret stays inside this object; only token_for() reads it, per URL.
        self._api_key = member.resolved_api_key()
        # Each attempt is cut at `timeout`; all of a call's attempts at `retry_budget`
        # (2 x timeout by default), so a hanging server costs a call about twice its timeout.
        self.retry = retry or RetryPolicy(
            max_attempts=member.retries + 1, deadline=member.attempt_budget, attempt_timeout=member.timeout
        )
        self.pool = ReplicaPool(self.urls, cooldown=cooldown)
        extra = f" (+{len(self.urls) - 1} replicas)" if len(self.urls) > 1 else ""
        self.endpoint = f"{self.protocol}:{public_url(self.urls[0])}{extra}"
        self.clients = LoopClients(self._new_client)
        self._info: BackendInfo | None = None
        self._tokenizer: Any = None
        self._tokenizer_checked = False
        self._warned_no_template = False
        self._aligner: Any = None
        self._aligner_checked = False
        self._warned_text_alignment = False

    # -- plumbing ------------------------------------------------------------------

    def _new_client(self) -> Any:
        import httpx

        # Proxies and CA files from the environment, never its credentials (env_client_options);
        # no redirects, so a token goes exactly where we send it.
        return httpx.AsyncClient(timeout=self.timeout, follow_redirects=False, **env_client_options())

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

    async def call(self, what: str, fn: Callable[[str], Awaitable[T]], tally: Attempts | None = None) -> T:
        """fn(url) on a replica with retries; errors name this member and the replica.

        The attempts it took (its error's `attempts` when it fails) are added to
        `tally`, the draft's or score's own (see `Attempts`).
        """
        try:
            result, attempts = await with_retries(
                fn, pool=self.pool, policy=self.retry, member=self.member_name, what=what
            )
        except BackendError as exc:
            if tally is not None:
                tally.add(exc.attempts)
            raise
        if tally is not None:
            tally.add(attempts)
        return result

    async def aclose(self) -> None:
        await self.clients.aclose()

    async def gather_calls(self, calls: Sequence[Awaitable[T]]) -> list[T]:
        """Run calls concurrently; the first failure (in order) is raised once all have ended.

        Every call is awaited, so none is left running after a sibling failed.
        """

        async def one(call: Awaitable[T]) -> T | Exception:
            try:
                return await call
            except Exception as exc:
                return exc

        results = await asyncio.gather(*(one(c) for c in calls))
        for result in results:
            if isinstance(result, Exception):
                raise result
        return results  # type: ignore[return-value]

    def refuse_unserved(self, served: Sequence[str]) -> None:
        """A ConfigError when the server's models do not include the one this member names.

        Without it a typo in a model id was answered, silently, by whatever model
        the server had (docs/design.md, "Reliability", the served model).
        """
        if self.served_model in served:
            return
        asked = (
            f"served_model={self.served_model!r}"
            if self.served_model != self.model
            else f"model={self.model!r}"
        )
        raise ConfigError(
            f"member {self.member_name!r}: {self.endpoint} serves {list(served)}, not {asked}; set model= "
            "to one of them, or served_model= to the served name when model names a local tokenizer"
        )

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

    def render_locally(self, chat: ChatToRender) -> str | None:
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
                    chat.messages,
                    tools=chat.tools,
                    chat_template=template,
                    tokenize=False,
                    add_generation_prompt=chat.add_generation_prompt,
                )
            )
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template(
            [chat.messages],
            tools=chat.tools,
            chat_template=template,
            add_generation_prompt=chat.add_generation_prompt,
        )
        return str(rendered[0])

    async def render(self, chat: ChatToRender) -> str | None:
        local = await asyncio.to_thread(self.render_locally, chat)
        if local is not None:
            return local
        rendered = await self.server_chat_template(chat)
        if rendered is None:
            self.warn_no_template()
        if rendered is None or chat.add_generation_prompt or self.server_template_omits_generation_prompt:
            return rendered
        # This server always adds the generation prompt. Without one, only what ends the
        # last turn matters (prompts.ChatFormat looks for it): keep its first marker.
        last = str(chat.messages[-1].get("content", "")) if chat.messages else ""
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

    #: Whether `server_chat_template` honours add_generation_prompt=False; when it
    #: does not, `render_chat` cuts the generation prompt off the server's text.
    server_template_omits_generation_prompt: ClassVar[bool] = False

    async def server_chat_template(self, chat: ChatToRender) -> str | None:
        """The server's own rendering of a chat, when its protocol offers one."""
        return None

    def text_extras(self) -> dict[str, Any]:
        """bos/eos texts for the plain template: servers add BOS themselves, so bos is ''."""
        tok = self.local_tokenizer()
        eos = (tok.eos_token or "") if tok is not None else ""
        return {"bos_text": "", "eos_text": eos}

    # -- scoring helper ---------------------------------------------------------------

    def alignment_tokenizer(self) -> Any:
        """The model's tokenizer when `model` names a local model or directory, whatever the template.

        Used only to find which of the server's tokens cover a candidate, from
        exact character offsets; the server's token ids are checked against it.
        """
        if not self._aligner_checked:
            self._aligner_checked = True
            try:
                from transformers import AutoTokenizer

                from specfuse.models import resolve_model_path

                self._aligner = AutoTokenizer.from_pretrained(resolve_model_path(self.model))
            except Exception:  # not a local model (or no transformers): the server's offsets, if any
                self._aligner = None
        return self._aligner

    def count_with_tokenizer(self, full_text: str, context_length: int, ids: Sequence[int]) -> int | None:
        """Covering tokens from a local tokenizer's offsets, if its ids are the server's (else None)."""
        tok = self.alignment_tokenizer()
        if tok is None or not getattr(tok, "is_fast", False):
            return None
        enc = tok(full_text, add_special_tokens=True, return_offsets_mapping=True)
        return count_from_offsets(
            list(enc["input_ids"]), [(int(s), int(e)) for s, e in enc["offset_mapping"]], context_length, ids
        )

    async def count_from_server(
        self, full_text: str, context_length: int, ids: Sequence[int], tally: Attempts | None = None
    ) -> int | None:
        """Covering tokens from the server's own exact offsets, where its protocol gives them.

        A request made for it adds its attempts to `tally`, the score's.
        """
        return None

    async def covering_tokens(
        self,
        full_text: str,
        context_length: int,
        ids: Sequence[int] | None,
        texts: Sequence[str | None],
        tally: Attempts | None = None,
    ) -> int:
        """How many of the server's trailing tokens cover full_text[context_length:].

        Exact sources first (a local tokenizer's offsets, the server's byte offsets),
        both checked against the token ids the server scored. Per-token decoded texts
        are a last resort: servers decode each token alone, so SentencePiece pieces
        lose their leading space and split characters come back as U+FFFD or "".
        """
        if ids is not None:
            n = await asyncio.to_thread(self.count_with_tokenizer, full_text, context_length, ids)
            if n is None:
                n = await self.count_from_server(full_text, context_length, ids, tally)
            if n is not None:
                return n
        if not self._warned_text_alignment:
            self._warned_text_alignment = True
            warnings.warn(
                f"member {self.member_name!r}: no local tokenizer for {self.model!r} and no exact offsets "
                "from this server, so candidates are aligned by per-token texts, which can be off by a "
                "token at a split character; name a local model or directory as `model` to align exactly",
                stacklevel=2,
            )
        return covering_count(full_text, context_length, texts)

    async def pick_covering(
        self,
        full_text: str,
        context_length: int,
        texts: Sequence[str | None],
        logprobs: Sequence[float | None],
        ids: Sequence[int] | None = None,
        tally: Attempts | None = None,
    ) -> CandidateScore:
        """Log-probs of the trailing tokens that cover full_text[context_length:].

        A request made to align them adds its attempts to `tally`, the score's.
        """
        try:
            n = await self.covering_tokens(full_text, context_length, ids, texts, tally)
        except ValueError as exc:
            raise BackendError(
                f"cannot align the server's tokens with the text: {exc}",
                member=self.member_name,
                endpoint=self.endpoint,
            ) from None
        if n > len(logprobs):
            raise BackendError(
                f"candidate {full_text[context_length:]!r} covers {n} tokens but the server returned "
                f"log-probs for {len(logprobs)}",
                member=self.member_name,
                endpoint=self.endpoint,
            )
        picked = list(logprobs[len(logprobs) - n :]) if n else []
        if not picked or any(lp is None for lp in picked):
            raise BackendError(
                f"the server returned no usable log-probs for candidate {full_text[context_length:]!r}",
                member=self.member_name,
                endpoint=self.endpoint,
            )
        return CandidateScore(tuple(float(lp) for lp in picked if lp is not None))


def count_from_offsets(
    local_ids: Sequence[int],
    offsets: Sequence[tuple[int, int]],
    boundary: int,
    server_ids: Sequence[int],
) -> int | None:
    """Tokens whose span ends after `boundary`, or None when the two tokenizations differ.

    `offsets` are (start, end) per token, in the unit of `boundary` (characters
    for a local tokenizer, bytes for TGI's /tokenize). The token that straddles
    the boundary (the context's last piece merged with the candidate's first)
    ends after it, so it belongs to the candidate. `server_ids` may be a suffix
    (SGLang's logprob_start_len) or carry extra leading tokens (a BOS the server
    added): only the part both have must agree.
    """
    first = next((i for i, (_, end) in enumerate(offsets) if end > boundary), len(offsets))
    n = len(local_ids) - first
    shared = min(len(local_ids), len(server_ids))
    if n > shared or list(local_ids[len(local_ids) - shared :]) != list(
        server_ids[len(server_ids) - shared :]
    ):
        return None
    return n


def cut_at_stop(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """Text up to the first stop sequence, and whether one was found."""
    hits = [i for s in stops if (i := text.find(s)) != -1]
    if not hits:
        return text, False
    return text[: min(hits)], True

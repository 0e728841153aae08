"""The one small interface every backend implements.

A backend knows how to reach one model. It works on plain prompt text (the
member's rendered prompt plus the fused answer so far) and never sees the
ensemble: drafting and scoring are all the engine asks of it.

Backends must be usable from more than one event loop over their lifetime
(the sync API drives the engine on a private loop thread), so anything bound
to a loop, such as an HTTP client, is created lazily per running loop.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from specfuse.scoring import candidate_score

if TYPE_CHECKING:
    from specfuse.config import MemberConfig

FinishReason = Literal["length", "eos", "stop"]


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of one draft call. temperature 0 means greedy."""

    temperature: float = 0.6
    top_p: float = 0.9
    seed: int | None = None


@dataclass(frozen=True)
class ChatToRender:
    """A chat to render with a model's template, as every backend's template hook takes it.

    One value rather than three parameters so that the hooks a backend overrides
    keep a one-line signature, and the lists are copied once, here.
    """

    messages: list[dict[str, Any]]
    #: None when there are none: some templates test `tools is not none`, which [] would pass.
    tools: list[dict[str, Any]] | None
    add_generation_prompt: bool


@dataclass(frozen=True)
class ServerUsage:
    """What one call cost the server, as the server itself reported it.

    Fused answers are paid for in server compute, mostly prompt tokens; the
    engine copies this into the trace so a user sees what verification costs.
    """

    #: Prompt tokens the server read for the call (cached or not).
    prompt_tokens: int
    #: Of those, read from the server's prefix cache; None when the server does not say.
    cached_tokens: int | None = None
    #: Requests the call made to the server (a batch counts once).
    requests: int = 1
    #: How the call scored: "echo" (whole prompt re-read) or "tokens" (token ids in, cache reused).
    path: str | None = None
    #: Of prompt_tokens, those of requests the server computed but whose answer it
    #: lost (vLLM's unencodable-NaN 400), so their cache use is unknown: the server
    #: computed between none and all of them, on top of computed_tokens.
    unmetered_tokens: int = 0
    #: Why each candidate of a token-path scoring that fell back to echo did: "lost"
    #: (vLLM could not encode the answer on any try), "uncounted" (the answer did not
    #: say how many tokens it read from the cache) or "unknown" (a cached candidate
    #: position that no earlier answer returned a log-prob for).
    echo_fallbacks: tuple[str, ...] = ()

    @property
    def computed_tokens(self) -> int | None:
        """Prompt tokens the server reported computing; None when it does not report its cache use."""
        if self.cached_tokens is None:
            return None
        return self.prompt_tokens - self.unmetered_tokens - self.cached_tokens

    def __add__(self, other: ServerUsage) -> ServerUsage:
        paths = sorted({p for p in (self.path, other.path) if p})
        return ServerUsage(
            prompt_tokens=self.prompt_tokens + other.prompt_tokens,
            cached_tokens=(
                None
                if self.cached_tokens is None or other.cached_tokens is None
                else self.cached_tokens + other.cached_tokens
            ),
            requests=self.requests + other.requests,
            path="+".join(paths) or None,
            unmetered_tokens=self.unmetered_tokens + other.unmetered_tokens,
            echo_fallbacks=self.echo_fallbacks + other.echo_fallbacks,
        )


def total_usage(usages: Sequence[ServerUsage | None]) -> ServerUsage | None:
    """The sum of several calls' usage; None if any call's usage is unknown."""
    known = [u for u in usages if u is not None]
    if not known or len(known) != len(usages):
        return None
    total = known[0]
    for u in known[1:]:
        total = total + u
    return total


@dataclass(frozen=True)
class Draft:
    """A candidate continuation produced by one drafter."""

    text: str
    token_count: int
    finish_reason: FinishReason
    #: The drafter's own log-probs of its generated tokens (for the trace).
    token_logprobs: tuple[float, ...] = ()
    #: What the draft cost the server, when the server reports it.
    usage: ServerUsage | None = None
    #: Attempts the draft's request needed, retries included (the trace records it).
    attempts: int = 1
    #: Each generated token's text, when the server reports it: they spell `text`
    #: (a token that completes a multi-byte character carries all of it).
    token_texts: tuple[str, ...] = ()

    @property
    def finished(self) -> bool:
        """The drafter ended its turn (EOS / end-of-turn) or hit a stop sequence."""
        return self.finish_reason != "length"

    def split(self, at: int, tail_tokens: int) -> tuple[Draft, Draft] | None:
        """The first `at` tokens, and at most `tail_tokens` after them, as two drafts.

        The token texts may spell more than `text` (a stop sequence or an end marker
        the server cut off): what lies beyond `text` belongs to no draft. None when
        they do not spell it (no texts reported, or a tokenizer's spelling differs).
        """
        pieces = self.token_texts
        spelled = "".join(pieces)
        if not pieces or len(pieces) != len(self.token_logprobs) or not spelled.startswith(self.text):
            return None
        ends = list(itertools.accumulate(len(p) for p in pieces))
        end = min(len(pieces), at + tail_tokens)
        cut = min(ends[at - 1], len(self.text)) if at else 0
        stop = min(ends[end - 1], len(self.text))
        head = Draft(
            self.text[:cut], at, "length", self.token_logprobs[:at], self.usage, self.attempts, pieces[:at]
        )
        tail = Draft(
            self.text[cut:stop],
            end - at,
            # The tail ends the draft when it reaches its last token or the end of its text.
            self.finish_reason if end == len(pieces) or ends[end - 1] >= len(self.text) else "length",
            self.token_logprobs[at:end],
            token_texts=pieces[at:end],
        )
        return head, tail


@dataclass(frozen=True)
class CandidateScore:
    """Log-probs of the tokens that cover one candidate's text, read by a verifier."""

    token_logprobs: tuple[float, ...]
    #: What scoring this candidate cost the server, when the server reports it.
    usage: ServerUsage | None = None
    #: Attempts of the score call, retries included: the most any of its requests
    #: needed, the same on every candidate of one call (the trace records it).
    attempts: int = 1

    @property
    def mean(self) -> float:
        """Mean log-prob per token (scoring.candidate_score, with no end-of-turn marker)."""
        return candidate_score(self.token_logprobs)


@dataclass(frozen=True)
class BackendInfo:
    """What the engine needs to know about a backend before the first round."""

    model_id: str
    context_window: int | None = None
    can_score: bool = True
    #: Max stop sequences the server accepts; the engine applies the rest itself.
    max_stop_sequences: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Backend(ABC):
    """How to reach one model."""

    #: Human-readable place of the model, for errors and traces. Never a secret.
    endpoint: str = ""

    @classmethod
    def from_member(cls, member: MemberConfig) -> Backend:
        """The backend of one member's settings (the registry builds every backend this way)."""
        return cls(member)  # type: ignore[call-arg]

    @abstractmethod
    async def info(self) -> BackendInfo:
        """Probe the backend once (cached by the implementation) and describe it."""

    @abstractmethod
    async def draft(
        self, context: str, *, max_tokens: int, sampling: Sampling, stop: Sequence[str] = ()
    ) -> Draft:
        """Generate at most max_tokens tokens continuing context.

        A stop sequence found in the generated text ends the draft there (the
        stop itself is cut off) with finish_reason "stop".
        """

    @abstractmethod
    async def score(self, context: str, candidates: Sequence[str]) -> list[CandidateScore]:
        """Prompt log-probs of the tokens covering each candidate after context.

        The covering tokens of candidate c are those of `context + c` whose
        character span ends after len(context); the token straddling the
        boundary belongs to c. One result per candidate, in order.
        """

    @abstractmethod
    async def count_tokens(self, text: str) -> int:
        """Number of tokens of text in this model's tokenizer."""

    async def render_chat(
        self,
        messages: Sequence[dict[str, Any]],
        tools: Sequence[dict[str, Any]] | None = None,
        *,
        add_generation_prompt: bool = True,
    ) -> str | None:
        """The prompt text the model's own chat template makes, or None if it has none."""
        return await self.render(
            ChatToRender(list(messages), list(tools) if tools else None, add_generation_prompt)
        )

    async def render(self, chat: ChatToRender) -> str | None:
        """What `render_chat` returns; a backend with a chat template overrides this, not `render_chat`."""
        return None

    async def aclose(self) -> None:
        """Release connections or memory. The backend may be used again afterwards."""
        return None

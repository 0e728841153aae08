"""One request in flight: the members it reads, its state between rounds, what it
returns, and how it begins (each member's prompt, counted against its window).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from specfuse import scoring
from specfuse.backends.base import Backend, BackendInfo, Draft
from specfuse.config import FusionSettings
from specfuse.errors import AllMembersFailedError, ConfigError, ContextWindowError
from specfuse.prompts import FormattedPrompt, Message, PromptFormat, check_messages
from specfuse.stopping import _all_stops
from specfuse.trace import FusionTrace


@dataclass
class Member:
    """A ready member: its backend probed, its prompt format known."""

    name: str
    backend: Backend
    format: PromptFormat
    roles: frozenset[str]
    weight: float
    info: BackendInfo
    #: Tokens of the end-of-turn marker in this member's tokenizer (the last
    #: tokens of a finished candidate's score count as one "stop here" unit).
    end_of_turn_tokens: int = 1

    @property
    def drafts(self) -> bool:
        return "draft" in self.roles

    @property
    def verifies(self) -> bool:
        return "verify" in self.roles


@dataclass(frozen=True)
class Usage:
    """Token counts of one response.

    input_tokens: the prompt as the members read it, summed over the members
    called (each in its own tokenizer); output_tokens: the fused answer,
    each segment counted in the tokenizer of the member that drafted it.
    """

    input_tokens: int
    output_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass
class FusionResult:
    text: str
    finish_reason: str
    trace: FusionTrace
    usage: Usage


@dataclass
class Segment:
    """An accepted piece of the answer, streamed the moment it is chosen."""

    text: str
    member: str | None
    round: int
    #: Set on the last segment of a response only.
    result: FusionResult | None = None


@dataclass
class _Request:
    """The state of one response in flight."""

    settings: FusionSettings
    prompts: dict[str, str]
    active: list[Member]
    weights: dict[str, float]
    quality: dict[str, float]
    trace: FusionTrace
    seed: int
    #: Stop sequences checked in the fused text: the caller's plus every member's
    #: turn markers, which a segment boundary may split between two drafters.
    stops: tuple[str, ...] = ()
    fused: str = ""
    tokens_used: int = 0
    max_tokens: int = 0
    started: float = field(default_factory=time.perf_counter)
    #: Consecutive rounds in which every call of a member failed (docs/design.md, "Reliability").
    failures: dict[str, int] = field(default_factory=dict)
    #: Aggregated S per candidate member of each verified round (the exit rule's evidence).
    history: list[dict[str, float]] = field(default_factory=list)
    #: The member that drafts first under gating (``gate_logprob``); None when gating is off.
    lead: str | None = None
    #: The rest of the lead's last draft, from the token it was unsure of: its
    #: candidate in the fused round that follows.
    held: Draft | None = None


async def _begin(
    messages: list[Message] | FormattedPrompt,
    tools: Sequence[dict[str, Any]] | None,
    settings: FusionSettings,
    members: list[Member],
    deadline_at: float | None,
    warm_weights: dict[str, float] | None,
) -> _Request:
    """A request's state. Members render and count the prompt on their servers within the
    request deadline (`deadline_at`): a member that stops answering there must not hold
    the request up."""
    limit = asyncio.timeout(None if deadline_at is None else max(0.0, deadline_at - time.perf_counter()))
    try:
        async with limit:
            prompts = await _prompts(messages, tools, members)
            counts = dict(
                zip(
                    [m.name for m in members],
                    await asyncio.gather(*(m.backend.count_tokens(prompts[m.name]) for m in members)),
                    strict=True,
                )
            )
    except TimeoutError:
        if not limit.expired():
            raise
        raise AllMembersFailedError(
            f"the request deadline ({settings.request_deadline} s) passed while the members "
            f"{[m.name for m in members]} rendered and counted the prompt"
        ) from None
    room = []
    for m in members:
        window = m.info.context_window
        if window is None:
            continue
        if counts[m.name] >= window:
            raise ContextWindowError(
                f"the prompt is {counts[m.name]} tokens for member {m.name!r}, whose context window "
                f"is {window}; shorten the prompt or drop that member"
            )
        room.append(window - counts[m.name])
    seed = settings.seed if settings.seed is not None else random.SystemRandom().randrange(2**31)
    configured = {m.name: m.weight for m in members if m.verifies or m.drafts}
    weights = scoring.initial_weights(configured)
    if settings.warm_weights and warm_weights is not None:
        weights = {**weights, **warm_weights}
    trace = FusionTrace(
        members=[m.name for m in members],
        prompt_tokens=counts,
        seed=seed,
        settings=settings.model_dump(),
    )
    return _Request(
        settings=settings,
        prompts=prompts,
        active=list(members),
        weights=weights,
        quality={m.name: 0.0 for m in members},
        trace=trace,
        seed=seed,
        stops=_all_stops(settings.stop, members),
        max_tokens=min([settings.max_tokens, *room]),
        lead=_lead(settings, members),
    )


async def _prompts(
    messages: list[Message] | FormattedPrompt,
    tools: Sequence[dict[str, Any]] | None,
    members: list[Member],
) -> dict[str, str]:
    """Each member's prompt text: its own template over the messages, or the formatted text."""
    if isinstance(messages, FormattedPrompt):
        if not messages.strip():
            raise ConfigError("the prompt is empty; pass a question")
        if tools:
            raise ConfigError(
                "tools are rendered by each member's chat template, which a FormattedPrompt "
                "skips; pass messages instead of a FormattedPrompt to offer tools"
            )
        return {m.name: str(messages) for m in members}
    checked = check_messages(messages)
    rendered = await asyncio.gather(*(m.format.render(checked, tools) for m in members))
    return dict(zip([m.name for m in members], rendered, strict=True))


def _lead(settings: FusionSettings, members: Sequence[Member]) -> str | None:
    """The member that drafts first under gating: the one named, else the highest weight.

    None when gating is off, or when the named lead is not among the members that
    started (left out at start: this request is fused in every round).
    """
    if settings.gate_logprob is None:
        return None
    drafters = [m for m in members if m.drafts]
    if settings.lead is not None:
        return settings.lead if settings.lead in [m.name for m in drafters] else None
    # max() keeps the first of equals: the first listed member leads an unweighted ensemble.
    return max(drafters, key=lambda m: m.weight).name if drafters else None

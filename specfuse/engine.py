"""The SpecFuse round loop (docs/design.md, "The algorithm"), as an async generator.

One round:

1. Draft.      Every active drafter continues `prompt_m + fused` by a short segment.
2. Verify.     Every active verifier scores every candidate by its prompt
               log-probs, all of them in one call once the drafts are in.
3. Normalise.  p_v = softmax over the candidates v scored.
4. Aggregate.  S(c) = weighted mean of p_v(c); identical candidates pool
               their support; the winner is argmax.
5. Broadcast.  The winner's text is appended to `fused` and streamed out.
6. Stop        when the winner finished, max_tokens is reached, a stop
               sequence or any member's turn marker appears in the fused
               text, or the caller cancels.

With gating (``gate_logprob``) the lead member drafts first and a segment it is
sure of is accepted without steps 2-4: the others draft and everyone verifies
only where the lead hesitates. Online weights (SpecEM) and model exit run
between rounds. The math lives in
:mod:`specfuse.scoring`; this module only orchestrates calls and records the
trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from specfuse import scoring
from specfuse._sync import LoopThread
from specfuse.backends.base import (
    Backend,
    BackendInfo,
    Draft,
    Sampling,
    ServerUsage,
    total_usage,
)
from specfuse.config import EnsembleConfig, FusionSettings, MemberConfig
from specfuse.errors import (
    AllMembersFailedError,
    CapabilityError,
    ConfigError,
    ContextWindowError,
    RetryableError,
    SpecfuseError,
)
from specfuse.prompts import (
    ChatFormat,
    FormattedPrompt,
    Message,
    PlainFormat,
    PromptFormat,
    check_messages,
    end_of_turn_tokens,
    message_text,
)
from specfuse.trace import CallRecord, CandidateRecord, FusionTrace, RoundRecord


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


class SpecFuse:
    """An ensemble of models that answers as one, segment by segment.

    >>> fuse = SpecFuse.local()                       # the embedded offline ensemble
    >>> print(fuse.generate("Name three primary colours.").text)
    """

    def __init__(
        self,
        config: EnsembleConfig | None = None,
        *,
        members: Sequence[Member] | None = None,
        fusion: FusionSettings | None = None,
    ) -> None:
        if config is None and members is None:
            raise ConfigError("pass an EnsembleConfig, or ready members=; SpecFuse.local() gives the default")
        if members is not None and not members:
            raise ConfigError("the ensemble has no members; add at least one")
        self.config = config
        self.settings = fusion or (config.fusion if config else FusionSettings())
        self._members: list[Member] | None = list(members) if members is not None else None
        self._backends: dict[str, Backend] = {}
        if config is not None:
            from specfuse.backends import create_backend  # local import: backends pull heavy deps

            self._backends = {m.display_name: create_backend(m) for m in config.members}
        self._start_lock: asyncio.Lock | None = None
        #: Members probed so far (all of them once `_members` is set).
        self._ready: dict[str, Member] = {}
        self._warm_weights: dict[str, float] | None = None
        self._loop_thread = LoopThread()
        self._usable_window: int | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        """Copies (copy.deepcopy, pickle) rebuild from the config and load their members lazily.

        Loaded models, the loop thread and connections are process state, not
        part of the value: the copy gets its own, and in the same process local
        models are not loaded twice (specfuse.backends.local shares them).
        """
        if self.config is None:
            raise TypeError(
                "a SpecFuse built from ready members= cannot be copied or pickled; "
                "build it from an EnsembleConfig (SpecFuse(config)) to copy it"
            )
        return (_rebuild, (self.config, self.settings, self._warm_weights))

    # -- construction -------------------------------------------------------

    @classmethod
    def local(cls, models: Sequence[str] | None = None, **fusion: Any) -> SpecFuse:
        """The embedded offline ensemble (short names from specfuse.models)."""
        if models is None:
            return cls(EnsembleConfig.local(**fusion))
        return cls(EnsembleConfig.local(tuple(models), **fusion))

    @classmethod
    def from_members(cls, members: Sequence[MemberConfig | dict[str, Any] | str], **fusion: Any) -> SpecFuse:
        return cls(EnsembleConfig.build(list(members), **fusion))

    @classmethod
    def from_file(cls, path: str) -> SpecFuse:
        return cls(EnsembleConfig.from_file(path))

    def _check_lead(self, settings: FusionSettings) -> None:
        """A lead (a request may name one) must be a drafting member of this ensemble."""
        if settings.lead is None:
            return
        if self._members is not None:
            drafters = [m.name for m in self._members if m.drafts]
        else:
            assert self.config is not None
            drafters = [m.display_name for m in self.config.members if "draft" in m.roles]
        if settings.lead not in drafters:
            raise ConfigError(f"lead={settings.lead!r} is not a drafting member; name one of {drafters}")

    @property
    def member_names(self) -> list[str]:
        if self._members is not None:
            return [m.name for m in self._members]
        assert self.config is not None
        return [m.display_name for m in self.config.members]

    async def astart(self, on_ready: Callable[[str, float], None] | None = None) -> list[Member]:
        """Load or probe every member; the members that are ready.

        on_ready(member name, seconds) is called as each member becomes ready. A
        member that cannot be reached (down, hanging or overloaded past its retry
        budget) is left out and probed again by the next call; only when the rest
        cannot fuse (no drafter, or several drafters and no verifier) does this
        raise AllMembersFailedError, naming every unreachable member. Once every
        member is ready, later calls return at once.
        """
        members, _ = await self._start(on_ready, None)
        return members

    async def _start(
        self, on_ready: Callable[[str, float], None] | None, deadline_at: float | None
    ) -> tuple[list[Member], dict[str, str]]:
        """(ready members in config order, {unreachable member: why}) for one request.

        `deadline_at` (perf_counter time) bounds the probes: a member not ready by
        then counts as unreachable for this request. Any other failure (a wrong
        model name, a server that cannot score for a verifier) is the user's to
        fix and is raised as it is.
        """
        if self._members is not None:
            return self._members, {}
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        assert self.config is not None
        left_out: dict[str, str] = {}
        async with self._start_lock:
            missing = [m for m in self.config.members if m.display_name not in self._ready]
            results = await asyncio.gather(
                *(self._prepare_by(m, on_ready, deadline_at) for m in missing), return_exceptions=True
            )
            errors: list[BaseException] = []
            for config, outcome in zip(missing, results, strict=True):
                if isinstance(outcome, Member):
                    self._ready[config.display_name] = outcome
                elif isinstance(outcome, RetryableError | TimeoutError):
                    left_out[config.display_name] = _describe(outcome) or "no answer before the deadline"
                else:
                    errors.append(outcome)
            ready = [
                self._ready[m.display_name] for m in self.config.members if m.display_name in self._ready
            ]
            if errors:
                raise errors[0]
            if not left_out:
                self._members = ready
        problem = _cannot_fuse(ready)
        if problem is not None:
            unreachable = "; ".join(f"{name!r}: {why}" for name, why in left_out.items())
            raise AllMembersFailedError(
                f"{problem}: {len(left_out)} member(s) could not be reached at start ({unreachable})"
            )
        return ready, left_out

    async def _prepare_by(
        self, config: MemberConfig, on_ready: Callable[[str, float], None] | None, deadline_at: float | None
    ) -> Member:
        """_prepare, given up at `deadline_at` (a request's deadline covers its members' probes)."""
        if deadline_at is None:
            return await self._prepare(config, on_ready)
        left = deadline_at - time.perf_counter()
        try:
            async with asyncio.timeout(max(0.0, left)):
                return await self._prepare(config, on_ready)
        except TimeoutError:
            raise TimeoutError(
                f"not ready within the request deadline ({self.settings.request_deadline} s)"
            ) from None

    async def _prepare(self, config: MemberConfig, on_ready: Callable[[str, float], None] | None) -> Member:
        backend = self._backends[config.display_name]
        started = time.perf_counter()
        info = await backend.info()
        if "verify" in config.roles and not info.can_score:
            why = info.extra.get("cannot_score")
            raise CapabilityError(
                "this server cannot return prompt log-probs, so the member cannot verify; "
                "give it roles=['draft']" + (f" ({why})" if why else ""),
                member=config.display_name,
                endpoint=backend.endpoint,
            )
        fmt: PromptFormat | None = None
        if config.template in ("auto", "chat", "server"):
            fmt = await ChatFormat.probe(backend)
            if fmt is None and config.template != "auto":
                raise ConfigError(
                    f"member {config.display_name!r} has no chat template; set template='plain'"
                )
        if fmt is None:
            extra = info.extra
            fmt = PlainFormat(bos=extra.get("bos_text", ""), eos=extra.get("eos_text", ""))
        marker_tokens = await end_of_turn_tokens(backend, fmt)
        if on_ready is not None:
            on_ready(config.display_name, time.perf_counter() - started)
        return Member(
            name=config.display_name,
            backend=backend,
            format=fmt,
            roles=config.roles,
            weight=config.weight,
            info=info,
            end_of_turn_tokens=marker_tokens,
        )

    async def aclose(self) -> None:
        # Every backend, also those of members that never became ready (a probe may have
        # opened a client before its server stopped answering).
        backends = [*self._backends.values(), *(m.backend for m in self._members or [])]
        for backend in {id(b): b for b in backends}.values():
            await backend.aclose()

    # -- the public API -------------------------------------------------------

    async def astream(
        self,
        messages: str | Sequence[Message],
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        **overrides: Any,
    ) -> AsyncIterator[Segment]:
        """Yield accepted segments as they are chosen; the last carries the result."""
        settings = self.settings.with_overrides(**overrides)
        started = time.perf_counter()
        # request_deadline bounds the whole answer, the members' probes at start included.
        deadline_at = started + settings.request_deadline if settings.request_deadline else None
        prompt = messages if isinstance(messages, FormattedPrompt) else _as_messages(messages)
        if isinstance(prompt, list):
            check_messages(prompt)  # bad input fails before any member is probed
        self._check_lead(settings)
        members, left_out = await self._start(None, deadline_at)
        request = await self._begin_by(prompt, tools, settings, members, deadline_at)
        request.started = started
        request.trace.left_out = left_out
        emitted = 0
        record: RoundRecord | None = None
        try:
            while True:
                played = await self._round(request)
                if played is None:  # the request deadline passed before any draft of the round
                    result = self._result(request, "deadline")
                    break
                record = played
                cut = self._cut_at_stop(request, record)
                finish = "stop" if cut else self._finish_reason(request, record)
                deadline = request.settings.request_deadline
                if (
                    finish is None
                    and deadline is not None
                    and time.perf_counter() - request.started > deadline
                ):
                    finish = "deadline"
                if finish is not None:
                    result = self._result(request, finish)
                    break
                safe = len(request.fused) - _pending_stop_prefix(request.fused, request.stops)
                if safe > emitted:
                    if request.trace.time_to_first_segment is None:
                        request.trace.time_to_first_segment = time.perf_counter() - request.started
                    yield Segment(request.fused[emitted:safe], record.winner, record.index)
                    emitted = safe
        except BaseException as exc:
            # The trace outlives the request (callers may hold it): say how it ended.
            cancelled = isinstance(exc, (asyncio.CancelledError, GeneratorExit))
            request.trace.finish_reason = "cancelled" if cancelled else "error"
            request.trace.total_time = time.perf_counter() - request.started
            raise
        # Outside the try: a caller that stops reading at the last segment (agenerate,
        # a LangChain or LlamaIndex consumer) closes the generator here, and that must
        # not turn a finished response into a cancelled one.
        last = (record.winner, record.index) if record is not None else (None, 0)
        yield Segment(request.fused[emitted:], *last, result)

    async def agenerate(
        self,
        messages: str | Sequence[Message],
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        **overrides: Any,
    ) -> FusionResult:
        # aclosing: the stream is finalised here and now, not whenever the garbage
        # collector reaches it (possibly on another thread's loop).
        async with contextlib.aclosing(self.astream(messages, tools=tools, **overrides)) as segments:
            async for segment in segments:
                if segment.result is not None:
                    return segment.result
        raise RuntimeError("the fusion ended without a result")  # unreachable: astream always ends with one

    async def abatch(
        self,
        prompts: Sequence[str | Sequence[Message]],
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        **overrides: Any,
    ) -> list[FusionResult]:
        """Several independent requests at once, results in the order of `prompts`.

        Their rounds interleave on the members (HTTP servers batch them; a local
        model serves one forward pass at a time, so the gain there is overlap of
        different models). If one request fails the others are cancelled.
        """
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(self.agenerate(p, tools=tools, **overrides)) for p in prompts]
        return [task.result() for task in tasks]

    def batch(
        self,
        prompts: Sequence[str | Sequence[Message]],
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        **overrides: Any,
    ) -> list[FusionResult]:
        """Blocking abatch()."""
        return self._loop_thread.run(self.abatch(prompts, tools=tools, **overrides))

    def generate(
        self,
        messages: str | Sequence[Message],
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        **overrides: Any,
    ) -> FusionResult:
        """Blocking generate; safe to call from inside a running event loop."""
        return self._loop_thread.run(self.agenerate(messages, tools=tools, **overrides))

    def stream(
        self,
        messages: str | Sequence[Message],
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        **overrides: Any,
    ) -> Iterator[Segment]:
        """Blocking stream; abandoning the iterator cancels the fusion."""
        return self._loop_thread.iterate(lambda: self.astream(messages, tools=tools, **overrides))

    def start(self, on_ready: Callable[[str, float], None] | None = None) -> list[Member]:
        """Blocking astart(): load or probe every member now rather than on first use."""
        return self._loop_thread.run(self.astart(on_ready))

    def close(self) -> None:
        self._loop_thread.run(self.aclose())
        self._loop_thread.stop()

    # -- the usable window ----------------------------------------------------

    @property
    def started(self) -> bool:
        """Whether every member is loaded or probed (by start(), or by the first call)."""
        return self._members is not None

    async def ausable_window(self, timeout: float | None = None) -> int | None:
        """Tokens a request may use for prompt and answer together; None if no member says.

        The smallest member window less that member's chat-template overhead
        (an empty user turn, rendered and counted by the member itself) and
        :data:`WINDOW_MARGIN`. Starts the members if needed, within `timeout`
        seconds (default: the request_deadline setting; a member not ready by then
        is left out of the measure); measured once every member is ready.
        """
        if self._usable_window is None:
            timeout = timeout if timeout is not None else self.settings.request_deadline
            members, _ = await self._start(None, time.perf_counter() + timeout if timeout else None)
            probe: list[Message] = [{"role": "user", "content": ""}]
            rooms = []
            for member in members:
                if member.info.context_window is None:
                    continue
                overhead = await member.backend.count_tokens(await member.format.render(probe, None))
                rooms.append(member.info.context_window - overhead - WINDOW_MARGIN)
            window = max(1, min(rooms)) if rooms else 0
            if not self.started:  # measured without an unreachable member: measure again next time
                return window or None
            self._usable_window = window
        return self._usable_window or None

    def usable_window(self, *, measure: bool = True, timeout: float | None = None) -> int | None:
        """Blocking ausable_window(); with measure=False it never loads or probes a member.

        Unmeasured, the window is estimated from the offline model store (local
        members only) with a typical template overhead; None when any member's
        window is unknown until it is probed.
        """
        if self._usable_window is not None or measure:
            return self._loop_thread.run(self.ausable_window(timeout))
        return _estimated_window(self.config.members if self.config else ())

    # -- token counts ----------------------------------------------------------

    async def acount_tokens(self, text: str) -> int:
        """Tokens of `text` as raw text (no chat template): the largest count over the members.

        Each member counts in its own tokenizer and the largest count is returned,
        so a budget checked against it holds for every member.
        """
        members = await self.astart()
        return max(await asyncio.gather(*(m.backend.count_tokens(text) for m in members)))

    async def acount_prompt_tokens(
        self, messages: str | Sequence[Message], *, tools: Sequence[dict[str, Any]] | None = None
    ) -> int:
        """Tokens of a conversation as the members read it: each member renders it with its
        own template (tools and generation prompt included) and counts in its own tokenizer;
        the largest count is returned, so a budget checked against it holds for every member.
        An empty conversation counts 0.
        """
        listed = _as_messages(messages)
        if not listed:
            return 0
        members = await self.astart()
        normalised = [{**m, "content": message_text(m)} for m in listed]

        async def count(member: Member) -> int:
            return await member.backend.count_tokens(await member.format.render(normalised, tools))

        return max(await asyncio.gather(*(count(m) for m in members)))

    def count_tokens(self, text: str) -> int:
        """Blocking acount_tokens()."""
        return self._loop_thread.run(self.acount_tokens(text))

    def count_prompt_tokens(
        self, messages: str | Sequence[Message], *, tools: Sequence[dict[str, Any]] | None = None
    ) -> int:
        """Blocking acount_prompt_tokens()."""
        return self._loop_thread.run(self.acount_prompt_tokens(messages, tools=tools))

    # -- one request ---------------------------------------------------------

    async def _begin_by(
        self,
        messages: list[Message] | FormattedPrompt,
        tools: Sequence[dict[str, Any]] | None,
        settings: FusionSettings,
        members: list[Member],
        deadline_at: float | None,
    ) -> _Request:
        """_begin within the request deadline: members render and count the prompt on their
        servers, and a member that stops answering there must not hold the request up."""
        if deadline_at is None:
            return await self._begin(messages, tools, settings, members)
        limit = asyncio.timeout(max(0.0, deadline_at - time.perf_counter()))
        try:
            async with limit:
                return await self._begin(messages, tools, settings, members)
        except TimeoutError:
            if not limit.expired():
                raise
            raise AllMembersFailedError(
                f"the request deadline ({settings.request_deadline} s) passed while the members "
                f"{[m.name for m in members]} rendered and counted the prompt"
            ) from None

    async def _begin(
        self,
        messages: list[Message] | FormattedPrompt,
        tools: Sequence[dict[str, Any]] | None,
        settings: FusionSettings,
        members: list[Member],
    ) -> _Request:
        prompts = await self._prompts(messages, tools, members)
        counts = dict(
            zip(
                [m.name for m in members],
                await asyncio.gather(*(m.backend.count_tokens(prompts[m.name]) for m in members)),
                strict=True,
            )
        )
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
        if settings.warm_weights and self._warm_weights is not None:
            weights = {**weights, **self._warm_weights}
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

    @staticmethod
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

    @staticmethod
    def _cut_at_stop(request: _Request, record: RoundRecord) -> bool:
        """Cut the fused text before the first stop sequence or member turn marker
        that ends in this round's segment, and the rounds' accepted texts with it.

        A marker may straddle two segments ("\\nUs" + "er:"), so the search starts
        a marker's length before the new text, and the cut may reach into earlier
        rounds. Returns whether it cut.
        """
        new_from = len(request.fused) - len(record.accepted_text)
        cut = _find_stop(request.fused, request.stops, new_from)
        if cut is None:
            return False
        excess = len(request.fused) - cut
        for earlier in reversed(request.trace.rounds):
            if excess <= 0:
                break
            kept = max(0, len(earlier.accepted_text) - excess)
            excess -= len(earlier.accepted_text) - kept
            earlier.accepted_text = earlier.accepted_text[:kept]
        request.fused = request.fused[:cut]
        return True

    @staticmethod
    def _finish_reason(request: _Request, record: RoundRecord) -> str | None:
        """Why the answer ends after this round, or None to go on. Reads, never edits."""
        winner = next(c for c in record.candidates if c.member == record.winner)
        if winner.finished:
            return "stop"
        if request.tokens_used >= request.max_tokens:
            return "length"
        return None

    def _result(self, request: _Request, finish: str) -> FusionResult:
        trace = request.trace
        trace.finish_reason = finish
        trace.total_time = time.perf_counter() - request.started
        if trace.time_to_first_segment is None:
            trace.time_to_first_segment = trace.total_time
        if request.settings.warm_weights:
            self._warm_weights = dict(request.weights)
        called = {c.member for r in trace.rounds for c in r.calls}
        usage = Usage(
            input_tokens=sum(n for m, n in trace.prompt_tokens.items() if m in called),
            output_tokens=trace.completion_tokens,
        )
        return FusionResult(text=request.fused, finish_reason=finish, trace=trace, usage=usage)

    # -- one round ------------------------------------------------------------

    async def _round(self, request: _Request) -> RoundRecord | None:
        """One round, recorded in the trace; None when the request deadline cut it before any draft."""
        settings = request.settings
        record = RoundRecord(index=len(request.trace.rounds) + 1)
        started = time.perf_counter()
        drafters = [m for m in request.active if m.drafts]
        verifiers = [m for m in request.active if m.verifies]
        solo = len(drafters) == 1
        remaining = request.max_tokens - request.tokens_used
        segment_tokens = min(settings.solo_segment_tokens if solo else settings.segment_tokens, remaining)

        drafts: dict[str, Draft] = {}
        lead = next((m for m in drafters if m.name == request.lead), None)
        if lead is not None and not solo:
            drafts, record.gated, record.gate_reason = await self._gate(request, record, lead, segment_tokens)
        if record.gated:
            scores: dict[str, dict[str, float]] = {}
        else:
            drafts, scores = await self._draft_and_verify(
                request, record, drafters, [] if solo else verifiers, segment_tokens, drafts
            )
        if not drafts:
            if _past(request):
                return None
            errors = "; ".join(f"{c.member}: {c.error}" for c in record.calls if c.error)
            raise AllMembersFailedError(f"every drafter failed in round {record.index}: {errors}")

        order = [m.name for m in request.active]
        record.candidates = [
            CandidateRecord(m, d.text, d.token_count, d.finished, d.finish_reason)
            for m, d in sorted(drafts.items(), key=lambda kv: order.index(kv[0]))
        ]
        record.weights_before = dict(request.weights)
        record.skipped_verification = solo or bool(record.gated)
        if record.skipped_verification or not scores:
            winner = record.candidates[0].member
            record.aggregated = {winner: 1.0}
        else:
            winner = self._rank(request, record, drafts, scores, order)
        record.weights_after = dict(request.weights)
        record.winner = winner
        record.accepted_text = drafts[winner].text
        request.fused += drafts[winner].text
        request.tokens_used += drafts[winner].token_count

        # A gated round has no verdict on the others: it is no evidence for an exit.
        if settings.model_exit and not solo and not record.gated and record.index >= settings.exit_warmup:
            # The lead never exits: it was chosen as the strongest member, and without it
            # no later segment could be gated (on IFEval it left one answer in 50).
            record.exits = [m for m in self._exits(request, [d.name for d in drafters]) if m != request.lead]
            request.active = [m for m in request.active if m.name not in record.exits]
        self._drop_failing(request, record)

        record.wall_time = time.perf_counter() - started
        request.trace.rounds.append(record)
        return record

    async def _gate(
        self, request: _Request, record: RoundRecord, lead: Member, segment_tokens: int
    ) -> tuple[dict[str, Draft], bool, str]:
        """The lead drafts alone first; its segment is accepted as is when the lead is sure of it.

        Returns the lead's draft (kept as its candidate when a round follows),
        whether the round is gated, and why, with the numbers.
        """
        threshold = request.settings.gate_logprob
        assert threshold is not None  # a lead is only chosen when gating is on
        draft = await self._draft(request, record, lead, segment_tokens)
        if draft is None:
            return {}, False, f"lead {lead.name} failed to draft"
        if not draft.token_logprobs:
            return {lead.name: draft}, False, f"lead {lead.name} reported no token log-probs"
        confidence = sum(draft.token_logprobs) / len(draft.token_logprobs)
        sure = confidence >= threshold
        relation = ">=" if sure else "<"
        return (
            {lead.name: draft},
            sure,
            f"lead {lead.name} mean log-prob {confidence:.3f} {relation} gate_logprob {threshold:g}",
        )

    @staticmethod
    def _rank(
        request: _Request,
        record: RoundRecord,
        drafts: dict[str, Draft],
        scores: dict[str, dict[str, float]],
        order: list[str],
    ) -> str:
        """Steps 3-4 of a verified round: probabilities, SpecEM weights, S, the winner."""
        settings = request.settings
        record.scores = scores
        if settings.self_verify:
            record.probabilities = scoring.normalise_per_verifier(scores, settings.tau)
        else:
            record.probabilities = scoring.cross_probabilities(scores, settings.tau)
        if settings.lam > 0:
            reward = scoring.rewards(record.probabilities, list(drafts))
            eta = scoring.learning_rate(settings.lam, len(request.trace.members), record.index)
            request.weights = scoring.update_weights(request.weights, reward, eta)
        record.aggregated = scoring.aggregate(record.probabilities, request.weights, list(drafts))
        support = record.aggregated
        if settings.pool_identical:
            groups = {m: f"{d.finished:d}{d.text}" for m, d in drafts.items()}
            support = scoring.pool_identical(record.aggregated, groups)
            record.pooled = support
        if settings.no_repeat_words:
            n = settings.no_repeat_words
            repeating = [m for m in support if scoring.repeats_words(request.fused, drafts[m].text, n)]
            if repeating and len(repeating) < len(support):  # all repeating: nothing to prefer
                record.repeating = repeating
                support = {m: v for m, v in support.items() if m not in repeating}
        for member, value in record.aggregated.items():
            request.quality[member] += value
        request.history.append(dict(record.aggregated))
        return scoring.pick_winner(support, request.weights, order)

    @staticmethod
    def _exits(request: _Request, active_drafters: list[str]) -> list[str]:
        """Which drafters leave after this round, by the configured exit rule."""
        settings = request.settings
        keep = min(settings.min_active, len(active_drafters))
        if settings.exit_rule == "evidence":
            return scoring.evidence_exits(
                request.history,
                active_drafters,
                margin=settings.exit_margin,
                patience=settings.exit_patience,
                min_active=keep,
            )
        return scoring.exit_decisions(
            request.quality,
            active_drafters,
            temperature=settings.exit_temperature,
            ratio=settings.exit_ratio,
            min_active=keep,
        )

    @staticmethod
    def _drop_failing(request: _Request, record: RoundRecord) -> None:
        """Leave out, for the rest of the response, a member that failed every call of
        _DROP_AFTER_FAILED_ROUNDS rounds in a row (docs/design.md, "Reliability").

        Without this a dead or hanging member is called again every round and costs
        each round its whole retry budget or `round_deadline`. The drop is recorded
        as an exit in the trace (the round's CallRecords say why); at least one
        drafter always stays, so an ensemble that is all down still raises
        AllMembersFailedError.
        """
        called: dict[str, list[bool]] = {}
        for call in record.calls:
            called.setdefault(call.member, []).append(call.error is not None)
        for m in request.active:
            failed = called.get(m.name)
            if failed is None:
                continue
            request.failures[m.name] = request.failures.get(m.name, 0) + 1 if all(failed) else 0
        for m in list(request.active):
            if request.failures.get(m.name, 0) < _DROP_AFTER_FAILED_ROUNDS:
                continue
            if m.drafts and sum(1 for o in request.active if o.drafts) <= 1:
                continue
            request.active.remove(m)
            record.exits.append(m.name)

    async def _draft_and_verify(
        self,
        request: _Request,
        record: RoundRecord,
        drafters: list[Member],
        verifiers: list[Member],
        segment_tokens: int,
        drafted: dict[str, Draft],
    ) -> tuple[dict[str, Draft], dict[str, dict[str, float]]]:
        """Draft (all drafters not in `drafted` at once), then verify: one call per verifier.

        Verification waits for the drafts so that each verifier reads all of its
        candidates in one call (one batched forward pass for a local model, one
        request to a server) instead of a call per candidate as they arrive.
        `round_deadline` bounds both: a drafter not in by then misses the round,
        and a round cut before its verification ends unverified.

        Returns the drafts that succeeded and s[verifier][drafter].
        """
        started = time.perf_counter()
        drafts = dict(drafted)
        scores: dict[str, dict[str, float]] = {}

        async def draft(member: Member) -> None:
            found = await self._draft(request, record, member, segment_tokens)
            if found is not None:
                drafts[member.name] = found

        async def body() -> None:
            await asyncio.gather(*(draft(d) for d in drafters if d.name not in drafts))
            # Without self-votes a verifier still reads its own draft when it is the only
            # reference its softmax would have (fewer than three drafters).
            own_as_reference = not request.settings.self_verify and len(drafts) < 3
            await asyncio.gather(
                *(self._verify(request, record, v, drafts, own_as_reference, scores) for v in verifiers)
            )

        limits = [request.settings.round_deadline] if request.settings.round_deadline else []
        if request.settings.request_deadline is not None:
            # The request's deadline cuts a round too: calls in flight are not waited for.
            limits.append(max(0.0, request.started + request.settings.request_deadline - time.perf_counter()))
        task = asyncio.ensure_future(body())
        try:
            await asyncio.wait([task], timeout=min(limits) if limits else None)
        finally:
            # Past the deadline (or when the caller is cancelled) every call in flight is
            # cut: left running, it would hold the server's resources for nothing.
            if not task.done():
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if not task.cancelled() and (error := task.exception()) is not None:
            raise error  # a programming error: backend failures are recorded, not raised
        record.critical_path = time.perf_counter() - started
        late = {d.name for d in drafters} - set(drafts) - {c.member for c in record.calls if c.error}
        for name in sorted(late):
            record.calls.append(_call_record(name, "draft", started, error="missed the round deadline"))
        return drafts, scores

    @staticmethod
    async def _draft(
        request: _Request, record: RoundRecord, drafter: Member, segment_tokens: int
    ) -> Draft | None:
        """One draft call, recorded in the round; None when it failed."""
        settings = request.settings
        sampling = Sampling(
            temperature=settings.temperature,
            top_p=settings.top_p,
            seed=_call_seed(request.seed, request.trace.members.index(drafter.name), record.index),
        )
        t0 = time.perf_counter()
        try:
            draft = await drafter.backend.draft(
                request.prompts[drafter.name] + request.fused,
                max_tokens=segment_tokens,
                sampling=sampling,
                stop=[*settings.stop, *drafter.format.stops],
            )
        except (SpecfuseError, OSError, TimeoutError) as exc:
            record.calls.append(
                _call_record(drafter.name, "draft", t0, error=_describe(exc), attempts=_attempts(exc))
            )
            return None
        record.calls.append(
            _call_record(
                drafter.name,
                "draft",
                t0,
                tokens=draft.token_count,
                usage=draft.usage,
                attempts=draft.attempts,
            )
        )
        return draft

    @staticmethod
    async def _verify(
        request: _Request,
        record: RoundRecord,
        verifier: Member,
        drafts: dict[str, Draft],
        own_as_reference: bool,
        scores: dict[str, dict[str, float]],
    ) -> None:
        """s[verifier][drafter] of every candidate this verifier reads, in one call.

        A finished candidate carries the verifier's own end-of-turn marker, so
        "stop here" competes with "go on"; identical texts are scored once. A
        failed call is recorded and the verifier abstains this round.
        """
        wanted = {
            name: (draft.text + verifier.format.end_of_turn, verifier.end_of_turn_tokens)
            if draft.finished
            else (draft.text, 0)
            for name, draft in drafts.items()
            if name != verifier.name or request.settings.self_verify or own_as_reference
        }
        if not wanted:
            return
        texts = list(dict.fromkeys(text for text, _ in wanted.values()))
        context = request.prompts[verifier.name] + request.fused
        t0 = time.perf_counter()
        try:
            results = await verifier.backend.score(context, texts)
        except (SpecfuseError, OSError, TimeoutError) as exc:
            record.calls.append(
                _call_record(verifier.name, "score", t0, error=_describe(exc), attempts=_attempts(exc))
            )
            return
        record.calls.append(
            _call_record(
                verifier.name,
                "score",
                t0,
                tokens=sum(len(r.token_logprobs) for r in results),
                usage=total_usage([r.usage for r in results]),
                attempts=max((r.attempts for r in results), default=1),
            )
        )
        by_text = dict(zip(texts, results, strict=True))
        scores[verifier.name] = {
            name: scoring.candidate_score(by_text[text].token_logprobs, marker)
            for name, (text, marker) in wanted.items()
        }


def _call_record(
    member: str,
    kind: str,
    started: float,
    *,
    tokens: int = 0,
    error: str | None = None,
    usage: ServerUsage | None = None,
    attempts: int = 1,
) -> CallRecord:
    """The one place a backend call becomes a trace entry (attempts from the backend's
    retries, what the call cost its server when the backend reports it)."""
    return CallRecord(
        member,
        kind,
        time.perf_counter() - started,
        attempts=attempts,
        error=error,
        tokens=tokens,
        **_cost_fields(usage),
    )


def _attempts(exc: BaseException) -> int:
    """Tries a failed call made: a BackendError says, anything else made one."""
    return getattr(exc, "attempts", 1)


def _rebuild(
    config: EnsembleConfig, settings: FusionSettings, warm_weights: dict[str, float] | None
) -> SpecFuse:
    fuse = SpecFuse(config, fusion=settings)
    fuse._warm_weights = warm_weights
    return fuse


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


#: A member whose every call failed this many rounds in a row sits out the rest of a response.
_DROP_AFTER_FAILED_ROUNDS = 2


#: Tokens kept free below a member's window for what a caller cannot see: a
#: framework counting a prompt in its own tokenizer (tiktoken, say) may count
#: fewer tokens than the member does, and tool prompts add text.
WINDOW_MARGIN = 64
#: A chat template's fixed text (default system prompt, role markers), used
#: until the real overhead is measured.
_TYPICAL_TEMPLATE_OVERHEAD = 64


def _estimated_window(members: Sequence[MemberConfig]) -> int | None:
    """The usable window from the offline model store, without loading a model."""
    from specfuse.models import MODELS  # the registry only: no weights are touched

    windows = [
        MODELS[m.model].context_length if m.backend == "local" and m.model in MODELS else None
        for m in members
    ]
    if not windows or None in windows:
        return None
    return min(w for w in windows if w is not None) - _TYPICAL_TEMPLATE_OVERHEAD - WINDOW_MARGIN


def _past(request: _Request) -> bool:
    deadline = request.settings.request_deadline
    return deadline is not None and time.perf_counter() - request.started >= deadline


def _cannot_fuse(members: Sequence[Member]) -> str | None:
    """Why these members cannot answer together (None when they can); as EnsembleConfig checks."""
    drafters = [m for m in members if m.drafts]
    if not drafters:
        return "no drafting member is left"
    if len(drafters) > 1 and not any(m.verifies for m in members):
        return "several drafters but no verifier is left"
    return None


def _as_messages(messages: str | Sequence[Message]) -> list[Message]:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    return [dict(m) for m in messages]


def _call_seed(request_seed: int, member_index: int, round_index: int) -> int:
    """A distinct, reproducible seed per (request, member, round)."""
    return (request_seed * 1_000_003 + member_index * 7_919 + round_index) % (2**31)


def _cost_fields(usage: ServerUsage | None) -> dict[str, Any]:
    """The CallRecord fields that say what a call cost its server."""
    if usage is None:
        return {}
    return {
        "server_prompt_tokens": usage.prompt_tokens,
        "prompt_tokens_computed": usage.computed_tokens,
        "prompt_tokens_unmetered": usage.unmetered_tokens,
        "requests": usage.requests,
        "scoring_path": usage.path,
    }


def _all_stops(caller_stops: Sequence[str], members: Sequence[Member]) -> tuple[str, ...]:
    """The caller's stop sequences plus every member's turn markers, without repeats."""
    return tuple(dict.fromkeys([*caller_stops, *(t for m in members for t in _turn_markers(m.format))]))


def _turn_markers(fmt: PromptFormat) -> tuple[str, ...]:
    """Strings that open or close a turn in a member's format: none may appear in an answer."""
    end = fmt.end_of_turn if fmt.end_of_turn.strip() else ""
    return tuple(dict.fromkeys([*fmt.stops, *([end] if end else [])]))


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _find_stop(text: str, stops: Sequence[str], new_from: int) -> int | None:
    """Index of the earliest stop sequence that ends in the newly added text."""
    if not stops:
        return None
    longest = max(len(s) for s in stops)
    start = max(0, new_from - longest + 1)
    hits = [i for s in stops if (i := text.find(s, start)) != -1]
    return min(hits) if hits else None


def _pending_stop_prefix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of text that could still grow into a stop sequence.

    That tail is held back from the stream until the next segment decides it.
    """
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:n]):
                best = max(best, n)
                break
    return best

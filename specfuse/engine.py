"""SpecFuse, the public API: an ensemble of models that answers as one.

Construction (local, from_members, from_file), start/close, generate, agenerate,
stream, astream, batch, token counting and the usable window. One request is
begun in :mod:`specfuse.request` and played round by round by
:mod:`specfuse.rounds` (the paper's method); the calls to the members are made
in :mod:`specfuse.verification` and the stop rules live in :mod:`specfuse.stopping`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from specfuse._sync import LoopThread
from specfuse.backends.base import (
    Backend,
)
from specfuse.config import EnsembleConfig, FusionSettings, MemberConfig
from specfuse.errors import (
    AllMembersFailedError,
    CapabilityError,
    ConfigError,
    RetryableError,
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
from specfuse.request import FusionResult, Member, Segment, _begin
from specfuse.rounds import play
from specfuse.verification import _describe


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
        request = await _begin(prompt, tools, settings, members, deadline_at, self._warm_weights)
        request.started = started
        request.trace.left_out = left_out
        async with contextlib.aclosing(play(request)) as segments:
            async for segment in segments:
                if segment.result is not None and request.settings.warm_weights:
                    self._warm_weights = dict(request.weights)
                yield segment

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


def _rebuild(
    config: EnsembleConfig, settings: FusionSettings, warm_weights: dict[str, float] | None
) -> SpecFuse:
    fuse = SpecFuse(config, fusion=settings)
    fuse._warm_weights = warm_weights
    return fuse


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

"""Drafting and verifying calls of one round, with their deadlines, recorded in the trace.

Every call to a member's backend is made here: a draft continues the member's
prompt plus the fused text; a verification scores all of a round's candidates in
one call. A failed call is recorded, never raised: the round goes on without it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from specfuse import scoring
from specfuse.backends.base import Draft, Sampling, ServerUsage, total_usage
from specfuse.errors import SpecfuseError
from specfuse.request import Member, _Request
from specfuse.trace import CallRecord, RoundRecord


async def _draft_and_verify(
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
        found = await _draft(request, record, member, segment_tokens)
        if found is not None:
            drafts[member.name] = found

    async def body() -> None:
        await asyncio.gather(*(draft(d) for d in drafters if d.name not in drafts))
        # Without self-votes a verifier still reads its own draft when it is the only
        # reference its softmax would have (fewer than three drafters).
        own_as_reference = not request.settings.self_verify and len(drafts) < 3
        await asyncio.gather(
            *(_verify(request, record, v, drafts, own_as_reference, scores) for v in verifiers)
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
            drafter.name, "draft", t0, tokens=draft.token_count, usage=draft.usage, attempts=draft.attempts
        )
    )
    return draft


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
        "echo_fallbacks": list(usage.echo_fallbacks),
    }


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"

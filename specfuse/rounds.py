"""The SpecFuse round loop (docs/design.md, "The algorithm"): `play` runs a begun
request round after round and yields the accepted segments as an async generator.

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

With gating (``gate_logprob``) the lead member drafts first, and the tokens it is
sure of are accepted without steps 2-4: from the first token it is unsure of, the
others draft too and everyone verifies. Online weights (SpecEM) and model exit run
between rounds. The math lives in
:mod:`specfuse.scoring`, the calls in :mod:`specfuse.verification`; this
module orders them and records the trace.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from specfuse import scoring
from specfuse.backends.base import Draft
from specfuse.errors import AllMembersFailedError
from specfuse.request import FusionResult, Member, Segment, Usage, _Request
from specfuse.stopping import _cut_at_stop, _finish_reason, _pending_stop_prefix
from specfuse.trace import CandidateRecord, RoundRecord
from specfuse.verification import _draft, _draft_and_verify

#: A member whose every call failed this many rounds in a row sits out the rest of a response.
_DROP_AFTER_FAILED_ROUNDS = 2


async def play(request: _Request) -> AsyncIterator[Segment]:
    """Round after round until a stop rule fires: yield each accepted segment as it is
    chosen (holding back a possible start of a stop sequence); the last carries the result."""
    emitted = 0
    record: RoundRecord | None = None
    try:
        while True:
            played = await _round(request)
            if played is None:  # the request deadline passed before any draft of the round
                result = _conclude(request, "deadline")
                break
            record = played
            finish = "stop" if _cut_at_stop(request, record) else _finish_reason(request, record)
            if finish is None and _past(request):
                finish = "deadline"
            if finish is not None:
                result = _conclude(request, finish)
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


def _conclude(request: _Request, finish: str) -> FusionResult:
    """The response as it ended: the trace's closing figures and the usage of the members called."""
    trace = request.trace
    trace.finish_reason = finish
    trace.total_time = time.perf_counter() - request.started
    if trace.time_to_first_segment is None:
        trace.time_to_first_segment = trace.total_time
    called = {c.member for r in trace.rounds for c in r.calls}
    usage = Usage(
        input_tokens=sum(n for m, n in trace.prompt_tokens.items() if m in called),
        output_tokens=trace.completion_tokens,
    )
    return FusionResult(text=request.fused, finish_reason=finish, trace=trace, usage=usage)


async def _round(request: _Request) -> RoundRecord | None:
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
    held, request.held = request.held, None
    if lead is not None and not solo:
        if held is not None:
            drafts, record.gated = {lead.name: held}, False
            record.gate_reason = f"lead {lead.name} was unsure here last round"
        else:
            drafts, record.gated, record.gate_reason = await _gate(request, record, lead, segment_tokens)
    if record.gated:
        scores: dict[str, dict[str, float]] = {}
    else:
        drafts, scores = await _draft_and_verify(
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
        winner = _rank(request, record, drafts, scores, order)
    record.weights_after = dict(request.weights)
    record.winner = winner
    record.accepted_text = drafts[winner].text
    request.fused += drafts[winner].text
    request.tokens_used += drafts[winner].token_count

    # A gated round has no verdict on the others: it is no evidence for an exit.
    if settings.model_exit and not solo and not record.gated and record.index >= settings.exit_warmup:
        # The lead never exits: it was chosen as the strongest member, and without it
        # no later segment could be gated (on IFEval it left one answer in 50).
        record.exits = [m for m in _exits(request, [d.name for d in drafters]) if m != request.lead]
        request.active = [m for m in request.active if m.name not in record.exits]
    _drop_failing(request, record)

    record.wall_time = time.perf_counter() - started
    request.trace.rounds.append(record)
    return record


async def _gate(
    request: _Request, record: RoundRecord, lead: Member, segment_tokens: int
) -> tuple[dict[str, Draft], bool, str]:
    """The lead drafts alone first; the tokens before the first it is unsure of are accepted.

    Returns the lead's draft (all of it when it is sure of every token, the tokens
    before the unsure one otherwise, or, when that is the first, its candidate
    for the round that runs now), whether the round is gated, and why. The rest
    of the draft, from the unsure token, is held as the lead's candidate for the
    fused round that follows.
    """
    threshold = request.settings.gate_logprob
    assert threshold is not None  # a lead is only chosen when gating is on
    alone = min(request.settings.gate_tokens, request.max_tokens - request.tokens_used)
    draft = await _draft(request, record, lead, alone)
    if draft is None:
        return {}, False, f"lead {lead.name} failed to draft"
    if not draft.token_logprobs:
        return {lead.name: draft}, False, f"lead {lead.name} reported no token log-probs"
    unsure = next((i for i, lp in enumerate(draft.token_logprobs) if lp < threshold), None)
    if unsure is None:
        least = min(draft.token_logprobs)
        sure = f"sure of all {len(draft.token_logprobs)} tokens (least log-prob {least:.3f})"
        return {lead.name: draft}, True, f"lead {lead.name} {sure} >= gate_logprob {threshold:g}"
    lp = draft.token_logprobs[unsure]
    why = f"lead {lead.name} token {unsure + 1} log-prob {lp:.3f} < gate_logprob {threshold:g}"
    parts = draft.split(unsure, segment_tokens)
    if parts is None:
        return {lead.name: draft}, False, f"{why}; no token texts to cut at, its whole draft is its candidate"
    head, tail = parts
    if unsure == 0:
        return {lead.name: tail}, False, why
    request.held = tail
    return {lead.name: head}, True, f"{why}: the {unsure} tokens before it are kept, a fused round follows"


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


def _exits(request: _Request, active_drafters: list[str]) -> list[str]:
    """Which drafters leave after this round, by the configured exit rule."""
    s = request.settings
    keep = min(s.min_active, len(active_drafters))
    if s.exit_rule == "evidence":
        spreads = {"margin": s.exit_margin, "patience": s.exit_patience}
        return scoring.evidence_exits(request.history, active_drafters, min_active=keep, **spreads)
    softmax = {"temperature": s.exit_temperature, "ratio": s.exit_ratio}
    return scoring.exit_decisions(request.quality, active_drafters, min_active=keep, **softmax)


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


def _past(request: _Request) -> bool:
    deadline = request.settings.request_deadline
    return deadline is not None and time.perf_counter() - request.started >= deadline

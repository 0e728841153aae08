"""Orchestration logic of the round loop: timing, batching, gating, failures.

These tests use scripted backends because what they check (when calls start,
what happens when one fails) is the engine's scheduling, which no model
output influences. Everything a model influences is tested on real models in
test_engine.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest

from specfuse import AllMembersFailedError, BackendError, ConfigError, SpecFuse
from specfuse.backends.base import Backend, BackendInfo, CandidateScore, Draft, Sampling
from specfuse.prompts import PlainFormat
from specfuse.request import Member
from specfuse.trace import RoundRecord


class ScriptedBackend(Backend):
    """Answers with fixed text after a fixed delay; logs when each call starts and ends."""

    def __init__(
        self,
        name: str,
        text: str,
        delay: float,
        log: list,
        *,
        fail: bool = False,
        logprob: float | None = None,
        tokens: Sequence[tuple[str, float]] = (),
    ) -> None:
        self.name, self.text, self.delay, self.log, self.fail = name, text, delay, log, fail
        self.endpoint = f"scripted:{name}"
        self.scored: list[list[str]] = []
        #: The drafter's own log-prob of each of its two tokens (None: reports none).
        self.logprob = logprob
        #: When given, the draft is these tokens (text, log-prob) in turn, as far as max_tokens.
        self.tokens = list(tokens)
        self.drafted = 0

    async def info(self) -> BackendInfo:
        return BackendInfo(model_id=self.name, context_window=10_000)

    async def draft(
        self, context: str, *, max_tokens: int, sampling: Sampling, stop: Sequence[str] = ()
    ) -> Draft:
        self.log.append((time.perf_counter(), self.name, "draft-start"))
        await asyncio.sleep(self.delay)
        if self.fail:
            raise BackendError("scripted failure", member=self.name)
        self.log.append((time.perf_counter(), self.name, "draft-end"))
        if self.tokens:
            taken = self.tokens[self.drafted : self.drafted + max_tokens]
            self.drafted += len(taken)
            return Draft(
                "".join(t for t, _ in taken),
                token_count=len(taken),
                finish_reason="length" if self.drafted < len(self.tokens) else "eos",
                token_logprobs=tuple(lp for _, lp in taken),
                token_texts=tuple(t for t, _ in taken),
            )
        own = () if self.logprob is None else (self.logprob, self.logprob)
        return Draft(self.text, token_count=2, finish_reason="length", token_logprobs=own)

    async def score(self, context: str, candidates: Sequence[str]) -> list[CandidateScore]:
        self.log.append((time.perf_counter(), self.name, f"score-start:{'|'.join(candidates)}"))
        self.scored.append(list(candidates))
        await asyncio.sleep(0.05)
        # prefer candidates that share our own text: a stand-in for "likes its own style"
        return [CandidateScore((0.0 if c == self.text else -1.0,)) for c in candidates]

    async def count_tokens(self, text: str) -> int:
        return len(text.split())


def member(backend: ScriptedBackend) -> Member:
    return Member(
        name=backend.name,
        backend=backend,
        format=PlainFormat(),
        roles=frozenset({"draft", "verify"}),
        weight=1.0,
        info=BackendInfo(model_id=backend.name, context_window=10_000),
    )


def fuse_of(*backends: ScriptedBackend, **settings) -> SpecFuse:
    from specfuse import FusionSettings

    base = {"max_tokens": 2, "model_exit": False, "seed": 1}
    base.update(settings)
    return SpecFuse(members=[member(b) for b in backends], fusion=FusionSettings(**base))


async def test_each_verifier_reads_all_its_candidates_in_one_call() -> None:
    """Drafts that arrive apart are still scored together: one call per verifier and round."""
    log: list = []
    members = [
        ScriptedBackend(n, n.upper(), delay, log) for n, delay in (("a", 0.05), ("b", 0.3), ("c", 0.6))
    ]
    result = await fuse_of(*members, max_tokens=4).agenerate("hi")
    assert len(result.trace.rounds) == 2
    for backend in members:
        # Two rounds, one call each, every time both other candidates (no self-votes).
        assert [sorted(batch) for batch in backend.scored] == [sorted(set("ABC") - {backend.text})] * 2
    for record in result.trace.rounds:
        assert [c.kind for c in record.calls].count("score") == 3
        # the round costs the slowest draft plus one verification, not a verification per candidate
        assert record.wall_time < 0.6 + 0.05 + 0.25
        assert record.critical_path <= record.wall_time


async def test_identical_candidates_are_scored_once_per_verifier() -> None:
    log: list = []
    a = ScriptedBackend("a", "same", 0.01, log)
    b = ScriptedBackend("b", "same", 0.01, log)
    c = ScriptedBackend("c", "other", 0.3, log)
    await fuse_of(a, b, c).agenerate("hi")
    for backend in (a, b, c):
        flat = [t for batch in backend.scored for t in batch]
        assert sorted(flat) == sorted(set(flat)), backend.scored


async def test_without_self_votes_three_drafters_never_score_their_own() -> None:
    log: list = []
    a, b, c = (ScriptedBackend(n, n.upper(), 0.01, log) for n in "abc")
    result = await fuse_of(a, b, c, self_verify=False).agenerate("hi")
    record = result.trace.rounds[0]
    for v in "abc":
        assert set(record.scores[v]) == set("abc") - {v}


class TableBackend(ScriptedBackend):
    """Drafts the next text of a script each round; scores a candidate by a fixed table.

    The table maps a candidate's text to one log-prob per token, so a test
    controls every verifier's opinion exactly.
    """

    def __init__(self, name: str, texts: Sequence[str], table: dict[str, float], log: list) -> None:
        super().__init__(name, texts[0], 0.0, log)
        self.texts, self.table, self.rounds = list(texts), table, 0

    async def draft(
        self, context: str, *, max_tokens: int, sampling: Sampling, stop: Sequence[str] = ()
    ) -> Draft:
        text = self.texts[min(self.rounds, len(self.texts) - 1)]
        self.rounds += 1
        return Draft(text, token_count=2, finish_reason="length")

    async def score(self, context: str, candidates: Sequence[str]) -> list[CandidateScore]:
        self.scored.append(list(candidates))
        return [CandidateScore((self.table.get(c, -9.0),)) for c in candidates]


async def test_without_self_votes_two_drafters_are_not_decided_by_member_order() -> None:
    """With self_verify off, each of two verifiers once judged a single candidate:
    softmax of one value is 1, both candidates got S = 1 and member order picked
    the first every round. Each now judges the other's draft against its own."""
    log: list = []
    # a finds b's text better than its own; b finds a's text far worse than its own.
    a = TableBackend("a", ["x"], {"x": -1.0, "y": -0.5}, log)
    b = TableBackend("b", ["y"], {"x": -3.0, "y": -0.1}, log)
    result = await fuse_of(a, b, self_verify=False, lam=0).agenerate("hi")
    record = result.trace.rounds[0]
    assert record.probabilities["a"] == pytest.approx({"b": 0.6224593})
    assert record.probabilities["b"] == pytest.approx({"a": 0.0521536})
    assert record.winner == "b"


async def test_identical_candidates_pool_their_support_in_a_round() -> None:
    log: list = []
    table = {"x": -1.0, "y": -0.5}
    members = [TableBackend("a", ["x"], table, log), TableBackend("b", ["x"], table, log)]
    members.append(TableBackend("c", ["y"], table, log))
    pooled = await fuse_of(*members, self_verify=True, lam=0).agenerate("hi")
    assert pooled.trace.rounds[0].winner == "a"  # x: 2 x 0.2741 against y: 0.4518
    assert pooled.trace.rounds[0].pooled["a"] == pytest.approx(0.5482, abs=1e-4)
    for m in members:
        m.rounds = 0
    split = await fuse_of(*members, self_verify=True, lam=0, pool_identical=False).agenerate("hi")
    assert split.trace.rounds[0].winner == "c"


async def test_a_candidate_that_repeats_the_answer_loses_when_another_does_not() -> None:
    """Verifiers like a loop ("x x" scores higher than "y"); with the guard on, the
    candidate that repeats two words of the answer is set aside and recorded."""
    log: list = []
    table = {" again and again": -0.1, " something new": -2.0}
    looper = TableBackend("looper", [" again and again"], table, log)
    fresh = TableBackend("fresh", [" something new"], table, log)
    loose = await fuse_of(looper, fresh, max_tokens=4, lam=0).agenerate("hi")
    assert [r.winner for r in loose.trace.rounds] == ["looper", "looper"]
    for m in (looper, fresh):
        m.rounds = 0
    guarded = await fuse_of(looper, fresh, max_tokens=4, lam=0, no_repeat_words=2).agenerate("hi")
    assert [r.winner for r in guarded.trace.rounds] == ["looper", "fresh"]
    assert guarded.trace.rounds[1].repeating == ["looper"]
    assert guarded.trace.rounds[0].repeating == []


async def test_a_turn_marker_split_across_two_segments_is_cut_from_the_answer() -> None:
    """A base model's "\nUser:" arrived as "\nUs" + "er:" in two rounds; each draft
    alone has no marker, so only a check of the fused text catches it."""
    log: list = []
    table = {" Yes.\nUs": -0.1, "er: Yes again": -0.1}
    talker = TableBackend("talker", [" Yes.\nUs", "er: Yes again"], table, log)
    other = TableBackend("other", ["zzz"], table, log)
    result = await fuse_of(talker, other, max_tokens=20, lam=0).agenerate("Say yes.")
    assert [r.winner for r in result.trace.rounds] == ["talker", "talker"]
    assert result.text == " Yes."
    assert result.finish_reason == "stop"
    assert "".join(r.accepted_text for r in result.trace.rounds) == result.text


async def test_stream_never_shows_a_members_turn_marker() -> None:
    log: list = []
    table = {" Yes.\nUs": -0.1, "er: Yes again": -0.1}
    talker = TableBackend("talker", [" Yes.\nUs", "er: Yes again"], table, log)
    other = TableBackend("other", ["zzz"], table, log)
    pieces = [seg.text async for seg in fuse_of(talker, other, max_tokens=20, lam=0).astream("Say yes.")]
    assert "".join(pieces) == " Yes."
    assert all("\nUs" not in p for p in pieces)


async def test_specem_keeps_a_verify_only_members_weight() -> None:
    log: list = []
    a = ScriptedBackend("a", "A", 0.0, log)
    b = ScriptedBackend("b", "B", 0.0, log)
    judge = ScriptedBackend("judge", "J", 0.0, log)
    judge_member = member(judge)
    judge_member.roles = frozenset({"verify"})
    from specfuse import FusionSettings

    fusion = FusionSettings(max_tokens=8, model_exit=False, seed=1, lam=1.0)
    fuse = SpecFuse(members=[member(a), member(b), judge_member], fusion=fusion)
    result = await fuse.agenerate("hi")
    assert len(result.trace.rounds) == 4
    for record in result.trace.rounds:
        assert record.weights_after["judge"] == pytest.approx(1 / 3)


async def test_evidence_exit_drops_a_clear_loser_and_keeps_two_verifiers_to_the_end() -> None:
    log: list = []
    table = {"A": -1.0, "B": -1.2, "C": -3.0}
    members = [TableBackend(n, [n.upper()], table, log) for n in "abc"]
    fuse = fuse_of(*members, max_tokens=20, model_exit=True, exit_warmup=2, exit_patience=2, lam=0)
    result = await fuse.agenerate("hi")
    exits = {m: r.index for r in result.trace.rounds for m in r.exits}
    assert list(exits) == ["c"]
    last = result.trace.rounds[-1]
    assert {c.member for c in last.calls if c.kind == "score"} == {"a", "b"}
    assert not last.skipped_verification


def test_members_per_round_by_tokens_weighs_rounds_by_the_tokens_they_added() -> None:
    from specfuse.trace import CallRecord, CandidateRecord, FusionTrace, RoundRecord

    fused = RoundRecord(
        1,
        candidates=[CandidateRecord(m, "t", 10, False, "length") for m in "abc"],
        winner="a",
        calls=[CallRecord(m, "draft", 0.0) for m in "abc"],
    )
    alone = RoundRecord(
        2,
        candidates=[CandidateRecord("a", "t", 30, False, "length")],
        winner="a",
        calls=[CallRecord("a", "draft", 0.0)],
    )
    trace = FusionTrace(members=list("abc"), rounds=[fused, alone])
    assert trace.members_per_round == 2.0  # (3 + 1) / 2
    assert trace.members_per_round_by_tokens == pytest.approx(1.5)  # (3 x 10 + 1 x 30) / 40
    assert trace.summary()["members_per_round_by_tokens"] == pytest.approx(1.5)


async def test_a_failing_drafter_is_recorded_and_the_round_goes_on() -> None:
    log: list = []
    ok = ScriptedBackend("ok", "fine", 0.01, log)
    bad = ScriptedBackend("bad", "never", 0.01, log, fail=True)
    result = await fuse_of(ok, bad).agenerate("hi")
    record = result.trace.rounds[0]
    assert record.winner == "ok"
    errors = [c for c in record.calls if c.error]
    assert [(c.member, c.kind) for c in errors] == [("bad", "draft")]
    assert "scripted failure" in errors[0].error


async def test_all_drafters_failing_is_one_clear_error() -> None:
    log: list = []
    a = ScriptedBackend("a", "x", 0.01, log, fail=True)
    b = ScriptedBackend("b", "y", 0.01, log, fail=True)
    with pytest.raises(AllMembersFailedError, match="every drafter failed in round 1"):
        await fuse_of(a, b).agenerate("hi")


async def test_round_deadline_leaves_a_straggler_out() -> None:
    log: list = []
    quick = ScriptedBackend("quick", "q", 0.01, log)
    straggler = ScriptedBackend("straggler", "s", 5.0, log)
    started = time.perf_counter()
    result = await fuse_of(quick, straggler, round_deadline=0.5).agenerate("hi")
    assert time.perf_counter() - started < 3.0
    record = result.trace.rounds[0]
    assert record.winner == "quick"
    assert any(c.member == "straggler" and c.error == "missed the round deadline" for c in record.calls)


async def test_tie_goes_to_member_order() -> None:
    log: list = []
    # Both verifiers like their own text equally: S ties, weights tie, order decides.
    first = ScriptedBackend("first", "1", 0.01, log)
    second = ScriptedBackend("second", "2", 0.01, log)
    result = await fuse_of(first, second, lam=0).agenerate("hi")
    assert result.trace.rounds[0].aggregated["first"] == pytest.approx(
        result.trace.rounds[0].aggregated["second"]
    )
    assert result.trace.rounds[0].winner == "first"


def test_stop_found_across_segment_boundaries() -> None:
    from specfuse.stopping import _find_stop

    # "Rayl" + "eigh!" : the stop straddles the boundary at index 4
    assert _find_stop("Rayleigh!", ["leigh"], new_from=4) == 3
    assert _find_stop("Rayleigh!", ["xyz"], new_from=4) is None
    # a stop wholly inside older text was handled in an earlier round
    assert _find_stop("ab--cd", ["--"], new_from=5) is None
    # the earliest of several stops wins
    assert _find_stop("one, two. three", [".", ","], new_from=0) == 3


def test_stream_holds_back_what_could_become_a_stop() -> None:
    from specfuse.stopping import _pending_stop_prefix

    assert _pending_stop_prefix("Hello\n\nUs", ["\n\nUser:"]) == 4  # "\n\nUs" may grow into the stop
    assert _pending_stop_prefix("Hello", ["\n\nUser:"]) == 0
    assert _pending_stop_prefix("abc", []) == 0
    assert _pending_stop_prefix("x END", ["ENDING", "Q"]) == 3  # the longest growing tail counts


# -- gated fusion ----------------------------------------------------------------


def draft_calls(record: RoundRecord) -> list[str]:
    return [c.member for c in record.calls if c.kind == "draft"]


async def test_a_sure_lead_writes_the_segment_alone() -> None:
    log: list = []
    lead = ScriptedBackend("lead", "L", 0.01, log, logprob=-0.1)
    other = ScriptedBackend("other", "O", 0.01, log, logprob=-0.1)
    result = await fuse_of(lead, other, max_tokens=4, gate_logprob=-0.5).agenerate("hi")
    assert result.text == "LL"
    for record in result.trace.rounds:
        assert record.gated is True and record.winner == "lead" and record.skipped_verification
        assert draft_calls(record) == ["lead"] and len(record.calls) == 1
        assert record.gate_reason == (
            "lead lead sure of all 2 tokens (least log-prob -0.100) >= gate_logprob -0.5"
        )
    assert other.scored == [] and not any(who == "other" for _, who, _ in log)
    assert result.trace.summary()["gated_rounds"] == 2
    assert "gated, no round: lead lead sure of all 2 tokens" in result.trace.to_html()


async def test_an_unsure_lead_gets_a_full_round_that_keeps_its_draft() -> None:
    log: list = []
    lead = ScriptedBackend("lead", "L", 0.01, log, logprob=-2.0)
    other = ScriptedBackend("other", "O", 0.01, log, logprob=-0.1)
    result = await fuse_of(lead, other, max_tokens=2, gate_logprob=-0.5).agenerate("hi")
    record = result.trace.rounds[0]
    assert record.gated is False and not record.skipped_verification
    # Its first token is unsure, and without token texts no cut is known: all of it competes.
    assert record.gate_reason == (
        "lead lead token 1 log-prob -2.000 < gate_logprob -0.5; "
        "no token texts to cut at, its whole draft is its candidate"
    )
    # The lead drafted once: its gate draft is its candidate in the round.
    assert sorted(draft_calls(record)) == ["lead", "other"]
    assert {c.member for c in record.candidates} == {"lead", "other"}
    assert set(record.scores) == {"lead", "other"}
    assert result.trace.summary()["gated_rounds"] == 0


async def test_the_lead_keeps_what_it_is_sure_of_and_the_round_starts_at_its_doubt() -> None:
    """Tokens before the first unsure one are accepted alone; from it the others draft and
    everyone verifies, the rest of the lead's draft (one segment of it) its candidate."""
    log: list = []
    sure, unsure = -0.1, -3.0
    lead = ScriptedBackend(
        "lead", "", 0.01, log, tokens=[("A", sure), (" b", sure), ("C", unsure), ("D", sure), ("E", sure)]
    )
    other = ScriptedBackend("other", "X", 0.01, log, logprob=sure)
    fuse = fuse_of(lead, other, max_tokens=4, segment_tokens=2, gate_tokens=5, gate_logprob=-0.5)
    result = await fuse.agenerate("hi")
    first, second = result.trace.rounds[:2]
    assert first.gated is True and first.accepted_text == "A b" and draft_calls(first) == ["lead"]
    assert first.gate_reason == (
        "lead lead token 3 log-prob -3.000 < gate_logprob -0.5: the 2 tokens before it are kept, "
        "a fused round follows"
    )
    assert second.gated is False and second.gate_reason == "lead lead was unsure here last round"
    # The lead is not asked again: its held tail, cut to a segment, is its candidate.
    assert draft_calls(second) == ["other"]
    assert {c.member: c.text for c in second.candidates} == {"lead": "CD", "other": "X"}
    assert set(second.scores) == {"lead", "other"}
    assert result.text.startswith("A b")


async def test_a_lead_unsure_of_its_first_token_competes_with_one_segment() -> None:
    log: list = []
    lead = ScriptedBackend("lead", "", 0.01, log, tokens=[("A", -3.0), ("B", -0.1), ("C", -0.1)])
    other = ScriptedBackend("other", "X", 0.01, log, logprob=-0.1)
    fuse = fuse_of(lead, other, max_tokens=2, segment_tokens=2, gate_tokens=3, gate_logprob=-0.5)
    record = (await fuse.agenerate("hi")).trace.rounds[0]
    assert (
        record.gated is False
        and record.gate_reason == "lead lead token 1 log-prob -3.000 < gate_logprob -0.5"
    )
    assert {c.member: c.text for c in record.candidates} == {"lead": "AB", "other": "X"}
    assert sorted(draft_calls(record)) == ["lead", "other"]


async def test_the_lead_is_the_highest_weight_unless_named() -> None:
    from specfuse import FusionSettings

    log: list = []
    a = ScriptedBackend("a", "A", 0.01, log, logprob=-0.1)
    b = ScriptedBackend("b", "B", 0.01, log, logprob=-0.1)
    heavy = member(b)
    heavy.weight = 2.0
    fusion = FusionSettings(max_tokens=2, model_exit=False, seed=1, gate_logprob=-0.5)
    by_weight = await SpecFuse(members=[member(a), heavy], fusion=fusion).agenerate("hi")
    assert by_weight.trace.rounds[0].winner == "b"
    named = await fuse_of(a, b, max_tokens=2, gate_logprob=-0.5, lead="b").agenerate("hi")
    assert named.trace.rounds[0].winner == "b"
    first = await fuse_of(a, b, max_tokens=2, gate_logprob=-0.5).agenerate("hi")
    assert first.trace.rounds[0].winner == "a"  # equal weights: the first listed leads
    with pytest.raises(ConfigError, match="lead='nobody' is not a drafting member"):
        await fuse_of(a, b, max_tokens=2, gate_logprob=-0.5, lead="nobody").agenerate("hi")


async def test_without_gating_no_round_is_gated() -> None:
    log: list = []
    a = ScriptedBackend("a", "A", 0.01, log, logprob=-0.01)
    b = ScriptedBackend("b", "B", 0.01, log, logprob=-0.01)
    result = await fuse_of(a, b, max_tokens=2, gate_logprob=None).agenerate("hi")
    assert result.trace.rounds[0].gated is None and result.trace.rounds[0].gate_reason == ""
    assert sorted(draft_calls(result.trace.rounds[0])) == ["a", "b"]


async def test_a_lead_without_token_log_probs_is_never_trusted() -> None:
    log: list = []
    a = ScriptedBackend("a", "A", 0.01, log)  # reports no log-probs
    b = ScriptedBackend("b", "B", 0.01, log)
    result = await fuse_of(a, b, max_tokens=2, gate_logprob=-5.0).agenerate("hi")
    record = result.trace.rounds[0]
    assert record.gated is False and record.gate_reason == "lead a reported no token log-probs"


async def test_the_lead_never_exits() -> None:
    """Verifiers that rate the lead's hesitant drafts lowest would exit it; it stays."""
    log: list = []
    table = {"A": -3.0, "B": -1.0, "C": -1.2}
    members = [TableBackend(n, [n.upper()], table, log) for n in "abc"]
    settings = {"max_tokens": 20, "model_exit": True, "exit_warmup": 2, "exit_patience": 2, "lam": 0}
    ungated = await fuse_of(*members, **settings, gate_logprob=None).agenerate("hi")
    assert [m for r in ungated.trace.rounds for m in r.exits] == ["a"]
    for m in members:
        m.rounds = 0
    # TableBackend drafts report no log-probs, so every round is fused: only the lead differs.
    gated = await fuse_of(*members, **settings, gate_logprob=-0.5, lead="a").agenerate("hi")
    assert all(r.gated is False for r in gated.trace.rounds)
    assert "a" not in [m for r in gated.trace.rounds for m in r.exits]

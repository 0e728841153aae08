"""Orchestration logic of the round loop: timing, pipelining, failures.

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

from specfuse import AllMembersFailedError, BackendError, SpecFuse
from specfuse.backends.base import Backend, BackendInfo, CandidateScore, Draft, Sampling
from specfuse.engine import Member
from specfuse.prompts import PlainFormat


class ScriptedBackend(Backend):
    """Answers with fixed text after a fixed delay; logs when each call starts and ends."""

    def __init__(self, name: str, text: str, delay: float, log: list, *, fail: bool = False) -> None:
        self.name, self.text, self.delay, self.log, self.fail = name, text, delay, log, fail
        self.endpoint = f"scripted:{name}"
        self.scored: list[list[str]] = []

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
        return Draft(self.text, token_count=2, finish_reason="length")

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


async def test_verification_of_a_candidate_starts_before_slower_drafts_end() -> None:
    log: list = []
    fast = ScriptedBackend("fast", "A", 0.05, log)
    slow = ScriptedBackend("slow", "B", 0.6, log)
    result = await fuse_of(fast, slow).agenerate("hi")
    slow_draft_end = next(t for t, who, what in log if who == "slow" and what == "draft-end")
    first_score_of_fast = min(t for t, who, what in log if what == "score-start:A")
    assert first_score_of_fast < slow_draft_end
    # the round costs about max(draft_i + verify(c_i)), not max(draft) + max(verify)
    record = result.trace.rounds[0]
    assert record.wall_time < 0.6 + 0.05 + 0.05 + 0.25
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


async def test_self_verify_off_skips_own_candidate() -> None:
    log: list = []
    a = ScriptedBackend("a", "x", 0.01, log)
    b = ScriptedBackend("b", "y", 0.01, log)
    result = await fuse_of(a, b, self_verify=False).agenerate("hi")
    record = result.trace.rounds[0]
    assert set(record.scores["a"]) == {"b"}
    assert set(record.scores["b"]) == {"a"}


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
    from specfuse.engine import _find_stop

    # "Rayl" + "eigh!" : the stop straddles the boundary at index 4
    assert _find_stop("Rayleigh!", ["leigh"], new_from=4) == 3
    assert _find_stop("Rayleigh!", ["xyz"], new_from=4) is None
    # a stop wholly inside older text was handled in an earlier round
    assert _find_stop("ab--cd", ["--"], new_from=5) is None
    # the earliest of several stops wins
    assert _find_stop("one, two. three", [".", ","], new_from=0) == 3


def test_stream_holds_back_what_could_become_a_stop() -> None:
    from specfuse.engine import _pending_stop_prefix

    assert _pending_stop_prefix("Hello\n\nUs", ["\n\nUser:"]) == 4  # "\n\nUs" may grow into the stop
    assert _pending_stop_prefix("Hello", ["\n\nUser:"]) == 0
    assert _pending_stop_prefix("abc", []) == 0
    assert _pending_stop_prefix("x END", ["ENDING", "Q"]) == 3  # the longest growing tail counts

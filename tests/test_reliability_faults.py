"""Faults on the wire, against a real `specfuse serve` behind a fault-injecting proxy.

The fault matrix (docs/design.md, "Reliability"): for each fault on member `b`'s proxy we assert
what the ensemble must do -- retry where it is safe, otherwise go on with
member `a` and record b's failure in the trace; leave a straggler out of a
round at `round_deadline`; raise one clear AllMembersFailedError when every
member is down; and never hang past a deadline (every test runs under
asyncio.wait_for).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from specfuse import SpecFuse
from specfuse.errors import AllMembersFailedError
from specfuse.trace import CallRecord, FusionTrace
from tests.fault_proxy import FaultProxy, Rule
from tests.reliability_fixtures import *  # noqa: F403  (the fixtures)
from tests.reliability_fixtures import PROMPT, SHORT, run


def calls_of(trace: FusionTrace, member: str) -> list[CallRecord]:
    return [c for r in trace.rounds for c in r.calls if c.member == member]


@pytest.mark.parametrize(
    "rule",
    [
        Rule(
            "status",
            status=429,
            body={"error": "Model is overloaded", "error_type": "overloaded"},
            headers={"Retry-After": "1"},
            times=2,
        ),
        Rule("status", status=503, body={"error": "Model is loading", "error_type": "unhealthy"}, times=2),
    ],
    ids=["429-retry-after", "503-waking"],
)
def test_overload_and_waking_are_retried_until_they_succeed(
    fuse: SpecFuse,
    clean: tuple[FaultProxy, FaultProxy],
    rule: Rule,
) -> None:
    _, b = clean
    b.set_rules(rule)
    t0 = time.monotonic()
    result = run(fuse.agenerate(PROMPT, **SHORT), 60)
    elapsed = time.monotonic() - t0
    calls = calls_of(result.trace, "b")
    assert calls and all(c.error is None for c in calls)
    # Two injected failures, each answered by one more attempt of the same call.
    assert sum(c.attempts for c in calls) == len(calls) + 2
    assert b.count() == len(calls) + 2
    if rule.status == 429:
        assert elapsed >= 1.0  # the Retry-After was honoured
    assert result.text


FAILURES = [
    # (rule, retried?) -- a retried failure costs FAST_RETRY.max_attempts requests per call.
    (Rule("status", status=500, body={"error": "boom", "error_type": "generation"}), False),
    (
        Rule("status", status=422, body={"error": "Input validation error: bad", "error_type": "validation"}),
        False,
    ),
    (Rule("malformed"), False),
    (Rule("reset"), True),
    (Rule("truncate"), True),
    (Rule("die"), True),
]


@pytest.mark.parametrize(
    ("rule", "retried"), FAILURES, ids=["500", "422", "malformed-json", "reset", "truncated", "die-mid-body"]
)
def test_a_failing_member_is_recorded_and_the_ensemble_continues(
    fuse: SpecFuse,
    clean: tuple[FaultProxy, FaultProxy],
    rule: Rule,
    retried: bool,
) -> None:
    _, b = clean
    b.set_rules(rule)
    result = run(fuse.agenerate(PROMPT, **SHORT), 60)
    assert result.text and result.finish_reason in ("length", "stop")
    assert all(r.winner == "a" for r in result.trace.rounds)
    failed = calls_of(result.trace, "b")
    assert failed and all(c.error for c in failed)
    for call in failed:
        assert call.attempts == (3 if retried else 1), call
        # The error names the member and the endpoint (the proxy), never a token.
        assert "'b'" in call.error and f"127.0.0.1:{b.port}" in call.error  # type: ignore[operator]
    assert all(c.error is None for c in calls_of(result.trace, "a"))


def test_a_slow_member_within_the_deadline_is_waited_for(
    fuse: SpecFuse,
    clean: tuple[FaultProxy, FaultProxy],
) -> None:
    _, b = clean
    b.set_rules(Rule("slow", delay=0.5))
    result = run(fuse.agenerate(PROMPT, round_deadline=30.0, **SHORT), 60)
    assert {c.member for c in result.trace.rounds[0].candidates} == {"a", "b"}
    assert all(c.error is None for c in result.trace.rounds[0].calls)


def test_a_straggler_is_left_out_at_the_round_deadline_and_then_dropped(
    fuse: SpecFuse,
    clean: tuple[FaultProxy, FaultProxy],
    b_hangs: FaultProxy,
) -> None:
    """b hangs: each round ends at round_deadline without it; after two such rounds it is not called again."""
    a, b = clean[0], b_hangs
    deadline = 4.0
    t0 = time.monotonic()
    result = run(fuse.agenerate(PROMPT, max_tokens=9, segment_tokens=3, round_deadline=deadline), 90)
    elapsed = time.monotonic() - t0
    rounds = result.trace.rounds
    assert result.text and len(rounds) >= 3
    for r in rounds[:2]:
        assert [c.member for c in r.candidates] == ["a"]
        assert r.wall_time < deadline + 2.0
        assert any(c.member == "b" and c.error == "missed the round deadline" for c in r.calls)
    assert rounds[1].exits == ["b"]
    # Dropped: no later round calls b, and b's proxy saw no request after round 2.
    assert all(c.member == "a" for r in rounds[2:] for c in r.calls)
    hung = b.count()
    assert hung >= 2
    # The abandoned requests were cancelled on the wire: the proxy saw their clients go.
    t1 = time.monotonic()
    while b.disconnects < hung and time.monotonic() - t1 < 5:
        time.sleep(0.05)
    assert b.disconnects == hung
    assert elapsed < 2 * deadline + 30
    assert a.count() > 0


def test_a_hanging_member_without_round_deadline_times_out(fuse: SpecFuse, b_hangs: FaultProxy) -> None:
    """No round_deadline: b's per-call timeout (1.5 s) and the retry budget bound the round."""
    backend: Any = fuse._backends["b"]
    saved = backend.timeout
    backend.timeout = 1.5  # read when the per-loop client is made (run() uses a fresh loop)
    try:
        t0 = time.monotonic()
        result = run(fuse.agenerate(PROMPT, **SHORT), 60)
        elapsed = time.monotonic() - t0
    finally:
        backend.timeout = saved
    failed = calls_of(result.trace, "b")
    assert failed and all("timed out" in (c.error or "") for c in failed)
    assert all(c.attempts == 3 for c in failed)
    assert result.text and elapsed < 3 * 1.5 + 20


def test_all_members_down_is_one_clear_error(
    fuse: SpecFuse,
    clean: tuple[FaultProxy, FaultProxy],
) -> None:
    a, b = clean
    a.set_rules(Rule("status", status=503, body={"error": "down", "error_type": "unhealthy"}))
    b.set_rules(Rule("reset"))
    t0 = time.monotonic()
    with pytest.raises(AllMembersFailedError) as info:
        run(fuse.agenerate(PROMPT, **SHORT), 60)
    message = str(info.value)
    for member, proxy in (("a", a), ("b", b)):
        assert f"'{member}'" in message and f"127.0.0.1:{proxy.port}" in message
    assert "503" in message and "after 3 attempts" in message
    assert time.monotonic() - t0 < 20


def test_concurrent_calls_on_one_backend_each_record_their_own_attempts(
    fuse: SpecFuse,
    clean: tuple[FaultProxy, FaultProxy],
) -> None:
    """Two requests at once on one backend: b's draft for one is retried twice, the other's is not.

    Attempts travel with each call's result, so neither trace shows the other's count.
    """
    _, b = clean
    loading = {"error": "Model is loading", "error_type": "unhealthy"}
    b.set_rules(Rule("status", status=503, body=loading, times=2, match=b"Retry me"))

    async def both() -> list[Any]:
        return list(
            await asyncio.gather(
                fuse.agenerate("Retry me. " + PROMPT, **SHORT), fuse.agenerate(PROMPT, **SHORT)
            )
        )

    retried, plain = run(both(), 60)
    retried_calls, plain_calls = calls_of(retried.trace, "b"), calls_of(plain.trace, "b")
    assert all(c.error is None for c in retried_calls + plain_calls)
    assert [c.attempts for c in retried_calls if c.kind == "draft"] == [3]
    assert sum(c.attempts for c in retried_calls) == len(retried_calls) + 2
    assert plain_calls and all(c.attempts == 1 for c in plain_calls)
    assert b.count() == len(retried_calls) + len(plain_calls) + 2

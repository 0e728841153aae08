"""What calls cost the servers: the pure logic (usage sums, the trace's fields, the
cached-position rule of vLLM's token-in route). The real-server proofs are in
tests/test_real_vllm_cost.py."""

from __future__ import annotations

import asyncio
import json

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from specfuse.backends.base import ServerUsage, total_usage
from specfuse.backends.vllm import VLLMBackend
from specfuse.backends.vllm_tokens import common_prefix, reported_cached_tokens, row_offset, valid_from
from specfuse.config import MemberConfig
from specfuse.errors import CapabilityError
from specfuse.trace import CallRecord, CandidateRecord, FusionTrace, RoundRecord
from tests.remote_fixtures import server_pool  # noqa: F401 - a session fixture


def test_computed_tokens_is_prompt_minus_cached_and_unknown_without_a_cache_count() -> None:
    assert ServerUsage(prompt_tokens=721, cached_tokens=640).computed_tokens == 81
    assert ServerUsage(prompt_tokens=721).computed_tokens is None


def test_usage_sums_keep_unknown_cache_counts_unknown() -> None:
    a = ServerUsage(prompt_tokens=100, cached_tokens=96, path="tokens")
    b = ServerUsage(prompt_tokens=100, cached_tokens=0, path="echo")
    total = total_usage([a, b])
    assert total == ServerUsage(prompt_tokens=200, cached_tokens=96, requests=2, path="echo+tokens")
    assert total_usage([a, ServerUsage(prompt_tokens=5)]) is not None
    assert total_usage([a, ServerUsage(prompt_tokens=5)]).computed_tokens is None  # type: ignore[union-attr]
    # A call whose usage is unknown makes the sum unknown, not smaller.
    assert total_usage([a, None]) is None
    assert total_usage([]) is None


def test_a_lost_try_is_unmetered_not_guessed() -> None:
    """Three token-route tries vLLM computed but could not answer, then echo."""
    lost = ServerUsage(prompt_tokens=600, cached_tokens=0, requests=3, path="tokens", unmetered_tokens=600)
    echo = ServerUsage(prompt_tokens=200, cached_tokens=0, path="echo")
    total = lost + echo
    assert total.computed_tokens == 200  # what the server reported computing
    assert total.unmetered_tokens == 600  # and up to this much more
    assert total.requests == 4 and total.path == "echo+tokens"
    # Each candidate's reason for its echo is kept through a sum, one entry each.
    why = ServerUsage(prompt_tokens=0, requests=0, echo_fallbacks=("lost",))
    assert (why + ServerUsage(prompt_tokens=1) + why).echo_fallbacks == ("lost", "lost")
    succeeded = lost + ServerUsage(prompt_tokens=200, cached_tokens=192, path="tokens")
    assert succeeded.computed_tokens == 8 and succeeded.unmetered_tokens == 600


def test_reported_cached_tokens_reads_vllm_usage_details() -> None:
    assert (
        reported_cached_tokens({"usage": {"prompt_tokens": 9, "prompt_tokens_details": {"cached_tokens": 0}}})
        == 0
    )
    assert (
        reported_cached_tokens({"usage": {"prompt_tokens": 9, "prompt_tokens_details": {"cached_tokens": 8}}})
        == 8
    )
    # Without --enable-prompt-tokens-details the field is absent: unknown, never 0.
    assert reported_cached_tokens({"usage": {"prompt_tokens": 9}}) is None
    assert reported_cached_tokens({"usage": {"prompt_tokens": 9, "prompt_tokens_details": None}}) is None
    assert reported_cached_tokens({}) is None


@given(cached=st.integers(0, 4096), start=st.integers(1, 4096))
@example(cached=128, start=128)  # the cache ends exactly at the candidate: its first log-prob is not computed
@example(cached=127, start=128)
def test_a_candidate_is_read_from_the_token_route_only_when_every_position_was_computed(
    cached: int, start: int
) -> None:
    # vLLM computes the log-prob of token i from the logits at i - 1: with k cached
    # tokens, tokens 1..k have none. A candidate starting at `start` is safe iff start > k.
    assert (valid_from(cached) <= start) == (start > cached)


def _probe(first: dict | None, second: dict | None) -> tuple[tuple[str, str], list[str]]:  # type: ignore[type-arg]
    """The path the probe picks when vLLM answers its two token-route requests so
    (None: vLLM computed the request but could not encode its answer on any try)."""
    backend = VLLMBackend(MemberConfig(model="m", backend="vllm", urls=["http://127.0.0.1:9"]))
    texts: list[str] = []
    answers = iter([first, second])

    async def token_ids(text: str) -> list[int]:
        texts.append(text)
        return list(range(40))

    async def post_tokens(url: str, body: dict) -> tuple[dict | None, int]:  # type: ignore[type-arg]
        answer = next(answers)
        return answer, 0 if answer is not None else 3

    backend._token_ids = token_ids  # type: ignore[method-assign]
    backend._post_tokens = post_tokens  # type: ignore[method-assign]
    return asyncio.run(backend._choose_scoring_path("m", True, 4096)), texts


def _usage(cached: int | None) -> dict:  # type: ignore[type-arg]
    details = {} if cached is None else {"prompt_tokens_details": {"cached_tokens": cached}}
    return {"usage": {"prompt_tokens": 300, **details}}


def test_the_probe_reads_a_lost_second_answer_as_proof_the_cache_was_read() -> None:
    # Both answered: the cached count decides.
    assert _probe(_usage(0), _usage(256))[0][0] == "tokens"
    assert _probe(_usage(0), _usage(0))[0][0] == "echo"
    # The second lost: only cached positions hold the NaN vLLM cannot encode, so the
    # cache was read, and the first answer showed the server reports its cache use.
    (path, why), _ = _probe(_usage(0), None)
    assert path == "tokens" and "cached" in why
    # ...but a server that does not report cached tokens still cannot use the route.
    (path, why), _ = _probe(_usage(None), None)
    assert path == "echo" and "--enable-prompt-tokens-details" in why
    (path, why), _ = _probe(None, None)
    assert path == "echo" and "uncached" in why


def test_each_probe_sends_a_text_no_earlier_probe_sent() -> None:
    # So its first request reads nothing from the cache and is always answered.
    _, first = _probe(_usage(0), _usage(256))
    _, second = _probe(_usage(0), _usage(256))
    assert first != second


@given(st.lists(st.integers(0, 5), max_size=8), st.lists(st.integers(0, 5), max_size=8))
def test_common_prefix_is_the_longest_shared_head(a: list[int], b: list[int]) -> None:
    n = common_prefix(a, b)
    assert a[:n] == b[:n]
    assert n == min(len(a), len(b)) or a[n] != b[n]


def test_member_scoring_setting_is_checked() -> None:
    assert MemberConfig(model="m", backend="vllm", urls=["http://h"]).scoring == "auto"
    assert MemberConfig(model="m", backend="vllm", urls=["http://h"], scoring="echo").scoring == "echo"
    with pytest.raises(ValueError, match="scoring"):
        MemberConfig(model="m", backend="vllm", urls=["http://h"], scoring="cheap")  # type: ignore[arg-type]


def _trace() -> FusionTrace:
    rnd = RoundRecord(index=1, winner="a", accepted_text="x")
    rnd.candidates = [
        CandidateRecord("a", "x", 1, False, "length"),
        CandidateRecord("b", "y", 1, False, "length"),
    ]
    rnd.calls = [
        CallRecord(
            "a", "draft", 0.1, tokens=1, server_prompt_tokens=700, prompt_tokens_computed=60, requests=1
        ),
        CallRecord(
            "b", "draft", 0.1, tokens=1, server_prompt_tokens=700, prompt_tokens_computed=700, requests=1
        ),
        CallRecord(
            "a",
            "score",
            0.1,
            tokens=2,
            server_prompt_tokens=2103,
            prompt_tokens_computed=140,
            prompt_tokens_unmetered=701,
            requests=3,
            scoring_path="echo+tokens",
            echo_fallbacks=["lost", "unknown", "lost"],
        ),
        CallRecord("b", "score", 0.1, tokens=2),  # a server that reports nothing
    ]
    return FusionTrace(members=["a", "b"], rounds=[rnd])


def test_trace_sums_prompt_tokens_computed_per_member_and_overall() -> None:
    summary = _trace().summary()
    assert summary["members"]["a"]["prompt_tokens_computed"] == 200
    assert summary["members"]["b"]["prompt_tokens_computed"] == 700
    assert summary["members"]["b"]["calls_without_cost"] == 1
    assert summary["members"]["a"]["calls_without_cost"] == 0
    assert summary["prompt_tokens_computed"] == 900
    assert summary["members"]["a"]["prompt_tokens_unmetered"] == 701
    assert summary["members"]["b"]["prompt_tokens_unmetered"] == 0
    assert summary["prompt_tokens_unmetered"] == 701
    # Candidates that fell back to echo, counted by why (three in one score call).
    assert summary["echo_fallbacks"] == {"lost": 2, "unknown": 1}


def test_to_dict_shows_each_calls_cost_and_scoring_path() -> None:
    data = json.loads(_trace().to_json())
    score = data["rounds"][0]["calls"][2]
    assert score["prompt_tokens_computed"] == 140
    assert score["server_prompt_tokens"] == 2103
    assert score["prompt_tokens_unmetered"] == 701
    assert score["requests"] == 3
    assert score["scoring_path"] == "echo+tokens"
    assert score["echo_fallbacks"] == ["lost", "unknown", "lost"]
    assert data["rounds"][0]["calls"][3]["prompt_tokens_computed"] is None
    assert data["summary"]["prompt_tokens_computed"] == 900


def test_a_server_without_the_token_route_scores_by_echo_in_one_request_and_says_why(
    server_pool,  # noqa: F811
) -> None:
    """`specfuse serve --protocol vllm` has no /inference/v1/generate, like a vLLM
    started without --enable-scale-out."""
    (server,) = server_pool.get("vllm", ("smollm2-135m",))

    def config(scoring: str) -> MemberConfig:
        return MemberConfig(model="smollm2-135m", backend="vllm", urls=[server.url], scoring=scoring)  # type: ignore[arg-type]

    async def main() -> None:
        auto = VLLMBackend(config("auto"))
        info = await auto.info()
        assert info.extra["scoring_path"] == "echo"
        assert "--enable-scale-out" in info.extra["scoring_path_reason"]
        context = "Name three primary colours.\nAnswer:"
        candidates = [" Red, blue and yellow.", " Green.", " Cyan, magenta"]
        batch = await auto.score(context, candidates)
        # All of a verifier's candidates went in one request...
        usages = [s.usage for s in batch]
        assert all(u is not None and u.path == "echo" for u in usages)
        assert sum(u.requests for u in usages if u) == 1
        # ...and score as each would alone.
        for cand, got in zip(candidates, batch, strict=True):
            alone = (await auto.score(context, [cand]))[0]
            assert got.token_logprobs == pytest.approx(alone.token_logprobs, abs=1e-4)
        await auto.aclose()

        strict = VLLMBackend(config("tokens"))
        with pytest.raises(CapabilityError, match="scoring='tokens' was asked for, but the server has no"):
            await strict.info()
        await strict.aclose()

    asyncio.run(main())


def test_prompt_log_prob_rows_are_found_in_either_runners_layout() -> None:
    """V1: a row for every prompt position; V2: rows only for the computed ones (vllm_tokens.row_offset)."""
    assert row_offset(10, 10, 4) == 0
    assert row_offset(6, 10, 4) == 4
    assert row_offset(10, 10, 0) == 0
    assert row_offset(8, 10, 4) is None

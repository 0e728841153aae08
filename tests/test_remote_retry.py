"""Retries, replicas and token hygiene against a loopback fault-injecting server.

Proves: 429 (with Retry-After) and 503 are retried and succeed, 422 is not
retried, failures name member and endpoint but never the token, a member's
api_key goes only to its own host, HF_TOKEN never goes to a non-HF host (nor
does huggingface_hub's cached token), and a failing replica is skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from specfuse import BackendError
from specfuse.backends import _remote, create_backend
from specfuse.backends._http import RetryPolicy, is_hf_hosted, token_for
from specfuse.backends.base import Sampling
from specfuse.config import MemberConfig
from tests.remote_fixtures import TGI_GENERATE_OK, fault_pair, fault_server  # noqa: F401  (fixtures)


def backend(protocol: str, *urls: str, **kw):
    b = create_backend(
        MemberConfig(model="m", name="member-x", backend=protocol, urls=list(urls), timeout=5, **kw)
    )
    b.retry = RetryPolicy(max_attempts=4, initial=0.01, maximum=0.05, deadline=10)
    return b


async def attempts_of(coro):
    """The result and its attempts: a score's own (each CandidateScore carries them), else
    (count_tokens returns a bare number) the most the retrying calls it made reported."""
    reported: list[int] = []
    retrying = _remote.with_retries

    async def recorded(*args, **kwargs):
        result, attempts = await retrying(*args, **kwargs)
        reported.append(attempts)
        return result, attempts

    _remote.with_retries = recorded
    try:
        result = await coro
    finally:
        _remote.with_retries = retrying
    if isinstance(result, list):
        return result, max(score.attempts for score in result)
    return result, max(reported, default=1)


@pytest.mark.parametrize("status", [429, 503])
def test_overload_and_waking_are_retried(fault_server, status):  # noqa: F811
    fault = fault_server.script(
        (status, {"error": "busy", "error_type": "overloaded"}, {"Retry-After": "0"}),
        (status, {"error": "busy", "error_type": "overloaded"}),
        (200, [{"id": 1, "text": "a", "start": 0, "stop": 1}] * 3),
    )
    b = backend("tgi", fault_server.url)
    n, attempts = asyncio.run(attempts_of(b.count_tokens("abc")))
    assert n == 3 and attempts == 3 and len(fault.seen) == 3


def test_tgi_generate_is_retried(fault_server):  # noqa: F811
    loading = {"error": "Model is loading", "error_type": "unhealthy"}
    fault_server.script((503, loading), (200, [TGI_GENERATE_OK]))
    b = backend("tgi", fault_server.url)
    draft = asyncio.run(b.draft("Hello", max_tokens=3, sampling=Sampling(temperature=0)))
    assert draft.text == " hi" and draft.token_count == 1
    assert len(fault_server.fault.seen) == 2


@pytest.mark.parametrize("protocol", ["tgi", "vllm", "sglang"])
def test_422_is_not_retried_and_errors_name_member_not_token(fault_server, protocol):  # noqa: F811
    fault = fault_server.script((422, {"error": "Input validation error: bad", "error_type": "validation"}))
    b = backend(protocol, fault_server.url, api_key="sk-secret-123")
    with pytest.raises(BackendError) as info:
        asyncio.run(b.draft("Hello", max_tokens=3, sampling=Sampling(temperature=0)))
    message = str(info.value)
    assert len(fault.seen) == 1
    assert "member-x" in message and f"127.0.0.1:{fault_server.port}" in message and "422" in message
    assert "sk-secret-123" not in message and "sk-secret-123" not in repr(b.__dict__.get("endpoint"))


def test_retries_stop_at_the_deadline(fault_server):  # noqa: F811
    fault_server.script((503, {"error": "down", "error_type": "unhealthy"}, {"Retry-After": "30"}))
    b = backend("tgi", fault_server.url)
    b.retry = RetryPolicy(max_attempts=50, initial=0.01, maximum=0.5, deadline=1.0)
    t0 = time.monotonic()
    with pytest.raises(BackendError, match="503"):
        asyncio.run(b.count_tokens("x"))
    assert time.monotonic() - t0 < 3.0


@pytest.mark.parametrize("protocol", ["tgi", "vllm", "sglang"])
def test_api_key_goes_to_its_host_and_hf_token_never_to_others(fault_server, monkeypatch, protocol):  # noqa: F811
    monkeypatch.setenv("HF_TOKEN", "hf_env_token_should_stay_home")
    fault_server.script((200, TGI_GENERATE_OK if protocol == "tgi" else {}))
    keyed = backend(protocol, fault_server.url, api_key="sk-member-key")
    bare = backend(protocol, fault_server.url)

    async def calls():
        for b in (keyed, bare):
            # The reply is not a valid body for every protocol; only the headers matter.
            with contextlib.suppress(BackendError, KeyError, TypeError, IndexError, AttributeError):
                await b.draft("Hello", max_tokens=1, sampling=Sampling(temperature=0))

    asyncio.run(calls())
    first, second = fault_server.fault.seen[0], fault_server.fault.seen[-1]
    assert first["headers"].get("authorization") == "Bearer sk-member-key"
    assert "authorization" not in second["headers"]
    assert all("hf_env_token" not in str(s["headers"]) for s in fault_server.fault.seen)


def test_token_policy():
    assert is_hf_hosted("https://abc.us-east-1.aws.endpoints.huggingface.cloud/")
    assert is_hf_hosted("https://router.huggingface.co/v1") and is_hf_hosted("https://x.hf.space")
    assert not is_hf_hosted("https://huggingface.co.evil.example/") and not is_hf_hosted(
        "http://127.0.0.1:8080"
    )
    assert token_for("http://127.0.0.1:1", None) is None
    assert token_for("http://127.0.0.1:1", "k") == "k"


def test_failing_replica_is_skipped_for_a_cooldown(fault_pair):  # noqa: F811
    bad, good = fault_pair
    bad.script((503, {"error": "down", "error_type": "unhealthy"}))
    good.script((200, [{"id": 1, "text": "a", "start": 0, "stop": 1}]))
    b = backend("tgi", bad.url, good.url)

    async def many():
        return [await b.count_tokens("a") for _ in range(6)]

    assert asyncio.run(many()) == [1] * 6
    assert len(bad.fault.seen) == 1  # hit once, then cooling down
    assert len(good.fault.seen) == 6


def test_serve_registers_its_subcommand():
    import argparse

    from specfuse import devserver as serve

    parser = argparse.ArgumentParser(prog="specfuse")
    serve.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "serve",
            "smollm2-135m",
            "--protocol",
            "sglang",
            "--port",
            "9",
            "--api-key",
            "k",
            "--max-concurrent-requests",
            "2",
        ]
    )
    assert (args.model, args.protocol, args.host, args.port) == ("smollm2-135m", "sglang", "127.0.0.1", 9)
    assert args.api_key == "k" and args.max_concurrent_requests == 2 and args.func is serve.run
    assert not args.enable_prefill_logprobs


def test_score_retries_and_reports_attempts(fault_server):  # noqa: F811
    prefill = [
        {"id": 1, "text": "ab", "logprob": None},
        {"id": 2, "text": "c", "logprob": -1.5},
        {"id": 3, "text": "d", "logprob": -0.5},
    ]
    fault_server.script(
        (503, {"error": "waking", "error_type": "unhealthy"}),
        (200, [{**TGI_GENERATE_OK, "details": {**TGI_GENERATE_OK["details"], "prefill": prefill}}]),
    )
    b = backend("tgi", fault_server.url)
    scores, attempts = asyncio.run(attempts_of(b.score("ab", ["cd"])))
    assert scores[0].token_logprobs == (-1.5, -0.5) and attempts == 2

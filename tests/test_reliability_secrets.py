"""Secrets stay secret: on the wire, in logs, traces, exceptions and serialised forms.

Extends tests/test_remote_retry.py (token policy against a scripted server)
and tests/test_langchain_adapter.py (LangChain dumpd) with a full fusion over
a real `specfuse serve`: member `a` has an api_key, member `b` has none, and
HF_TOKEN is set. The proxies record every request's headers, so we can prove
a's key reaches a's host only and no token ever reaches b's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from specfuse import EnsembleConfig, SpecFuse
from specfuse.backends._http import RetryPolicy
from tests.fault_proxy import FaultProxy, Rule
from tests.reliability_fixtures import *  # noqa: F403  (the fixtures)
from tests.reliability_fixtures import MODEL, PROMPT, SHORT, run

KEY = "sk-reliability-member-key-7f3a"
HF = "hf_reliability_env_token_91c2"


@pytest.fixture(scope="module")
def keyed(proxies: tuple[FaultProxy, FaultProxy]) -> Iterator[SpecFuse]:
    a, b = proxies
    members = [
        {"model": MODEL, "name": "a", "backend": "tgi", "urls": [a.url], "api_key": KEY, "timeout": 20},
        {"model": MODEL, "name": "b", "backend": "tgi", "urls": [b.url], "timeout": 20},
    ]
    fuse = SpecFuse(EnsembleConfig.build(members, temperature=0.0, seed=7))
    for backend in fuse._backends.values():
        backend.retry = RetryPolicy(max_attempts=2, initial=0.05, maximum=0.1, deadline=10)  # type: ignore[attr-defined]
    yield fuse
    fuse.close()


def test_keys_reach_their_own_host_only_and_never_show(
    keyed: SpecFuse,
    clean: tuple[FaultProxy, FaultProxy],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("HF_TOKEN", HF)
    a, b = clean
    caplog.set_level(logging.DEBUG)
    run(keyed.astart(), 120)
    result = run(keyed.agenerate(PROMPT, **SHORT), 60)
    assert result.text
    # On the wire: every request to a's host carries its key; b's host never sees any token.
    assert a.seen and all(s.headers.get("authorization") == f"Bearer {KEY}" for s in a.seen)
    assert b.seen and all("authorization" not in s.headers for s in b.seen)
    assert {s.path for s in b.seen} >= {"/info", "/", "/tokenize"}  # probe, generate/score, count
    everything = " ".join(str(s.headers) + s.body.decode(errors="replace") for s in a.seen + b.seen)
    assert HF not in everything and KEY not in everything.replace(f"Bearer {KEY}", "")
    # Nowhere else: logs at DEBUG, the trace, reprs, serialised settings.
    shown = [
        caplog.text,
        result.trace.to_json(),
        result.trace.to_html(),
        repr(keyed.config),
        str(keyed.config),
        keyed.config.model_dump_json() if keyed.config else "",
        repr(keyed._backends["a"]),
        keyed._backends["a"].endpoint,
    ]
    for text in shown:
        assert KEY not in text and HF not in text


def test_a_refused_key_is_reported_without_it(keyed: SpecFuse, clean: tuple[FaultProxy, FaultProxy]) -> None:
    a, _ = clean
    a.set_rules(Rule("status", status=401, body={"error": "Unauthorized", "error_type": "authentication"}))
    run(keyed.astart(), 120)
    result = run(keyed.agenerate(PROMPT, **SHORT), 60)
    errors = [c.error or "" for r in result.trace.rounds for c in r.calls if c.member == "a"]
    assert errors and all("401" in e and "api_key" in e for e in errors)
    assert all(c.attempts == 1 for r in result.trace.rounds for c in r.calls if c.member == "a")  # no retry
    assert KEY not in result.trace.to_json()
    a.set_rules(Rule("status", status=401, body={"error": "Unauthorized"}, paths=("/", "/generate")))
    _, b = clean
    b.set_rules(Rule("status", status=401, body={"error": "Unauthorized"}))
    with pytest.raises(Exception) as info:
        run(keyed.agenerate(PROMPT, **SHORT), 60)
    assert "401" in str(info.value) and KEY not in str(info.value) and KEY not in repr(info.value)


def test_adapters_serialise_without_member_keys() -> None:
    """LlamaIndex's SpecFuseLLM and LangChain's completion model (test_langchain_adapter covers the chat)."""
    from langchain_core.load import dumps

    from langchain_specfuse import SpecFuseLLM as LangChainLLM
    from llama_index_specfuse import SpecFuseLLM

    member = {"model": "m1", "backend": "tgi", "urls": ["http://127.0.0.1:9"], "api_key": KEY}
    llm = SpecFuseLLM(EnsembleConfig.build([member]))
    for text in (llm.model_dump_json(), str(llm.to_dict()), repr(llm), str(llm)):
        assert KEY not in text
    assert llm.ensemble.members[0].api_key is not None  # still held, as a SecretStr
    assert llm.ensemble.members[0].api_key.get_secret_value() == KEY
    completion = LangChainLLM(members=[member], api_key="sk-top-level-secret")
    for text in (dumps(completion), repr(completion), str(completion)):
        assert KEY not in text and "sk-top-level-secret" not in text


def test_llama_index_to_json() -> None:
    # LlamaIndex's to_json() runs json.dumps over model_dump(): member roles dump as a list.
    from llama_index_specfuse import SpecFuseLLM

    member = {"model": "smollm2-135m", "backend": "tgi", "urls": "http://127.0.0.1:9", "api_key": KEY}
    text = SpecFuseLLM(EnsembleConfig.build([member])).to_json()
    assert '"roles": ["draft", "verify"]' in text
    assert KEY not in text

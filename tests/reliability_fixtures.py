"""Shared fixtures of the reliability tests (docs/design.md, "Reliability").

One real `specfuse serve` (smollm2-135m, TGI protocol, prefill log-probs on)
sits behind two fault-injecting proxies; the ensemble has two members, `a`
and `b`, one per proxy. Both members are the same small model because this
machine has two shared cores: a fault on `b`'s proxy then changes nothing but
`b`, and each round stays cheap. Everything is session-scoped so the server
starts, and the members are probed, once for all reliability test modules.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

import pytest

from specfuse import EnsembleConfig, SpecFuse
from specfuse.backends._http import RetryPolicy
from tests.fault_proxy import FaultProxy, Rule
from tests.remote_fixtures import ServerProcess

T = TypeVar("T")

#: The fixtures; test modules star-import them (pytest finds fixtures by module name).
__all__ = ["b_hangs", "clean", "fuse", "proxies", "upstream"]

MODEL = "smollm2-135m"
SERVE_ARGS = ("--enable-prefill-logprobs",)
PROMPT = "Name three primary colours."
#: Fast retries so that a failing member costs seconds, not the default 30 s budget.
FAST_RETRY = RetryPolicy(max_attempts=3, initial=0.05, maximum=0.2, deadline=10.0)
#: One short round per request unless a test asks for more.
SHORT = {"max_tokens": 3, "segment_tokens": 3}


def run(coro: Coroutine[Any, Any, T], limit: float) -> T:
    """Run coro on a fresh loop, failing (not hanging) if it takes more than `limit` seconds."""
    return asyncio.run(asyncio.wait_for(coro, limit))


#: One server, two proxies and one probed ensemble for every reliability module.
#: Each test module star-imports these fixtures, which makes pytest see one
#: session fixture per module; the cache keeps them from starting one server each.
_SHARED: dict[str, Any] = {}


@pytest.fixture(scope="session")
def upstream(request: pytest.FixtureRequest) -> ServerProcess:
    if "upstream" not in _SHARED:
        server = ServerProcess(MODEL, "tgi", SERVE_ARGS).start()
        request.addfinalizer(server.stop)
        server.wait_healthy()
        _SHARED["upstream"] = server
    return _SHARED["upstream"]


@pytest.fixture(scope="session")
def proxies(upstream: ServerProcess, request: pytest.FixtureRequest) -> tuple[FaultProxy, FaultProxy]:
    if "proxies" not in _SHARED:
        pair = FaultProxy(upstream.url).start(), FaultProxy(upstream.url).start()
        for p in pair:
            request.addfinalizer(p.stop)
        _SHARED["proxies"] = pair
    return _SHARED["proxies"]


def make_fuse(proxies: tuple[FaultProxy, FaultProxy], timeout: float = 20.0, **fusion: Any) -> SpecFuse:
    """Members a and b over the two proxies, greedy, with fast retries, every round fused
    (so each round calls both members and a fault on either one is met)."""
    members = [
        {"model": MODEL, "name": name, "backend": "tgi", "urls": [p.url], "timeout": timeout}
        for name, p in zip("ab", proxies, strict=True)
    ]
    settings = {"temperature": 0.0, "seed": 7, "gate_logprob": None, **fusion}
    fuse = SpecFuse(EnsembleConfig.build(members, **settings))
    for backend in fuse._backends.values():
        backend.retry = FAST_RETRY  # type: ignore[attr-defined]
    return fuse


@pytest.fixture(scope="session")
def fuse(proxies: tuple[FaultProxy, FaultProxy], request: pytest.FixtureRequest) -> SpecFuse:
    if "fuse" not in _SHARED:
        for p in proxies:
            p.set_rules()
        model = make_fuse(proxies)
        request.addfinalizer(model.close)
        run(model.astart(), 120)
        _SHARED["fuse"] = model
    return _SHARED["fuse"]


@pytest.fixture(autouse=False)
def clean(proxies: tuple[FaultProxy, FaultProxy]) -> Iterator[tuple[FaultProxy, FaultProxy]]:
    """Healthy proxies before and after a test."""
    for p in proxies:
        p.set_rules()
    yield proxies
    for p in proxies:
        p.set_rules()


@pytest.fixture
def b_hangs(clean: tuple[FaultProxy, FaultProxy]) -> FaultProxy:
    """Member b's proxy, taking every request and never answering (`clean` heals it after)."""
    b = clean[1]
    b.set_rules(Rule("hang"))
    return b

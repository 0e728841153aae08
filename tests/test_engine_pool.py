"""The one engine-ownership rule of both adapters (specfuse.engine_pool), on real adapter objects.

The members are remote ones nobody serves: building an engine probes nothing, so no
model is loaded and no server is needed; closing one stops its loop thread.
"""

from __future__ import annotations

import copy
import gc
import pickle
from collections.abc import Iterator

import pytest

from langchain_specfuse import ChatSpecFuse, SpecFuseLLM
from llama_index_specfuse import SpecFuseLLM as LlamaIndexLLM
from specfuse import EnsembleConfig, SpecFuse, engine_pool
from specfuse.engine_pool import MAX_ENGINES_ENV, EnginePool


def _members(name: str) -> list[dict[str, str]]:
    return [{"model": name, "backend": "tgi", "urls": "http://127.0.0.1:9"}]


@pytest.fixture
def closed(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[SpecFuse]]:
    """The engines closed during the test, in order; adapters use a fresh pool bounded at 2."""
    record: list[SpecFuse] = []
    real_close = SpecFuse.close

    def close(self: SpecFuse) -> None:
        record.append(self)
        real_close(self)

    monkeypatch.setattr(SpecFuse, "close", close)
    monkeypatch.setattr(engine_pool, "POOL", EnginePool(max_engines=2))
    yield record
    for engine in engine_pool.POOL.engines():
        real_close(engine)


def _pool() -> list[SpecFuse]:
    return engine_pool.POOL.engines()


def test_two_models_with_the_same_config_share_one_engine_across_both_adapters(
    closed: list[SpecFuse],
) -> None:
    chat = ChatSpecFuse(members=_members("a"))
    llm = SpecFuseLLM(members=_members("a"))
    assert chat.engine is llm.engine
    li = LlamaIndexLLM.from_members(_members("a"))
    assert li.engine is chat.engine  # the same configuration, so the same rule and engine
    assert ChatSpecFuse(members=_members("b")).engine is not chat.engine
    assert ChatSpecFuse(members=_members("a"), api_key="k").engine is not chat.engine  # keys differ


def test_a_third_config_evicts_and_closes_the_least_recently_used_unused_engine(
    closed: list[SpecFuse],
) -> None:
    first = ChatSpecFuse(members=_members("a"))
    a = first.engine
    second = LlamaIndexLLM.from_members(_members("b"))
    b = second.engine
    del first
    gc.collect()
    third = SpecFuseLLM(members=_members("c"))
    c = third.engine
    assert closed == [a]
    assert _pool() == [b, c]
    assert second.engine is b  # not closed under its live user


def test_an_engine_a_live_model_uses_is_never_closed_the_pool_waits_over_its_bound(
    closed: list[SpecFuse],
) -> None:
    models = [ChatSpecFuse(members=_members(name)) for name in "abc"]
    engines = [m.engine for m in models]
    assert closed == [] and _pool() == engines  # over the bound of 2, all in use
    del models[0]
    gc.collect()
    d = ChatSpecFuse(members=_members("d"))
    assert d.engine is not None
    assert closed == [engines[0]]  # the first unused one goes when the next is requested
    assert _pool() == [engines[1], engines[2], d.engine]


def test_a_copy_keeps_the_engine_alive_after_its_original_is_gone(closed: list[SpecFuse]) -> None:
    original = LlamaIndexLLM.from_members(_members("a"))
    engine = original.engine
    deep = copy.deepcopy(original)
    shallow = ChatSpecFuse(members=_members("a"))
    shallow_copy = shallow.model_copy()
    assert deep.engine is engine and shallow_copy.engine is engine
    del original, shallow
    gc.collect()
    for name in "bc":
        assert ChatSpecFuse(members=_members(name)).engine is not engine
    assert engine not in closed
    assert pickle.loads(pickle.dumps(deep)).engine is engine  # unpickled: the pooled engine again


def test_an_engine_passed_by_the_caller_is_the_callers_never_pooled(closed: list[SpecFuse]) -> None:
    fuse = SpecFuse(EnsembleConfig.build(_members("own")))
    llm = LlamaIndexLLM(fuse=fuse)
    assert llm.engine is fuse and fuse not in _pool()
    fuse.close()


def test_the_bound_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    pool = EnginePool()
    monkeypatch.setenv(MAX_ENGINES_ENV, "3")
    assert pool.bound() == 3
    monkeypatch.delenv(MAX_ENGINES_ENV)
    assert pool.bound() == 8
    assert EnginePool(max_engines=1).bound() == 1

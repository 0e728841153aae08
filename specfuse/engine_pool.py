"""Who owns an engine: the one rule both framework adapters follow.

Framework code builds many model objects over the same ensemble (per chain, per
test, ``model_copy``), and each new :class:`~specfuse.SpecFuse` would probe its
members again and hold its own connections and KV caches. So model objects with
an identical configuration (members, settings and api keys) share one engine,
kept in a process-wide pool.

The pool is bounded: it keeps at most :func:`max_engines` engines (default
``DEFAULT_MAX_ENGINES``; set ``SPECFUSE_MAX_ENGINES`` or ``POOL.max_engines``).
When a new configuration would exceed the bound, the least recently used engine
that no live model object still uses is evicted and closed (its connections
released, its loop thread stopped). An engine a live model object uses is never
closed under it: if every engine is in use, the pool stays over the bound until
one is no longer used. Eviction happens when an engine is requested, never from
a garbage-collector callback.
"""

from __future__ import annotations

import hashlib
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from specfuse.config import EnsembleConfig
from specfuse.engine import SpecFuse

__all__ = ["DEFAULT_MAX_ENGINES", "MAX_ENGINES_ENV", "POOL", "EnginePool", "SharesEngine", "engine_key"]

#: Environment variable that bounds the pool (a positive integer).
MAX_ENGINES_ENV = "SPECFUSE_MAX_ENGINES"
#: Engines kept when neither the variable nor ``EnginePool.max_engines`` says otherwise.
DEFAULT_MAX_ENGINES = 8


def engine_key(config: EnsembleConfig) -> str:
    """Tells configurations apart, including by api keys, without keeping the keys in the key."""
    keys = "|".join(m.api_key.get_secret_value() if m.api_key else "" for m in config.members)
    return config.model_dump_json() + "|" + hashlib.sha256(keys.encode()).hexdigest()


class EnginePool:
    """Engines by configuration, least recently used first, each with its live users."""

    def __init__(self, max_engines: int | None = None) -> None:
        #: None: read ``SPECFUSE_MAX_ENGINES`` (else ``DEFAULT_MAX_ENGINES``) at each request.
        self.max_engines = max_engines
        self._engines: OrderedDict[str, SpecFuse] = OrderedDict()
        # By engine key: the users as weak references by id (model objects are unhashable).
        self._users: dict[str, dict[int, weakref.ref[Any]]] = {}
        self._lock = threading.Lock()

    def bound(self) -> int:
        if self.max_engines is not None:
            return max(1, self.max_engines)
        return max(1, int(os.environ.get(MAX_ENGINES_ENV) or DEFAULT_MAX_ENGINES))

    def get(self, config: EnsembleConfig, user: Any) -> SpecFuse:
        """The engine of `config`, built if needed; `user` (a live model object) now uses it."""
        key = engine_key(config)
        with self._lock:
            engine = self._engines.get(key)
            if engine is None:
                engine = self._engines[key] = SpecFuse(config)
                self._users[key] = {}
            self._engines.move_to_end(key)
            self._users[key][id(user)] = weakref.ref(user)
            evicted = self._evict()
        for old in evicted:
            old.close()
        return engine

    def uses(self, user: Any, engine: SpecFuse | None) -> bool:
        """Whether `engine` is pooled and `user` is registered as one of its users."""
        if engine is None:
            return False
        with self._lock:
            for key, pooled in self._engines.items():
                if pooled is engine:
                    ref = self._users[key].get(id(user))
                    return ref is not None and ref() is user
            return False

    def engines(self) -> list[SpecFuse]:
        """The pooled engines, least recently used first."""
        with self._lock:
            return list(self._engines.values())

    def _evict(self) -> list[SpecFuse]:
        evicted = []
        while len(self._engines) > self.bound():
            unused = next((k for k in self._engines if not self._live(k)), None)
            if unused is None:
                break  # every engine has a live user: over the bound until one is free
            evicted.append(self._engines.pop(unused))
            del self._users[unused]
        return evicted

    def _live(self, key: str) -> bool:
        users = self._users[key]
        for dead in [i for i, ref in users.items() if ref() is None]:
            del users[dead]
        return bool(users)


#: The pool both adapters share.
POOL = EnginePool()


class SharesEngine:
    """Copies of an adapter model object that holds a pooled engine in the private `_engine`.

    The engine (loaded models, a loop thread, locks) is process state, not part of
    the object's value: a deep copy shares it, a pickle leaves it out and the
    unpickled object gets it again on first use. A copy is not yet registered as a
    user of the engine; :meth:`_pooled_engine` registers it on first use.
    """

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> Any:
        memo = {} if memo is None else memo
        engine = (self.__pydantic_private__ or {}).get("_engine")  # type: ignore[attr-defined]
        if engine is not None:
            memo[id(engine)] = engine
        return super().__deepcopy__(memo)  # type: ignore[misc]

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()  # type: ignore[misc]
        private = dict(state.get("__pydantic_private__") or {})
        private["_engine"] = None
        return {**state, "__pydantic_private__": private}

    def _pooled_engine(self, config: Callable[[], EnsembleConfig]) -> SpecFuse:
        """This object's engine from :data:`POOL`, this object registered as its user."""
        engine: SpecFuse | None = self._engine  # type: ignore[attr-defined]
        if not POOL.uses(self, engine):
            engine = POOL.get(config(), self)
            self._engine = engine  # type: ignore[attr-defined]
        assert engine is not None
        return engine

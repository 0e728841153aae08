"""Backends: one module per protocol behind one small interface (see base)."""

from __future__ import annotations

from specfuse.backends.base import Backend, BackendInfo, CandidateScore, Draft, Sampling
from specfuse.config import MemberConfig
from specfuse.errors import ConfigError


def create_backend(member: MemberConfig) -> Backend:
    """The backend a member's settings describe (nothing is loaded or probed yet)."""
    if member.backend == "local":
        from specfuse.backends.local import LocalBackend

        return LocalBackend(member.model, dtype=member.dtype, kv_cache=member.kv_cache)
    raise ConfigError(f"backend {member.backend!r} is not supported yet; use backend='local'")


__all__ = ["Backend", "BackendInfo", "CandidateScore", "Draft", "Sampling", "create_backend"]

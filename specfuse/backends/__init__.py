"""Backends: one module per protocol behind one small interface (see base)."""

from __future__ import annotations

from specfuse.backends.base import Backend, BackendInfo, CandidateScore, Draft, Sampling, ServerUsage
from specfuse.config import MemberConfig
from specfuse.errors import ConfigError


def create_backend(member: MemberConfig) -> Backend:
    """The backend a member's settings describe (nothing is loaded or probed yet).

    Remote modules are imported on demand so that a local-only install never
    needs httpx or huggingface_hub, and a remote-only one never imports torch.
    """
    if member.backend == "local":
        from specfuse.backends.local import LocalBackend

        return LocalBackend(member.model, dtype=member.dtype, kv_cache=member.kv_cache)
    if member.backend == "tgi":
        from specfuse.backends.tgi import TGIBackend

        return TGIBackend(member)
    if member.backend == "vllm":
        from specfuse.backends.openai_compat import VLLMBackend

        return VLLMBackend(member)
    if member.backend == "sglang":
        from specfuse.backends.sglang import SGLangBackend

        return SGLangBackend(member)
    raise ConfigError(f"backend {member.backend!r} is not supported; use 'local', 'tgi', 'vllm' or 'sglang'")


__all__ = ["Backend", "BackendInfo", "CandidateScore", "Draft", "Sampling", "ServerUsage", "create_backend"]

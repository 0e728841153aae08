"""Backends: one module per protocol behind one small interface (see base).

Which protocols exist, and how a member's settings become a backend, is
the registry's (backends/registry.py): add a protocol with register_protocol.
"""

from __future__ import annotations

from specfuse.backends.base import (
    Backend,
    BackendInfo,
    CandidateScore,
    ChatToRender,
    Draft,
    Sampling,
    ServerUsage,
)
from specfuse.backends.registry import Protocol, create_backend, protocol_names, register_protocol

__all__ = [
    "Backend",
    "BackendInfo",
    "CandidateScore",
    "ChatToRender",
    "Draft",
    "Protocol",
    "Sampling",
    "ServerUsage",
    "create_backend",
    "protocol_names",
    "register_protocol",
]

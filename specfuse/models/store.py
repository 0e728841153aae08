"""The on-disk store of converted offline models (docs/design.md, "Offline models").

Nothing here ever talks to a model hub. The first :func:`ensure_model` call
for a model has ``convert.py`` assemble, check and dequantize its GGUF, and
keeps the resulting Hugging Face directory (config, bf16 safetensors,
tokenizer). Later calls return that directory at once, so loading costs
seconds instead of the 15-45 s a GGUF load (dequantization) takes on 2 cores.

Layout of the cache (``$SPECFUSE_CACHE`` or ``~/.cache/specfuse``)::

    models/<name>/                  finished model, holds MARKER_FILE
    models/.<name>.lock             fcntl lock serialising conversions
    models/.tmp-<name>~<random>/    a conversion in progress (renamed when done)
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from specfuse.errors import ModelNotAvailableError
from specfuse.models.convert import ProgressFn, convert_gguf, prepare_gguf
from specfuse.models.registry import MODELS, ModelSpec, get_model_spec, list_models

try:  # fcntl is POSIX-only; elsewhere we fall back to an in-process lock.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "CONVERSION_FORMAT",
    "MARKER_FILE",
    "default_cache_dir",
    "ensure_model",
    "is_converted",
    "model_dir",
    "models_root",
    "resolve_model_path",
    "sweep_orphans",
]

#: Written last into a converted model directory; its presence means "complete".
MARKER_FILE = "specfuse_model.json"
#: Bump when the conversion recipe (convert.convert_gguf) changes: older
#: conversions are then redone (newer ones are accepted, see _marker_is_current).
CONVERSION_FORMAT = 1


# --------------------------------------------------------------------------- paths


def default_cache_dir() -> Path:
    """``$SPECFUSE_CACHE`` if set, else ``~/.cache/specfuse``."""
    env = os.environ.get("SPECFUSE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "specfuse"


def models_root(cache_dir: Path | None) -> Path:
    """The ``models`` folder of a cache (``cache_dir``, else :func:`default_cache_dir`)."""
    return (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "models"


def model_dir(name: str, *, cache_dir: Path | None = None) -> Path:
    """Where the converted model lives (whether or not it exists yet)."""
    return models_root(cache_dir) / get_model_spec(name).name


# --------------------------------------------------------------------------- markers


def _read_marker(directory: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((directory / MARKER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _marker_is_current(spec: ModelSpec, marker: dict[str, Any] | None) -> bool:
    # A marker from another GGUF or an older recipe means the directory is stale.
    # A *newer* recipe is accepted: processes running different specfuse versions
    # share one cache, and "==" would make them reconvert each other's output in
    # a loop, replacing directories under each other's feet.
    if marker is None or marker.get("gguf_sha256") != spec.gguf_sha256:
        return False
    version = marker.get("format")
    return isinstance(version, int) and version >= CONVERSION_FORMAT


def is_converted(name: str, *, cache_dir: Path | None = None) -> bool:
    """Whether :func:`ensure_model` would return without converting."""
    spec = get_model_spec(name)
    return _marker_is_current(spec, _read_marker(model_dir(spec.name, cache_dir=cache_dir)))


def _write_marker(spec: ModelSpec, directory: Path, seconds: float, tokenizer: dict[str, Any]) -> None:
    marker = {
        "format": CONVERSION_FORMAT,
        "name": spec.name,
        "gguf_sha256": spec.gguf_sha256,
        "quantization": spec.quantization,
        "packages": [p.requirement for p in spec.packages],
        # Read from metadata, not the modules: importing torch costs seconds.
        "transformers": importlib.metadata.version("transformers"),
        "torch": importlib.metadata.version("torch"),
        "conversion_seconds": round(seconds, 1),
        "tokenizer": tokenizer,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    tmp = directory / (MARKER_FILE + ".tmp")
    tmp.write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    tmp.replace(directory / MARKER_FILE)


# --------------------------------------------------------------------------- locks

_thread_locks: dict[Path, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


@contextlib.contextmanager
def _exclusive(lock_path: Path, *, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive lock across threads and processes; yields whether it was acquired.

    flock locks belong to open file descriptions, so threads of one process that
    each open the file exclude each other too; the thread lock covers platforms
    without fcntl. With ``blocking=False`` a busy lock yields False at once.
    """
    with _thread_locks_guard:
        thread_lock = _thread_locks.setdefault(lock_path, threading.Lock())
    if not thread_lock.acquire(blocking=blocking):
        yield False
        return
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    yield False
                    return
            yield True
        finally:
            # Closing the descriptor releases the flock.
            os.close(fd)
    finally:
        thread_lock.release()


def sweep_orphans(root: Path) -> None:
    """Delete staging directories of conversions that were killed midway.

    A killed conversion can leave a 500 MB GGUF behind. A staging directory whose
    model lock nobody holds belongs to no running conversion, so it can go.
    """
    for spec in list_models():
        if not any(root.glob(f".tmp-{spec.name}~*")):
            continue
        with _exclusive(root / f".{spec.name}.lock", blocking=False) as acquired:
            if acquired:
                for stale in root.glob(f".tmp-{spec.name}~*"):
                    shutil.rmtree(stale, ignore_errors=True)


# --------------------------------------------------------------------------- models


def ensure_model(
    name: str,
    *,
    cache_dir: Path | None = None,
    progress: ProgressFn | None = None,
    force: bool = False,
) -> Path:
    """Return a directory with the converted model, converting it on first use.

    The directory loads with ``AutoModelForCausalLM.from_pretrained(dir)`` and
    ``AutoTokenizer.from_pretrained(dir)``. Conversion happens in a temporary
    directory that is renamed into place only after the marker file is written,
    so an interrupted conversion is never mistaken for a finished one.
    ``force`` redoes the conversion even if a current one exists.
    """
    spec = get_model_spec(name)
    say = progress or (lambda _message: None)
    root = models_root(cache_dir)
    final = root / spec.name
    if not force and _marker_is_current(spec, _read_marker(final)):
        return final  # fast path: no lock, no hashing

    sweep_orphans(root)
    with _exclusive(root / f".{spec.name}.lock"):
        # Another thread or process may have finished while we waited.
        if not force and _marker_is_current(spec, _read_marker(final)):
            return final
        # Holding the lock, any leftover staging directory is from a crash.
        for stale in root.glob(f".tmp-{spec.name}~*"):
            shutil.rmtree(stale, ignore_errors=True)

        started = time.perf_counter()
        # "~" never occurs in a short name, so this glob cannot match another model's staging.
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{spec.name}~", dir=root))
        try:
            out_dir = staging / "model"
            out_dir.mkdir()
            gguf = prepare_gguf(spec, staging, say)
            facts = convert_gguf(spec, gguf, out_dir, say)
            if gguf.parent == staging:
                gguf.unlink()  # the assembled copy is only needed for the conversion
            _write_marker(spec, out_dir, time.perf_counter() - started, facts)
            # Move an outdated or forced-over conversion aside first: rename
            # cannot replace a non-empty directory.
            if final.exists():
                final.rename(staging / "old")
            out_dir.rename(final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        say(f"{spec.name}: converted in {time.perf_counter() - started:.1f} s -> {final}")
        return final


def resolve_model_path(name_or_path: str | os.PathLike[str]) -> Path:
    """A registered short name -> :func:`ensure_model`; an existing directory -> itself.

    Anything else is an error: hub ids are never downloaded.
    """
    text = os.fspath(name_or_path)
    if isinstance(name_or_path, str) and text.strip().lower() in MODELS:
        return ensure_model(text)
    path = Path(text).expanduser()
    if path.is_dir():
        return path.resolve()
    raise ModelNotAvailableError(
        f"{text!r} is neither a local model name ({', '.join(MODELS)}) nor an existing directory. "
        "specfuse never downloads models from a hub; for a hub model, download it yourself and "
        "pass its directory."
    )

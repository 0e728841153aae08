"""specfuse: fuse several LLMs into one, segment by segment (SpecFuse / SpecEM).

The core is framework-free; `langchain_specfuse` and `llama_index_specfuse`
adapt it to LangChain and LlamaIndex.
"""

from specfuse.config import DEFAULT_LOCAL_MODELS, EnsembleConfig, FusionSettings, MemberConfig
from specfuse.engine import FusionResult, Member, Segment, SpecFuse, Usage
from specfuse.errors import (
    AllMembersFailedError,
    BackendError,
    CapabilityError,
    ConfigError,
    ContextWindowError,
    ModelNotAvailableError,
    SpecfuseError,
)
from specfuse.trace import FusionTrace

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_LOCAL_MODELS",
    "AllMembersFailedError",
    "BackendError",
    "CapabilityError",
    "ConfigError",
    "ContextWindowError",
    "EnsembleConfig",
    "FusionResult",
    "FusionSettings",
    "FusionTrace",
    "Member",
    "MemberConfig",
    "ModelNotAvailableError",
    "Segment",
    "SpecFuse",
    "SpecfuseError",
    "Usage",
]

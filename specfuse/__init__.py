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
    ContextWindowErrorRemote,
    ModelIntegrityError,
    ModelNotAvailableError,
    ModelPackagesMissingError,
    RemoteError,
    RetryableError,
    SpecfuseError,
    ToolCallError,
    UnknownModelError,
)
from specfuse.prompts import FormattedPrompt
from specfuse.trace import FusionTrace

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_LOCAL_MODELS",
    "AllMembersFailedError",
    "BackendError",
    "CapabilityError",
    "ConfigError",
    "ContextWindowError",
    "ContextWindowErrorRemote",
    "EnsembleConfig",
    "FormattedPrompt",
    "FusionResult",
    "FusionSettings",
    "FusionTrace",
    "Member",
    "MemberConfig",
    "ModelIntegrityError",
    "ModelNotAvailableError",
    "ModelPackagesMissingError",
    "RemoteError",
    "RetryableError",
    "Segment",
    "SpecFuse",
    "SpecfuseError",
    "ToolCallError",
    "UnknownModelError",
    "Usage",
]

"""specfuse: fuse several LLMs into one, segment by segment (SpecFuse / SpecEM).

The core is framework-free; `langchain_specfuse` and `llama_index_specfuse`
adapt it to LangChain and LlamaIndex.
"""

from specfuse import errors as _errors
from specfuse.config import DEFAULT_LOCAL_MODELS, EnsembleConfig, FusionSettings, MemberConfig
from specfuse.engine import SpecFuse
from specfuse.errors import *  # noqa: F403  (every error; the list is specfuse.errors.__all__)
from specfuse.prompts import FormattedPrompt
from specfuse.request import FusionResult, Member, Segment, Usage
from specfuse.trace import FusionTrace

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_LOCAL_MODELS",
    "EnsembleConfig",
    "FormattedPrompt",
    "FusionResult",
    "FusionSettings",
    "FusionTrace",
    "Member",
    "MemberConfig",
    "Segment",
    "SpecFuse",
    "Usage",
    *_errors.__all__,
]

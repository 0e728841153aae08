"""Shared fixtures: real small models, loaded once per test session.

Models load once per process (specfuse.backends.local caches them), so every
ensemble built here after the first costs no extra load time.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
from hypothesis import settings

from specfuse import EnsembleConfig, SpecFuse

# Randomised tests must not make a run pass or fail by luck: by default every run
# draws the same examples (derandomize), so CI and a fresh checkout agree. Set
# HYPOTHESIS_PROFILE=explore to search with fresh random examples; keep whatever
# it finds as an explicit @example.
settings.register_profile("ci", derandomize=True, database=None, print_blob=True, deadline=None)
settings.register_profile("explore", print_blob=True, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


#: Two different tokenizers and templates (ChatML instruct + a base model with
#: the plain template), the fastest pair of the embedded models.
PAIR = ("smollm2-135m", "gemma3-270m")


def pair_config(**fusion: object) -> EnsembleConfig:
    """The two-member test ensemble, greedy and short unless told otherwise."""
    settings: dict[str, object] = {"temperature": 0.0, "max_tokens": 24, "seed": 7}
    settings.update(fusion)
    return EnsembleConfig.local(PAIR, **settings)


@pytest.fixture(scope="session")
def pair() -> SpecFuse:
    """A started two-member ensemble shared by tests that only read from it."""
    fuse = SpecFuse(pair_config())
    fuse.start()
    return fuse

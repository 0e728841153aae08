"""Whole fusions over real `specfuse serve --protocol vllm|sglang` servers.

Proves: the vLLM completions path (echo + logprobs + max_tokens 0) and the
SGLang native path (logprob_start_len at the shared context) score the same
tokens as the in-process engine, so the greedy fused answer is identical.
"""

from __future__ import annotations

import pytest

from tests.remote_fixtures import (  # noqa: F401  (fixtures)
    PAIR,
    fuses_like_reference,
    reference_answer,
    server_pool,
)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("protocol", ["vllm", "sglang"])
def test_fusion_equals_in_process(server_pool, reference_answer, protocol):  # noqa: F811
    fuses_like_reference(protocol, server_pool.get(protocol, PAIR), reference_answer)

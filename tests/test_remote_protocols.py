"""Whole fusions over real `specfuse serve --protocol vllm|sglang` servers.

Proves: the vLLM completions path (echo + logprobs + max_tokens 0) and the
SGLang native path (logprob_start_len at the shared context) score the same
tokens as the in-process engine, so the greedy fused answer is identical.
"""

from __future__ import annotations

import pytest

from specfuse import SpecFuse
from tests.remote_fixtures import (  # noqa: F401  (fixtures)
    PAIR,
    PROMPT,
    reference_answer,
    remote_config,
    server_pool,
)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("protocol", ["vllm", "sglang"])
def test_fusion_equals_in_process(server_pool, reference_answer, protocol):  # noqa: F811
    servers = server_pool.get(protocol, PAIR)
    fuse = SpecFuse(remote_config(protocol, servers))
    assert all(m.info.can_score for m in fuse.start())
    result = fuse.generate(PROMPT)
    fuse.close()
    assert result.text == reference_answer.text
    assert [r.winner for r in result.trace.rounds] == [r.winner for r in reference_answer.trace.rounds]

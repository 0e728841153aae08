"""The store of log-probs a server already computed (pure logic; on a real vLLM: test_real_vllm_cost)."""

from __future__ import annotations

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from specfuse.backends.known_logprobs import DRAFT_TOLERANCE, KnownLogprobs, shared_store
from specfuse.backends.vllm_tokens import common_prefix


def naive_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@given(st.lists(st.integers(0, 3), max_size=40), st.lists(st.integers(0, 3), max_size=40))
@example([], [1])
@example([1, 2, 3], [1, 2, 3])
@example([1, 2, 3], [1, 2, 4])
def test_common_prefix_is_the_longest_common_prefix(a: list[int], b: list[int]) -> None:
    assert common_prefix(a, b) == naive_prefix(a, b)
    assert common_prefix(tuple(a), b) == naive_prefix(a, b)


def test_a_position_is_known_only_after_the_same_tokens() -> None:
    known = KnownLogprobs()
    # A draft: prompt 1 2 3, then it sampled 4 5 with these log-probs.
    known.add([1, 2, 3, 4, 5], {3: -0.5, 4: -1.5}, "draft")
    assert known.lookup([1, 2, 3, 4, 5, 6], range(3, 5)) == [-0.5, -1.5]
    assert known.lookup([1, 2, 3, 4, 9], range(3, 4)) == [-0.5]
    # Token 4 at position 3 again, but after other tokens: another condition, not known.
    assert known.lookup([1, 7, 3, 4, 5], range(3, 4)) is None
    # Position 4 holds another token than the draft's: not known.
    assert known.lookup([1, 2, 3, 4, 9], range(3, 5)) is None
    # Nothing to look up is known at once.
    assert known.lookup([1, 2], range(2, 2)) == []


def test_positions_may_come_from_several_answers() -> None:
    known = KnownLogprobs()
    known.add([1, 2, 3, 4], {3: -0.25}, "draft")
    known.add([1, 2, 3, 4, 5, 6], {4: -2.0, 5: -3.0}, "score")
    assert known.lookup([1, 2, 3, 4, 5, 6, 7], range(3, 6)) == [-0.25, -2.0, -3.0]


def test_the_store_keeps_only_its_capacity() -> None:
    known = KnownLogprobs(capacity=2)
    for t in range(3):
        known.add([t, 1], {1: -float(t)}, "score")
    assert known.lookup([0, 1], range(1, 2)) is None
    assert known.lookup([2, 1], range(1, 2)) == [-2.0]


def test_drafts_stop_counting_once_a_scoring_disagrees() -> None:
    known = KnownLogprobs()
    known.add([1, 2, 3, 4], {3: -0.1}, "draft")
    known.add([1, 2, 3, 4, 5], {3: -0.1 - DRAFT_TOLERANCE / 2, 4: -1.0}, "score")
    assert known.drafts_trusted
    known.add([1, 2, 8, 9], {3: -0.2}, "draft")
    with pytest.warns(UserWarning, match="does not return raw log-probs"):
        known.add([1, 2, 8, 9, 5], {3: -0.2 - 2 * DRAFT_TOLERANCE}, "score")
    assert not known.drafts_trusted
    # The scoring's own values still count; the drafts' no longer do.
    assert known.lookup([1, 2, 3, 4, 5], range(3, 5)) == [-0.1 - DRAFT_TOLERANCE / 2, -1.0]
    known.clear()
    known.add([1, 2, 3, 4], {3: -0.1}, "draft")
    assert known.lookup([1, 2, 3, 4], range(3, 4)) is None


def test_members_on_one_server_and_model_share_a_store() -> None:
    a = shared_store(["http://h:1", "http://h:2"], "m")
    assert shared_store(["http://h:2", "http://h:1"], "m") is a
    assert shared_store(["http://h:1", "http://h:2"], "other") is not a
    assert shared_store(["http://h:3"], "m") is not a

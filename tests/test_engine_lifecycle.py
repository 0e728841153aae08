"""The core's lifecycle: how a finished response is recorded, what a blank prompt gets,
and copies of a SpecFuse object. Real local models (the conftest pair)."""

from __future__ import annotations

import asyncio
import copy
import pickle

import pytest

from specfuse import SpecFuse
from specfuse.errors import ConfigError
from tests.conftest import pair_config

PROMPT = "Name a colour."


def _assert_finished(result_reason: str, trace_reason: str | None, summary_reason: str) -> None:
    assert result_reason in {"stop", "length"}
    assert trace_reason == result_reason
    assert summary_reason == result_reason


def test_a_completed_generate_is_not_recorded_as_cancelled(pair: SpecFuse) -> None:
    result = pair.generate(PROMPT, max_tokens=8)
    trace = result.trace
    _assert_finished(result.finish_reason, trace.finish_reason, trace.to_dict()["finish_reason"])
    assert trace.summary()["total_time"] == round(trace.total_time, 4) > 0


def test_a_completed_agenerate_keeps_its_finish_reason_and_total_time(pair: SpecFuse) -> None:
    async def twice() -> list[tuple[str, str | None, float]]:
        out = []
        for _ in range(2):
            result = await pair.agenerate(PROMPT, max_tokens=8)
            total = result.trace.total_time
            await asyncio.sleep(0.05)  # anything that finalises the stream late would rewrite it now
            out.append((result.finish_reason, result.trace.finish_reason, result.trace.total_time - total))
        return out

    for reason, trace_reason, drift in asyncio.run(twice()):
        assert reason in {"stop", "length"} and trace_reason == reason
        assert drift == 0.0


def test_a_stream_read_up_to_its_last_segment_and_abandoned_keeps_the_reason(pair: SpecFuse) -> None:
    stream = pair.stream(PROMPT, max_tokens=8)
    last = None
    for segment in stream:
        if segment.result is not None:
            last = segment.result
            break  # stop reading at the last segment, as adapters do
    stream.close()
    assert last is not None
    assert last.trace.finish_reason == last.finish_reason in {"stop", "length"}


# -- blank input ------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["", "   ", "\n\t "])
def test_a_blank_prompt_is_a_clear_error(pair: SpecFuse, prompt: str) -> None:
    with pytest.raises(ConfigError, match="empty"):
        pair.generate(prompt)


def test_a_conversation_without_any_text_is_a_clear_error(pair: SpecFuse) -> None:
    with pytest.raises(ConfigError, match="empty"):
        pair.generate([{"role": "system", "content": " "}, {"role": "user", "content": ""}])
    # A system message with text and an empty user turn has nothing to answer either.
    with pytest.raises(ConfigError, match="empty"):
        pair.generate([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  "}])


# -- copies ------------------------------------------------------------------------------


def test_a_spec_fuse_object_deep_copies_and_pickles_before_and_after_use(pair: SpecFuse) -> None:
    fresh = SpecFuse(pair_config())
    for original in (fresh, pair):
        for copied in (copy.deepcopy(original), pickle.loads(pickle.dumps(original))):
            assert copied is not original
            assert copied.member_names == original.member_names
            assert copied.settings == original.settings
    again = pickle.loads(pickle.dumps(pair))
    # The copy loads its members on first use (the process's loaded models are reused) and answers alike.
    assert again.generate(PROMPT, max_tokens=6).text == pair.generate(PROMPT, max_tokens=6).text


def test_a_spec_fuse_built_from_ready_members_refuses_to_copy_clearly(pair: SpecFuse) -> None:
    members = pair.start()
    built = SpecFuse(members=members)
    with pytest.raises(TypeError, match="EnsembleConfig"):
        copy.deepcopy(built)
    with pytest.raises(TypeError, match="EnsembleConfig"):
        pickle.dumps(built)

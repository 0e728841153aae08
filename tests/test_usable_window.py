"""SpecFuse.usable_window: the one public answer to "how many tokens may a request use"."""

from __future__ import annotations

import asyncio

from specfuse import EnsembleConfig, SpecFuse
from specfuse.engine import WINDOW_MARGIN
from specfuse.models import MODELS


def test_measured_window_is_the_tightest_member_less_its_template_and_the_margin(pair: SpecFuse) -> None:
    rooms = []
    for member in pair.start():
        assert member.info.context_window is not None
        probe = asyncio.run(member.format.render([{"role": "user", "content": ""}], None))
        overhead = asyncio.run(member.backend.count_tokens(probe))
        assert 0 < overhead < 100
        rooms.append(member.info.context_window - overhead - WINDOW_MARGIN)
    assert pair.usable_window() == min(rooms)
    # Once measured, the estimate-only form returns the measured value too.
    assert pair.usable_window(measure=False) == min(rooms)


def test_estimate_loads_nothing_and_comes_from_the_model_store() -> None:
    fuse = SpecFuse(EnsembleConfig.local(("smollm2-135m", "gemma3-270m")))
    estimate = fuse.usable_window(measure=False)
    assert not fuse.started
    smallest = min(MODELS["smollm2-135m"].context_length, MODELS["gemma3-270m"].context_length)
    assert estimate is not None and smallest - 200 < estimate < smallest


def test_estimate_is_none_for_a_remote_member_whose_window_only_the_server_knows() -> None:
    config = EnsembleConfig.build(
        [{"model": "m", "backend": "tgi", "urls": "http://127.0.0.1:9"}, "smollm2-135m"]
    )
    fuse = SpecFuse(config)
    assert fuse.usable_window(measure=False) is None and not fuse.started

"""Cancellation reaches the wire and the local compute, and leaves the model usable.

Proved from the outside: the fault proxy sees the client disconnect (or sees
no further requests), and the local model's lock is released within a token
or two of the cancel instead of after the whole segment.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from specfuse import SpecFuse
from specfuse.backends.base import Sampling
from specfuse.backends.local import LocalBackend
from tests.fault_proxy import FaultProxy, Rule
from tests.reliability_fixtures import *  # noqa: F403  (the fixtures)
from tests.reliability_fixtures import PROMPT, SHORT, run


def wait_until(predicate: object, limit: float) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_cancelling_an_async_generation_cancels_its_http_calls(
    fuse: SpecFuse, clean: tuple[FaultProxy, FaultProxy]
) -> None:
    a, b = clean
    for p in (a, b):
        p.set_rules(Rule("hang"))

    async def cancel_midway() -> None:
        task = asyncio.create_task(fuse.agenerate(PROMPT, **SHORT))
        while a.in_flight + b.in_flight < 2:
            await asyncio.sleep(0.02)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        else:
            raise AssertionError("the generation was not cancelled")

    run(cancel_midway(), 30)
    # Both hanging requests saw their client go away: the calls were cancelled on the wire.
    assert wait_until(lambda: a.disconnects >= 1 and b.disconnects >= 1, 5)
    assert a.in_flight == 0 and b.in_flight == 0
    # The same model object answers the next request.
    for p in (a, b):
        p.set_rules()
    assert run(fuse.agenerate(PROMPT, **SHORT), 60).text


def test_abandoning_a_stream_stops_the_requests(fuse: SpecFuse, clean: tuple[FaultProxy, FaultProxy]) -> None:
    a, b = clean
    stream = fuse.stream(PROMPT, max_tokens=60, segment_tokens=2)
    first = next(stream)
    assert first.text
    stream.close()  # abandon it: the fusion must stop calling the members
    settled = a.count() + b.count()
    time.sleep(1.5)
    assert a.count() + b.count() == settled
    assert a.in_flight == 0 and b.in_flight == 0
    assert fuse.generate(PROMPT, **SHORT).text


def test_cancelling_a_local_draft_stops_the_compute_and_keeps_the_model_usable() -> None:
    backend = LocalBackend("smollm2-135m")
    loaded = backend.load()
    greedy = Sampling(temperature=0.0)

    async def cancel_long_draft() -> float:
        task = asyncio.create_task(
            backend.draft("Count from one to one hundred:", max_tokens=400, sampling=greedy)
        )
        await asyncio.sleep(0.3)
        while not loaded.lock.locked():  # the worker thread is generating
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)
        task.cancel()
        cancelled_at = time.monotonic()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        # The worker thread checks the cancel Event once per token and then lets go of the model.
        acquired = await asyncio.to_thread(loaded.lock.acquire, True, 10)
        assert acquired
        loaded.lock.release()
        return time.monotonic() - cancelled_at

    released_after = run(cancel_long_draft(), 60)
    assert released_after < 3.0  # 400 tokens would take far longer on this machine
    draft = run(backend.draft("Say hi.", max_tokens=3, sampling=greedy), 60)
    assert draft.text and draft.token_count <= 3

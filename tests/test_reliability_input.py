"""Bad input gives a clear error (or a documented behaviour), before any model call where possible.

Covered: empty messages, an empty prompt, unknown roles, non-text content
parts, invalid settings, a prompt longer than a member's context window (in
the engine, and TGI's 422 over HTTP mapped to ContextWindowError), and more
stop sequences than a TGI server accepts (at most `max_stop_sequences` are
sent; the rest are applied on the client).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from specfuse import SpecFuse
from specfuse.backends.base import Sampling
from specfuse.config import FusionSettings
from specfuse.errors import BackendError, ConfigError, ContextWindowError
from tests.fault_proxy import FaultProxy
from tests.reliability_fixtures import *  # noqa: F403  (the fixtures)
from tests.reliability_fixtures import PROMPT, SHORT, run

#: Far more than smollm2-135m's 8192-token window.
TOO_LONG = "hello " * 9000


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "no messages"),
        ([{"role": "wizard", "content": "hi"}], "role 'wizard'"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
            "type 'image_url' is not supported",
        ),
        ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}], "read text only"),
    ],
    ids=["empty", "bad-role", "image-part", "audio-part"],
)
def test_bad_messages_fail_before_any_call(
    fuse: SpecFuse, clean: tuple[FaultProxy, FaultProxy], messages: list[Any], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        run(fuse.agenerate(messages), 30)
    assert sum(p.count() for p in clean) == 0  # no generation or scoring call was made


def test_text_parts_are_joined_and_an_empty_prompt_is_refused(
    fuse: SpecFuse, clean: tuple[FaultProxy, FaultProxy]
) -> None:
    """Text content parts are joined; an empty user turn is a clear error (it used to get a greeting)."""
    parts = [{"role": "user", "content": [{"type": "text", "text": "Name three "}, "primary colours."]}]
    assert run(fuse.agenerate(parts, **SHORT), 60).text
    with pytest.raises(ConfigError, match="empty"):
        run(fuse.agenerate("", **SHORT), 60)


@pytest.mark.parametrize(
    "override",
    [
        {"temperature": -1.0},
        {"top_p": 0.0},
        {"max_tokens": 0},
        {"round_deadline": 0.0},
        {"stop": [""]},
        {"no_such_knob": 1},
    ],
)
def test_invalid_settings_are_config_errors(fuse: SpecFuse, override: dict[str, Any]) -> None:
    name = next(iter(override))
    with pytest.raises(ConfigError, match=name if name != "stop" else "non-empty"):
        run(fuse.agenerate(PROMPT, **override), 30)
    with pytest.raises(ConfigError):
        FusionSettings().with_overrides(**override)


def test_a_prompt_longer_than_the_context_window_is_refused_up_front(
    fuse: SpecFuse, clean: tuple[FaultProxy, FaultProxy]
) -> None:
    with pytest.raises(ContextWindowError, match="context window is 8191"):
        run(fuse.agenerate(TOO_LONG, **SHORT), 60)
    assert sum(p.count() for p in clean) == 0  # only /tokenize was asked


def test_tgi_422_for_a_too_long_input_maps_to_context_window_error(
    fuse: SpecFuse, clean: tuple[FaultProxy, FaultProxy]
) -> None:
    a, _ = clean
    backend: Any = fuse._backends["a"]
    with pytest.raises(ContextWindowError) as info:
        run(backend.draft(TOO_LONG, max_tokens=2, sampling=Sampling(temperature=0.0)), 60)
    assert isinstance(info.value, BackendError) and "422" in str(info.value)
    assert "'a'" in str(info.value) and a.count() == 1  # named, and not retried


def test_more_stop_sequences_than_the_server_allows(
    fuse: SpecFuse, clean: tuple[FaultProxy, FaultProxy]
) -> None:
    """TGI refuses more than 4 stops (422); the backend sends 4 and applies the rest itself."""
    a, _ = clean
    backend: Any = fuse._backends["a"]
    greedy = Sampling(temperature=0.0)
    context = "The three primary colours are"
    plain = run(backend.draft(context, max_tokens=6, sampling=greedy), 60).text
    stop = plain[len(plain) // 2 : len(plain) // 2 + 2]
    assert stop.strip() and plain.find(stop) > 0
    stops = [f"never-{i}" for i in range(5)] + [stop]
    a.set_rules()
    draft = run(backend.draft(context, max_tokens=6, sampling=greedy, stop=stops), 60)
    sent = json.loads(a.seen[-1].body)["parameters"]["stop"]
    assert len(sent) == 4 and stop not in sent
    assert draft.text == plain[: plain.find(stop)] and draft.finish_reason == "stop"
    # Through the engine too: six stop sequences, no 422.
    result = run(fuse.agenerate(PROMPT, stop=[f"never-{i}" for i in range(6)], **SHORT), 60)
    assert result.text and all(c.error is None for r in result.trace.rounds for c in r.calls)

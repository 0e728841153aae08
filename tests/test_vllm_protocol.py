"""The vLLM backend's handling of what different vLLM releases answer, on a scripted loopback server.

Each reply below is the shape the named vLLM code produces; the behaviour of
the current release is also checked against the real server in
tests/test_real_vllm.py. These cover the answers only other releases (or
other models) give, which one real server cannot show.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from specfuse.backends._http import RemoteError, RetryPolicy, error_from_status
from specfuse.backends.base import Sampling
from specfuse.backends.vllm import VLLMBackend
from specfuse.config import MemberConfig
from specfuse.errors import ConfigError, ContextWindowError
from tests.remote_fixtures import FaultServer, fault_server  # noqa: F401  (fixture)

MODELS = {"object": "list", "data": [{"id": "m", "object": "model", "max_model_len": 2048}]}


def vllm_error(message: str, status: int = 400) -> tuple[int, dict[str, Any]]:
    # ErrorResponse / ErrorInfo in vllm/entrypoints/serve/engine/protocol.py
    return status, {"error": {"message": message, "type": "BadRequestError", "param": None, "code": status}}


def completion(tokens: list[str], logprobs: list[float | None], prompt_tokens: int) -> dict[str, Any]:
    return {
        "choices": [
            {
                "index": 0,
                "text": "".join(tokens),
                "logprobs": {"tokens": tokens, "token_logprobs": logprobs},
                "finish_reason": "length",
                "stop_reason": None,
            }
        ],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 1},
    }


#: "Hello world" echoed with its prompt log-probs, as vLLM 0.32 answers max_tokens 0.
PROBE_OK = completion(["Hello", " world"], [None, -10.9], 2)


def backend(url: str, **fields: Any) -> VLLMBackend:
    b = VLLMBackend(MemberConfig(model="m", name="member-v", backend="vllm", urls=[url], timeout=5, **fields))
    b.retry = RetryPolicy(max_attempts=2, initial=0.01, maximum=0.02, deadline=5)
    return b


def bodies(server: FaultServer, path: str) -> list[dict[str, Any]]:
    return [json.loads(s["body"]) for s in server.fault.seen if s["path"] == path and s["body"]]


def test_nested_error_message_is_printed_as_text() -> None:
    status, body = vllm_error("'temperature' must be non-negative, got -1.")
    error = error_from_status(status, json.dumps(body), {})
    assert str(error) == "HTTP 400: 'temperature' must be non-negative, got -1."


def test_vllm_overflow_is_a_context_window_error(fault_server: FaultServer) -> None:  # noqa: F811
    message = (
        "This model's maximum context length is 2048 tokens. However, your prompt contains 2300 "
        "input tokens, which exceeds this limit even without any output tokens. Please reduce "
        "the length of the input prompt. (parameter=input_tokens, value=2300)"
    )
    fault_server.script(vllm_error(message))
    with pytest.raises(ContextWindowError, match="maximum context length is 2048") as caught:
        asyncio.run(backend(fault_server.url).draft("x", max_tokens=4, sampling=Sampling(temperature=0)))
    assert "{'" not in str(caught.value)
    # Any other 400 stays a plain refusal.
    fault_server.script(vllm_error("'top_p' must be in (0, 1], got 2."))
    with pytest.raises(RemoteError) as other:
        asyncio.run(backend(fault_server.url).draft("x", max_tokens=4, sampling=Sampling(temperature=0)))
    assert not isinstance(other.value, ContextWindowError)


def test_a_refused_probe_makes_a_member_that_cannot_score(fault_server: FaultServer) -> None:  # noqa: F811
    reason = "Prefix caching with prompt logprobs not yet supported on VLLM V1."
    fault_server.script(
        (200, MODELS),
        vllm_error(reason),  # the probe, max_tokens 0
        (200, {"tokens": [9, 10], "count": 2}),
        (200, {"tokens": [9, 10], "count": 2}),
    )
    info = asyncio.run(backend(fault_server.url).info())
    assert not info.can_score
    assert reason in info.extra["cannot_score"]


def test_max_tokens_zero_refused_then_scoring_reads_only_the_prompt(
    fault_server: FaultServer,  # noqa: F811
) -> None:
    fault_server.script(
        (200, MODELS),
        vllm_error("max_tokens must be at least 1, got 0."),
        # max_tokens 1: the generated token is echoed after the prompt.
        (200, completion(["Hello", " world", "!"], [None, -10.9, -0.5], 2)),
        (200, {"tokens": [9, 10], "count": 2}),
        (200, {"tokens": [9, 10], "count": 2}),
        (200, completion(["Hi", " there", " again"], [None, -2.0, -0.25], 2)),
    )
    b = backend(fault_server.url)
    assert asyncio.run(b.info()).can_score
    (score,) = asyncio.run(b.score("Hi", [" there"]))
    assert score.token_logprobs == (-2.0,)
    assert [body["max_tokens"] for body in bodies(fault_server, "/v1/completions")] == [0, 1, 1]


def test_bos_is_written_once_by_the_prompt_not_added_by_the_server(
    fault_server: FaultServer,  # noqa: F811
) -> None:
    """A tokenizer that adds a BOS (Gemma's, Llama's): prompts carry it as text, the server adds none."""
    fault_server.script(
        (200, MODELS),
        (200, PROBE_OK),
        (200, {"tokens": [2, 9, 10], "count": 3}),  # add_special_tokens true
        (200, {"tokens": [9, 10], "count": 2}),  # false
        (200, {"prompt": "<bos>"}),  # /detokenize [2]
        (200, completion(["x"], [None], 1)),
    )
    b = backend(fault_server.url)
    assert asyncio.run(b.info()).extra["bos_text"] == "<bos>"
    asyncio.run(b.draft("<bos>User: hi", max_tokens=1, sampling=Sampling(temperature=0)))
    sent = bodies(fault_server, "/v1/completions")
    assert all(body["add_special_tokens"] is False for body in sent)
    assert sent[-1]["prompt"] == "<bos>User: hi"


def test_bos_is_not_doubled_on_a_server_that_ignores_add_special_tokens(
    fault_server: FaultServer,  # noqa: F811
) -> None:
    """Releases older than the field ignore it and always add the BOS: the prompt's own is dropped."""
    fault_server.script(
        (200, MODELS),
        (200, completion(["<bos>", "Hello", " world"], [None, -3.0, -10.9], 3)),
        (200, {"tokens": [2, 9, 10], "count": 3}),
        (200, {"tokens": [9, 10], "count": 2}),
        (200, {"prompt": "<bos>"}),
        (200, completion(["x"], [None], 2)),
    )
    b = backend(fault_server.url)
    assert asyncio.run(b.info()).extra["bos_text"] == ""
    asyncio.run(b.draft("<bos><start_of_turn>user\nhi", max_tokens=1, sampling=Sampling(temperature=0)))
    assert bodies(fault_server, "/v1/completions")[-1]["prompt"] == "<start_of_turn>user\nhi"


def test_tokenizer_and_chat_template_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="for remote members"):
        MemberConfig(model="smollm2-135m", tokenizer="smollm2-135m")
    with pytest.raises(ValueError, match="contradicts template='plain'"):
        MemberConfig(
            model="m", backend="vllm", urls=["http://127.0.0.1:1"], template="plain", chat_template="x"
        )
    with pytest.raises(ConfigError, match="cannot load tokenizer 'no-such-model'"):
        backend("http://127.0.0.1:1", tokenizer="no-such-model").local_tokenizer()

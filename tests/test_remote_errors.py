"""How each server's error bodies become specfuse errors (pure parsing, bodies as the servers send them).

The bodies are the ones the real servers build: TGI's `ErrorResponse`
(router/src/server.rs, validation.rs), vLLM's OpenAI `ErrorResponse`
(`{"error": {"message", "type", "code"}}`, older `{"object": "error", ...}`),
SGLang's `_create_error_response` (`{"error": {"message"}}`, http_server.py).
"""

from __future__ import annotations

import json

import pytest

from specfuse import ContextWindowError
from specfuse.backends._http import ContextWindowErrorRemote, RemoteError, error_from_status

TGI_TOTAL = (
    "Input validation error: `inputs` tokens + `max_new_tokens` must be <= 2048. "
    "Given: 2040 `inputs` tokens and 16 `max_new_tokens`"
)
TGI_INPUT = "Input validation error: `inputs` must have less than 1024 tokens. Given: 1500"
TGI_MAX_NEW = "Input validation error: `max_new_tokens` must be <= 1024. Given: 4096"
VLLM_OVER = (
    "This model's maximum context length is 2048 tokens. However, you requested 2100 tokens "
    "(2090 in the messages, 10 in the completion). Please reduce the length of the messages or completion."
)
VLLM_V1_OVER = "The decoder prompt (length 9001) is longer than the maximum model length of 2048."
SGLANG_OVER = "The input (9001 tokens) is longer than the model's context length (2048 tokens)."
SGLANG_TOTAL = "Requested token count exceeds the model's maximum context length of 2048 tokens."


def tgi(message: str) -> str:
    return json.dumps({"error": message, "error_type": "validation"})


def vllm(message: str) -> str:
    return json.dumps({"error": {"message": message, "type": "BadRequestError", "param": None, "code": 400}})


def vllm_old(message: str) -> str:
    return json.dumps({"object": "error", "message": message, "type": "BadRequestError", "code": 400})


def sglang(message: str) -> str:
    return json.dumps({"error": {"message": message}})


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (422, tgi(TGI_TOTAL)),
        (422, tgi(TGI_INPUT)),
        (400, vllm(VLLM_OVER)),
        (400, vllm_old(VLLM_OVER)),
        (400, vllm(VLLM_V1_OVER)),
        (400, sglang(SGLANG_OVER)),
        (400, sglang(SGLANG_TOTAL)),
    ],
)
def test_every_servers_overflow_is_a_context_window_error(status: int, body: str) -> None:
    err = error_from_status(status, body, {})
    assert isinstance(err, ContextWindowErrorRemote) and isinstance(err, ContextWindowError)
    assert err.status == status


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (422, tgi(TGI_MAX_NEW)),
        (422, tgi("Input validation error: `max_new_tokens` must be strictly positive")),
        (422, tgi("Input validation error: `stop` supports up to 4 stop sequences. Given: 6")),
        (400, sglang("Unexpected keyword argument 'seed'")),
    ],
)
def test_other_validation_errors_are_not_context_window_errors(status: int, body: str) -> None:
    err = error_from_status(status, body, {})
    assert isinstance(err, RemoteError) and not isinstance(err, ContextWindowError)


@pytest.mark.parametrize("body", [vllm(VLLM_OVER), vllm_old(VLLM_OVER), sglang(VLLM_OVER)])
def test_nested_error_bodies_print_their_message_not_a_dict(body: str) -> None:
    text = str(error_from_status(400, body, {}))
    assert VLLM_OVER[:60] in text
    assert "{" not in text and "'message'" not in text

"""`specfuse gateway` over a real vLLM 0.32 server, called with the official openai client.

Two members on the one real server (its store name, whose tokenizer is local,
and a hub-style id the member must render through the server), each with its
own key: the answers, the stream, the usable window the server's limit sets,
and no member key in anything the gateway returns or writes.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.gateway_fixtures import GatewayProcess, write_config
from tests.vllm_server import HUB_NAME, KEYS, STORE_NAME, VLLMServer, serve

pytestmark = pytest.mark.slow

KEY = "sk-gateway-over-vllm"
MODEL = "fused-smollm"
PROMPT = "Name three primary colours."


@pytest.fixture(scope="module")
def real_vllm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VLLMServer]:
    yield from serve(tmp_path_factory)


@pytest.fixture(scope="module")
def gateway(real_vllm: VLLMServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    folder = tmp_path_factory.mktemp("gateway-vllm")
    members = [
        {
            "model": STORE_NAME,
            "name": "local-tok",
            "backend": "vllm",
            "urls": [real_vllm.url],
            "api_key": KEYS[0],
        },
        {
            "model": HUB_NAME,
            "name": "server-tok",
            "backend": "vllm",
            "urls": [real_vllm.url],
            "api_key": KEYS[1],
        },
    ]
    config = write_config(
        folder / "vllm.json", members, {"temperature": 0.0, "seed": 7, "max_tokens": 24, "gate_logprob": None}
    )
    process = GatewayProcess(
        config, folder / "gateway.log", api_key=KEY, args=("--model-name", MODEL)
    ).start()
    try:
        process.wait_healthy(180)
        yield process
    finally:
        process.stop()


def test_chat_stream_and_window_over_real_vllm(gateway: GatewayProcess) -> None:
    client = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY, max_retries=0, timeout=180)
    assert [m.id for m in client.models.list().data] == [MODEL]
    messages = [{"role": "user", "content": PROMPT}]
    response = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=12, extra_body={"specfuse_trace": True}
    )
    text = response.choices[0].message.content or ""
    assert text.strip()
    trace = response.model_extra["specfuse_trace"]  # type: ignore[index]
    assert "".join(r["accepted_text"] for r in trace["rounds"]) == text
    # Every member was called on the real server: both drafted and scored.
    kinds = {(c["member"], c["kind"]) for r in trace["rounds"] for c in r["calls"] if not c["error"]}
    assert {("local-tok", "draft"), ("server-tok", "draft")} <= kinds
    assert response.usage is not None and response.usage.completion_tokens > 0

    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=12, stream=True, stream_options={"include_usage": True}
        )
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed.strip()
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0

    # vLLM runs with --max-model-len 2048: the gateway refuses a longer prompt itself, with both numbers.
    long = httpx.post(
        gateway.url + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        json={"model": MODEL, "messages": [{"role": "user", "content": "word " * 3000}], "max_tokens": 4},
        timeout=120,
    )
    assert long.status_code == 400
    error = long.json()["error"]
    assert error["code"] == "context_length_exceeded"
    window, prompt = [int(w) for w in error["message"].split() if w.isdigit()][:2]
    assert window < 2048 < prompt

    # No member key anywhere the gateway speaks or writes.
    metrics = httpx.get(gateway.url + "/metrics", timeout=10).text
    log = Path(gateway.log).read_text(errors="replace")
    for key in KEYS:
        for where in (response.model_dump_json(), json.dumps([c.model_dump() for c in chunks]), metrics, log):
            assert key not in where

"""`specfuse gateway` with the real clients: openai (sync, async, streaming, tools),
LangChain's ChatOpenAI, LlamaIndex's OpenAILike and curl, against a real uvicorn
gateway subprocess on loopback.

Two gateways, one per module:

* `local`: the fast test pair (smollm2-135m + gemma3-270m) in the gateway's own
  process, greedy; its answers are compared with the same engine in this
  process, so a gateway that changed, cut or mixed answers fails.
* `remote`: two members over fault-injecting proxies in front of one real
  `specfuse serve` (TGI protocol), with a member key and `--max-concurrent 1`;
  the proxies count and hold member calls, which is how the disconnect,
  429 and mid-answer failure tests see what the gateway does to its members.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from specfuse import SpecFuse
from tests.conftest import pair_config
from tests.fault_proxy import FaultProxy, Rule
from tests.gateway_fixtures import GatewayProcess, write_config
from tests.reliability_fixtures import *  # noqa: F403  (the session fixtures upstream, proxies)

KEY = "sk-gateway-test-key"
MEMBER_KEY = "sk-member-secret-7c1f"
MODEL = "specfuse:smollm2-135m+gemma3-270m"
PROMPT = "Name three primary colours."
SHORT = 12
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
#: What LangChain's and LlamaIndex's OpenAI clients are both given (the same names in each):
#: the gateway's model and key, the reference's answer length, no retries.
FRAMEWORK_CLIENT: dict[str, Any] = {"model": MODEL, "api_key": KEY, "max_tokens": SHORT, "max_retries": 0}
#: Tiny models copy text they are asked to repeat: the only way to get a call from them reliably.
CALL_PROMPT = (
    'Reply with exactly: <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
)


def wait_until(predicate: Any, limit: float) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    folder = tmp_path_factory.mktemp("gateway-local")
    config = write_config(
        folder / "pair.json",
        [{"model": "smollm2-135m"}, {"model": "gemma3-270m"}],
        # Every round fused: the tool calls and JSON answers asserted below are what this
        # pair writes together; under the default gate smollm2 (the lead) writes most of
        # them alone. Gating itself is tested in test_engine_orchestration.py.
        {"temperature": 0.0, "max_tokens": 24, "seed": 7, "gate_logprob": None},
    )
    gateway = GatewayProcess(config, folder / "gateway.log", api_key=KEY).start()
    try:
        gateway.wait_healthy()
        yield gateway
    finally:
        gateway.stop()


@pytest.fixture(scope="module")
def client(local: GatewayProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=local.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def pair() -> Iterator[SpecFuse]:
    """The gateway's ensemble in process, with its settings (every round fused)."""
    fuse = SpecFuse(pair_config(gate_logprob=None))
    yield fuse
    fuse.close()


@pytest.fixture(scope="module")
def reference(pair: SpecFuse) -> dict[str, Any]:
    """The in-process answer to PROMPT with the gateway's settings."""
    result = pair.generate([{"role": "user", "content": PROMPT}], max_tokens=SHORT)
    return {"text": result.text, "usage": result.usage, "rounds": len(result.trace.rounds)}


# -- /health, /v1/models, the openai client ----------------------------------------------------------


def test_health_and_models(local: GatewayProcess, client: openai.OpenAI) -> None:
    health = local.health().json()
    assert health == {"status": "ok", "model": MODEL, "members": ["smollm2-135m", "gemma3-270m"]}
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_sync_chat_is_the_engines_answer(client: openai.OpenAI, reference: dict[str, Any]) -> None:
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=SHORT
    )
    choice = response.choices[0]
    assert choice.message.content == reference["text"]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert response.usage is not None
    assert response.usage.prompt_tokens == reference["usage"].input_tokens
    assert response.usage.completion_tokens == reference["usage"].output_tokens
    assert response.usage.total_tokens == reference["usage"].total_tokens
    # The cost extension: rounds and member calls of this answer.
    cost = response.usage.model_extra["specfuse"]  # type: ignore[index]
    assert cost["rounds"] == reference["rounds"] and cost["calls"] >= 2 * cost["rounds"]
    # The trace only on request.
    assert "specfuse_trace" not in (response.model_extra or {})


def test_stream_sends_one_chunk_per_segment_and_usage(
    client: openai.OpenAI, reference: dict[str, Any]
) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=SHORT,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(texts) == reference["text"]
    segment_chunks = [c for c in chunks if (c.model_extra or {}).get("specfuse_member")]
    assert len(segment_chunks) == len(texts) == reference["rounds"]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishes) == 1 and finishes[0] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == reference["usage"].output_tokens
    # Without include_usage, no usage chunk.
    plain = list(
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": PROMPT}], max_tokens=SHORT, stream=True
        )
    )
    assert all(c.usage is None for c in plain) and all(c.choices for c in plain)


def test_async_concurrent_requests_keep_their_own_answers(local: GatewayProcess, pair: SpecFuse) -> None:
    prompts = [PROMPT, "What is the capital of France?"]
    expected = [pair.generate([{"role": "user", "content": p}], max_tokens=SHORT).text for p in prompts]

    async def both() -> list[str]:
        aclient = openai.AsyncOpenAI(base_url=local.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        async with aclient:

            async def ask(prompt: str, stream: bool) -> str:
                messages = [{"role": "user", "content": prompt}]
                if not stream:
                    r = await aclient.chat.completions.create(
                        model=MODEL, messages=messages, max_tokens=SHORT
                    )
                    return r.choices[0].message.content or ""
                s = await aclient.chat.completions.create(
                    model=MODEL, messages=messages, max_tokens=SHORT, stream=True
                )
                return "".join([c.choices[0].delta.content or "" async for c in s if c.choices])

            return list(await asyncio.gather(ask(prompts[0], True), ask(prompts[1], False)))

    assert asyncio.run(asyncio.wait_for(both(), 120)) == expected


def test_trace_on_request(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=SHORT,
        extra_body={"specfuse_trace": True},
    )
    trace = response.model_extra["specfuse_trace"]  # type: ignore[index]
    assert trace["members"] == ["smollm2-135m", "gemma3-270m"]
    assert "".join(r["accepted_text"] for r in trace["rounds"]) == response.choices[0].message.content


# -- tools and response_format, through the core's tool-call policy ------------------------------


def test_tool_call_non_streaming_and_streaming(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": CALL_PROMPT}]
    response = client.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], tool_choice="auto", max_tokens=40
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    assert "<tool_call>" not in (choice.message.content or "")

    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, tools=[WEATHER], tool_choice="auto", max_tokens=40, stream=True
        )
    )
    deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert [(d.function.name, json.loads(d.function.arguments)) for d in deltas] == [
        ("get_weather", {"city": "Paris"})
    ]
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "<tool_call>" not in content  # the call's markup never reaches content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "tool_calls"
    ]

    # The call goes back in with its result: a tool turn the members' templates render.
    follow = client.chat.completions.create(
        model=MODEL,
        messages=[
            *messages,
            {"role": "assistant", "content": None, "tool_calls": [c.model_dump() for c in calls]},
            {"role": "tool", "tool_call_id": calls[0].id, "content": "Sunny, 21 C"},
        ],
        tools=[WEATHER],
        max_tokens=SHORT,
    )
    assert follow.choices[0].message.content or follow.choices[0].message.tool_calls


def test_an_unreadable_call_stays_visible_as_content(client: openai.OpenAI) -> None:
    # A call of a tool nobody offered has no OpenAI shape: the client must see what was written.
    prompt = 'Reply with exactly: <tool_call>{"name": "launch_rocket", "arguments": {}}</tool_call>'
    response = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], tools=[WEATHER], max_tokens=30
    )
    choice = response.choices[0]
    assert not choice.message.tool_calls and choice.finish_reason != "tool_calls"
    assert "launch_rocket" in (choice.message.content or "")


@pytest.mark.parametrize("kind", ["json_object", "json_schema"])
def test_response_format_returns_the_json_value(client: openai.OpenAI, kind: str) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "hex": {"type": "string"}}}
    fmt: dict[str, Any] = {"type": kind}
    if kind == "json_schema":
        fmt["json_schema"] = {"name": "colour", "schema": schema}
    response = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": 'Reply with exactly: {"name": "red", "hex": "#ff0000"}'}],
        response_format=fmt,  # type: ignore[arg-type]
        max_tokens=24,
    )
    assert json.loads(response.choices[0].message.content or "") == {"name": "red", "hex": "#ff0000"}


# -- /v1/completions ---------------------------------------------------------------------------------


def test_completions_plain_and_streaming(client: openai.OpenAI, pair: SpecFuse) -> None:
    from specfuse.prompts import FormattedPrompt

    prompt = "The capital of France is"
    expected = pair.generate(FormattedPrompt(prompt), max_tokens=8).text
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8)
    assert response.choices[0].text == expected
    assert response.usage is not None and response.usage.completion_tokens > 0
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=prompt, max_tokens=8, stream=True, stream_options={"include_usage": True}
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == response.usage.total_tokens


# -- OpenAI-shaped errors ---------------------------------------------------------------------------


def _post(local: GatewayProcess, path: str, body: Any, *, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(local.url + path, content=content, headers=headers, timeout=60)


def _error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        (b'{"model": ', 400, None, "invalid_json"),
        (b"[1, 2]", 400, None, "invalid_type"),
        ({**CHAT, "messages": "hi"}, 400, "messages", "invalid_type"),
        ({**CHAT, "temperature": "hot"}, 400, "temperature", "invalid_type"),
        ({**CHAT, "max_tokens": 0}, 400, "max_tokens", "invalid_type"),
        ({"model": MODEL}, 400, "messages", "missing_required_parameter"),
        ({**CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role", "invalid_type"),
        ({**CHAT, "messages": [{"role": "user", "content": "  "}]}, 400, "messages", "invalid_value"),
        ({**CHAT, "model": "gpt-4o"}, 404, "model", "model_not_found"),
        ({**CHAT, "n": 2}, 400, "n", "unsupported_parameter"),
        ({**CHAT, "logprobs": True}, 400, "logprobs", "unsupported_parameter"),
        ({**CHAT, "tool_choice": "get_time", "tools": [WEATHER]}, 400, "tool_choice", "invalid_value"),
        ({**CHAT, "top_p": 0}, 400, None, "invalid_value"),
    ],
)
def test_bad_inputs_get_openai_errors(
    local: GatewayProcess, body: Any, status: int, param: str | None, code: str
) -> None:
    response = _post(local, "/v1/chat/completions", body)
    assert response.status_code == status, response.text
    error = _error(response)
    assert error["code"] == code and error["param"] == param
    assert error["type"] == "invalid_request_error" and error["message"]


def test_prompt_over_the_usable_window_names_both_numbers(local: GatewayProcess) -> None:
    response = _post(
        local, "/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "word " * 9000}]}
    )
    assert response.status_code == 400
    error = _error(response)
    assert error["code"] == "context_length_exceeded"
    numbers = [int(w) for w in error["message"].replace(",", " ").split() if w.isdigit()]
    window, prompt = numbers[0], numbers[1]
    assert prompt > window > 1000


def test_completions_refuses_what_it_cannot_do(local: GatewayProcess) -> None:
    for extra, param in (
        ({"echo": True}, "echo"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"best_of": 2}, "best_of"),
    ):
        body = {"model": MODEL, "prompt": "Hello", "max_tokens": 2, **extra}
        response = _post(local, "/v1/completions", body)
        assert response.status_code == 400 and _error(response)["param"] == param


def test_auth_and_unknown_paths(local: GatewayProcess, client: openai.OpenAI) -> None:
    wrong = openai.OpenAI(base_url=local.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "invalid_api_key"
    assert _post(local, "/v1/chat/completions", CHAT, key=None).status_code == 401
    assert httpx.get(local.url + "/v1/models", timeout=10).status_code == 401
    # Health and metrics stay open for load balancers and scrapers.
    assert local.health().status_code == 200
    missing = httpx.get(local.url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert missing.status_code == 404 and _error(missing)["type"] == "invalid_request_error"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


# -- /metrics ----------------------------------------------------------------------------------------


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            head = line.split(" ")[0]
            if head.split("{")[0] == name:
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_metrics_count_requests_rounds_calls_wins_and_errors(
    local: GatewayProcess, client: openai.OpenAI
) -> None:
    before = httpx.get(local.url + "/metrics", timeout=10).text
    response = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=SHORT,
        extra_body={"specfuse_trace": True},
    )
    _post(local, "/v1/chat/completions", {**CHAT, "n": 3})
    after = httpx.get(local.url + "/metrics", timeout=10).text
    trace = response.model_extra["specfuse_trace"]  # type: ignore[index]

    def grew(name: str, **labels: str) -> float:
        return _metric(after, name, **labels) - _metric(before, name, **labels)

    assert grew("specfuse_requests_total", endpoint="/v1/chat/completions", status="200") == 1
    assert grew("specfuse_requests_total", endpoint="/v1/chat/completions", status="400") == 1
    assert grew("specfuse_errors_total", kind="unsupported") == 1
    assert grew("specfuse_rounds_total") == len(trace["rounds"])
    for member in ("smollm2-135m", "gemma3-270m"):
        calls = sum(1 for r in trace["rounds"] for c in r["calls"] if c["member"] == member)
        wins = sum(1 for r in trace["rounds"] if r["winner"] == member)
        assert grew("specfuse_member_calls_total", member=member) == calls
        assert grew("specfuse_member_wins_total", member=member) == wins
    assert grew("specfuse_request_duration_seconds_count", endpoint="/v1/chat/completions") == 1
    assert grew("specfuse_completion_tokens_total") == response.usage.completion_tokens  # type: ignore[union-attr]
    assert KEY not in after


# -- LangChain, LlamaIndex, curl ---------------------------------------------------------------------


def test_langchain_chat_openai(local: GatewayProcess, reference: dict[str, Any]) -> None:
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=local.url + "/v1", stream_usage=True, **FRAMEWORK_CLIENT)
    message = chat.invoke(PROMPT)
    assert message.content == reference["text"]
    assert message.usage_metadata is not None
    assert message.usage_metadata["output_tokens"] == reference["usage"].output_tokens
    streamed = list(chat.stream(PROMPT))
    assert "".join(str(c.content) for c in streamed) == reference["text"]
    assert (
        sum((c.usage_metadata or {}).get("output_tokens", 0) for c in streamed)
        == reference["usage"].output_tokens
    )
    called = chat.bind_tools([WEATHER]).invoke(CALL_PROMPT, max_tokens=40)
    assert [(c["name"], c["args"]) for c in called.tool_calls] == [("get_weather", {"city": "Paris"})]


def test_llama_index_openai_like(local: GatewayProcess, reference: dict[str, Any]) -> None:
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.openai_like import OpenAILike

    llm = OpenAILike(
        api_base=local.url + "/v1",
        is_chat_model=True,
        temperature=0.0,  # LlamaIndex's default is 0.1; the reference is greedy
        context_window=2048,
        **FRAMEWORK_CLIENT,
    )
    answer = llm.chat([ChatMessage(role="user", content=PROMPT)])
    assert answer.message.content == reference["text"]
    streamed = "".join(r.delta or "" for r in llm.stream_chat([ChatMessage(role="user", content=PROMPT)]))
    assert streamed == reference["text"]
    completer = OpenAILike(
        model=MODEL, api_base=local.url + "/v1", api_key=KEY, is_chat_model=False, max_tokens=8, max_retries=0
    )
    assert completer.complete("The capital of France is").text


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_streams_sse_to_done(local: GatewayProcess, reference: dict[str, Any]) -> None:
    body = json.dumps(
        {**CHAT, "messages": [{"role": "user", "content": PROMPT}], "max_tokens": SHORT, "stream": True}
    )
    out = subprocess.run(
        [
            "curl",
            "-sN",
            "--max-time",
            "120",
            local.url + "/v1/chat/completions",
            "-H",
            f"Authorization: Bearer {KEY}",
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
        ],
        capture_output=True,
        text=True,
        timeout=150,
        check=True,
    ).stdout
    events = [line.removeprefix("data: ") for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == MODEL for c in chunks)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == reference["text"]


# -- over remote members: disconnects, 429, a member failing mid-answer, member keys -------------


@pytest.fixture(scope="module")
def remote(
    proxies: tuple[FaultProxy, FaultProxy],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[GatewayProcess]:
    folder = tmp_path_factory.mktemp("gateway-remote")
    members = [
        {
            "model": "smollm2-135m",
            "name": name,
            "backend": "tgi",
            "urls": [p.url],
            "timeout": 10,
            "api_key": MEMBER_KEY,
        }
        for name, p in zip("ab", proxies, strict=True)
    ]
    # Every round fused, so a fault on member b is met mid-answer.
    fusion = {"temperature": 0.0, "seed": 7, "max_tokens": 24, "gate_logprob": None}
    config = write_config(folder / "remote.json", members, fusion)
    # The first probe of member a hangs: /health must say "starting" until every member answered.
    _set_rules(proxies)
    proxies[0].set_rules(Rule("hang", paths=("/info",), times=1))
    gateway = GatewayProcess(
        config, folder / "gateway.log", api_key=KEY, args=("--max-concurrent", "1", "--retry-after", "3")
    ).start()
    try:
        assert wait_until(lambda: proxies[0].in_flight >= 1, 60), "the gateway never probed member a"
        starting = gateway.health()
        assert starting.status_code == 503 and starting.json()["status"] == "starting"
        gateway.wait_healthy(120)  # the probe timed out after 10 s and its retry answered
        yield gateway
    finally:
        gateway.stop()
        _set_rules(proxies)


def _set_rules(proxies: tuple[FaultProxy, ...], *rules: Rule) -> None:
    """Give every proxy the same rules, each its own copy (a rule counts its `times` down);
    no rules: healthy again."""
    for p in proxies:
        p.set_rules(*(dataclasses.replace(r) for r in rules))


def _hanging(*proxies: FaultProxy) -> int:
    """Member calls held by a "hang" rule (not ones that were passing when the rule changed)."""
    return sum(1 for p in proxies for s in list(p.seen) if s.rule == "hang")


def _stream_request(remote: GatewayProcess, max_tokens: int = 60) -> tuple[httpx.Client, Any]:
    http = httpx.Client(timeout=120)
    body = {
        "model": "specfuse:a+b",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "stream": True,
    }
    response = http.send(
        http.build_request(
            "POST", remote.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
        ),
        stream=True,
    )
    return http, response


def test_remote_answer_and_member_key_stays_inside(
    remote: GatewayProcess, proxies: tuple[FaultProxy, FaultProxy]
) -> None:
    client = openai.OpenAI(base_url=remote.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    response = client.chat.completions.create(
        model="specfuse:a+b",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=SHORT,
        extra_body={"specfuse_trace": True},
    )
    assert response.choices[0].message.content
    # The members got their key; nothing the gateway sends or writes has it.
    assert any(s.headers.get("authorization") == f"Bearer {MEMBER_KEY}" for s in proxies[0].seen)
    assert MEMBER_KEY not in response.model_dump_json()
    assert MEMBER_KEY not in httpx.get(remote.url + "/metrics", timeout=10).text
    assert MEMBER_KEY not in httpx.get(remote.url + "/health", timeout=10).text
    computed = _metric(
        httpx.get(remote.url + "/metrics", timeout=10).text, "specfuse_member_calls_total", member="a"
    )
    assert computed > 0


def test_disconnect_mid_stream_cancels_member_calls(
    remote: GatewayProcess,
    proxies: tuple[FaultProxy, FaultProxy],
) -> None:
    a, b = proxies
    http, response = _stream_request(remote)
    lines = response.iter_lines()
    while '"specfuse_member"' not in next(lines):  # the first accepted segment
        pass
    _set_rules(proxies, Rule("hang", paths=("/", "/generate")))
    # The next round's calls reach the members and hang there; then the client leaves.
    assert wait_until(lambda: _hanging(a, b) >= 1, 30)
    response.close()
    http.close()
    assert wait_until(lambda: a.disconnects + b.disconnects >= 1 and a.in_flight + b.in_flight == 0, 5)
    settled = a.count() + b.count()
    time.sleep(1.5)
    assert a.count() + b.count() == settled  # no member call keeps running, none is started
    metrics = httpx.get(remote.url + "/metrics", timeout=10).text
    assert _metric(metrics, "specfuse_requests_in_flight") == 0
    assert _metric(metrics, "specfuse_errors_total", kind="cancelled") >= 1


def test_429_beyond_the_limit_and_a_non_streaming_disconnect(
    remote: GatewayProcess,
    proxies: tuple[FaultProxy, FaultProxy],
) -> None:
    a, b = proxies
    _set_rules(proxies, Rule("hang", paths=("/", "/generate")))
    body = {"model": "specfuse:a+b", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8}
    outcome: dict[str, Any] = {}

    def first() -> None:
        try:
            httpx.post(
                remote.url + "/v1/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {KEY}"},
                timeout=4,
            )
        except httpx.TimeoutException as exc:  # the client gives up and closes its connection
            outcome["gave_up"] = exc

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert wait_until(lambda: _hanging(a, b) >= 1, 10)
        second = _post(remote, "/v1/chat/completions", body)
        assert second.status_code == 429
        assert second.headers["retry-after"] == "3"
        assert _error(second)["type"] == "rate_limit_error"
    finally:
        thread.join(30)
    assert "gave_up" in outcome
    assert wait_until(lambda: a.disconnects + b.disconnects >= 1 and a.in_flight + b.in_flight == 0, 5)
    _set_rules(proxies)
    # The slot was given back: the next request is served.
    assert wait_until(
        lambda: _post(remote, "/v1/chat/completions", {**body, "max_tokens": 2}).status_code == 200, 60
    )


def test_member_failure_mid_answer_is_a_stream_error(
    remote: GatewayProcess,
    proxies: tuple[FaultProxy, FaultProxy],
) -> None:
    _set_rules(proxies)
    client = openai.OpenAI(base_url=remote.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    stream = client.chat.completions.create(
        model="specfuse:a+b",
        messages=[{"role": "user", "content": PROMPT}],
        max_tokens=60,
        stream=True,
        extra_body={"specfuse_fusion": {"segment_tokens": 3}},
    )
    received = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received.append(chunk.choices[0].delta.content)
                if len(received) == 1:
                    boom = Rule("status", status=500, body={"error": "boom", "error_type": "generation"})
                    _set_rules(proxies, boom)
    assert received  # the answer had begun
    assert caught.value.body["code"] == "members_failed"  # type: ignore[index]
    assert MEMBER_KEY not in caught.value.message
    _set_rules(proxies)
    log = Path(remote.log).read_text(errors="replace")
    assert MEMBER_KEY not in log and KEY not in log


def test_the_command_is_wired_into_the_cli() -> None:
    from specfuse.cli import build_parser

    args = build_parser().parse_args(["gateway", "ensemble.toml", "--port", "9000", "--max-concurrent", "4"])
    assert (args.command, args.config, args.port, args.max_concurrent) == (
        "gateway",
        "ensemble.toml",
        9000,
        4,
    )
    assert args.host == "127.0.0.1"  # loopback unless told otherwise

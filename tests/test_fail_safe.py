"""Remote members that fail safe (issue 23), against real loopback servers.

One real `specfuse serve` (smollm2-135m, vLLM protocol, started with an API
key), a socket that accepts connections and never answers, a port nobody
listens on, the fault-injecting proxy for slow and failing answers, and a
small forwarding HTTP proxy. Time bounds are asserted with generous slack:
they are the behaviour the issue asks to prove (a member is given up within
about twice its `timeout`; `request_deadline` bounds a whole answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from specfuse import AllMembersFailedError, ConfigError, EnsembleConfig, SpecFuse
from specfuse.backends import create_backend
from specfuse.config import MemberConfig
from specfuse.errors import RetryableError
from tests.fault_proxy import FaultProxy, Rule
from tests.remote_fixtures import FaultServer, ServerProcess, fault_server, free_port  # noqa: F401

MODEL = "smollm2-135m"
KEY = "sk-failsafe-0123456789abcdef"
PROMPT = "Name three primary colours."
SHORT = {"temperature": 0.0, "max_tokens": 4, "seed": 1}


@pytest.fixture(scope="module")
def served() -> Iterator[ServerProcess]:
    server = ServerProcess(MODEL, "vllm", ("--api-key", KEY)).start()
    try:
        server.wait_healthy()
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def no_ambient_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test sets the variables it means; none leaks in from the machine."""
    for name in ("SPECFUSE_API_KEY", "MY_VLLM_KEY"):
        monkeypatch.delenv(name, raising=False)


def member(url: str, **fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "backend": "vllm", "urls": [url], **fields}


@contextlib.contextmanager
def silent_url() -> Iterator[str]:
    """A server that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def dead_url() -> str:
    """A loopback port nobody listens on: every connection is refused."""
    return f"http://127.0.0.1:{free_port()}"


def timed(fn: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    try:
        return fn(), time.perf_counter() - t0
    except Exception as exc:  # the caller asserts on it
        return exc, time.perf_counter() - t0


# -- 1. the served model -------------------------------------------------------------------


def test_a_model_the_server_does_not_serve_is_refused_naming_what_it_serves(served: ServerProcess) -> None:
    fuse = SpecFuse.from_members(
        [member(served.url, model="meta-llama/Llama-3-8B", api_key=KEY), member(served.url, api_key=KEY)],
        **SHORT,
    )
    try:
        with pytest.raises(ConfigError) as err:
            fuse.generate(PROMPT)
    finally:
        fuse.close()
    message = str(err.value)
    assert "'meta-llama/Llama-3-8B'" in message and f"['{MODEL}']" in message and "served_model=" in message
    assert KEY not in message


def test_served_model_maps_a_local_tokenizer_to_the_served_name(served: ServerProcess) -> None:
    from specfuse.models import resolve_model_path

    local_dir = str(resolve_model_path(MODEL))
    fuse = SpecFuse.from_members(
        [member(served.url, model=local_dir, name="mapped", served_model=MODEL, api_key=KEY)], **SHORT
    )
    try:
        result = fuse.generate(PROMPT)
        (ready,) = fuse.start()
    finally:
        fuse.close()
    assert result.text and ready.info.model_id == MODEL


def test_sglang_applies_the_same_rule() -> None:
    from specfuse.models import resolve_model_path

    server = ServerProcess(MODEL, "sglang").start()
    try:
        server.wait_healthy()
        typo = MemberConfig(model="meta-llama/Llama-3-8B", backend="sglang", urls=[server.url])
        with pytest.raises(ConfigError, match=rf"serves \['{MODEL}'\], not model='meta-llama/Llama-3-8B'"):
            asyncio.run(create_backend(typo).info())
        local_dir = str(resolve_model_path(MODEL))
        mapped = MemberConfig(model=local_dir, served_model=MODEL, backend="sglang", urls=[server.url])
        assert asyncio.run(create_backend(mapped).info()).model_id == MODEL
    finally:
        server.stop()


# -- 2. time bounds ------------------------------------------------------------------------


def test_a_hanging_member_is_given_up_within_about_twice_its_timeout() -> None:
    with silent_url() as url:
        config = MemberConfig(model="m", name="hangs", backend="vllm", urls=[url], timeout=0.5)
        backend = create_backend(config)
        error, elapsed = timed(lambda: asyncio.run(backend.info()))
    assert isinstance(error, RetryableError), error
    assert "timed out" in str(error) and "'hangs'" in str(error)
    assert elapsed < 2.0  # 2 x 0.5 s, with slack; it was 6 attempts and a 30 s budget


def test_retries_and_their_budget_are_settings(fault_server: Any) -> None:  # noqa: F811
    fault = fault_server.script((503, {"error": "waking up"}, {"Retry-After": "0"}))
    for retries in (0, 3):
        fault.seen.clear()
        backend = create_backend(
            MemberConfig(model="m", backend="vllm", urls=[fault_server.url], retries=retries, timeout=5)
        )
        with pytest.raises(RetryableError):
            asyncio.run(backend.info())
        assert len(fault.seen) == retries + 1
    # A Retry-After longer than the budget: given up when the budget is spent.
    fault_server.script((503, {"error": "waking up"}, {"Retry-After": "30"}))
    backend = create_backend(
        MemberConfig(model="m", backend="vllm", urls=[fault_server.url], retries=10, retry_budget=1.0)
    )
    error, elapsed = timed(lambda: asyncio.run(backend.info()))
    assert isinstance(error, RetryableError) and elapsed < 2.5


def test_the_request_deadline_bounds_the_members_probe() -> None:
    with silent_url() as url:
        fuse = SpecFuse.from_members([member(url, name="hangs", timeout=60)], request_deadline=1.0, **SHORT)
        error, elapsed = timed(lambda: fuse.generate(PROMPT))
        fuse.close()
    assert isinstance(error, AllMembersFailedError), error
    assert "'hangs'" in str(error) and "request deadline" in str(error)
    assert elapsed < 3.0  # the deadline (1 s) with slack; the probe alone once took 4 minutes


def test_the_adapters_timeout_bounds_the_members_probe() -> None:
    from langchain_specfuse import ChatSpecFuse
    from llama_index_specfuse import SpecFuseLLM

    with silent_url() as url:
        chat = ChatSpecFuse(members=[member(url, name="hangs", timeout=60)], timeout=1.0, max_tokens=4)
        error, lc_elapsed = timed(lambda: chat.invoke(PROMPT))
        assert isinstance(error, AllMembersFailedError), error
        llm = SpecFuseLLM.from_members([member(url, name="hangs-too", timeout=60)], timeout=1.0, max_tokens=4)
        error, li_elapsed = timed(lambda: llm.complete(PROMPT))
        assert isinstance(error, AllMembersFailedError), error
    assert lc_elapsed < 3.0 and li_elapsed < 3.0


def answer_within_a_deadline_while(served: ServerProcess, hangs: str) -> tuple[Any, float]:
    """One answer with request_deadline=1.0 whose member's server, after the probe,
    stops answering the path `hangs`: (the result or the error, seconds taken)."""
    with FaultProxy(served.url) as proxy:
        fuse = SpecFuse.from_members([member(proxy.url, name="stalls", api_key=KEY)], **SHORT)
        try:
            fuse.start()
            proxy.set_rules(Rule("hang", paths=(hangs,)))
            return timed(lambda: fuse.generate(PROMPT, request_deadline=1.0))
        finally:
            proxy.set_rules()
            fuse.close()


def test_the_request_deadline_ends_an_answer_whose_member_hangs_mid_answer(served: ServerProcess) -> None:
    result, elapsed = answer_within_a_deadline_while(served, hangs="/v1/completions")
    assert not isinstance(result, Exception), result
    assert result.finish_reason == "deadline" and elapsed < 3.0


def test_the_request_deadline_bounds_reading_the_prompt(served: ServerProcess) -> None:
    # /tokenize is prompt counting.
    error, elapsed = answer_within_a_deadline_while(served, hangs="/tokenize")
    assert isinstance(error, AllMembersFailedError) and "request deadline" in str(error)
    assert elapsed < 3.0


def test_a_slow_server_within_the_timeout_works_and_beyond_it_is_given_up(served: ServerProcess) -> None:
    with FaultProxy(served.url) as proxy:
        proxy.set_rules(Rule("slow", paths=("/v1/models",), delay=0.5))
        fuse = SpecFuse.from_members([member(proxy.url, name="slow", api_key=KEY, timeout=5)], **SHORT)
        try:
            assert fuse.generate(PROMPT).text
        finally:
            fuse.close()
        proxy.set_rules(Rule("slow", paths=("/v1/models",), delay=3.0))
        backend = create_backend(MemberConfig(**member(proxy.url, name="slow", api_key=KEY, timeout=0.4)))
        error, elapsed = timed(lambda: asyncio.run(backend.info()))
        proxy.set_rules()
    assert isinstance(error, RetryableError) and "timed out" in str(error)
    assert elapsed < 1.6  # 2 x 0.4 s with slack, although the server would answer after 3 s


# -- 3. degraded start ---------------------------------------------------------------------


def test_an_unreachable_member_is_left_out_and_the_healthy_one_answers(served: ServerProcess) -> None:
    fuse = SpecFuse.from_members(
        [member(served.url, name="up", api_key=KEY), member(dead_url(), name="down")], **SHORT
    )
    try:
        result = fuse.generate(PROMPT)
    finally:
        fuse.close()
    assert result.text and result.trace.members == ["up"]
    assert list(result.trace.left_out) == ["down"] and "could not reach" in result.trace.left_out["down"]
    assert result.trace.summary()["left_out"] == result.trace.left_out
    assert result.trace.to_dict()["left_out"] == result.trace.left_out


def test_a_gated_ensemble_whose_lead_is_left_out_fuses_every_round(served: ServerProcess) -> None:
    """The named lead cannot be reached at start: no error, no gating, the rest answer."""
    fuse = SpecFuse.from_members(
        [member(served.url, name="up", api_key=KEY), member(dead_url(), name="down")],
        **SHORT,
        gate_logprob=-0.5,
        lead="down",
    )
    try:
        result = fuse.generate(PROMPT)
    finally:
        fuse.close()
    assert result.text and list(result.trace.left_out) == ["down"]
    assert all(r.gated is None for r in result.trace.rounds)


def test_a_left_out_member_is_probed_again_by_the_next_request(served: ServerProcess) -> None:
    with FaultProxy(served.url) as proxy:
        proxy.set_rules(Rule("status", paths=("/v1/models",), status=503, body={"error": "waking"}))
        fuse = SpecFuse.from_members(
            [member(served.url, name="up", api_key=KEY), member(proxy.url, name="flaky", api_key=KEY)],
            **SHORT,
        )
        try:
            first = fuse.generate(PROMPT)
            proxy.set_rules()
            second = fuse.generate(PROMPT)
        finally:
            fuse.close()
    assert list(first.trace.left_out) == ["flaky"] and "503" in first.trace.left_out["flaky"]
    assert second.trace.left_out == {} and second.trace.members == ["up", "flaky"]


def test_with_every_member_unreachable_the_error_names_each_of_them() -> None:
    members = [member(dead_url(), name="down-1"), member(dead_url(), name="down-2")]
    fuse = SpecFuse.from_members(members, **SHORT)
    try:
        error, elapsed = timed(lambda: fuse.generate(PROMPT))
    finally:
        fuse.close()
    assert isinstance(error, AllMembersFailedError), error
    assert "'down-1'" in str(error) and "'down-2'" in str(error)
    assert elapsed < 5.0  # a refused connection is retried twice, within a second


# -- 4. keys from the environment ----------------------------------------------------------


def test_core_reads_the_default_key_variable(served: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECFUSE_API_KEY", KEY)
    fuse = SpecFuse.from_members([member(served.url)], **SHORT)
    try:
        assert fuse.generate(PROMPT).text
    finally:
        fuse.close()


def test_a_member_names_its_own_key_variable(served: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPECFUSE_API_KEY", "sk-the-wrong-key")
    monkeypatch.setenv("MY_VLLM_KEY", KEY)
    config = EnsembleConfig.build([member(served.url, api_key_env="MY_VLLM_KEY")], **SHORT)
    assert KEY not in config.model_dump_json() and KEY not in repr(config)
    fuse = SpecFuse(config)
    try:
        assert fuse.generate(PROMPT).text
    finally:
        fuse.close()


def test_a_named_variable_that_is_not_set_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"\$MY_VLLM_KEY, which is not set"):
        SpecFuse.from_members([member(dead_url(), api_key_env="MY_VLLM_KEY")])


def test_an_ensemble_file_reference_is_read_from_the_environment_never_sent_as_text(
    served: ServerProcess, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    path = tmp_path / "ensemble.toml"
    path.write_text(
        f'[[members]]\nmodel = "{MODEL}"\nbackend = "vllm"\nurls = ["{served.url}"]\n'
        'api_key = "${MY_VLLM_KEY}"\n[fusion]\nmax_tokens = 4\ntemperature = 0.0\n'
    )
    config = EnsembleConfig.from_file(path)
    assert config.members[0].api_key is None and config.members[0].api_key_env == "MY_VLLM_KEY"
    monkeypatch.setenv("MY_VLLM_KEY", KEY)
    fuse = SpecFuse(config)
    try:
        assert fuse.generate(PROMPT).text
    finally:
        fuse.close()
    # The literal reference never reaches a server.
    with FaultServer() as server:
        server.script((200, {"object": "list", "data": []}))
        monkeypatch.delenv("MY_VLLM_KEY")
        with pytest.raises(ConfigError, match="MY_VLLM_KEY"):
            SpecFuse.from_members([member(server.url, api_key="${MY_VLLM_KEY}")])
        assert server.fault.seen == []


def test_cli_reads_the_key_from_the_environment(
    served: ServerProcess, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from specfuse.cli import main

    path = tmp_path / "ensemble.toml"
    path.write_text(f'[[members]]\nmodel = "{MODEL}"\nbackend = "vllm"\nurls = ["{served.url}"]\n')
    monkeypatch.setenv("SPECFUSE_API_KEY", KEY)
    assert main(["generate", PROMPT, "--config", str(path), "--max-tokens", "4", "--json"]) == 0
    assert '"finish_reason"' in capsys.readouterr().out


def test_langchain_reads_a_members_key_variable(
    served: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    from langchain_specfuse import ChatSpecFuse

    monkeypatch.setenv("SPECFUSE_API_KEY", "sk-the-wrong-key")
    monkeypatch.setenv("MY_VLLM_KEY", KEY)
    chat = ChatSpecFuse(members=[member(served.url, name="lc", api_key="${MY_VLLM_KEY}")], max_tokens=4)
    assert chat.invoke(PROMPT).content
    chat2 = ChatSpecFuse(members=[member(served.url, name="lc2", api_key_env="MY_VLLM_KEY")], max_tokens=4)
    assert chat2.invoke(PROMPT).content


def test_llama_index_reads_the_default_key_variable(
    served: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    from llama_index_specfuse import SpecFuseLLM

    monkeypatch.setenv("SPECFUSE_API_KEY", KEY)
    llm = SpecFuseLLM.from_members([member(served.url, name="li")], max_tokens=4, temperature=0.0)
    assert llm.complete(PROMPT).text


# -- 6. max_retries in both adapters -------------------------------------------------------


@pytest.mark.parametrize("retries", [0, 2])
def test_max_retries_is_honoured_by_both_adapters(fault_server: Any, retries: int) -> None:  # noqa: F811
    from langchain_specfuse import ChatSpecFuse
    from llama_index_specfuse import SpecFuseLLM

    fault = fault_server.script((503, {"error": "waking up"}, {"Retry-After": "0"}))
    spec = member(fault_server.url, name="wakes", model="m")
    with pytest.raises(AllMembersFailedError):
        ChatSpecFuse(members=[spec], max_retries=retries, max_tokens=4).invoke(PROMPT)
    assert len(fault.seen) == retries + 1
    fault.seen.clear()
    with pytest.raises(AllMembersFailedError):
        SpecFuseLLM.from_members([{**spec, "name": "wakes-li"}], max_retries=retries, max_tokens=4).complete(
            PROMPT
        )
    assert len(fault.seen) == retries + 1


# -- 7. server cost in every view ----------------------------------------------------------


def test_server_cost_is_recorded_for_drafts_and_shown_in_every_view(
    served: ServerProcess, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import re

    from specfuse.cli import main
    from specfuse.trace import server_cost

    # Drafts on vLLM's default path (no --enable-prompt-tokens-details) report prompt
    # tokens but not their cache use: recorded as unmetered, not as "no cost".
    fuse = SpecFuse.from_members([member(served.url, name="solo", api_key=KEY)], **SHORT)
    try:
        result = fuse.generate(PROMPT)
    finally:
        fuse.close()
    drafts = [c for r in result.trace.rounds for c in r.calls if c.kind == "draft"]
    assert drafts and all(c.server_prompt_tokens and c.prompt_tokens_unmetered > 0 for c in drafts)
    summary = result.trace.summary()
    assert summary["members"]["solo"]["calls_without_cost"] == 0 and summary["prompt_tokens_unmetered"] > 0
    html = result.trace.to_html()
    assert "<th>prompt tokens computed</th>" in html
    assert f"<td>{server_cost(summary['members']['solo'])}</td>" in html
    assert f"server prompt tokens computed: {server_cost(summary)}" in html

    path = tmp_path / "ensemble.toml"
    path.write_text(f'[[members]]\nmodel = "{MODEL}"\nbackend = "vllm"\nurls = ["{served.url}"]\n')
    monkeypatch.setenv("SPECFUSE_API_KEY", KEY)
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["generate", PROMPT, "--config", str(path), "--max-tokens", "4", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    assert "prompt computed" in err and re.search(
        r"server prompt tokens computed: 0 \+ up to \d+ unmetered", err
    )

"""What a LangChain user hits first: finish reasons, token counting, copies, batching and
loading a serialised model, on real local models (and a real loopback server for batching)."""

from __future__ import annotations

import asyncio
import copy
import pickle
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, trim_messages
from langchain_core.outputs import LLMResult

from langchain_specfuse import ChatSpecFuse, SpecFuseLLM
from tests.fault_proxy import FaultProxy, Rule
from tests.reliability_fixtures import *  # noqa: F403  (the loopback server and proxies)
from tests.reliability_fixtures import MODEL

PAIR = ["smollm2-135m", "gemma3-270m"]
README = Path(__file__).resolve().parent.parent / "langchain_specfuse" / "README.md"


@pytest.fixture(scope="module")
def chat() -> ChatSpecFuse:
    return ChatSpecFuse.local(PAIR, temperature=0.0, max_tokens=8, seed=7)


@pytest.fixture(scope="module")
def completion() -> SpecFuseLLM:
    return SpecFuseLLM.local(PAIR, temperature=0.0, max_tokens=8, seed=7)


# -- a completed answer is recorded as completed -------------------------------------------


def _check_finished(meta: dict[str, Any]) -> None:
    reason = meta["finish_reason"]
    assert reason in {"stop", "length"}
    assert meta["specfuse_summary"]["finish_reason"] == reason
    assert meta["specfuse_trace"]["finish_reason"] == reason


def test_invoke_stream_and_batch_metadata_say_how_the_answer_finished(chat: ChatSpecFuse) -> None:
    _check_finished(chat.invoke("Name a fruit.").response_metadata)
    last = list(chat.stream("Name a fruit."))[-1]
    _check_finished(last.response_metadata)
    for message in chat.batch(["Name a fruit.", "Name a colour.", "Name a city."]):
        _check_finished(message.response_metadata)


async def test_ainvoke_and_abatch_metadata_say_how_the_answer_finished(chat: ChatSpecFuse) -> None:
    _check_finished((await chat.ainvoke("Name a fruit.")).response_metadata)
    for message in await chat.abatch(["Name a fruit.", "Name a colour."]):
        _check_finished(message.response_metadata)


def test_completion_generation_info_says_how_the_answer_finished(completion: SpecFuseLLM) -> None:
    result = completion.generate(["Name a fruit.", "Name a colour."])
    for generations in result.generations:
        _check_finished(generations[0].generation_info or {})


# -- token counting ---------------------------------------------------------------------------


def test_get_num_tokens_counts_with_the_members_tokenizers(chat: ChatSpecFuse) -> None:
    text = "The quick brown fox jumps over the lazy dog, twice: quick brown fox."
    members = chat.engine.start()
    counts = [
        len(m.backend.load().tokenizer(text, add_special_tokens=False)["input_ids"])  # type: ignore[attr-defined]
        for m in members
    ]
    assert chat.get_num_tokens(text) == max(counts) > 0
    assert SpecFuseLLM.local(PAIR).get_num_tokens(text) == max(counts)


def test_get_num_tokens_from_messages_counts_what_the_members_read(chat: ChatSpecFuse) -> None:
    messages = [SystemMessage("Be brief."), HumanMessage("Name a fruit.")]
    counted = chat.get_num_tokens_from_messages(messages)
    # The rendered prompt, template and generation prompt included: what the fusion reads.
    prompt_tokens = chat.invoke(messages).response_metadata["specfuse_trace"]["prompt_tokens"]
    assert counted == max(prompt_tokens.values())
    assert counted > chat.get_num_tokens("Be brief.") + chat.get_num_tokens("Name a fruit.")
    assert chat.get_num_tokens_from_messages([]) == 0


def test_trim_messages_with_the_model_as_token_counter_keeps_a_budget(chat: ChatSpecFuse) -> None:
    history: list[Any] = [SystemMessage("You are a helpful assistant.")]
    for i in range(6):
        history += [HumanMessage(f"Question number {i}: what is {i} plus {i}?"), AIMessage(f"It is {2 * i}.")]
    history.append(HumanMessage("And what is 7 plus 7?"))
    budget = chat.get_num_tokens_from_messages(history) // 2
    trimmed = trim_messages(
        history, max_tokens=budget, token_counter=chat, strategy="last", include_system=True, start_on="human"
    )
    assert 2 <= len(trimmed) < len(history)
    assert trimmed[0] == history[0] and trimmed[-1] == history[-1]
    assert chat.get_num_tokens_from_messages(trimmed) <= budget


# -- copies -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [ChatSpecFuse, SpecFuseLLM])
def test_models_deep_copy_and_pickle_before_and_after_their_first_call(cls: Any) -> None:
    model = cls.local(PAIR, temperature=0.0, max_tokens=6, seed=7, fusion={"tau": 0.7})
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert copied.members == model.members and copied.fusion == {"tau": 0.7}
    answer = model.invoke("Name a fruit.")
    deep, unpickled = copy.deepcopy(model), pickle.loads(pickle.dumps(model))
    assert deep.engine is model.engine  # loaded models are shared, not duplicated
    for copied in (deep, unpickled):
        again = copied.invoke("Name a fruit.")
        assert getattr(again, "content", again) == getattr(answer, "content", answer)


# -- batching ---------------------------------------------------------------------------------------


class _Ends(BaseCallbackHandler):
    def __init__(self) -> None:
        self.usage: list[dict[str, int]] = []

    def on_llm_end(self, response: LLMResult, **kwargs: Any) -> None:
        self.usage.append((response.llm_output or {}).get("token_usage") or {})


def test_completion_batch_sums_every_prompts_usage(completion: SpecFuseLLM) -> None:
    handler = _Ends()
    result = completion.generate(["Name a fruit.", "Name a colour."], callbacks=[handler])
    per_prompt = [(g[0].generation_info or {})["usage_metadata"] for g in result.generations]
    assert result.llm_output is not None
    assert result.llm_output["token_usage"] == {
        key: sum(u[key] for u in per_prompt) for key in ("input_tokens", "output_tokens", "total_tokens")
    }
    # LangChain hands the call's total to the first run and {} to the others (LLMResult.flatten),
    # so a callback that adds up token_usage counts every prompt exactly once.
    assert sum(u.get("output_tokens", 0) for u in handler.usage) == sum(
        u["output_tokens"] for u in per_prompt
    )


def _peak_in_flight(proxy: FaultProxy, work: Callable[[], Any]) -> tuple[int, Any]:
    """Run work() in a thread; return the most requests the proxy held at once, and its result."""
    box: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: box.setdefault("result", work()))
    peak = 0
    thread.start()
    while thread.is_alive():
        peak = max(peak, proxy.in_flight)
        time.sleep(0.005)
    thread.join()
    return peak, box.get("result")


@pytest.mark.parametrize("method", ["batch", "abatch"])
def test_completion_batch_runs_its_prompts_concurrently(
    clean: tuple[FaultProxy, FaultProxy], method: str
) -> None:
    proxy = clean[0]
    # One member behind a proxy that holds every generation call for a second: requests run
    # one at a time never have two calls in flight; concurrent requests have one each.
    proxy.set_rules(Rule("slow", delay=1.0))
    llm = SpecFuseLLM(
        members=[{"model": MODEL, "name": "a", "backend": "tgi", "urls": [proxy.url], "timeout": 30}],
        temperature=0.0,
        max_tokens=2,
        segment_tokens=2,
    )
    prompts = ["Name a fruit.", "Name a colour.", "Name a city."]
    if method == "batch":
        peak, answers = _peak_in_flight(proxy, lambda: llm.batch(prompts))
    else:
        peak, answers = _peak_in_flight(proxy, lambda: asyncio.run(llm.abatch(prompts)))
    assert answers is not None and len(answers) == 3 and all(isinstance(a, str) for a in answers)
    assert peak == len(prompts)


# -- loading a serialised model -----------------------------------------------------------------------


def _readme_block(heading: str) -> str:
    section = README.read_text(encoding="utf-8").split(heading, 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"no python block under {heading!r} in {README}"
    return match.group(1)


def test_the_documented_load_of_a_serialised_model_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPECFUSE_API_KEY", raising=False)
    scope: dict[str, Any] = {}
    exec(compile(_readme_block("## Serialisation and copies"), str(README), "exec"), scope)
    assert isinstance(scope["revived"], ChatSpecFuse)
    assert scope["revived"].members == scope["chat"].members

"""The local backend on a real model: the KV cache changes speed, never numbers."""

from __future__ import annotations

import pytest
import torch

from specfuse import ModelNotAvailableError
from specfuse.backends.base import Sampling
from specfuse.backends.local import LocalBackend

GREEDY = Sampling(temperature=0.0)
CONTEXT = "<|im_start|>user\nWrite a haiku about rivers.<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def cached() -> LocalBackend:
    return LocalBackend("smollm2-135m", kv_cache=True)


@pytest.fixture(scope="module")
def uncached() -> LocalBackend:
    return LocalBackend("smollm2-135m", kv_cache=False)


async def test_cache_does_not_change_greedy_drafts(cached: LocalBackend, uncached: LocalBackend) -> None:
    fused = ""
    for _ in range(3):  # several rounds so the cache is rolled back and extended
        a = await cached.draft(CONTEXT + fused, max_tokens=6, sampling=GREEDY)
        b = await uncached.draft(CONTEXT + fused, max_tokens=6, sampling=GREEDY)
        assert a.text == b.text
        fused += a.text
    assert cached._kv.ids, "the cached backend kept keys/values"
    assert not uncached._kv.ids


async def test_cache_does_not_change_scores(cached: LocalBackend, uncached: LocalBackend) -> None:
    first = await cached.draft(CONTEXT, max_tokens=8, sampling=GREEDY)
    candidates = [first.text, " Flowing water", "Rivers run", "🌊 waves"]
    a = await cached.score(CONTEXT, candidates)
    b = await uncached.score(CONTEXT, candidates)
    for x, y in zip(a, b, strict=True):
        assert len(x.token_logprobs) == len(y.token_logprobs)
        assert x.token_logprobs == pytest.approx(y.token_logprobs, abs=2e-4)


async def test_batched_scoring_equals_one_at_a_time(uncached: LocalBackend) -> None:
    candidates = ["Rivers run", " Flowing water over stones", "x"]
    together = await uncached.score(CONTEXT, candidates)
    alone = [(await uncached.score(CONTEXT, [c]))[0] for c in candidates]
    for x, y in zip(together, alone, strict=True):
        assert x.token_logprobs == pytest.approx(y.token_logprobs, abs=2e-4)


async def test_scores_are_the_models_own_log_probs(uncached: LocalBackend) -> None:
    loaded = uncached.load()
    tok, model = loaded.tokenizer, loaded.model
    candidate = " Flowing water"
    scored = (await uncached.score(CONTEXT, [candidate]))[0]
    ctx_ids = tok(CONTEXT, add_special_tokens=False)["input_ids"]
    full_ids = tok(CONTEXT + candidate, add_special_tokens=False)["input_ids"]
    assert full_ids[: len(ctx_ids)] == ctx_ids  # no merge across the boundary here
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(torch.tensor([full_ids])).logits[0].float(), -1)
    expected = [logprobs[j - 1, full_ids[j]].item() for j in range(len(ctx_ids), len(full_ids))]
    assert scored.token_logprobs == pytest.approx(expected, abs=2e-4)


async def test_straddling_token_belongs_to_the_candidate(uncached: LocalBackend) -> None:
    # "Hello wor" + "ld": the token " world" spans the boundary, so it covers "ld".
    tok = uncached.load().tokenizer
    whole = tok("Hello world", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(whole)[-1] == "Ġworld"
    scored = (await uncached.score("Hello wor", ["ld"]))[0]
    assert len(scored.token_logprobs) == 1
    reference = (await uncached.score("Hello", [" world"]))[0]
    assert scored.token_logprobs == pytest.approx(reference.token_logprobs, abs=2e-4)


async def test_draft_stops_at_a_stop_sequence(uncached: LocalBackend) -> None:
    free = await uncached.draft(CONTEXT, max_tokens=12, sampling=GREEDY)
    stop = free.text.split()[1]
    stopped = await uncached.draft(CONTEXT, max_tokens=12, sampling=GREEDY, stop=[stop])
    assert stopped.finish_reason == "stop"
    assert stopped.finished
    assert stop not in stopped.text
    assert free.text.startswith(stopped.text)


async def test_sampling_is_reproducible_per_seed(uncached: LocalBackend) -> None:
    hot = Sampling(temperature=1.0, top_p=0.95, seed=123)
    a = await uncached.draft(CONTEXT, max_tokens=10, sampling=hot)
    b = await uncached.draft(CONTEXT, max_tokens=10, sampling=hot)
    assert a.text == b.text
    assert len(a.token_logprobs) == a.token_count


def test_unknown_model_and_missing_directory_are_refused(tmp_path) -> None:
    with pytest.raises(ModelNotAvailableError, match="smollm2-135m"):
        LocalBackend("no-such-model")
    with pytest.raises(ModelNotAvailableError, match="does not exist"):
        LocalBackend(str(tmp_path / "nowhere"))
    with pytest.raises(ModelNotAvailableError, match=r"config\.json"):
        LocalBackend(str(tmp_path))

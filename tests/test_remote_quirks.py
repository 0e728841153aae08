"""The remote backends against the imitation servers' real-server quirks (specfuse.devserver).

Each test starts `specfuse.devserver` apps on loopback (uvicorn in a thread,
one shared smollm2-135m) that reproduce what TGI, vLLM and SGLang do and that
specfuse once got wrong: TGI's compat route returning the prompt, its
/chat_tokenize cutting after a final assistant message, SGLang's
`sampling_seed` and its /get_server_info, vLLM's and SGLang's overflow
errors, and per-token texts that cannot place a split character.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from specfuse import ContextWindowError
from specfuse.backends import create_backend
from specfuse.backends.base import Sampling
from specfuse.config import MemberConfig
from tests.remote_fixtures import free_port

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m"
#: smollm2-135m answers it greedily with U+1F375 four times, three byte tokens each.
EMOJI_PROMPT = "I love pizza \U0001f355\U0001f355 and pasta"
#: Candidates whose boundary or body falls inside characters split across tokens.
HARD = [
    ("日本語", "日本語"),
    ("한", "👍🏽"),
    ("User: hi\nAssistant:", " 😀 héllo wörld"),
    ("a", " \u0308 \U0001f600"),
]


class Imitation:
    """One devserver app on a loopback port, served by uvicorn in a daemon thread."""

    def __init__(self, runner: Any, protocol: str, **options: Any) -> None:
        import uvicorn

        from specfuse.devserver import ServeOptions, build_app

        self.port = free_port()
        inner = build_app(ServeOptions(model=MODEL, protocol=protocol, **options), runner=runner)
        #: "METHOD /path" of every HTTP request the server received, in order.
        self.requests: list[str] = []

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] == "http":
                self.requests.append(f"{scope['method']} {scope['path']}")
            await inner(scope, receive, send)

        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def runner() -> Any:
    from specfuse.devserver.runner import Runner

    return Runner(MODEL)


@pytest.fixture(scope="module")
def servers(runner: Any) -> Iterator[dict[str, Imitation]]:
    started = {
        "tgi": Imitation(runner, "tgi", enable_prefill_logprobs=True),
        "vllm": Imitation(runner, "vllm", max_total_tokens=512),
        "sglang": Imitation(runner, "sglang", max_total_tokens=512),
    }
    yield started
    for server in started.values():
        server.stop()


def member(protocol: str, url: str, model: str = MODEL, **kw: Any) -> Any:
    return create_backend(MemberConfig(model=model, backend=protocol, urls=[url], timeout=120, **kw))


def post(url: str, **kw: Any) -> httpx.Response:
    return httpx.post(url, timeout=120, **kw)


def get(url: str) -> httpx.Response:
    return httpx.get(url, timeout=120)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# -- every protocol -------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["tgi", "vllm", "sglang"])
def test_drafts_carry_each_tokens_text_so_the_gate_can_cut_them(servers, protocol):
    """Gated fusion keeps a draft's first tokens and holds the rest (Draft.split). TGI and
    vLLM report what each generated token adds to the text, "" for the first bytes of a
    split character; SGLang decodes each token alone, so a split character cannot be cut."""
    backend = member(protocol, servers[protocol].url)
    greedy = Sampling(temperature=0.0)
    plain = run(backend.draft("The sky is", max_tokens=8, sampling=greedy))
    assert len(plain.token_texts) == len(plain.token_logprobs) > 3
    head, tail = plain.split(3, 8) or (None, None)
    assert head is not None and tail is not None and head.text + tail.text == plain.text
    assert head.token_logprobs + tail.token_logprobs == plain.token_logprobs

    emoji = run(backend.draft(EMOJI_PROMPT, max_tokens=12, sampling=greedy))
    assert "\U0001f375" in emoji.text  # split across three byte tokens each
    if protocol == "sglang":
        assert "\ufffd" in "".join(emoji.token_texts) and emoji.split(4, 8) is None
    else:
        assert "".join(emoji.token_texts).startswith(emoji.text)
        head, tail = emoji.split(4, 8) or (None, None)
        assert head is not None and tail is not None
        assert emoji.text.startswith(head.text + tail.text) and tail.text


# -- TGI ------------------------------------------------------------------------------


def test_tgi_compat_route_returns_the_prompt_unless_told_not_to(servers):
    """The imitation's POST / defaults return_full_text to true for a text-generation model;
    the TGI backend's drafts (the TGI backend posts to that route) still hold only new text."""
    url = servers["tgi"].url
    body = {"inputs": "The sky is", "parameters": {"max_new_tokens": 3}}
    assert post(url + "/", json=body).json()[0]["generated_text"].startswith("The sky is")
    assert not post(url + "/generate", json=body).json()["generated_text"].startswith("The sky is")

    tgi = member("tgi", url)
    draft = run(tgi.draft("The sky is", max_tokens=4, sampling=Sampling(temperature=0.0)))
    direct = post(url + "/generate", json={**body, "parameters": {"max_new_tokens": 4}}).json()
    assert draft.text == direct["generated_text"]
    assert not draft.text.startswith("The sky is")


def test_tgi_chat_tokenize_cut_still_finds_the_end_of_turn(servers):
    """TGI >= 3.0 ends a rendering at a final assistant message; the end-of-turn probe copes."""
    from specfuse.prompts import ChatFormat

    url = servers["tgi"].url
    cut = post(
        url + "/chat_tokenize",
        json={"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]},
    ).json()
    assert cut["templated_text"].endswith("Hello")
    fmt = run(ChatFormat.probe(member("tgi", url, template="server")))
    assert fmt is not None and fmt.end_of_turn == "<|im_end|>"


def test_tgi_tokenize_offsets_are_bytes(servers):
    rows = post(servers["tgi"].url + "/tokenize", json={"inputs": "é😀"}).json()
    assert rows[-1]["stop"] == len("é😀".encode())


# -- SGLang ---------------------------------------------------------------------------


def test_sglang_sampled_drafts_send_sampling_seed(servers):
    """SGLang rejects an unknown `seed`; sampled drafts use `sampling_seed` and repeat with it."""
    url = servers["sglang"].url
    refused = post(
        url + "/generate",
        json={"text": "Hi", "sampling_params": {"max_new_tokens": 2, "temperature": 0.6, "seed": 1}},
    )
    assert refused.status_code == 400 and "seed" in refused.json()["error"]["message"]
    sglang = member("sglang", url)
    sampling = Sampling(temperature=0.6, top_p=0.9, seed=11)

    async def twice() -> tuple[Any, Any]:
        return (
            await sglang.draft("Once upon a time", max_tokens=6, sampling=sampling),
            await sglang.draft("Once upon a time", max_tokens=6, sampling=sampling),
        )

    first, second = run(twice())
    assert first.text and first.text == second.text


def test_sglang_context_window_from_get_server_info(servers):
    info = get(servers["sglang"].url + "/get_model_info").json()
    assert set(info) == {"model_path", "tokenizer_path", "is_generation"}
    sglang = member("sglang", servers["sglang"].url)
    assert run(sglang.info()).context_window == 511  # max_req_input_len of a 512-token server


@pytest.mark.parametrize(
    ("context", "candidates"),
    [
        ("Name three primary colours.\nAnswer:", [" Red, blue and yellow.", " Green.", " Cyan, magenta"]),
        # Boundaries inside characters split across tokens, and a repeated candidate.
        ("User: hi\nAssistant:", [" 😀 héllo wörld", "👍🏽", " hi", " hi"]),
    ],
)
def test_sglang_scores_all_of_a_verifiers_candidates_in_one_request(servers, context, candidates):
    """One POST /generate with `text` a list scores every candidate, each exactly as alone."""
    server = servers["sglang"]
    sglang = member("sglang", server.url)

    async def main() -> tuple[list[str], list[Any], list[Any]]:
        # Learn the context's length first (the call that does is charged to the next score).
        await sglang.score(context, candidates[:1])
        before = len(server.requests)
        batch = await sglang.score(context, candidates)
        sent = server.requests[before:]
        alone = [(await sglang.score(context, [c]))[0] for c in candidates]
        await sglang.aclose()
        return sent, batch, alone

    sent, batch, alone = run(main())
    assert sent == ["POST /generate"]
    assert [s.token_logprobs for s in batch] == [a.token_logprobs for a in alone]
    usages = [s.usage for s in batch]
    assert all(u is not None and u.path == "logprob_start_len" for u in usages)
    # The request's usage rides on the first candidate: every prompt's tokens, one request.
    assert [u.requests for u in usages if u] == [1] + [0] * (len(candidates) - 1)
    assert usages[0].prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert all(u.prompt_tokens == 0 for u in usages[1:] if u)


def test_sglang_imitation_takes_a_batch_as_sglang_does(servers):
    """A list in `text`, per-prompt lists or one value for the rest; a list answered in order."""
    url = servers["sglang"].url
    texts = ["The sky is", "Once upon a time there"]
    single = [
        post(
            url + "/generate",
            json={
                "text": t,
                "sampling_params": {"max_new_tokens": 0},
                "return_logprob": True,
                "logprob_start_len": 1,
            },
        ).json()
        for t in texts
    ]
    batch = post(
        url + "/generate",
        json={
            "text": texts,
            "sampling_params": [{"max_new_tokens": 0}, {"max_new_tokens": 0}],
            "return_logprob": True,
            "logprob_start_len": [1, 1],
        },
    ).json()
    assert isinstance(batch, list) and len(batch) == 2
    for one, item in zip(single, batch, strict=True):
        assert item["meta_info"]["input_token_logprobs"] == one["meta_info"]["input_token_logprobs"]
        assert item["meta_info"]["prompt_tokens"] == one["meta_info"]["prompt_tokens"]
    wrong = post(url + "/generate", json={"text": texts, "logprob_start_len": [0, 0, 0]})
    assert wrong.status_code == 400
    overlong = post(url + "/generate", json={"text": ["Hi", "hello " * 600]})
    assert overlong.status_code == 400 and "context length" in overlong.json()["error"]["message"]


# -- errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["vllm", "sglang"])
def test_overlong_prompts_are_context_window_errors(servers, protocol):
    backend = member(protocol, servers[protocol].url)
    with pytest.raises(ContextWindowError, match="context length"):
        run(backend.draft("hello " * 600, max_tokens=4, sampling=Sampling(temperature=0.0)))


# -- exact alignment ------------------------------------------------------------------


def local_scores(pairs: list[tuple[str, str]]) -> list[Any]:
    from specfuse.backends.local import LocalBackend

    local = LocalBackend(MODEL)

    async def score() -> list[Any]:
        return [(await local.score(c, [x]))[0] for c, x in pairs]

    return run(score())


@pytest.mark.parametrize(
    ("protocol", "model"),
    [
        ("vllm", MODEL),  # a local tokenizer, token ids from return_tokens_as_token_ids
        ("sglang", MODEL),  # a local tokenizer, token ids from input_token_logprobs
        ("tgi", MODEL),  # a local tokenizer, prefill ids
        ("tgi", "served/elsewhere"),  # no local tokenizer: TGI's byte offsets from /tokenize
    ],
)
def test_alignment_is_exact_where_per_token_texts_are_not(servers, protocol, model):
    """Split characters (vLLM reports their pieces as "", TGI and SGLang as U+FFFD) and a
    boundary inside such a run: the remote scores cover the same tokens as in-process."""
    backend = member(protocol, servers[protocol].url, model=model)

    async def score() -> list[Any]:
        return [(await backend.score(c, [x]))[0] for c, x in HARD]

    got = run(score())
    for (context, cand), g, w in zip(HARD, got, local_scores(HARD), strict=True):
        assert len(g.token_logprobs) == len(w.token_logprobs), (context, cand)
        assert g.mean == pytest.approx(w.mean, abs=1e-3), (context, cand)


def test_vllm_renders_chats_through_tokenize_and_detokenize(servers, runner):
    """vLLM's own chat rendering (/tokenize with messages, then /detokenize), as the real server."""
    url = servers["vllm"].url
    messages = [{"role": "user", "content": "Hi 😀"}]
    ids = post(url + "/tokenize", json={"messages": messages}).json()["tokens"]
    text = post(url + "/detokenize", json={"tokens": ids}).json()["prompt"]
    want = runner.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == want

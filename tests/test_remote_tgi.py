"""Whole fusions over real `specfuse serve --protocol tgi` servers, and TGI's contract.

Proves: the HTTP path (plain JSON through the shared stack, prefill alignment, server
chat templates) reaches the same greedy answer as the in-process engine; the
server's responses validate against TGI's OpenAPI document and parse with
huggingface_hub; Unicode candidates are scored on the same tokens as locally;
a server without --enable-prefill-logprobs gives the actionable error.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import jsonschema
import pytest

from specfuse import CapabilityError, SpecFuse
from tests.remote_fixtures import (  # noqa: F401  (fixtures)
    PAIR,
    PROMPT,
    fuses_like_reference,
    reference_answer,
    remote_config,
    server_pool,
)

pytestmark = pytest.mark.slow


def _nullable(node: object) -> object:
    """OpenAPI 3.0 `nullable: true` -> JSON Schema (jsonschema does not know `nullable`)."""
    if isinstance(node, list):
        return [_nullable(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _nullable(v) for k, v in node.items()}
    if node.pop("nullable", False):
        return {"anyOf": [node, {"type": "null"}]}
    return node


#: The part of TGI's OpenAPI document these tests use (tests/data: its origin is in its "info").
SPEC = _nullable(json.loads((Path(__file__).parent / "data" / "tgi-openapi-subset.json").read_text()))


def validate(instance: object, schema_name: str) -> None:
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": SPEC["components"]}
    jsonschema.validate(instance, schema)


@pytest.fixture(scope="module")
def tgi(server_pool):  # noqa: F811
    return server_pool.get("tgi", PAIR, ("--enable-prefill-logprobs",))


def test_tgi_fusion_equals_in_process(tgi, reference_answer):  # noqa: F811
    result = fuses_like_reference("tgi", tgi, reference_answer)
    # Scores agree to float noise (servers run a fresh prefill, locally a cached batch).
    for remote, local in zip(result.trace.rounds, reference_answer.trace.rounds, strict=True):
        for verifier, row in local.scores.items():
            for member, value in row.items():
                assert remote.scores[verifier][member] == pytest.approx(value, abs=1e-3)


def test_tgi_vs_embedded_local_ensemble(tgi, reference_answer):  # noqa: F811
    """The embedded local ensemble gives the TGI answer: both put Gemma's <bos> first."""
    from specfuse.backends.local import LocalBackend

    assert asyncio.run(LocalBackend("gemma3-270m").info()).extra.get("bos_text") == "<bos>"
    from specfuse import EnsembleConfig

    local = SpecFuse(EnsembleConfig.local(PAIR, temperature=0.0, max_tokens=24, seed=7)).generate(PROMPT)
    assert local.text == reference_answer.text


def test_tgi_contract_validates_and_parses_with_huggingface_hub(tgi):
    from huggingface_hub import AsyncInferenceClient
    from huggingface_hub.inference._generated.types import TextGenerationOutput

    url = tgi[0].url
    info = httpx.get(url + "/info").json()
    validate(info, "Info")
    body = {
        "inputs": "Hello 😀 wörld",
        "parameters": {"max_new_tokens": 4, "details": True, "decoder_input_details": True},
    }
    out = httpx.post(url + "/generate", json=body).json()
    validate(out, "GenerateResponse")
    assert out["details"]["prefill"][0]["logprob"] is None and len(out["details"]["prefill"]) > 3
    compat = httpx.post(url + "/", json=body).json()
    jsonschema.validate(
        compat,
        {
            "type": "array",
            "items": {"$ref": "#/components/schemas/GenerateResponse"},
            "components": SPEC["components"],
        },
    )
    # Greedy is deterministic: same text and tokens (log-probs may differ in the last float bits,
    # since the second request reuses the server's prefix cache). The compat route of a
    # "text-generation" model returns the prompt too unless return_full_text is false.
    assert compat[0]["generated_text"] == body["inputs"] + out["generated_text"]
    assert [t["id"] for t in compat[0]["details"]["tokens"]] == [t["id"] for t in out["details"]["tokens"]]
    toks = httpx.post(url + "/tokenize", json={"inputs": "Hello wörld"}).json()
    validate(toks, "TokenizeResponse")
    chat = httpx.post(
        url + "/chat_tokenize", json={"model": "x", "messages": [{"role": "user", "content": "Hi"}]}
    )
    validate(chat.json(), "ChatTokenizeResponse")
    assert "<|im_start|>assistant" in chat.json()["templated_text"]
    no_template = httpx.post(
        tgi[1].url + "/chat_tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}
    )
    assert no_template.status_code == 422
    validate(no_template.json(), "ErrorResponse")
    too_long = httpx.post(
        url + "/generate", json={"inputs": "hi " * 9000, "parameters": {"max_new_tokens": 2}}
    )
    assert too_long.status_code == 422 and too_long.json()["error_type"] == "validation"
    with httpx.stream(
        "POST", url + "/generate_stream", json={"inputs": "Hello", "parameters": {"max_new_tokens": 3}}
    ) as r:
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    for event in events:
        validate(event, "StreamResponse")
    assert events[-1]["generated_text"] is not None

    async def hub() -> None:
        import httpx2

        client = AsyncInferenceClient(base_url=url, headers={"authorization": None})
        # HF_HUB_OFFLINE=1 blocks the hub's default session (meant for the Hub, not this URL).
        client._async_client = httpx2.AsyncClient(follow_redirects=False, timeout=None)
        parsed = await client.text_generation(
            "Hello", max_new_tokens=3, details=True, decoder_input_details=True
        )
        assert isinstance(parsed, TextGenerationOutput) and parsed.details.prefill
        chunks = [
            c
            async for c in await client.text_generation("Hello", max_new_tokens=3, stream=True, details=True)
        ]
        assert chunks[-1].details.finish_reason in ("length", "eos_token", "stop_sequence")
        await client.close()

    asyncio.run(hub())


@pytest.mark.parametrize("model_index", [0, 1])
def test_unicode_candidates_score_on_the_same_tokens(tgi, model_index):
    """Prefill alignment over partial-UTF-8 tokens (U+FFFD texts) picks the local backend's tokens."""
    from specfuse.backends import create_backend
    from specfuse.backends.local import LocalBackend
    from specfuse.config import MemberConfig

    server = tgi[model_index]
    remote = create_backend(MemberConfig(model=server.model, backend="tgi", urls=[server.url]))
    local = LocalBackend(server.model)
    context = "User: say something fun\nAssistant:"
    candidates = [" 😀 héllo wörld", "日本語のテキスト", " plain ascii", "é", " 🎉🎉 done"]
    bos = "<bos>" if model_index == 1 else ""  # the server adds Gemma's BOS itself

    async def both():
        return await remote.score(context, candidates), await local.score(bos + context, candidates)

    got, want = asyncio.run(both())
    for g, w, c in zip(got, want, candidates, strict=True):
        assert len(g.token_logprobs) == len(w.token_logprobs), c
        assert g.mean == pytest.approx(w.mean, abs=1e-3), c


def test_server_chat_template_matches_the_local_one(tgi):
    """template='server' renders through POST /chat_tokenize; a base model falls back to plain."""
    from specfuse.backends import create_backend
    from specfuse.backends.local import LocalBackend
    from specfuse.config import MemberConfig
    from specfuse.prompts import ChatFormat

    chat, base = (
        create_backend(MemberConfig(model=s.model, backend="tgi", urls=[s.url], template="server"))
        for s in tgi
    )
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi 😀"}]

    async def run():
        fmt = await ChatFormat.probe(chat)
        return (
            await chat.render_chat(messages),
            await LocalBackend("smollm2-135m").render_chat(messages),
            fmt.end_of_turn,
            await ChatFormat.probe(base),
        )

    remote, local, end_of_turn, base_format = asyncio.run(run())
    assert remote == local
    assert end_of_turn == "<|im_end|>"
    assert base_format is None


def test_tgi_without_prefill_logprobs_says_how_to_fix(server_pool):  # noqa: F811
    servers = server_pool.get("tgi", ("smollm2-135m",), ())
    fuse = SpecFuse(remote_config("tgi", servers))
    with pytest.raises(CapabilityError, match="--enable-prefill-logprobs") as info:
        fuse.start()
    assert "smollm2-135m" in str(info.value) and servers[0].url.split("//")[1] in str(info.value)


async def test_serve_api_key_and_concurrency_limit():
    """--api-key demands the Bearer token; past --max-concurrent-requests TGI answers 429, not a queue."""
    from specfuse.devserver import ServeOptions, build_app

    app = build_app(ServeOptions(model="smollm2-135m", api_key="k3y", max_concurrent_requests=1))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://serve") as client:
        assert (await client.get("/info")).status_code == 401
        ok = {"authorization": "Bearer k3y"}
        assert (await client.get("/info", headers=ok)).status_code == 200
        body = {"inputs": "Count to ten:", "parameters": {"max_new_tokens": 12}}
        replies = await asyncio.gather(*(client.post("/generate", json=body, headers=ok) for _ in range(2)))
    statuses = sorted(r.status_code for r in replies)
    assert statuses == [200, 429]
    overloaded = next(r for r in replies if r.status_code == 429).json()
    validate(overloaded, "ErrorResponse")
    assert overloaded["error_type"] == "overloaded"

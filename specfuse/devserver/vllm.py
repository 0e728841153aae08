"""The imitation's vLLM protocol: /v1/models, /tokenize, /detokenize and /v1/completions
with echo, prompt_logprobs and vLLM's per-token texts."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from specfuse.devserver.context import Context, Protocol, stop_strings
from specfuse.devserver.runner import Runner

if TYPE_CHECKING:
    from fastapi import Request
    from fastapi.responses import Response


def _error_body(status: int, message: str, kind: str) -> dict[str, Any]:
    # vllm/entrypoints/openai/protocol.py, ErrorResponse: {"error": ErrorInfo} since
    # late 2025 (older versions sent the ErrorInfo fields at the top level).
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


PROTOCOL = Protocol(name="vllm", error_body=_error_body)


def _prompt_token_text(runner: Runner, ids: Sequence[int], j: int) -> str:
    """A prompt token's text as vLLM (late 2025 on) reports it: a piece of a split
    character is decoded with up to 3 tokens before it and gives what it completes, or
    "" when it completes nothing (vllm/v1/engine/logprobs.py, _correct_decoded_token)."""
    alone = runner.token_text(ids[j])
    if "\ufffd" not in alone:
        return alone
    for k in range(1, min(3, j) + 1):
        whole = runner.tokenizer.decode(list(ids[j - k : j + 1]), skip_special_tokens=False)
        if not whole.endswith("\ufffd"):
            before = runner.tokenizer.decode(list(ids[j - k : j]), skip_special_tokens=False)
            return whole[len(before.rstrip("\ufffd")) :]
    return ""


@PROTOCOL.get("/v1/models")
async def models(ctx: Context, request: Request) -> Response:
    return ctx.json(
        {
            "object": "list",
            "data": [
                {
                    "id": ctx.model_id,
                    "object": "model",
                    "owned_by": "specfuse",
                    "max_model_len": ctx.max_total,
                }
            ],
        }
    )


@PROTOCOL.post("/tokenize")
async def tokenize(ctx: Context, request: Request) -> Response:
    runner = ctx.runner
    body = await request.json()
    if "messages" in body:
        # vllm/entrypoints/openai/serving_tokenization.py (TokenizeChatRequest): the
        # server's own chat template; add_generation_prompt defaults to true and
        # add_special_tokens to false (the template carries any BOS).
        tok = runner.tokenizer
        if not tok.chat_template:
            return ctx.error(
                400,
                "As of transformers v4.44, default chat template is no longer allowed, so you must "
                "provide a chat template if the tokenizer does not define one.",
                "BadRequestError",
            )
        text = tok.apply_chat_template(
            body["messages"],
            tools=body.get("tools"),
            tokenize=False,
            add_generation_prompt=body.get("add_generation_prompt", True),
            continue_final_message=body.get("continue_final_message", False),
        )
        ids = runner.encode(text, add_special_tokens=body.get("add_special_tokens", False))
    else:
        special = body.get("add_special_tokens", True)
        ids = runner.encode(body.get("prompt", ""), add_special_tokens=special)
    result: dict[str, Any] = {"tokens": ids, "count": len(ids), "max_model_len": ctx.max_total}
    if body.get("return_token_strs"):
        result["token_strs"] = runner.tokenizer.convert_ids_to_tokens(ids)
    return ctx.json(result)


@PROTOCOL.post("/detokenize")
async def detokenize(ctx: Context, request: Request) -> Response:
    # serving_tokenization.py, create_detokenize: {"tokens": [ids]} -> {"prompt": text}.
    body = await request.json()
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        return ctx.error(400, "tokens must be a list of integers", "BadRequestError")
    return ctx.json({"prompt": ctx.runner.tokenizer.decode(tokens, skip_special_tokens=False)})


@PROTOCOL.post("/v1/completions")
async def completions(ctx: Context, request: Request) -> Response:
    body = await request.json()
    prompts = body.get("prompt")
    if not (isinstance(prompts, list) and len(prompts) > 1 and all(isinstance(p, str) for p in prompts)):
        return await _complete_one(ctx, body)
    # A list of prompts gives one choice per prompt, `index` in prompt order, and
    # the usage summed (vllm/entrypoints/openai/completion/serving.py,
    # OpenAIServingCompletion.request_output_to_completion_response).
    answers = [await _complete_one(ctx, {**body, "prompt": p}) for p in prompts]
    if any(a.status_code != 200 for a in answers):
        return next(a for a in answers if a.status_code != 200)
    parts = [json.loads(bytes(a.body)) for a in answers]
    merged = parts[0]
    merged["choices"] = [{**p["choices"][0], "index": i} for i, p in enumerate(parts)]
    merged["usage"] = {k: sum(p["usage"][k] for p in parts) for k in merged["usage"]}
    return ctx.json(merged)


async def _complete_one(ctx: Context, body: dict[str, Any]) -> Response:
    runner = ctx.runner
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        return ctx.error(400, "prompt must be a string", "BadRequestError")
    max_tokens = body.get("max_tokens", 16)
    ids = runner.encode(prompt)
    if ctx.limit_error(ids, max_tokens) is not None:
        # vllm/entrypoints/openai/serving_engine.py, OpenAIServing._validate_input.
        return ctx.error(
            400,
            f"This model's maximum context length is {ctx.max_total} tokens. However, you requested "
            f"{len(ids) + int(max_tokens or 0)} tokens ({len(ids)} in the messages, {max_tokens} in the "
            "completion). Please reduce the length of the messages or completion.",
            "BadRequestError",
        )
    temperature = float(body.get("temperature", 1.0))
    stop = stop_strings(body.get("stop"))
    generation = await ctx.generate(
        ids, max_tokens, temperature, float(body.get("top_p", 1.0)), body.get("seed"), stop
    )
    text = generation.text_before_stop
    want_logprobs = body.get("logprobs")
    prompt_lp: list[float | None] | None = None
    if body.get("echo") or body.get("prompt_logprobs") is not None:
        prompt_lp = await ctx.prompt_logprobs(ids, 0)
    logprobs = None
    if want_logprobs is not None:
        tokens, token_lps = [], []
        if body.get("echo"):
            tokens += [_prompt_token_text(runner, ids, j) for j in range(len(ids))]
            token_lps += list(prompt_lp or [])
        gen = [
            t for t in generation.tokens if not (generation.finish == "eos" and t is generation.tokens[-1])
        ]
        tokens += [t.text for t in gen]
        token_lps += [t.logprob for t in gen]
        if body.get("return_tokens_as_token_ids"):
            # vllm/entrypoints/openai/serving_completion.py: tokens become "token_id:N".
            all_ids = (list(ids) if body.get("echo") else []) + [t.id for t in gen]
            tokens = [f"token_id:{i}" for i in all_ids]
        offsets, pos = [], 0
        for t in tokens:
            offsets.append(pos)
            pos += len(t)
        logprobs = {
            "tokens": tokens,
            "token_logprobs": token_lps,
            "text_offset": offsets,
            "top_logprobs": None,
        }
    choice: dict[str, Any] = {
        "index": 0,
        "text": (prompt if body.get("echo") else "") + text,
        "logprobs": logprobs,
        "finish_reason": "length" if generation.finish == "length" else "stop",
        "stop_reason": generation.matched_stop,
    }
    if body.get("prompt_logprobs") is not None:
        choice["prompt_logprobs"] = [
            None
            if lp is None
            else {str(i): {"logprob": lp, "rank": 1, "decoded_token": runner.token_text(i)}}
            for i, lp in zip(ids, prompt_lp or [], strict=True)
        ]
    n_gen = len(generation.tokens)
    return ctx.json(
        {
            "id": f"cmpl-{time.time_ns()}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": ctx.model_id,
            "choices": [choice],
            "usage": {
                "prompt_tokens": len(ids),
                "completion_tokens": n_gen,
                "total_tokens": len(ids) + n_gen,
            },
        }
    )

"""The imitation's TGI protocol: /generate, /generate_stream, the compat POST /, /info,
/tokenize and /chat_tokenize, with TGI's `{"error", "error_type"}` bodies and 422s."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from specfuse.devserver.context import Context, Protocol
from specfuse.devserver.runner import Generation, Runner

if TYPE_CHECKING:
    from fastapi import Request
    from fastapi.responses import Response

_TGI_FINISH = {"length": "length", "eos": "eos_token", "stop": "stop_sequence"}


def _error_body(status: int, message: str, kind: str) -> dict[str, Any]:
    return {"error": message, "error_type": kind}


PROTOCOL = Protocol(name="tgi", error_body=_error_body)


def _tokens(runner: Runner, text: str) -> list[dict[str, Any]]:
    """TGI's /tokenize rows: start/stop are BYTE offsets into the input, and the text is
    those bytes decoded lossily (router/src/server.rs, encoding_to_tokens: the Rust
    tokenizers crate reports byte offsets and the router slices `input.bytes()`)."""
    data = text.encode("utf-8")
    starts = [0]
    for ch in text:
        starts.append(starts[-1] + len(ch.encode("utf-8")))
    rows = []
    for i, s, e in runner.offsets(text):
        bs, be = starts[s], starts[e]
        rows.append({"id": i, "text": data[bs:be].decode("utf-8", "replace"), "start": bs, "stop": be})
    return rows


def _parse(ctx: Context, body: Any) -> tuple[str, dict[str, Any]] | Response:
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), str):
        return ctx.error(422, "Input validation error: `inputs` must be a string", "validation")
    params = body.get("parameters") or {}
    if not isinstance(params, dict):
        return ctx.error(422, "Input validation error: `parameters` must be an object", "validation")
    temperature = params.get("temperature")
    if temperature is not None and temperature <= 0:
        return ctx.error(422, "Input validation error: `temperature` must be strictly positive", "validation")
    top_p = params.get("top_p")
    if top_p is not None and not 0 < top_p < 1:
        return ctx.error(422, "Input validation error: `top_p` must be > 0.0 and < 1.0", "validation")
    stop = params.get("stop") or []
    max_stop = ctx.options.max_stop_sequences
    if len(stop) > max_stop:
        return ctx.error(
            422,
            f"Input validation error: `stop` supports up to {max_stop} stop sequences. Given: {len(stop)}",
            "validation",
        )
    max_new = params.get("max_new_tokens")
    if max_new is None:
        max_new = 100
    if max_new < 1:
        return ctx.error(
            422, "Input validation error: `max_new_tokens` must be strictly positive", "validation"
        )
    return body["inputs"], params


async def _generate_response(
    ctx: Context, body: Any, default_full_text: bool = False
) -> tuple[dict[str, Any], Generation, int] | Response:
    parsed = _parse(ctx, body)
    if not isinstance(parsed, tuple):
        return parsed
    inputs, params = parsed
    runner = ctx.runner
    ids = runner.encode(inputs)
    max_new = params.get("max_new_tokens") or 100
    too_long = ctx.limit_error(ids, max_new)
    if too_long is not None:
        return ctx.error(422, too_long, "validation")
    # As in TGI: a temperature or top_p warper switches sampling on even without do_sample.
    do_sample = (
        bool(params.get("do_sample"))
        or params.get("temperature") not in (None, 1.0)
        or params.get("top_p") is not None
    )
    temperature = float(params.get("temperature") or 1.0) if do_sample else 0.0
    top_p = float(params.get("top_p") or 1.0)
    seed = params.get("seed")
    generation = await ctx.generate(ids, max_new, temperature, top_p, seed, list(params.get("stop") or []))
    text = generation.text
    full_text = params.get("return_full_text")
    if full_text if full_text is not None else default_full_text:
        text = inputs + text
    result: dict[str, Any] = {"generated_text": text}
    if params.get("details", False):
        prefill: list[dict[str, Any]] = []
        if params.get("decoder_input_details") and ctx.options.enable_prefill_logprobs:
            logprobs = await ctx.prompt_logprobs(ids, 0)
            prefill = [
                {"id": i, "text": runner.token_text(i), "logprob": lp}
                for i, lp in zip(ids, logprobs, strict=True)
            ]
        result["details"] = {
            "finish_reason": _TGI_FINISH[generation.finish],
            "generated_tokens": len(generation.tokens),
            "seed": seed if do_sample else None,
            "prefill": prefill,
            "tokens": [
                {"id": t.id, "text": t.text, "logprob": t.logprob, "special": t.special}
                for t in generation.tokens
            ],
        }
    return result, generation, len(ids)


def _sse(generation: Generation, input_length: int, params: dict[str, Any]) -> Response:
    from fastapi.responses import StreamingResponse

    async def events() -> AsyncIterator[str]:
        n = len(generation.tokens)
        for index, t in enumerate(generation.tokens):
            last = index == n - 1
            event: dict[str, Any] = {
                "index": index,
                "token": {"id": t.id, "text": t.text, "logprob": t.logprob, "special": t.special},
                "generated_text": generation.text if last else None,
                "details": {
                    "finish_reason": _TGI_FINISH[generation.finish],
                    "generated_tokens": n,
                    "input_length": input_length,
                    "seed": params.get("seed") if params.get("do_sample") else None,
                }
                if last and params.get("details", True)
                else None,
            }
            yield f"data:{json.dumps(event)}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


async def _stream(ctx: Context, body: Any) -> Response:
    params = (body or {}).get("parameters") or {} if isinstance(body, dict) else {}
    if params.get("decoder_input_details"):
        return ctx.error(
            422,
            "Input validation error: `decoder_input_details` == true is not supported when streaming",
            "validation",
        )
    made = await _generate_response(ctx, body)
    if not isinstance(made, tuple):
        return made
    _, generation, input_length = made
    return _sse(generation, input_length, params)


@PROTOCOL.post("/generate")
async def generate(ctx: Context, request: Request) -> Response:
    made = await _generate_response(ctx, await request.json())
    return ctx.json(made[0]) if isinstance(made, tuple) else made


@PROTOCOL.post("/generate_stream")
async def generate_stream(ctx: Context, request: Request) -> Response:
    return await _stream(ctx, await request.json())


@PROTOCOL.post("/")
async def compat(ctx: Context, request: Request) -> Response:
    body = await request.json()
    if isinstance(body, dict) and body.get("stream"):
        return await _stream(ctx, body)
    # router/src/server.rs, compat_generate: an unset return_full_text takes the server's
    # default, true when the model's pipeline tag is "text-generation" (run(),
    # compat_return_full_text); huggingface_hub's text_generation() posts here.
    made = await _generate_response(
        ctx, body, default_full_text=ctx.options.pipeline_tag == "text-generation"
    )
    return ctx.json([made[0]]) if isinstance(made, tuple) else made


@PROTOCOL.get("/info")
async def info(ctx: Context, request: Request) -> Response:
    options = ctx.options
    return ctx.json(
        {
            "model_id": ctx.model_id,
            "model_sha": None,
            "model_pipeline_tag": options.pipeline_tag,
            "max_concurrent_requests": options.max_concurrent_requests,
            "max_best_of": 1,
            "max_stop_sequences": options.max_stop_sequences,
            "max_input_tokens": ctx.max_input,
            "max_total_tokens": ctx.max_total,
            "validation_workers": 1,
            "max_client_batch_size": 1,
            "router": "specfuse-serve",
            "version": "3.3.0-specfuse",
            "sha": None,
            "docker_label": None,
        }
    )


@PROTOCOL.post("/tokenize")
async def tokenize(ctx: Context, request: Request) -> Response:
    body = await request.json()
    if not isinstance(body, dict) or not isinstance(body.get("inputs"), str):
        return ctx.error(422, "Input validation error: `inputs` must be a string", "validation")
    return ctx.json(_tokens(ctx.runner, body["inputs"]))


@PROTOCOL.post("/chat_tokenize")
async def chat_tokenize(ctx: Context, request: Request) -> Response:
    body = await request.json()
    tok = ctx.runner.tokenizer
    if not tok.chat_template:
        return ctx.error(422, "Template error: this model has no chat template", "template_error")
    try:
        text = tok.apply_chat_template(
            body.get("messages") or [],
            tools=body.get("tools"),
            tokenize=False,
            add_generation_prompt=True,
        )
    except Exception as exc:  # a template raising on odd input is the caller's error
        return ctx.error(422, f"Template error: {exc}", "template_error")
    # TGI >= 3.0 continues a final assistant message instead of opening a new turn: the
    # rendering is cut right after that message's content and trimmed
    # (router/src/infer/chat_template.rs, ChatTemplate::apply), so no end-of-turn follows.
    messages = body.get("messages") or []
    last = messages[-1] if messages and isinstance(messages[-1], dict) else {}
    content = last.get("content")
    if last.get("role") == "assistant" and isinstance(content, str):
        index = text.rfind(content)
        if index != -1:
            text = text[: index + len(content)].rstrip()
    return ctx.json({"tokenize_response": _tokens(ctx.runner, text), "templated_text": text})

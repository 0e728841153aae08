"""The imitation's SGLang protocol: /get_model_info, /get_server_info and the native
/generate (one prompt or a batch), with `logprob_start_len` and `sampling_seed`."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from specfuse.devserver.context import Context, Protocol, stop_strings

if TYPE_CHECKING:
    from fastapi import Request
    from fastapi.responses import Response

#: SGLang's API-facing sampling fields (python/sglang/srt/sampling/sampling_params.py).
_SGLANG_SAMPLING_FIELDS = frozenset(
    {
        "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k",
        "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n",
        "json_schema", "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens",
        "spaces_between_special_tokens", "no_stop_trim", "custom_params", "stream_interval",
        "logit_bias", "sampling_seed",
    }
)  # fmt: skip


def _error_body(status: int, message: str, kind: str) -> dict[str, Any]:
    # python/sglang/srt/entrypoints/http_server.py, _create_error_response.
    return {"error": {"message": message}}


PROTOCOL = Protocol(name="sglang", error_body=_error_body)


# python/sglang/srt/entrypoints/http_server.py, get_model_info: no length here.
@PROTOCOL.get("/get_model_info")
async def model_info(ctx: Context, request: Request) -> Response:
    info = {"model_path": ctx.model_id, "tokenizer_path": str(ctx.runner.path), "is_generation": True}
    return ctx.json(info)


# get_server_info: the ServerArgs (context_length stays null unless given on the command
# line) merged with the scheduler's info (max_total_num_tokens, max_req_input_len).
@PROTOCOL.get("/get_server_info")
async def server_info(ctx: Context, request: Request) -> Response:
    return ctx.json(
        {
            "model_path": ctx.model_id,
            "tokenizer_path": str(ctx.runner.path),
            "context_length": ctx.options.max_total_tokens,
            "max_total_num_tokens": ctx.max_total,
            "max_req_input_len": ctx.max_total - 1,
            "internal_states": [{"last_gen_throughput": 0.0}],
            "version": "0.5.20-specfuse",
        }
    )


@PROTOCOL.post("/generate")
async def generate(ctx: Context, request: Request) -> Response:
    body = await request.json()
    text = body.get("text")
    if isinstance(text, str):
        one = await _generate_one(
            ctx,
            text,
            body.get("sampling_params") or {},
            bool(body.get("return_logprob")),
            body.get("logprob_start_len"),
            bool(body.get("return_text_in_logprobs")),
        )
        return ctx.json(one) if isinstance(one, dict) else one
    # A batch, as real SGLang takes it: `text` a list of prompts, and each per-request
    # field either one value for all or a list with one per prompt; the answer is a
    # list of results in the prompts' order (python/sglang/srt/managers/io_struct.py,
    # GenerateReqInput._determine_batch_size and _normalize_batch_inputs, which
    # normalises sampling_params, return_logprob and logprob_start_len per item).
    if not isinstance(text, list) or not text or not all(isinstance(t, str) for t in text):
        return ctx.error(400, "text must be a string or a non-empty list of strings", "BadRequestError")
    n = len(text)

    def each(name: str, default: Any) -> list[Any] | None:
        value = body.get(name)
        if value is None:
            return [default] * n
        if not isinstance(value, list):
            return [value] * n
        return value if len(value) == n else None

    params = each("sampling_params", {})
    flags = each("return_logprob", False)
    starts = each("logprob_start_len", -1)
    if params is None or flags is None or starts is None:
        return ctx.error(400, "a per-request list's length differs from the batch size", "BadRequestError")
    results = []
    for t, sp, flag, start in zip(text, params, flags, starts, strict=True):
        one = await _generate_one(
            ctx, t, sp or {}, bool(flag), start, bool(body.get("return_text_in_logprobs"))
        )
        if not isinstance(one, dict):
            return one  # one invalid prompt fails the whole batch
        results.append(one)
    return ctx.json(results)


async def _generate_one(
    ctx: Context,
    text: str,
    sp: dict[str, Any],
    return_logprob: bool,
    logprob_start_len: Any,
    return_text: bool,
) -> dict[str, Any] | Response:
    runner, max_total = ctx.runner, ctx.max_total
    # python/sglang/srt/sampling/sampling_params.py, SamplingParams(**sampling_params):
    # an unknown field (`seed` instead of `sampling_seed`) fails the request.
    unknown = sorted(set(sp) - _SGLANG_SAMPLING_FIELDS)
    if unknown:
        return ctx.error(400, f"Unexpected keyword argument '{unknown[0]}'", "BadRequestError")
    max_new = int(sp.get("max_new_tokens", 128) if sp.get("max_new_tokens") is not None else 128)
    ids = runner.encode(text)
    if len(ids) >= max_total:
        # python/sglang/srt/managers/tokenizer_manager.py, _validate_one_request.
        return ctx.error(
            400,
            f"The input ({len(ids)} tokens) is longer than the model's context length ({max_total} tokens).",
            "BadRequestError",
        )
    if len(ids) + max_new > max_total:
        return ctx.error(
            400,
            f"Requested token count exceeds the model's maximum context length of {max_total} tokens. "
            f"You requested a total of {len(ids) + max_new} tokens: {len(ids)} tokens from the input "
            f"messages and {max_new} tokens for the completion.",
            "BadRequestError",
        )
    generation = await ctx.generate(
        ids,
        max_new,
        float(sp.get("temperature", 1.0)),
        float(sp.get("top_p", 1.0)),
        sp.get("sampling_seed"),
        stop_strings(sp.get("stop")),
    )
    if generation.finish == "length":
        finish: dict[str, Any] = {"type": "length", "length": max_new}
    elif generation.finish == "eos":
        finish = {"type": "stop", "matched": generation.tokens[-1].id}
    else:
        finish = {"type": "stop", "matched": generation.matched_stop}
    meta: dict[str, Any] = {
        "id": f"{time.time_ns()}",
        "finish_reason": finish,
        "prompt_tokens": len(ids),
        "completion_tokens": len(generation.tokens),
        "cached_tokens": 0,
    }
    if return_logprob:
        start = int(logprob_start_len if logprob_start_len is not None else -1)
        if start < 0:
            start = len(ids)  # SGLang's default: no prompt log-probs
        lps = await ctx.prompt_logprobs(ids, start) if start < len(ids) else []

        # Each token's text only when asked for, decoded on its own
        # (python/sglang/srt/managers/tokenizer_manager.py, detokenize_logprob_tokens:
        # None unless return_text_in_logprobs, else tokenizer.batch_decode of the ids).
        def spelled(token: int) -> str | None:
            return runner.token_text(token) if return_text else None

        meta["input_token_logprobs"] = [[lp, i, spelled(i)] for i, lp in zip(ids[start:], lps, strict=True)]
        meta["output_token_logprobs"] = [[t.logprob, t.id, spelled(t.id)] for t in generation.tokens]
    return {"text": generation.text_before_stop, "meta_info": meta}

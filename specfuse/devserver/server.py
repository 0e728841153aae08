"""`specfuse serve`: one local model behind a TGI, vLLM or SGLang style HTTP API.

Why it exists: the remote backends must be tested against real servers, and
TGI / vLLM / SGLang need GPUs and weights downloads this project cannot
assume. This server runs one of the embedded models on loopback and speaks
the subset of each protocol specfuse uses, with the same quirks the real
servers have (TGI's silently empty `prefill` without
`--enable-prefill-logprobs`, its `{"error", "error_type"}` bodies, 422 for
over-long input, 429 past the concurrency limit). It is also handy to share
one loaded model between several processes on a laptop.

Like the real servers, it tokenizes inputs with the tokenizer's special
tokens added (a BOS where the model wants one), and decodes each token on
its own for per-token texts (so partial UTF-8 characters come back as U+FFFD).
Greedy decoding (`do_sample: false` / `temperature: 0`) is deterministic.
"""

import argparse
import asyncio
import json
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: Protocols this server can speak.
PROTOCOLS = ("tgi", "vllm", "sglang")


@dataclass
class GenToken:
    id: int
    text: str
    logprob: float
    special: bool


@dataclass
class Generation:
    tokens: list[GenToken]
    text: str
    #: "length" | "eos" | "stop"
    finish: str
    matched_stop: str | None = None


class Runner:
    """One loaded model with a prefix KV cache; every forward pass holds the model lock.

    The cache is the local backend's: SGLang's `logprob_start_len` and plain
    repeated prompts then reuse the shared prefix, as a real server's prefix
    cache would.
    """

    def __init__(self, model: str, dtype: str = "float32") -> None:
        from specfuse.backends.local import _KVCache, load_model
        from specfuse.models import resolve_model_path

        self.name = model
        self.path: Path = resolve_model_path(model)
        self.loaded = load_model(self.path, dtype)
        self.tokenizer = self.loaded.tokenizer
        self._kv = _KVCache()
        self._special_ids = set(self.tokenizer.all_special_ids)

    @property
    def context_window(self) -> int:
        return int(self.loaded.context_window or 8192)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def token_text(self, token_id: int) -> str:
        """The text of one token decoded alone, as TGI and vLLM report it."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def offsets(self, text: str) -> list[tuple[int, int, int]]:
        enc = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        return [
            (i, int(s), int(e)) for i, (s, e) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
        ]

    def tgi_tokens(self, text: str) -> list[dict[str, Any]]:
        """TGI's /tokenize rows: start/stop are BYTE offsets into the input, and the text is
        those bytes decoded lossily (router/src/server.rs, encoding_to_tokens: the Rust
        tokenizers crate reports byte offsets and the router slices `input.bytes()`)."""
        data = text.encode("utf-8")
        starts = [0]
        for ch in text:
            starts.append(starts[-1] + len(ch.encode("utf-8")))
        rows = []
        for i, s, e in self.offsets(text):
            bs, be = starts[s], starts[e]
            rows.append({"id": i, "text": data[bs:be].decode("utf-8", "replace"), "start": bs, "stop": be})
        return rows

    def vllm_token_text(self, ids: Sequence[int], j: int) -> str:
        """A prompt token's text as vLLM (late 2025 on) reports it: a piece of a split
        character is decoded with up to 3 tokens before it and gives what it completes, or
        "" when it completes nothing (vllm/v1/engine/logprobs.py, _correct_decoded_token)."""
        alone = self.token_text(ids[j])
        if "\ufffd" not in alone:
            return alone
        for k in range(1, min(3, j) + 1):
            whole = self.tokenizer.decode(list(ids[j - k : j + 1]), skip_special_tokens=False)
            if not whole.endswith("\ufffd"):
                before = self.tokenizer.decode(list(ids[j - k : j]), skip_special_tokens=False)
                return whole[len(before.rstrip("\ufffd")) :]
        return ""

    # -- forward passes (call from a worker thread) -------------------------------

    def prompt_logprobs(self, ids: list[int], start: int = 0) -> list[float | None]:
        """log p(ids[j] | ids[:j]) for j >= start; position 0 has none (None)."""
        import torch

        start = max(0, min(start, len(ids)))
        with self.loaded.lock, torch.inference_mode():
            reuse = min(self._kv.reusable_prefix(ids), max(start - 1, 0), len(ids) - 1)
            reuse = max(reuse, 0)
            cache = self._kv.view(reuse)
            out = self.loaded.model(input_ids=torch.tensor([ids[reuse:]]), cache=cache, use_cache=True)
            logprobs = torch.log_softmax(out.logits[0].float(), dim=-1)
            self._kv.keep(cache, ids)
        result: list[float | None] = []
        for j in range(start, len(ids)):
            if j == 0:
                result.append(None)
            else:
                result.append(float(logprobs[j - 1 - reuse, ids[j]]))
        return result

    def generate(
        self,
        ids: list[int],
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        stop: Sequence[str],
    ) -> Generation:
        """Decode like specfuse's local backend does, so greedy results match it token for token."""
        import torch

        from specfuse.backends.base import Sampling
        from specfuse.backends.local import _first_stop, _sample

        sampling = Sampling(temperature=temperature, top_p=top_p, seed=seed)
        generator = torch.Generator().manual_seed(seed if seed is not None else 0)
        out: list[GenToken] = []
        text = ""
        finish = "length"
        matched: str | None = None
        if max_new_tokens <= 0:
            return Generation([], "", "length")
        with self.loaded.lock, torch.inference_mode():
            reuse = min(self._kv.reusable_prefix(ids), len(ids) - 1)
            cache = self._kv.view(reuse)
            logits = (
                self.loaded.model(input_ids=torch.tensor([ids[reuse:]]), cache=cache, use_cache=True)
                .logits[0, -1]
                .float()
            )
            fed = list(ids)
            generated: list[int] = []
            while len(generated) < max_new_tokens:
                token, logprob = _sample(logits, sampling, generator)
                if token in self.loaded.stop_token_ids:
                    out.append(GenToken(token, self.token_text(token), logprob, True))
                    finish = "eos"
                    break
                generated.append(token)
                out.append(GenToken(token, self.token_text(token), logprob, token in self._special_ids))
                text = self.tokenizer.decode(generated, skip_special_tokens=False)
                hit = _first_stop(text, stop)
                if hit is not None:
                    finish = "stop"
                    matched = next(s for s in stop if text.find(s) == hit)
                    break
                if len(generated) >= max_new_tokens:
                    break
                logits = (
                    self.loaded.model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True)
                    .logits[0, -1]
                    .float()
                )
                fed.append(token)
            self._kv.keep(cache, fed)
        return Generation(out, text, finish, matched)


class Overloaded(Exception):
    """More requests in flight than --max-concurrent-requests."""


class Slots:
    """Admission control: refuse (429) rather than queue past the limit, like TGI."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        with self._lock:
            if self.used >= self.limit:
                raise Overloaded
            self.used += 1

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self.used -= 1


@dataclass
class ServeOptions:
    model: str
    protocol: str = "tgi"
    host: str = "127.0.0.1"
    port: int = 8080
    enable_prefill_logprobs: bool = False
    max_concurrent_requests: int = 128
    max_input_tokens: int | None = None
    max_total_tokens: int | None = None
    max_stop_sequences: int = 4
    api_key: str | None = None
    dtype: str = "float32"
    #: TGI: the model's pipeline tag; "text-generation" makes the compat route return the full text.
    pipeline_tag: str = "text-generation"


def build_app(options: ServeOptions, runner: Runner | None = None) -> Any:
    """The FastAPI app for one protocol (the model loads here unless a runner is given)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    runner = runner or Runner(options.model, options.dtype)
    window = runner.context_window
    max_total = options.max_total_tokens or window
    max_input = options.max_input_tokens or max(1, max_total - 1)
    slots = Slots(options.max_concurrent_requests)
    app = FastAPI(title=f"specfuse serve ({options.protocol})")
    model_id = runner.name

    def error(status: int, message: str, kind: str) -> JSONResponse:
        if options.protocol == "tgi":
            body: dict[str, Any] = {"error": message, "error_type": kind}
        elif options.protocol == "vllm":
            # vllm/entrypoints/openai/protocol.py, ErrorResponse: {"error": ErrorInfo} since
            # late 2025 (older versions sent the ErrorInfo fields at the top level).
            body = {"error": {"message": message, "type": kind, "param": None, "code": status}}
        else:
            # python/sglang/srt/entrypoints/http_server.py, _create_error_response.
            body = {"error": {"message": message}}
        return JSONResponse(body, status_code=status)

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Any:
        # --api-key: every route but health needs the Bearer token (compared in constant time).
        if options.api_key and request.url.path not in ("/health",):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {options.api_key}".encode()):
                return error(401, "Unauthorized", "authentication")
        try:
            with slots:
                return await call_next(request)
        except Overloaded:
            return error(429, "Model is overloaded", "overloaded")

    def validate(ids: list[int], max_new: int) -> JSONResponse | None:
        if len(ids) > max_input:
            return error(
                422,
                f"Input validation error: `inputs` must have less than {max_input} tokens. Given: {len(ids)}",
                "validation",
            )
        if len(ids) + max_new > max_total:
            return error(
                422,
                f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= {max_total}. "
                f"Given: {len(ids)} `inputs` tokens and {max_new} `max_new_tokens`",
                "validation",
            )
        return None

    async def run_generation(
        ids: list[int], max_new: int, temperature: float, top_p: float, seed: int | None, stop: list[str]
    ) -> Generation:
        return await asyncio.to_thread(
            runner.generate,
            ids,
            max_new_tokens=max_new,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop,
        )

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({}, status_code=200)

    if options.protocol == "tgi":
        _tgi_routes(app, options, runner, error, validate, run_generation, max_input, max_total, model_id)
    elif options.protocol == "vllm":
        _vllm_routes(app, options, runner, error, validate, run_generation, max_total, model_id)
    elif options.protocol == "sglang":
        _sglang_routes(app, options, runner, error, validate, run_generation, max_total, model_id)
    else:
        raise ValueError(f"unknown protocol {options.protocol!r}; use one of {PROTOCOLS}")
    return app


# -- TGI ------------------------------------------------------------------------


_TGI_FINISH = {"length": "length", "eos": "eos_token", "stop": "stop_sequence"}


def _tgi_routes(
    app: Any,
    options: ServeOptions,
    runner: Runner,
    error: Any,
    validate: Any,
    run_generation: Any,
    max_input: int,
    max_total: int,
    model_id: str,
) -> None:
    from fastapi import Request
    from fastapi.responses import JSONResponse, StreamingResponse

    def parse(body: Any) -> tuple[str, dict[str, Any]] | JSONResponse:
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), str):
            return error(422, "Input validation error: `inputs` must be a string", "validation")
        params = body.get("parameters") or {}
        if not isinstance(params, dict):
            return error(422, "Input validation error: `parameters` must be an object", "validation")
        temperature = params.get("temperature")
        if temperature is not None and temperature <= 0:
            return error(422, "Input validation error: `temperature` must be strictly positive", "validation")
        top_p = params.get("top_p")
        if top_p is not None and not 0 < top_p < 1:
            return error(422, "Input validation error: `top_p` must be > 0.0 and < 1.0", "validation")
        stop = params.get("stop") or []
        if len(stop) > options.max_stop_sequences:
            return error(
                422,
                f"Input validation error: `stop` supports up to {options.max_stop_sequences} stop sequences. "
                f"Given: {len(stop)}",
                "validation",
            )
        max_new = params.get("max_new_tokens")
        if max_new is None:
            max_new = 100
        if max_new < 1:
            return error(
                422, "Input validation error: `max_new_tokens` must be strictly positive", "validation"
            )
        return body["inputs"], params

    async def generate_response(
        body: Any, default_full_text: bool = False
    ) -> tuple[dict[str, Any], Generation, int] | JSONResponse:
        parsed = parse(body)
        if isinstance(parsed, JSONResponse):
            return parsed
        inputs, params = parsed
        ids = runner.encode(inputs)
        max_new = params.get("max_new_tokens") or 100
        bad = validate(ids, max_new)
        if bad is not None:
            return bad
        # As in TGI: a temperature or top_p warper switches sampling on even without do_sample.
        do_sample = (
            bool(params.get("do_sample"))
            or params.get("temperature") not in (None, 1.0)
            or params.get("top_p") is not None
        )
        temperature = float(params.get("temperature") or 1.0) if do_sample else 0.0
        top_p = float(params.get("top_p") or 1.0)
        seed = params.get("seed")
        generation = await run_generation(
            ids, max_new, temperature, top_p, seed, list(params.get("stop") or [])
        )
        text = generation.text
        full_text = params.get("return_full_text")
        if full_text if full_text is not None else default_full_text:
            text = inputs + text
        result: dict[str, Any] = {"generated_text": text}
        if params.get("details", False):
            prefill: list[dict[str, Any]] = []
            if params.get("decoder_input_details") and options.enable_prefill_logprobs:
                logprobs = await asyncio.to_thread(runner.prompt_logprobs, ids, 0)
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

    def sse(body: Any, generation: Generation, input_length: int, params: dict[str, Any]) -> Any:
        async def events() -> Any:
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

    async def stream(body: Any) -> Any:
        params = (body or {}).get("parameters") or {} if isinstance(body, dict) else {}
        if params.get("decoder_input_details"):
            return error(
                422,
                "Input validation error: `decoder_input_details` == true is not supported when streaming",
                "validation",
            )
        made = await generate_response(body)
        if isinstance(made, JSONResponse):
            return made
        _, generation, input_length = made
        return sse(body, generation, input_length, params)

    @app.post("/generate")
    async def generate(request: Request) -> Any:
        made = await generate_response(await request.json())
        return made if isinstance(made, JSONResponse) else JSONResponse(made[0])

    @app.post("/generate_stream")
    async def generate_stream(request: Request) -> Any:
        return await stream(await request.json())

    @app.post("/")
    async def compat(request: Request) -> Any:
        body = await request.json()
        if isinstance(body, dict) and body.get("stream"):
            return await stream(body)
        # router/src/server.rs, compat_generate: an unset return_full_text takes the server's
        # default, true when the model's pipeline tag is "text-generation" (run(),
        # compat_return_full_text); huggingface_hub's text_generation() posts here.
        made = await generate_response(body, default_full_text=options.pipeline_tag == "text-generation")
        return made if isinstance(made, JSONResponse) else JSONResponse([made[0]])

    @app.get("/info")
    async def info() -> JSONResponse:
        return JSONResponse(
            {
                "model_id": model_id,
                "model_sha": None,
                "model_pipeline_tag": options.pipeline_tag,
                "max_concurrent_requests": options.max_concurrent_requests,
                "max_best_of": 1,
                "max_stop_sequences": options.max_stop_sequences,
                "max_input_tokens": max_input,
                "max_total_tokens": max_total,
                "validation_workers": 1,
                "max_client_batch_size": 1,
                "router": "specfuse-serve",
                "version": "3.3.0-specfuse",
                "sha": None,
                "docker_label": None,
            }
        )

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Any:
        body = await request.json()
        if not isinstance(body, dict) or not isinstance(body.get("inputs"), str):
            return error(422, "Input validation error: `inputs` must be a string", "validation")
        inputs = body["inputs"]
        return JSONResponse(runner.tgi_tokens(inputs))

    @app.post("/chat_tokenize")
    async def chat_tokenize(request: Request) -> Any:
        body = await request.json()
        tok = runner.tokenizer
        if not tok.chat_template:
            return error(422, "Template error: this model has no chat template", "template_error")
        try:
            text = tok.apply_chat_template(
                body.get("messages") or [],
                tools=body.get("tools"),
                tokenize=False,
                add_generation_prompt=True,
            )
        except Exception as exc:  # a template raising on odd input is the caller's error
            return error(422, f"Template error: {exc}", "template_error")
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
        return JSONResponse({"tokenize_response": runner.tgi_tokens(text), "templated_text": text})


# -- vLLM -----------------------------------------------------------------------


def _vllm_routes(
    app: Any,
    options: ServeOptions,
    runner: Runner,
    error: Any,
    validate: Any,
    run_generation: Any,
    max_total: int,
    model_id: str,
) -> None:
    from fastapi import Request
    from fastapi.responses import JSONResponse

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse(
            {
                "object": "list",
                "data": [
                    {"id": model_id, "object": "model", "owned_by": "specfuse", "max_model_len": max_total}
                ],
            }
        )

    @app.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        body = await request.json()
        if "messages" in body:
            # vllm/entrypoints/openai/serving_tokenization.py (TokenizeChatRequest): the
            # server's own chat template; add_generation_prompt defaults to true and
            # add_special_tokens to false (the template carries any BOS).
            tok = runner.tokenizer
            if not tok.chat_template:
                return error(
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
        result: dict[str, Any] = {"tokens": ids, "count": len(ids), "max_model_len": max_total}
        if body.get("return_token_strs"):
            result["token_strs"] = runner.tokenizer.convert_ids_to_tokens(ids)
        return JSONResponse(result)

    @app.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        # serving_tokenization.py, create_detokenize: {"tokens": [ids]} -> {"prompt": text}.
        body = await request.json()
        tokens = body.get("tokens")
        if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
            return error(400, "tokens must be a list of integers", "BadRequestError")
        return JSONResponse({"prompt": runner.tokenizer.decode(tokens, skip_special_tokens=False)})

    @app.post("/v1/completions")
    async def completions(request: Request) -> JSONResponse:
        body = await request.json()
        prompts = body.get("prompt")
        if not (isinstance(prompts, list) and len(prompts) > 1 and all(isinstance(p, str) for p in prompts)):
            return await complete_one(body)
        # A list of prompts gives one choice per prompt, `index` in prompt order, and
        # the usage summed (vllm/entrypoints/openai/completion/serving.py,
        # OpenAIServingCompletion.request_output_to_completion_response).
        answers = [await complete_one({**body, "prompt": p}) for p in prompts]
        if any(a.status_code != 200 for a in answers):
            return next(a for a in answers if a.status_code != 200)
        parts = [json.loads(bytes(a.body)) for a in answers]
        merged = parts[0]
        merged["choices"] = [{**p["choices"][0], "index": i} for i, p in enumerate(parts)]
        merged["usage"] = {k: sum(p["usage"][k] for p in parts) for k in merged["usage"]}
        return JSONResponse(merged)

    async def complete_one(body: dict[str, Any]) -> JSONResponse:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str):
            return error(400, "prompt must be a string", "BadRequestError")
        max_tokens = body.get("max_tokens", 16)
        ids = runner.encode(prompt)
        bad = validate(ids, max_tokens)
        if bad is not None:
            # vllm/entrypoints/openai/serving_engine.py, OpenAIServing._validate_input.
            return error(
                400,
                f"This model's maximum context length is {max_total} tokens. However, you requested "
                f"{len(ids) + int(max_tokens or 0)} tokens ({len(ids)} in the messages, {max_tokens} in the "
                "completion). Please reduce the length of the messages or completion.",
                "BadRequestError",
            )
        temperature = float(body.get("temperature", 1.0))
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        generation = await run_generation(
            ids, max_tokens, temperature, float(body.get("top_p", 1.0)), body.get("seed"), stop
        )
        text = generation.text
        if generation.matched_stop is not None:
            text = text[: text.find(generation.matched_stop)]
        want_logprobs = body.get("logprobs")
        prompt_lp: list[float | None] | None = None
        if body.get("echo") or body.get("prompt_logprobs") is not None:
            prompt_lp = await asyncio.to_thread(runner.prompt_logprobs, ids, 0)
        logprobs = None
        if want_logprobs is not None:
            tokens, token_lps = [], []
            if body.get("echo"):
                tokens += [runner.vllm_token_text(ids, j) for j in range(len(ids))]
                token_lps += list(prompt_lp or [])
            gen = [
                t
                for t in generation.tokens
                if not (generation.finish == "eos" and t is generation.tokens[-1])
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
        return JSONResponse(
            {
                "id": f"cmpl-{time.time_ns()}",
                "object": "text_completion",
                "created": int(time.time()),
                "model": model_id,
                "choices": [choice],
                "usage": {
                    "prompt_tokens": len(ids),
                    "completion_tokens": n_gen,
                    "total_tokens": len(ids) + n_gen,
                },
            }
        )


# -- SGLang ---------------------------------------------------------------------


def _sglang_routes(
    app: Any,
    options: ServeOptions,
    runner: Runner,
    error: Any,
    validate: Any,
    run_generation: Any,
    max_total: int,
    model_id: str,
) -> None:
    from fastapi import Request
    from fastapi.responses import JSONResponse

    # python/sglang/srt/entrypoints/http_server.py, get_model_info: no length here.
    @app.get("/get_model_info")
    async def model_info() -> JSONResponse:
        info = {"model_path": model_id, "tokenizer_path": str(runner.path), "is_generation": True}
        return JSONResponse(info)

    # get_server_info: the ServerArgs (context_length stays null unless given on the command
    # line) merged with the scheduler's info (max_total_num_tokens, max_req_input_len).
    @app.get("/get_server_info")
    async def server_info() -> JSONResponse:
        return JSONResponse(
            {
                "model_path": model_id,
                "tokenizer_path": str(runner.path),
                "context_length": options.max_total_tokens,
                "max_total_num_tokens": max_total,
                "max_req_input_len": max_total - 1,
                "internal_states": [{"last_gen_throughput": 0.0}],
                "version": "0.5.20-specfuse",
            }
        )

    @app.post("/generate")
    async def generate(request: Request) -> JSONResponse:
        body = await request.json()
        text = body.get("text")
        if isinstance(text, str):
            one = await generate_one(
                text,
                body.get("sampling_params") or {},
                bool(body.get("return_logprob")),
                body.get("logprob_start_len"),
            )
            return one if isinstance(one, JSONResponse) else JSONResponse(one)
        # A batch, as real SGLang takes it: `text` a list of prompts, and each per-request
        # field either one value for all or a list with one per prompt; the answer is a
        # list of results in the prompts' order (python/sglang/srt/managers/io_struct.py,
        # GenerateReqInput._determine_batch_size and _normalize_batch_inputs, which
        # normalises sampling_params, return_logprob and logprob_start_len per item).
        if not isinstance(text, list) or not text or not all(isinstance(t, str) for t in text):
            return error(400, "text must be a string or a non-empty list of strings", "BadRequestError")
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
            return error(400, "a per-request list's length differs from the batch size", "BadRequestError")
        results = []
        for t, sp, flag, start in zip(text, params, flags, starts, strict=True):
            one = await generate_one(t, sp or {}, bool(flag), start)
            if isinstance(one, JSONResponse):
                return one  # one invalid prompt fails the whole batch
            results.append(one)
        return JSONResponse(results)

    async def generate_one(
        text: str, sp: dict[str, Any], return_logprob: bool, logprob_start_len: Any
    ) -> dict[str, Any] | JSONResponse:
        # python/sglang/srt/sampling/sampling_params.py, SamplingParams(**sampling_params):
        # an unknown field (`seed` instead of `sampling_seed`) fails the request.
        unknown = sorted(set(sp) - _SGLANG_SAMPLING_FIELDS)
        if unknown:
            return error(400, f"Unexpected keyword argument '{unknown[0]}'", "BadRequestError")
        max_new = int(sp.get("max_new_tokens", 128) if sp.get("max_new_tokens") is not None else 128)
        ids = runner.encode(text)
        if len(ids) >= max_total:
            # python/sglang/srt/managers/tokenizer_manager.py, _validate_one_request.
            return error(
                400,
                f"The input ({len(ids)} tokens) is longer than the model's context length "
                f"({max_total} tokens).",
                "BadRequestError",
            )
        if len(ids) + max_new > max_total:
            return error(
                400,
                f"Requested token count exceeds the model's maximum context length of {max_total} tokens. "
                f"You requested a total of {len(ids) + max_new} tokens: {len(ids)} tokens from the input "
                f"messages and {max_new} tokens for the completion.",
                "BadRequestError",
            )
        stop = sp.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        generation = await run_generation(
            ids,
            max_new,
            float(sp.get("temperature", 1.0)),
            float(sp.get("top_p", 1.0)),
            sp.get("sampling_seed"),
            stop,
        )
        out_text = generation.text
        if generation.matched_stop is not None:
            out_text = out_text[: out_text.find(generation.matched_stop)]
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
            lps = await asyncio.to_thread(runner.prompt_logprobs, ids, start) if start < len(ids) else []
            meta["input_token_logprobs"] = [
                [lp, i, runner.token_text(i)] for i, lp in zip(ids[start:], lps, strict=True)
            ]
            meta["output_token_logprobs"] = [[t.logprob, t.id, t.text] for t in generation.tokens]
        return {"text": out_text, "meta_info": meta}


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


# -- command line ------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model", metavar="MODEL", help="local short name (e.g. smollm2-135m) or model directory"
    )
    parser.add_argument(
        "--protocol", choices=PROTOCOLS, default="tgi", help="HTTP API to speak (default tgi)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--enable-prefill-logprobs",
        action="store_true",
        help="TGI: return prompt log-probs in `prefill` (without it, prefill is silently empty, as in TGI 3)",
    )
    parser.add_argument("--max-concurrent-requests", type=int, default=128, help="answer 429 beyond this")
    parser.add_argument("--max-input-tokens", type=int, default=None)
    parser.add_argument("--max-total-tokens", type=int, default=None)
    parser.add_argument("--max-stop-sequences", type=int, default=4)
    parser.add_argument("--api-key", default=None, help="require `Authorization: Bearer <key>`")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument(
        "--pipeline-tag",
        default="text-generation",
        help="TGI: the model's pipeline tag (text-generation: POST / returns the prompt too, as in TGI)",
    )
    parser.add_argument("--log-level", default="warning")


def run(args: argparse.Namespace) -> int:
    """Load the model, then serve until interrupted."""
    import uvicorn

    options = ServeOptions(
        model=args.model,
        protocol=args.protocol,
        host=args.host,
        port=args.port,
        enable_prefill_logprobs=args.enable_prefill_logprobs,
        max_concurrent_requests=args.max_concurrent_requests,
        max_input_tokens=args.max_input_tokens,
        max_total_tokens=args.max_total_tokens,
        max_stop_sequences=args.max_stop_sequences,
        api_key=args.api_key,
        dtype=args.dtype,
        pipeline_tag=args.pipeline_tag,
    )
    app = build_app(options)
    uvicorn.run(app, host=options.host, port=options.port, log_level=args.log_level, access_log=False)
    return 0


def register(subparsers: Any) -> None:
    """Add the `serve` subcommand to an argparse subparsers object (used by specfuse.cli)."""
    parser = subparsers.add_parser(
        "serve",
        help="serve one local model over a TGI, vLLM or SGLang style HTTP API",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m specfuse.devserver")
    add_arguments(parser)
    return run(parser.parse_args(argv))

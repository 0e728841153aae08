"""`specfuse serve`: one local model behind a TGI, vLLM or SGLang style HTTP API.

Why it exists: the remote backends must be tested against real servers, and
TGI / vLLM / SGLang need GPUs and weights downloads this project cannot
assume. This server runs one of the embedded models on loopback and speaks
the subset of each protocol specfuse uses, with the same quirks the real
servers have (TGI's silently empty `prefill` without
`--enable-prefill-logprobs`, its `{"error", "error_type"}` bodies, 422 for
over-long input, 429 past the concurrency limit). It is also handy to share
one loaded model between several processes on a laptop.

This module is what every protocol shares: the app with its health route,
the API key and the concurrency limit, and the command line. The model is
`runner.py`; each protocol is one module (`tgi.py`, `vllm.py`, `sglang.py`)
listed once in `_PROTOCOLS` below.
"""

import argparse
import secrets
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import fields
from typing import Any

from specfuse.devserver import sglang, tgi, vllm
from specfuse.devserver.context import Context, Handler, Protocol, ServeOptions
from specfuse.devserver.runner import Runner

#: The protocols this server can speak, by the name `--protocol` takes: a new one is a
#: module defining a `Protocol` and one entry here.
_PROTOCOLS: dict[str, Protocol] = {p.name: p for p in (tgi.PROTOCOL, vllm.PROTOCOL, sglang.PROTOCOL)}
PROTOCOLS = tuple(_PROTOCOLS)


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


def build_app(options: ServeOptions, runner: Runner | None = None) -> Any:
    """The FastAPI app for one protocol (the model loads here unless a runner is given)."""
    from fastapi import FastAPI, Request, Response

    protocol = _PROTOCOLS.get(options.protocol)
    if protocol is None:
        raise ValueError(f"unknown protocol {options.protocol!r}; use one of {PROTOCOLS}")
    runner = runner or Runner(options.model, options.dtype)
    max_total = options.max_total_tokens or runner.context_window
    max_input = options.max_input_tokens or max(1, max_total - 1)
    ctx = Context(options, runner, protocol, max_input=max_input, max_total=max_total)
    slots = Slots(options.max_concurrent_requests)
    app = FastAPI(title=f"specfuse serve ({options.protocol})")

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        # --api-key: every route but health needs the Bearer token (compared in constant time).
        if options.api_key and request.url.path not in ("/health",):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {options.api_key}".encode()):
                return ctx.error(401, "Unauthorized", "authentication")
        try:
            with slots:
                return await call_next(request)
        except Overloaded:
            return ctx.error(429, "Model is overloaded", "overloaded")

    @app.get("/health")
    async def health() -> Response:
        return ctx.json({}, status=200)

    def bind(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        # FastAPI reads the endpoint's signature to inject the request; the context rides
        # along here rather than in each protocol's closures.
        async def endpoint(request: Request) -> Response:
            return await handler(ctx, request)

        return endpoint

    for route in protocol.routes:
        app.add_api_route(
            route.path, bind(route.handler), methods=[route.method], name=route.handler.__name__
        )
    return app


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

    # The parser's destinations are named after ServeOptions' fields (`log_level` is uvicorn's).
    options = ServeOptions(**{f.name: getattr(args, f.name) for f in fields(ServeOptions)})
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

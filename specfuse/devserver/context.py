"""What a protocol module is given and what it gives back: the imitation's one interface.

A protocol module (`tgi.py`, `vllm.py`, `sglang.py`) defines a `Protocol`: its
error-body shape and its `Route`s, whose handlers take the `Context` (the
options, the model and the server's limits) and the request. `server.py`
binds the handlers to one app, so no protocol code closes over loose values.

FastAPI is imported only when a response is made: the package must import
without the server extra, or `specfuse` would lose its other commands.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from specfuse.devserver.runner import Generation, Runner

if TYPE_CHECKING:
    from fastapi import Request
    from fastapi.responses import Response


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


Handler = Callable[["Context", "Request"], Awaitable["Response"]]


@dataclass(frozen=True)
class Route:
    method: Literal["GET", "POST"]
    path: str
    handler: Handler


@dataclass
class Protocol:
    """One HTTP API the imitation speaks; `server.py`'s table lists every one.

    A protocol module creates its `Protocol` first and marks each handler with
    `@PROTOCOL.get(path)` / `@PROTOCOL.post(path)`, so a route's path stands above
    its code; the app adds the routes in that order.
    """

    name: str
    #: The JSON body of an error in this protocol's shape, from (status, message, kind).
    error_body: Callable[[int, str, str], dict[str, Any]]
    routes: list[Route] = field(default_factory=list)

    def get(self, path: str) -> Callable[[Handler], Handler]:
        return self._route("GET", path)

    def post(self, path: str) -> Callable[[Handler], Handler]:
        return self._route("POST", path)

    def _route(self, method: Literal["GET", "POST"], path: str) -> Callable[[Handler], Handler]:
        def add(handler: Handler) -> Handler:
            self.routes.append(Route(method, path, handler))
            return handler

        return add


@dataclass(frozen=True)
class Context:
    """Everything a handler may use, fixed when the app is built."""

    options: ServeOptions
    runner: Runner
    protocol: Protocol
    max_input: int
    max_total: int

    @property
    def model_id(self) -> str:
        return self.runner.name

    def json(self, body: Any, status: int = 200) -> Response:
        from fastapi.responses import JSONResponse

        return JSONResponse(body, status_code=status)

    def error(self, status: int, message: str, kind: str) -> Response:
        return self.json(self.protocol.error_body(status, message, kind), status)

    def limit_error(self, ids: list[int], max_new: int) -> str | None:
        """Why the input or input + new tokens exceed the limits, in TGI's words (vLLM only
        asks whether; SGLang words and counts its own), or None when they fit."""
        if len(ids) > self.max_input:
            return (
                f"Input validation error: `inputs` must have less than {self.max_input} tokens. "
                f"Given: {len(ids)}"
            )
        if len(ids) + max_new > self.max_total:
            return (
                f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= {self.max_total}. "
                f"Given: {len(ids)} `inputs` tokens and {max_new} `max_new_tokens`"
            )
        return None

    # The model runs in a worker thread so that the event loop keeps answering (health,
    # 429s) while one request holds the model lock.

    async def generate(
        self,
        ids: list[int],
        max_new: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        stop: list[str],
    ) -> Generation:
        return await asyncio.to_thread(
            self.runner.generate,
            ids,
            max_new_tokens=max_new,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop,
        )

    async def prompt_logprobs(self, ids: list[int], start: int = 0) -> list[float | None]:
        return await asyncio.to_thread(self.runner.prompt_logprobs, ids, start)


def stop_strings(value: Any) -> list[str]:
    """A request's `stop` (absent, one string or a list) as a list, as vLLM and SGLang take it."""
    stop = value or []
    return [stop] if isinstance(stop, str) else list(stop)

"""The gateway's FastAPI app: OpenAI routes over one :class:`specfuse.SpecFuse` engine.

The app holds no state between requests beyond the engine's started members
and its metrics, so replicas behind any load balancer are interchangeable.
Each request is checked (body, types, model, unsupported fields, prompt
size, concurrency) before any member is called; what fails afterwards
reaches a streaming client as an error event, never as a silently cut answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from specfuse.engine import SpecFuse
from specfuse.errors import SpecfuseError
from specfuse.gateway import errors, translate
from specfuse.gateway.errors import GatewayError
from specfuse.gateway.metrics import CONTENT_TYPE_LATEST, GatewayMetrics
from specfuse.gateway.schemas import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionRequest,
    Delta,
    FunctionCall,
    ModelCard,
    ModelList,
    SamplingRequest,
    ToolCallDelta,
    new_id,
    now,
    unsupported_fields,
)
from specfuse.prompts import FormattedPrompt
from specfuse.request import FusionResult

log = logging.getLogger("specfuse.gateway")

R = TypeVar("R", bound=BaseModel)
S = TypeVar("S", bound=SamplingRequest)
T = TypeVar("T")


@dataclass(frozen=True)
class GatewayOptions:
    #: The one model id the gateway serves (GET /v1/models, the `model` field of requests).
    model_name: str
    #: Bearer key clients must send; None leaves the API open (loopback use).
    api_key: str | None = None
    #: Fusions one replica runs at once; beyond it requests get 429 with Retry-After.
    max_concurrent: int = 32
    #: Seconds a 429 asks the client to wait.
    retry_after: float = 1.0
    #: Seconds the members get to load or answer their probes at start-up.
    start_timeout: float = 600.0


class _Slots:
    """A non-blocking concurrency limit: a request beyond it is refused, not queued.

    Queued requests would hold their clients' connections open behind work the
    replica cannot do soon; a 429 lets the client (or the load balancer) go to
    another replica or come back after Retry-After.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def acquire(self, retry_after: float) -> Callable[[], None]:
        if self.used >= self.limit:
            raise errors.too_many_requests(self.limit, retry_after)
        self.used += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.used -= 1

        return release


def _sse(model: BaseModel) -> str:
    return f"data: {model.model_dump_json(exclude_none=True)}\n\n"


@dataclass(frozen=True)
class _Streaming:
    """A streamed request as `Gateway.serve` hands it to its stream: one value, not four arguments."""

    call: translate.CoreCall
    endpoint: str
    #: Frees the request's concurrency slot; the stream calls it when the fusion ends.
    release: Callable[[], None]
    #: time.perf_counter() when the request arrived, for the latency metric.
    started: float


@dataclass(frozen=True)
class _StreamReply:
    """What every chunk of one streamed answer repeats (its type, id, time and model), and how it ends."""

    chunk_type: type[ChatCompletionChunk] | type[Completion]
    id: str
    created: int
    model: str
    include_usage: bool

    def chunk(self, *choices: ChunkChoice | CompletionChoice, **extra: Any) -> str:
        return _sse(
            self.chunk_type(
                id=self.id, created=self.created, model=self.model, choices=list(choices), **extra
            )
        )

    def ending(
        self, call: translate.CoreCall, result: FusionResult, finish: ChunkChoice | CompletionChoice
    ) -> Iterator[str]:
        """The finish chunk with the fusion's own reason (and trace, if asked for), then the usage chunk."""
        yield self.chunk(
            finish,
            specfuse_finish_reason=result.finish_reason,
            specfuse_trace=result.trace.to_dict() if call.trace else None,
        )
        if self.include_usage:
            yield self.chunk(usage=translate.usage(result))


class _ClientGone(Exception):
    """The client closed its connection before the answer was ready."""


async def _wait_for_disconnect(request: Request) -> None:
    # The body is read already, so the next ASGI message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Run work, cancelling it (and so its member calls) if the client goes away first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        watcher.cancel()
        raise
    watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(BaseException):
        await task
    raise _ClientGone


class Gateway:
    """The routes' shared state: the engine, its readiness, limits and metrics."""

    def __init__(self, engine: SpecFuse, options: GatewayOptions) -> None:
        self.engine = engine
        self.options = options
        self.metrics = GatewayMetrics()
        self.slots = _Slots(options.max_concurrent)
        self.ready = False
        self.start_error: str | None = None
        self.window: int | None = None
        self.members = engine.member_names

    async def start(self) -> None:
        """Probe every member (and measure the usable window) once, before /health says ready."""
        try:
            await asyncio.wait_for(self._start(), self.options.start_timeout)
        except TimeoutError:
            self.start_error = f"members did not answer their probes within {self.options.start_timeout}s"
        except SpecfuseError as exc:
            self.start_error = str(exc)  # core errors name members and endpoints, never keys
        except ImportError as exc:
            # "No module named ..." says what to install, and holds nothing secret.
            self.start_error = f"a package the members need is missing: {exc}"
        except Exception as exc:
            self.start_error = f"{type(exc).__name__} while starting the members"
            log.exception("starting the members failed")
        if self.start_error:
            log.error("the ensemble is not ready: %s", self.start_error)

    async def _start(self) -> None:
        await self.engine.astart()
        self.window = await self.engine.ausable_window()
        self.ready = True
        log.info("ensemble ready: %s (usable window %s tokens)", ", ".join(self.members), self.window)

    # -- checks ----------------------------------------------------------------

    def authorize(self, request: Request) -> None:
        key = self.options.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken does not tell how much of a guess was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise errors.unauthorized()

    async def parse(self, request: Request, model: type[R]) -> R:
        body = await request.body()
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise errors.invalid_json(exc) from None
        if not isinstance(data, dict):
            raise GatewayError(400, "the request body must be a JSON object", code="invalid_type")
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            raise errors.from_validation(exc) from None

    async def accept(self, request: Request, model: type[S]) -> S:
        """A generation request's body, once its caller, its JSON and its fields have all passed."""
        self.authorize(request)
        body = await self.parse(request, model)
        self.check(body)
        return body

    def check(self, request: SamplingRequest) -> None:
        if request.model != self.options.model_name:
            raise errors.unknown_model(request.model, self.options.model_name)
        refused = unsupported_fields(request)
        if refused is not None:
            raise errors.unsupported(*refused)
        if not self.ready:
            raise errors.not_ready(self.start_error or "the members are still starting")

    async def check_call(self, call: translate.CoreCall) -> None:
        """Settings the engine would refuse, and a prompt over the usable window (refused with
        both numbers), are found before any member drafts, so a stream never starts for them."""
        try:
            self.engine.settings.with_overrides(**call.overrides)
        except SpecfuseError as exc:
            raise errors.from_core(exc) from None
        if not self.window:
            return
        try:
            if isinstance(call.prompt, FormattedPrompt):
                tokens = await self.engine.acount_tokens(call.prompt)
            else:
                tokens = await self.engine.acount_prompt_tokens(call.prompt, tools=call.plan.tools)
        except SpecfuseError as exc:
            raise errors.from_core(exc, "messages") from None
        if tokens > self.window:
            raise errors.context_too_long(tokens, self.window)

    # -- serving ---------------------------------------------------------------

    def fuse(self, call: translate.CoreCall) -> AsyncIterator[Any]:
        return self.engine.astream(call.prompt, tools=call.plan.tools, **call.overrides)

    async def generate(self, call: translate.CoreCall) -> FusionResult:
        return await self.engine.agenerate(call.prompt, tools=call.plan.tools, **call.overrides)

    async def serve(
        self,
        request: Request,
        call: translate.CoreCall,
        body: SamplingRequest,
        endpoint: str,
        respond: Callable[[FusionResult], BaseModel],
        stream: Callable[[_Streaming], AsyncIterator[str]],
    ) -> Response:
        started = time.perf_counter()
        release = self.slots.acquire(self.options.retry_after)
        handed_over = False
        try:
            await self.check_call(call)
            if body.stream:
                handed_over = True
                return StreamingResponse(
                    self.sse(endpoint, stream(_Streaming(call, endpoint, release, started))),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                    # Also released here: a stream cancelled before its first step never runs its finally.
                    background=BackgroundTask(release),
                )
            self.metrics.in_flight.inc()
            try:
                result = await _unless_disconnected(request, self.generate(call))
            except _ClientGone:
                self.metrics.errors.labels("cancelled").inc()
                self.metrics.requests.labels(endpoint, "499").inc()
                return Response(status_code=499)
            except (SpecfuseError, OSError, TimeoutError) as exc:
                raise errors.from_core(exc) from None
            finally:
                self.metrics.in_flight.dec()
            release()
            self.metrics.record_result(result)
            self.metrics.requests.labels(endpoint, "200").inc()
            self.metrics.latency.labels(endpoint, "false").observe(time.perf_counter() - started)
            data = respond(result).model_dump(exclude_none=True)
            for choice in data.get("choices", []):
                if "message" in choice:
                    # OpenAI sends "content": null next to tool calls; clients read the key.
                    choice["message"].setdefault("content", None)
            return JSONResponse(data)
        finally:
            if not handed_over:
                release()

    async def _segments(self, streaming: _Streaming) -> AsyncIterator[tuple[Any, FusionResult | None]]:
        """The fusion's segments with the bookkeeping every stream shares.

        Yields (segment, result); a failure is turned into a GatewayError for the
        caller to send as an error event. A cancelled stream (the client went
        away) cancels the fusion: closing the engine's generator cancels its
        member calls in flight.
        """
        endpoint, started = streaming.endpoint, streaming.started
        self.metrics.in_flight.inc()
        try:
            async with contextlib.aclosing(self.fuse(streaming.call)) as segments:
                async for segment in segments:
                    yield segment, segment.result
                    if segment.result is not None:
                        self.metrics.record_result(segment.result)
                        self.metrics.requests.labels(endpoint, "200").inc()
                        self.metrics.latency.labels(endpoint, "true").observe(time.perf_counter() - started)
        except (asyncio.CancelledError, GeneratorExit):
            self.metrics.errors.labels("cancelled").inc()
            self.metrics.requests.labels(endpoint, "499").inc()
            raise
        except GatewayError:
            raise
        except Exception as exc:
            if not isinstance(exc, (SpecfuseError, OSError, TimeoutError)):
                log.exception("a streamed fusion failed")
            raise errors.from_core(exc) from None
        finally:
            self.metrics.in_flight.dec()
            streaming.release()

    async def sse(self, endpoint: str, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        """A stream's chunks, then `[DONE]`; a failure mid-answer ends it with an error event
        instead (no `[DONE]`: the answer did not end)."""
        # aclosing: a client that goes away closes this generator, and the fusion inside
        # must be closed (its member calls cancelled) now, not when it is collected.
        async with contextlib.aclosing(chunks) as inner:
            try:
                async for item in inner:
                    yield item
            except GatewayError as exc:
                self.metrics.errors.labels(exc.kind).inc()
                self.metrics.requests.labels(endpoint, "stream_error").inc()
                yield exc.sse()
                return
        yield "data: [DONE]\n\n"

    async def chat_stream(self, streaming: _Streaming, reply: _StreamReply) -> AsyncIterator[str]:
        call = streaming.call

        def chunk(delta: Delta, **extra: Any) -> str:
            return reply.chunk(ChunkChoice(delta=delta), **extra)

        yield chunk(Delta(role="assistant", content=""))
        async for segment, result in self._segments(streaming):
            # A parsed answer (tool calls, JSON) is read whole at the end; a call's
            # markup must not leak into content.
            if segment.text and not call.parsed_output:
                yield chunk(
                    Delta(content=segment.text),
                    specfuse_member=segment.member,
                    specfuse_round=segment.round,
                )
            if result is None:
                continue
            parsed = call.plan.parse(result.text)
            if call.parsed_output:
                text = translate.content(parsed, result.text)
                if text:
                    yield chunk(Delta(content=text))
                calls = translate.tool_calls(parsed) or []
                if calls:
                    deltas = [
                        ToolCallDelta(index=i, id=c.id, function=FunctionCall(**c.function.model_dump()))
                        for i, c in enumerate(calls)
                    ]
                    yield chunk(Delta(tool_calls=deltas))
            finish = translate.finish_reason(result, parsed)
            for item in reply.ending(call, result, ChunkChoice(delta=Delta(), finish_reason=finish)):
                yield item

    async def completion_stream(self, streaming: _Streaming, reply: _StreamReply) -> AsyncIterator[str]:
        async for segment, result in self._segments(streaming):
            if segment.text:
                yield reply.chunk(
                    CompletionChoice(text=segment.text, finish_reason=None),
                    specfuse_member=segment.member,
                    specfuse_round=segment.round,
                )
            if result is None:
                continue
            finish = translate.finish_reason(result)
            for item in reply.ending(streaming.call, result, CompletionChoice(text="", finish_reason=finish)):
                yield item


def create_app(engine: SpecFuse, options: GatewayOptions) -> FastAPI:
    """The gateway over a (not yet started) engine; members are probed at start-up."""
    gateway = Gateway(engine, options)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        starting = asyncio.create_task(gateway.start())
        try:
            yield
        finally:
            starting.cancel()
            with contextlib.suppress(BaseException):
                await starting
            await engine.aclose()

    app = FastAPI(title="specfuse gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.gateway = gateway

    def error_response(exc: GatewayError, endpoint: str) -> JSONResponse:
        gateway.metrics.errors.labels(exc.kind).inc()
        gateway.metrics.requests.labels(endpoint, str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(GatewayError)
    async def on_gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return error_response(exc, request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Unknown paths and methods get the OpenAI shape too (clients parse only that).
        # The path is not used as a label: arbitrary paths would grow the metric without bound.
        kind = "not_found" if exc.status_code == 404 else "invalid_request"
        error = GatewayError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", kind=kind)
        return error_response(error, "other")

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path)
        return error_response(errors.from_core(exc), request.url.path)

    @app.get("/health")
    async def health() -> JSONResponse:
        if gateway.ready:
            body = {"status": "ok", "model": options.model_name, "members": gateway.members}
            return JSONResponse(body)
        status = "failed" if gateway.start_error else "starting"
        return JSONResponse({"status": status, "error": gateway.start_error}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(gateway.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        gateway.authorize(request)
        card = ModelCard(id=options.model_name, created=now(), specfuse_members=gateway.members)
        gateway.metrics.requests.labels("/v1/models", "200").inc()
        return JSONResponse(ModelList(data=[card]).model_dump())

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = await gateway.accept(request, ChatCompletionRequest)
        call = translate.chat_call(body)
        model = options.model_name
        rid, created = new_id("chatcmpl"), now()
        return await gateway.serve(
            request,
            call,
            body,
            "/v1/chat/completions",
            lambda result: translate.chat_completion(call, result, model, rid, created),
            lambda streaming: gateway.chat_stream(
                streaming,
                _StreamReply(ChatCompletionChunk, new_id("chatcmpl"), now(), model, body.include_usage),
            ),
        )

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = await gateway.accept(request, CompletionRequest)
        call = translate.completion_call(body)
        model = options.model_name

        def respond(result: FusionResult) -> Completion:
            choice = CompletionChoice(text=result.text, finish_reason=translate.finish_reason(result))
            return Completion(
                id=new_id("cmpl"),
                created=now(),
                model=model,
                choices=[choice],
                usage=translate.usage(result),
                specfuse_finish_reason=result.finish_reason,
                specfuse_trace=result.trace.to_dict() if call.trace else None,
            )

        return await gateway.serve(
            request,
            call,
            body,
            "/v1/completions",
            respond,
            lambda streaming: gateway.completion_stream(
                streaming, _StreamReply(Completion, new_id("cmpl"), now(), model, body.include_usage)
            ),
        )

    return app

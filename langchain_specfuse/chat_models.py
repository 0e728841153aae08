"""ChatSpecFuse: a LangChain chat model that fuses several LLMs segment by segment."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, ClassVar, Literal

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.exceptions import OutputParserException
from langchain_core.language_models import LanguageModelInput
from langchain_core.language_models.chat_models import (
    BaseChatModel,
    LangSmithParams,
    agenerate_from_stream,
    generate_from_stream,
)
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.output_parsers.openai_tools import JsonOutputKeyToolsParser, PydanticToolsParser
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableLambda, RunnableMap, RunnablePassthrough
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from langchain_core.utils.pydantic import is_basemodel_subclass
from pydantic import BaseModel

from langchain_specfuse._base import SpecFuseParams, result_metadata, usage_metadata
from langchain_specfuse._convert import ParsedOutput, to_core_messages, to_langchain_output
from specfuse import FusionResult, Segment
from specfuse.errors import ConfigError
from specfuse.tool_calls import ToolPlan, normalize_tool_choice

_StructuredMethod = Literal["function_calling", "json_schema", "json_mode"]


@dataclass
class _Request:
    """One call, translated for the engine."""

    messages: list[dict[str, Any]]
    plan: ToolPlan
    overrides: dict[str, Any]

    @property
    def tools(self) -> list[dict[str, Any]] | None:
        return self.plan.tools

    def parse(self, text: str) -> ParsedOutput:
        return to_langchain_output(self.plan.parse(text))


class ChatSpecFuse(SpecFuseParams, BaseChatModel):
    """Several LLMs fused into one chat model (SpecFuse, arXiv 2412.07380).

    Each round every member drafts a short segment, every member scores every
    draft, and the best one is appended to the shared answer and streamed.

    Setup::

        from langchain_specfuse import ChatSpecFuse

        llm = ChatSpecFuse.local()                                  # embedded offline ensemble
        llm = ChatSpecFuse(members=["smollm2-135m", "gemma3-270m"], max_tokens=64)
        llm = ChatSpecFuse(config_path="ensemble.toml")             # TGI / vLLM / SGLang members

    Streaming yields one AIMessageChunk per accepted segment; the last one has
    `chunk_position="last"` and carries `usage_metadata` and the full metadata.

    Usage (`usage_metadata`): `input_tokens` is the prompt as each member called
    during the response read it, summed over those members, each in its own
    tokenizer (so a 2-member ensemble reports about twice the prompt);
    `output_tokens` is the fused answer, each segment counted in the tokenizer
    of the member that drafted it. Only the last streamed chunk carries usage.

    Response metadata: `model_name`, `finish_reason`, `specfuse_summary`
    (`FusionTrace.summary()`: rounds, calls, wins, exits, timings),
    `specfuse_member_usage` (per member: prompt_tokens, tokens_drafted,
    tokens_won, tokens_scored, calls, wins), `specfuse_trace` (the full trace as
    a dict: every round's candidates, scores and weights) and `specfuse_segments`
    (the accepted segments with the member and round that produced each).

    Tool calling: `bind_tools` hands OpenAI-style tools to every member's chat
    template (or the core's generic tool prompt for members without one) and
    parses `<tool_call>{...}</tool_call>`, ```json fences or bare JSON calls
    from the fused text. `tool_choice="any"`, `"required"` or a tool name adds
    an instruction to the system prompt. On invoke the call markup is removed
    from `content`; a stream has already sent it, so streamed content keeps it
    and the last chunk carries the parsed calls.
    """

    # -- LangChain plumbing ---------------------------------------------------

    llm_type: ClassVar[str] = "specfuse-chat"
    lc_module: ClassVar[str] = "chat_models"

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="specfuse",
            ls_model_name=kwargs.get("model") or self.resolved_model_name,
            ls_model_type="chat",
        )
        temperature = kwargs.get("temperature", self.temperature)
        if temperature is not None:
            params["ls_temperature"] = temperature
        max_tokens = kwargs.get("max_tokens", self.max_tokens)
        if max_tokens is not None:
            params["ls_max_tokens"] = max_tokens
        stops = [*(self.stop or []), *(stop or [])]
        if stops:
            params["ls_stop"] = stops
        return params

    # -- tools and structured output -----------------------------------------------

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: dict[str, Any] | str | bool | None = None,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools (any form `convert_to_openai_tool` accepts).

        tool_choice: None/"auto" (the model decides), "none" (tools hidden),
        "any"/"required"/True (some tool must be called), a tool name or an
        OpenAI `{"type": "function", "function": {"name": ...}}` dict.
        """
        formatted = [convert_to_openai_tool(t, strict=strict) for t in tools]
        # Checked now, so a bad choice fails at bind time rather than on the first call.
        choice = normalize_tool_choice(tool_choice, [t["function"]["name"] for t in formatted])
        return super().bind(tools=formatted, tool_choice=choice, **kwargs)

    def with_structured_output(
        self,
        schema: dict[str, Any] | type | None = None,
        *,
        method: _StructuredMethod = "function_calling",
        include_raw: bool = False,
        strict: bool | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, dict[str, Any] | BaseModel]:
        """Structured output through the fusion.

        method="function_calling" binds the schema as a forced tool (LangChain's
        base implementation); "json_schema" asks for a JSON object matching the
        schema in the system prompt; "json_mode" asks for any JSON object (the
        schema, if given, is described too). Pydantic schemas return validated
        instances, others dicts; a bad answer raises OutputParserException, or
        lands in `parsing_error` with include_raw=True.
        """
        if method not in ("function_calling", "json_schema", "json_mode"):
            raise ConfigError(f"unknown method {method!r}; use function_calling, json_schema or json_mode")
        if kwargs:
            raise ConfigError(
                f"unsupported arguments {sorted(kwargs)}; accepted: schema, method, include_raw, strict"
            )
        if schema is None and method != "json_mode":
            raise ConfigError(f"method={method!r} needs a schema")
        is_model = isinstance(schema, type) and is_basemodel_subclass(schema)
        bound: Runnable[Any, Any]
        parser: Runnable[Any, Any]
        if method == "function_calling":
            # As BaseChatModel.with_structured_output binds it, but its parser returns None
            # when the answer holds no call, and include_raw then showed parsed=None with
            # parsing_error=None: an answer without a valid call must be an error.
            tool = convert_to_openai_tool(schema, strict=strict)  # type: ignore[arg-type]
            name = tool["function"]["name"]
            bound = self.bind_tools(
                [schema],  # type: ignore[list-item]
                tool_choice=name,
                strict=strict,
                ls_structured_output_format={"kwargs": {"method": method, "strict": strict}, "schema": tool},
            )
            parser = _required_call(
                PydanticToolsParser(tools=[schema], first_tool_only=True)  # type: ignore[list-item]
                if is_model
                else JsonOutputKeyToolsParser(key_name=name, first_tool_only=True),
                name,
            )
        else:
            json_schema = convert_to_json_schema(schema) if schema is not None else None
            bound = self.bind(
                response_format={
                    "type": "json_object" if method == "json_mode" else "json_schema",
                    "schema": json_schema,
                },
                ls_structured_output_format={"kwargs": {"method": method}, "schema": schema},
            )
            parser = PydanticOutputParser(pydantic_object=schema) if is_model else JsonOutputParser()  # type: ignore[arg-type]
        if include_raw:
            with_parsed = RunnablePassthrough.assign(
                parsed=itemgetter("raw") | parser, parsing_error=lambda _: None
            )
            without = RunnablePassthrough.assign(parsed=lambda _: None)
            return RunnableMap(raw=bound) | with_parsed.with_fallbacks(
                [without], exception_key="parsing_error"
            )
        return bound | parser

    # -- generation ------------------------------------------------------------------

    def _request(
        self, messages: list[BaseMessage], stop: list[str] | None, kwargs: dict[str, Any]
    ) -> _Request:
        kwargs = dict(kwargs)
        model = kwargs.pop("model", None)
        if model is not None and model != self.resolved_model_name:
            raise ConfigError("ChatSpecFuse fuses a fixed ensemble; a per-call model= is not supported")
        plan = ToolPlan.build(
            kwargs.pop("tools", None),
            kwargs.pop("tool_choice", None),
            response_format=kwargs.pop("response_format", None),
        )
        return _Request(
            messages=plan.messages(to_core_messages(messages)),
            plan=plan,
            overrides=plan.overrides(self._overrides(stop, kwargs)),
        )

    def _message(self, result: FusionResult, request: _Request) -> AIMessage:
        parsed = request.parse(result.text)
        metadata = result_metadata(result, self.resolved_model_name)
        metadata["specfuse_segments"] = [
            {"member": r.winner, "round": r.index, "text": r.accepted_text} for r in result.trace.rounds
        ]
        return AIMessage(
            content=parsed.content,
            tool_calls=parsed.tool_calls,
            invalid_tool_calls=parsed.invalid_tool_calls,
            usage_metadata=usage_metadata(result),
            response_metadata=metadata,
        )

    def _chunk(self, segment: Segment, request: _Request) -> ChatGenerationChunk:
        """One accepted segment as a chunk; the last also carries usage, tool calls and metadata."""
        segments = [{"member": segment.member, "round": segment.round, "text": segment.text}]
        result = segment.result
        if result is None:
            return ChatGenerationChunk(
                message=AIMessageChunk(
                    content=segment.text, response_metadata={"specfuse_segments": segments}
                )
            )
        parsed = request.parse(result.text)
        chunks = [
            tool_call_chunk(
                name=c["name"], args=json.dumps(c["args"], ensure_ascii=False), id=c["id"], index=i
            )
            for i, c in enumerate(parsed.tool_calls)
        ]
        chunks += [
            tool_call_chunk(name=c.get("name"), args=c.get("args"), id=c.get("id"), index=len(chunks) + i)
            for i, c in enumerate(parsed.invalid_tool_calls)
        ]
        metadata = result_metadata(result, self.resolved_model_name)
        metadata["specfuse_segments"] = segments
        message = AIMessageChunk(
            content=segment.text,
            tool_call_chunks=chunks,
            usage_metadata=usage_metadata(result),
            response_metadata=metadata,
            chunk_position="last",
        )
        return ChatGenerationChunk(message=message, generation_info={"finish_reason": result.finish_reason})

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.streaming:
            return generate_from_stream(self._stream(messages, stop, run_manager, **kwargs))
        request = self._request(messages, stop, kwargs)
        result = self.engine.generate(request.messages, tools=request.tools, **request.overrides)
        return ChatResult(generations=[ChatGeneration(message=self._message(result, request))])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.streaming:
            return await agenerate_from_stream(self._astream(messages, stop, run_manager, **kwargs))
        request = self._request(messages, stop, kwargs)
        result = await self.engine.agenerate(request.messages, tools=request.tools, **request.overrides)
        return ChatResult(generations=[ChatGeneration(message=self._message(result, request))])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        request = self._request(messages, stop, kwargs)
        for segment in self.engine.stream(request.messages, tools=request.tools, **request.overrides):
            chunk = self._chunk(segment, request)
            # BaseChatModel.stream() passes no run_manager and reports tokens itself;
            # only internal callers (streaming=True invoke) hand one in.
            if run_manager is not None:
                run_manager.on_llm_new_token(segment.text, chunk=chunk)
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        request = self._request(messages, stop, kwargs)
        async for segment in self.engine.astream(request.messages, tools=request.tools, **request.overrides):
            chunk = self._chunk(segment, request)
            if run_manager is not None:
                await run_manager.on_llm_new_token(segment.text, chunk=chunk)
            yield chunk


def _required_call(parser: Runnable[Any, Any], tool: str) -> Runnable[Any, Any]:
    """`parser` over an AI message, failing (OutputParserException) when it finds no call of `tool`.

    The members write calls as text, and a fused answer may hold none (cut by
    max_tokens, or prose): that is a parsing error, never a silent None.
    """

    def parse(message: AIMessage) -> Any:
        value = parser.invoke(message)
        if value is None:
            text = message.content if isinstance(message.content, str) else json.dumps(message.content)
            raise OutputParserException(
                f"the fused answer holds no valid call of the tool {tool!r}: {text[:300]!r}",
                llm_output=text,
            )
        return value

    return RunnableLambda(parse)

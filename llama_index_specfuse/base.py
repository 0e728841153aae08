"""SpecFuseLLM: a specfuse ensemble as a LlamaIndex function-calling LLM.

A thin adapter: messages and tools go to :class:`specfuse.SpecFuse` as plain
dicts, accepted segments come back as stream deltas, and the fused text is
parsed for tool calls only when tools were offered. All algorithm logic stays
in the core.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
    ToolCallBlock,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr, model_validator
from llama_index.core.constants import DEFAULT_CONTEXT_WINDOW
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection

from specfuse import (
    EnsembleConfig,
    FormattedPrompt,
    FusionResult,
    FusionSettings,
    MemberConfig,
    Segment,
    SpecFuse,
)
from specfuse.config import ADAPTER_FIELD_SETTINGS, request_overrides
from specfuse.engine_pool import SharesEngine
from specfuse.errors import ConfigError, ToolCallError
from specfuse.tool_calls import ToolPlan, parse_tool_calls

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

#: Keywords LlamaIndex itself passes to chat() (from _prepare_chat_with_tools):
#: read by the tool plan, never fusion settings.
_TOOL_KEYWORDS = ("tools", "tool_choice")

_ROLES = {
    MessageRole.SYSTEM: "system",
    MessageRole.DEVELOPER: "system",
    MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant",
    MessageRole.MODEL: "assistant",
    MessageRole.CHATBOT: "assistant",
    MessageRole.TOOL: "tool",
    MessageRole.FUNCTION: "tool",
}


class SpecFuseLLM(SharesEngine, FunctionCallingLLM):
    """Several LLMs fused segment by segment (SpecFuse), as one LlamaIndex LLM.

    >>> llm = SpecFuseLLM.local()                                   # embedded offline ensemble
    >>> llm = SpecFuseLLM.local(["smollm2-135m", "gemma3-270m"], temperature=0.0)
    >>> llm = SpecFuseLLM.from_file("ensemble.toml")
    >>> print(llm.complete("Name three primary colours.").text)

    The engine is built on first use and kept, so loaded models are reused by
    every call. ``response.raw`` carries ``usage`` (read by
    ``TokenCountingHandler``), ``specfuse_trace`` (the :class:`FusionTrace`) and
    its ``summary``.
    """

    ensemble: EnsembleConfig = Field(
        default_factory=EnsembleConfig.local, description="Members and fusion defaults."
    )
    max_tokens: int | None = Field(default=None, gt=0, description="Max tokens of a fused answer.")
    temperature: float | None = Field(default=None, ge=0.0, description="0 means greedy.")
    top_p: float | None = Field(default=None, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    seed: int | None = Field(default=None, description="Seed for reproducible sampling.")
    segment_tokens: int | None = Field(default=None, gt=0, description="Max tokens per drafted segment.")
    stop: list[str] | None = Field(default=None, description="Stop sequences.")
    timeout: float | None = Field(
        default=None, gt=0.0, description="Seconds allowed per response (the core's request_deadline)."
    )
    max_retries: int | None = Field(
        default=None,
        ge=0,
        description="Retries of each remote member call (None: each member's own `retries`, default 2).",
    )
    fusion: dict[str, Any] = Field(
        default_factory=dict, description="Any other FusionSettings field for every request (tau, lam, ...)."
    )
    context_window: int | None = Field(
        default=None, gt=0, description="Override the window derived from the members."
    )
    is_function_calling: bool = Field(
        default=True, description="Offer tools to the members and parse their calls from the text."
    )
    model: str | None = Field(default=None, description="Model name reported in metadata.")

    _engine: SpecFuse | None = PrivateAttr(default=None)
    #: True when the caller passed `fuse=`: that engine is the caller's, never pooled.
    _given: bool = PrivateAttr(default=False)

    @model_validator(mode="after")
    def _check_fusion(self) -> SpecFuseLLM:
        # Validate early, so a typo fails at construction rather than on first call.
        self.ensemble.fusion.with_overrides(**self._overrides({}))
        return self

    def __init__(self, ensemble: EnsembleConfig | None = None, *, fuse: SpecFuse | None = None, **data: Any):
        if fuse is not None:
            if fuse.config is None:
                raise ConfigError("pass a SpecFuse built from an EnsembleConfig (SpecFuse(config))")
            ensemble = fuse.config
        if ensemble is not None:
            data["ensemble"] = ensemble
        super().__init__(**data)
        self._engine = fuse
        self._given = fuse is not None

    # -- construction ----------------------------------------------------------

    @classmethod
    def local(cls, models: Sequence[str] | None = None, **kwargs: Any) -> SpecFuseLLM:
        """The embedded offline ensemble, or a subset of its short names.

        Keywords that are fields of this class (max_tokens, temperature, ...) set
        them; any other FusionSettings keyword becomes a fusion default.
        """
        fields, fusion = cls._split(kwargs)
        config = EnsembleConfig.local(tuple(models), **fusion) if models else EnsembleConfig.local(**fusion)
        return cls(config, **fields)

    @classmethod
    def from_members(
        cls, members: Sequence[MemberConfig | dict[str, Any] | str], **kwargs: Any
    ) -> SpecFuseLLM:
        """Members as MemberConfig, dicts (``{"model": ..., "backend": "tgi", "urls": ...}``) or names."""
        fields, fusion = cls._split(kwargs)
        return cls(EnsembleConfig.build(list(members), **fusion), **fields)

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> SpecFuseLLM:
        """An ensemble from a `.toml` or `.json` config file."""
        return cls(EnsembleConfig.from_file(path), **kwargs)

    @classmethod
    def _split(cls, kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        own = set(cls.model_fields) - {"ensemble"}
        return (
            {k: v for k, v in kwargs.items() if k in own},
            {k: v for k, v in kwargs.items() if k not in own},
        )

    @classmethod
    def class_name(cls) -> str:
        return "SpecFuseLLM"

    @property
    def engine(self) -> SpecFuse:
        """The SpecFuse engine: the one passed as `fuse`, else shared from :mod:`specfuse.engine_pool`."""
        if self._given and self._engine is not None:
            return self._engine
        return self._pooled_engine(lambda: self.ensemble.with_retries(self.max_retries))

    # -- metadata --------------------------------------------------------------

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self._context_window(),
            num_output=self._settings().max_tokens,
            is_chat_model=True,
            is_function_calling_model=self.is_function_calling,
            model_name=self._model_name(),
        )

    def _model_name(self) -> str:
        return self.model or "specfuse:" + "+".join(m.display_name for m in self.ensemble.members)

    def _context_window(self) -> int:
        """The engine's usable window (see SpecFuse.usable_window), unless overridden.

        Knowing it means loading or probing the members. From sync code that is
        done once (models load there anyway); inside a running event loop it must
        not block, so until a call has measured it the engine's estimate is used.
        """
        if self.context_window is not None:
            return self.context_window
        try:
            asyncio.get_running_loop()
            measure = False
        except RuntimeError:
            measure = True
        # Within the answer's timeout: a hanging member must not hold metadata up for longer.
        return self.engine.usable_window(measure=measure, timeout=self._settings().request_deadline) or (
            DEFAULT_CONTEXT_WINDOW
        )

    def _settings(self) -> FusionSettings:
        return self.ensemble.fusion.with_overrides(**self._overrides({}))

    # -- request plumbing ------------------------------------------------------

    def _overrides(self, call: dict[str, Any]) -> dict[str, Any]:
        """Fusion overrides of one request: `fusion`, then fields, then the call's keywords."""
        fields = {name: getattr(self, name) for name in ADAPTER_FIELD_SETTINGS}
        return request_overrides(self.fusion, fields, call)

    def _request(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> _Call:
        call = {k: v for k, v in kwargs.items() if k not in _TOOL_KEYWORDS}
        plan = ToolPlan.build(kwargs.get("tools"), kwargs.get("tool_choice"))
        return _Call(
            plan.messages(to_specfuse_messages(messages)), plan, plan.overrides(self._overrides(call))
        )

    def _generate(self, call: _Call) -> FusionResult:
        return self.engine.generate(call.messages, tools=call.plan.tools, **call.overrides)

    async def _agenerate(self, call: _Call) -> FusionResult:
        result = None
        async for segment in self._asegments(call):
            result = segment.result
        assert result is not None  # the engine's last segment always carries it
        return result

    async def _asegments(self, call: _Call) -> AsyncIterator[Segment]:
        # Natively async, so metadata stops estimating; within the answer's timeout.
        await self.engine.ausable_window(call.overrides.get("request_deadline"))
        async for segment in self.engine.astream(call.messages, tools=call.plan.tools, **call.overrides):
            yield segment

    def _segments(self, call: _Call) -> Iterator[Segment]:
        # The engine's blocking stream runs on its own loop thread: safe in Jupyter too.
        return self.engine.stream(call.messages, tools=call.plan.tools, **call.overrides)

    def _chat_response(
        self, text: str, delta: str | None, result: FusionResult | None, plan: ToolPlan
    ) -> ChatResponse:
        additional: dict[str, Any] = {}
        content = text
        if result is not None and plan.tools:
            parsed = plan.parse(result.text)
            if delta is None:  # a stream's content stays the sum of its deltas
                content = parsed.text
            if parsed.calls:
                additional["tool_calls"] = [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
                    }
                    for call in parsed.calls
                ]
            if parsed.invalid:
                additional["invalid_tool_calls"] = [vars(call) for call in parsed.invalid]
        return ChatResponse(
            message=ChatMessage(role=MessageRole.ASSISTANT, content=content, additional_kwargs=additional),
            delta=delta,
            raw=self._raw(result),
        )

    def _completion_response(
        self, text: str, delta: str | None, result: FusionResult | None
    ) -> CompletionResponse:
        return CompletionResponse(text=text, delta=delta, raw=self._raw(result))

    def _raw(self, result: FusionResult | None) -> dict[str, Any] | None:
        if result is None:
            return None
        return {
            "text": result.text,
            "finish_reason": result.finish_reason,
            # TokenCountingHandler reads raw["usage"]["prompt_tokens"/"completion_tokens"].
            "usage": {
                "prompt_tokens": result.usage.input_tokens,
                "completion_tokens": result.usage.output_tokens,
                "total_tokens": result.usage.total_tokens,
            },
            "model": self._model_name(),
            "specfuse_trace": result.trace,
            "summary": result.trace.summary(),
        }

    # -- chat ----------------------------------------------------------------

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        call = self._request(messages, kwargs)
        result = self._generate(call)
        return self._chat_response(result.text, None, result, call.plan)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        call = self._request(messages, kwargs)
        result = await self._agenerate(call)
        return self._chat_response(result.text, None, result, call.plan)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        call = self._request(messages, kwargs)
        return (
            self._chat_response(text, s.text, s.result, call.plan)
            for text, s in _running(self._segments(call))
        )

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        call = self._request(messages, kwargs)
        return (
            self._chat_response(text, s.text, s.result, call.plan)
            async for text, s in _arunning(self._asegments(call))
        )

    # -- completion ------------------------------------------------------------
    # The members are chat models: a prompt is one user turn, rendered by each
    # member's own template. formatted=True (LlamaIndex: "the prompt is already
    # formatted for the model") sends the text to every member as is instead.

    def _prompt_call(self, prompt: str, formatted: bool, kwargs: dict[str, Any]) -> _Call:
        call = self._request([ChatMessage(role=MessageRole.USER, content=prompt)], kwargs)
        if not formatted:
            return call
        return _Call(FormattedPrompt(prompt), call.plan, call.overrides)

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        result = self._generate(self._prompt_call(prompt, formatted, kwargs))
        return self._completion_response(result.text, None, result)

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        result = await self._agenerate(self._prompt_call(prompt, formatted, kwargs))
        return self._completion_response(result.text, None, result)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        segments = self._segments(self._prompt_call(prompt, formatted, kwargs))
        return (self._completion_response(text, s.text, s.result) for text, s in _running(segments))

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        segments = self._asegments(self._prompt_call(prompt, formatted, kwargs))
        return (self._completion_response(text, s.text, s.result) async for text, s in _arunning(segments))

    # -- function calling --------------------------------------------------------

    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        messages = list(chat_history or [])
        if isinstance(user_msg, str):
            user_msg = ChatMessage(role=MessageRole.USER, content=user_msg)
        if user_msg is not None:
            messages.append(user_msg)
        tool_choice = kwargs.pop("tool_choice", None)
        if tool_required and tool_choice in (None, "auto"):
            tool_choice = "required"
        # Which tool is forced and what the prompt says is the core's ToolPlan, built per call.
        return {
            "messages": messages,
            "tools": [tool.metadata.to_openai_tool() for tool in tools] or None,
            "tool_choice": tool_choice,
            **kwargs,
        }

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        calls = response.message.additional_kwargs.get("tool_calls") or []
        if not calls:
            if error_on_no_tool_call:
                raise ToolCallError(
                    "expected at least one tool call, but the fused answer has none: "
                    f"{response.message.content!r}"
                )
            return []
        selections = []
        for call in calls:
            function = call["function"]
            arguments = function["arguments"]
            selections.append(
                ToolSelection(
                    tool_id=call["id"],
                    tool_name=function["name"],
                    tool_kwargs=json.loads(arguments) if isinstance(arguments, str) else arguments,
                )
            )
        return selections


def _running(segments: Iterator[Segment]) -> Iterator[tuple[str, Segment]]:
    """(text so far, segment) for each segment a stream shows: one with text, and the last."""
    text = ""
    for segment in segments:
        text += segment.text
        if segment.text or segment.result is not None:
            yield text, segment


async def _arunning(segments: AsyncIterator[Segment]) -> AsyncIterator[tuple[str, Segment]]:
    text = ""
    async for segment in segments:
        text += segment.text
        if segment.text or segment.result is not None:
            yield text, segment


@dataclass(frozen=True)
class _Call:
    """One call, translated for the engine."""

    messages: list[dict[str, Any]] | FormattedPrompt
    plan: ToolPlan
    overrides: dict[str, Any]


# -- message conversion --------------------------------------------------------------


def to_specfuse_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """LlamaIndex ChatMessages -> the HF chat-template dicts the engine renders.

    An assistant turn that called tools keeps its calls as ``tool_calls`` (with
    ``arguments`` as an object, as chat templates expect) and drops the call
    markup from its text, so the template does not show each call twice.
    """
    out: list[dict[str, Any]] = []
    for message in messages:
        role = _ROLES.get(message.role)
        if role is None:
            raise ConfigError(f"unsupported message role {message.role!r}")
        content = message.content or ""
        entry: dict[str, Any] = {"role": role, "content": content}
        calls = _tool_calls_of(message)
        if role == "assistant" and calls:
            entry["tool_calls"] = calls
            entry["content"] = parse_tool_calls(content, [c["function"]["name"] for c in calls]).text
        if role == "tool":
            call_id = message.additional_kwargs.get("tool_call_id")
            if call_id:
                entry["tool_call_id"] = call_id
            if message.additional_kwargs.get("name"):
                entry["name"] = message.additional_kwargs["name"]
        out.append(entry)
    return out


def _tool_calls_of(message: ChatMessage) -> list[dict[str, Any]]:
    """A message's tool calls, from additional_kwargs (ours, OpenAI's) or ToolCallBlocks."""
    calls = []
    for call in message.additional_kwargs.get("tool_calls") or []:
        if not isinstance(call, dict):
            call = call.model_dump() if hasattr(call, "model_dump") else dict(call)
        function = call.get("function") or {}
        arguments = function.get("arguments") or {}
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                arguments = {}
        calls.append(
            {
                "id": call.get("id"),
                "type": "function",
                "function": {"name": function.get("name"), "arguments": arguments},
            }
        )
    for block in message.blocks:
        if isinstance(block, ToolCallBlock):
            kwargs = block.tool_kwargs
            if isinstance(kwargs, str):
                kwargs = json.loads(kwargs) if kwargs.strip() else {}
            calls.append(
                {
                    "id": block.tool_call_id,
                    "type": "function",
                    "function": {"name": block.tool_name, "arguments": kwargs},
                }
            )
    return calls

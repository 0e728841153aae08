"""SpecFuseLLM: a specfuse ensemble as a LlamaIndex function-calling LLM.

A thin adapter: messages and tools go to :class:`specfuse.SpecFuse` as plain
dicts, accepted segments come back as stream deltas, and the fused text is
parsed for tool calls only when tools were offered. All algorithm logic stays
in the core.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

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
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.constants import DEFAULT_CONTEXT_WINDOW
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import ToolSelection

from specfuse import EnsembleConfig, FusionResult, FusionSettings, MemberConfig, Segment, SpecFuse
from specfuse.tool_calls import parse_tool_calls

if TYPE_CHECKING:
    from llama_index.core.tools.types import BaseTool

T = TypeVar("T")

#: Tokens kept free for what LlamaIndex cannot see: its tiktoken count of a prompt
#: may differ from a member's own tokenizer, and tool prompts add text.
_TOKENIZER_MARGIN = 64

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


class SpecFuseLLM(FunctionCallingLLM):
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
    seed: int | None = Field(default=None, description="Seed for reproducible sampling.")
    stop: list[str] | None = Field(default=None, description="Stop sequences.")
    fusion_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Other FusionSettings overrides for every request."
    )
    context_window: int | None = Field(
        default=None, gt=0, description="Override the window derived from the members."
    )
    is_function_calling: bool = Field(
        default=True, description="Offer tools to the members and parse their calls from the text."
    )
    model: str | None = Field(default=None, description="Model name reported in metadata.")

    _fuse: SpecFuse | None = PrivateAttr(default=None)
    _window: int | None = PrivateAttr(default=None)
    _window_lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def __init__(self, ensemble: EnsembleConfig | None = None, *, fuse: SpecFuse | None = None, **data: Any):
        if fuse is not None:
            if fuse.config is None:
                raise ValueError("pass a SpecFuse built from an EnsembleConfig (SpecFuse(config))")
            ensemble = fuse.config
        if ensemble is not None:
            data["ensemble"] = ensemble
        super().__init__(**data)
        self._fuse = fuse

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
        """The SpecFuse engine, built on first use and kept (its loaded models with it)."""
        if self._fuse is None:
            self._fuse = SpecFuse(self.ensemble)
        return self._fuse

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
        """The smallest member window less that member's chat-template overhead.

        Knowing it means loading or probing the members. From sync code we do it
        once (that is where models load); inside a running event loop we must not
        block, so until an async call has measured it we return an estimate.
        """
        if self.context_window is not None:
            return self.context_window
        if self._window is not None:
            return self._window
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return _run_blocking(self._measure_window())
        return self._estimated_window()

    async def _measure_window(self) -> int:
        members = await self.engine.astart()
        if self._window is not None:
            return self._window
        probe = [{"role": "user", "content": ""}]
        rooms = []
        for member in members:
            if member.info.context_window is None:
                continue
            overhead = await member.backend.count_tokens(await member.format.render(probe, None))
            rooms.append(member.info.context_window - overhead - _TOKENIZER_MARGIN)
        with self._window_lock:
            self._window = max(1, min(rooms)) if rooms else DEFAULT_CONTEXT_WINDOW
        return self._window

    def _estimated_window(self) -> int:
        from specfuse.models import MODELS

        windows = [
            MODELS[m.model].context_length if m.backend == "local" and m.model in MODELS else None
            for m in self.ensemble.members
        ]
        if None in windows:
            return DEFAULT_CONTEXT_WINDOW
        # 64 covers the templates' default system prompts until the real overhead is measured.
        return min(w for w in windows if w is not None) - 64 - _TOKENIZER_MARGIN

    def _settings(self) -> FusionSettings:
        return self.ensemble.fusion.with_overrides(**self._overrides({}))

    # -- request plumbing ------------------------------------------------------

    def _overrides(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Fusion overrides of one request: our fields, then the call's FusionSettings keywords.

        LlamaIndex passes assorted keywords (formatted, tool_choice, ...); only
        those naming a fusion setting are meant for the engine.
        """
        out: dict[str, Any] = {**self.fusion_kwargs}
        for name in ("max_tokens", "temperature", "seed", "stop"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        out.update({k: v for k, v in kwargs.items() if k in FusionSettings.model_fields and v is not None})
        return out

    def _request(
        self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, str | None, dict[str, Any]]:
        tools = kwargs.get("tools") or None
        forced = kwargs.get("forced_tool")
        dicts = to_specfuse_messages(messages)
        instruction = kwargs.get("tool_instruction")
        if tools and instruction:
            dicts = _with_system_note(dicts, instruction)
        return dicts, tools, forced, self._overrides(kwargs)

    async def _asegments(
        self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]
    ) -> AsyncIterator[Segment]:
        dicts, tools, _, overrides = self._request(messages, kwargs)
        if self._window is None:
            await self._measure_window()  # natively async, so metadata stops estimating
        async for segment in self.engine.astream(dicts, tools=tools, **overrides):
            yield segment

    def _segments(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> Iterator[Segment]:
        dicts, tools, _, overrides = self._request(messages, kwargs)
        # The engine's blocking stream runs on its own loop thread: safe in Jupyter too.
        return self.engine.stream(dicts, tools=tools, **overrides)

    def _tool_names(self, kwargs: dict[str, Any]) -> list[str]:
        return [t["function"]["name"] for t in kwargs.get("tools") or [] if "function" in t]

    def _chat_response(
        self, text: str, delta: str | None, result: FusionResult | None, kwargs: dict[str, Any]
    ) -> ChatResponse:
        additional: dict[str, Any] = {}
        content = text
        if result is not None and kwargs.get("tools"):
            parsed = parse_tool_calls(result.text, self._tool_names(kwargs), kwargs.get("forced_tool"))
            specs = {t["function"]["name"]: t["function"] for t in kwargs["tools"] if "function" in t}
            if parsed.calls:
                additional["tool_calls"] = [
                    {
                        "id": call.id,
                        "type": "function",
                        "function": {
                            "name": call.name,
                            "arguments": json.dumps(
                                _unwrap_schema_echo(call.arguments, specs.get(call.name))
                            ),
                        },
                    }
                    for call in parsed.calls
                ]
                if delta is None:  # a stream's content stays the sum of its deltas
                    content = parsed.text
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
        dicts, tools, _, overrides = self._request(messages, kwargs)
        result = self.engine.generate(dicts, tools=tools, **overrides)
        return self._chat_response(result.text, None, result, kwargs)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        result = None
        async for segment in self._asegments(messages, kwargs):
            result = segment.result
        assert result is not None  # the engine's last segment always carries it
        return self._chat_response(result.text, None, result, kwargs)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        def gen() -> ChatResponseGen:
            text = ""
            for segment in self._segments(messages, kwargs):
                text += segment.text
                if segment.text or segment.result is not None:
                    yield self._chat_response(text, segment.text, segment.result, kwargs)

        return gen()

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        async def gen() -> ChatResponseAsyncGen:
            text = ""
            async for segment in self._asegments(messages, kwargs):
                text += segment.text
                if segment.text or segment.result is not None:
                    yield self._chat_response(text, segment.text, segment.result, kwargs)

        return gen()

    # -- completion ------------------------------------------------------------
    # The members are chat models: a prompt is one user turn, rendered by each
    # member's own template.

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        dicts, tools, _, overrides = self._request(
            [ChatMessage(role=MessageRole.USER, content=prompt)], kwargs
        )
        result = self.engine.generate(dicts, tools=tools, **overrides)
        return self._completion_response(result.text, None, result)

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        result = None
        async for segment in self._asegments([ChatMessage(role=MessageRole.USER, content=prompt)], kwargs):
            result = segment.result
        assert result is not None
        return self._completion_response(result.text, None, result)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        def gen() -> CompletionResponseGen:
            text = ""
            for segment in self._segments([ChatMessage(role=MessageRole.USER, content=prompt)], kwargs):
                text += segment.text
                if segment.text or segment.result is not None:
                    yield self._completion_response(text, segment.text, segment.result)

        return gen()

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        async def gen() -> CompletionResponseAsyncGen:
            text = ""
            async for segment in self._asegments(
                [ChatMessage(role=MessageRole.USER, content=prompt)], kwargs
            ):
                text += segment.text
                if segment.text or segment.result is not None:
                    yield self._completion_response(text, segment.text, segment.result)

        return gen()

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
        specs = [tool.metadata.to_openai_tool() for tool in tools]
        names = [spec["function"]["name"] for spec in specs]
        messages = list(chat_history or [])
        if isinstance(user_msg, str):
            user_msg = ChatMessage(role=MessageRole.USER, content=user_msg)
        if user_msg is not None:
            messages.append(user_msg)
        tool_choice = kwargs.pop("tool_choice", None)
        # There is no constrained decoding across members: a required tool is
        # enforced by the prompt, and a bare argument object then counts as its call.
        forced = None
        if isinstance(tool_choice, str) and tool_choice in names:
            forced = tool_choice
        elif isinstance(tool_choice, dict):
            forced = (tool_choice.get("function") or {}).get("name") or tool_choice.get("name")
        elif (tool_required or tool_choice in ("required", "any")) and len(names) == 1:
            forced = names[0]
        instruction = None
        if forced is not None:
            instruction = f"You must call the tool {forced!r} now."
        elif tool_required or tool_choice in ("required", "any"):
            instruction = "You must call one of the tools " + ", ".join(map(repr, names)) + " now."
        if instruction:
            instruction += (
                ' Answer only with the call: <tool_call>{"name": <tool name>, "arguments": '
                "<object of arguments>}</tool_call>"
            )
        return {
            "messages": messages,
            "tools": specs or None,
            "forced_tool": forced,
            "tool_instruction": instruction,
            **kwargs,
        }

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        calls = response.message.additional_kwargs.get("tool_calls") or []
        if not calls:
            if error_on_no_tool_call:
                raise ValueError(
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
            raise ValueError(f"unsupported message role {message.role!r}")
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


def _unwrap_schema_echo(arguments: dict[str, Any], spec: dict[str, Any] | None) -> dict[str, Any]:
    """Undo a small model's habit of nesting its arguments under the schema's "properties" key.

    ``{"properties": {"name": "Lisbon"}}`` is unwrapped only when the tool has no
    parameter called "properties", so a real argument of that name is kept.
    """
    params = ((spec or {}).get("parameters") or {}).get("properties") or {}
    inner = arguments.get("properties")
    if set(arguments) == {"properties"} and isinstance(inner, dict) and "properties" not in params:
        return inner
    return arguments


def _with_system_note(messages: list[dict[str, Any]], note: str) -> list[dict[str, Any]]:
    if messages and messages[0]["role"] == "system":
        first = {**messages[0], "content": f"{messages[0]['content']}\n\n{note}".strip()}
        return [first, *messages[1:]]
    return [{"role": "system", "content": note}, *messages]


def _run_blocking(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion from sync code, on a fresh loop in a helper thread."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=target, name="specfuse-llama-index-metadata", daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]

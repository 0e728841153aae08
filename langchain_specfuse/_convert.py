"""Pure conversions between LangChain objects and the core's plain data.

Nothing here calls a model or decides anything: LangChain messages become the
core's chat dicts (the Hugging Face chat-template shape), and the core's parsed
answer becomes LangChain tool calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    InvalidToolCall,
    SystemMessage,
    ToolCall,
    ToolMessage,
)
from langchain_core.messages.tool import invalid_tool_call, tool_call

from specfuse.errors import ConfigError
from specfuse.tool_calls import ParsedText

CoreMessage = dict[str, Any]

#: Content blocks that carry no text the members could read, but that are
#: redundant with other fields (tool_use mirrors AIMessage.tool_calls) or
#: private to one provider (reasoning traces): safe to drop.
_DROPPABLE_BLOCKS = frozenset({"tool_use", "tool_call", "tool_call_chunk", "thinking", "reasoning"})

_ROLE_BY_CHAT_ROLE = {"human": "user", "user": "user", "ai": "assistant", "assistant": "assistant"}


def _text_of(message: BaseMessage) -> str:
    """The message's text; refuse images, audio and files, which no member can read."""
    content = message.content
    if isinstance(content, str):
        return content
    texts: list[str] = []
    for block in content:
        if isinstance(block, str):
            texts.append(block)
            continue
        kind = block.get("type")
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind not in _DROPPABLE_BLOCKS:
            raise ConfigError(
                f"content block of type {kind!r} is not supported: specfuse members read text only"
            )
    return "".join(texts)


def to_core_messages(messages: Sequence[BaseMessage]) -> list[CoreMessage]:
    """LangChain messages -> the core's chat dicts (HF chat-template shape).

    An AIMessage's tool calls become `tool_calls` entries with `arguments` as a
    dict (what HF templates such as Qwen's run through `tojson`); a ToolMessage
    becomes a `tool` turn that keeps its `tool_call_id` and name.
    """
    out: list[CoreMessage] = []
    for message in messages:
        if isinstance(message, SystemMessage):
            out.append({"role": "system", "content": _text_of(message)})
        elif isinstance(message, HumanMessage):
            out.append({"role": "user", "content": _text_of(message)})
        elif isinstance(message, AIMessage):
            entry: CoreMessage = {"role": "assistant", "content": _text_of(message)}
            if message.tool_calls:
                entry["tool_calls"] = [
                    {
                        "type": "function",
                        "id": call.get("id"),
                        "function": {"name": call["name"], "arguments": call["args"]},
                    }
                    for call in message.tool_calls
                ]
            out.append(entry)
        elif isinstance(message, ToolMessage):
            entry = {"role": "tool", "content": _text_of(message), "tool_call_id": message.tool_call_id}
            if message.name:
                entry["name"] = message.name
            out.append(entry)
        elif isinstance(message, FunctionMessage):
            out.append({"role": "tool", "content": _text_of(message), "name": message.name})
        elif isinstance(message, ChatMessage):
            role = _ROLE_BY_CHAT_ROLE.get(message.role, message.role)
            out.append({"role": role, "content": _text_of(message)})
        else:
            raise ConfigError(f"unsupported message type {type(message).__name__}")
    return out


# -- the fused answer -> LangChain ---------------------------------------------------
# What counts as a call is decided by specfuse.tool_calls; this only maps its result.


@dataclass
class ParsedOutput:
    """The fused text split into the prose left for `content` and the tool calls found."""

    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    invalid_tool_calls: list[InvalidToolCall] = field(default_factory=list)


def to_langchain_output(parsed: ParsedText) -> ParsedOutput:
    """The core's parsed answer as LangChain tool calls."""
    return ParsedOutput(
        content=parsed.text,
        tool_calls=[tool_call(name=c.name, args=c.arguments, id=c.id) for c in parsed.calls],
        invalid_tool_calls=[
            invalid_tool_call(name=c.name, args=c.raw, id=c.id, error=c.error) for c in parsed.invalid
        ],
    )

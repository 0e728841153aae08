"""Pure conversions between LangChain objects and the core's plain data.

Nothing here calls a model: LangChain messages become the core's chat dicts
(the Hugging Face chat-template shape), and the fused answer text becomes
LangChain tool calls. Keeping these pure lets them be unit-tested exhaustively.
"""

from __future__ import annotations

import json
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

from specfuse.tool_calls import FENCED_JSON, TAGGED_CALL, decode_arguments, json_values, new_call_id

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
            raise ValueError(
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
            raise ValueError(f"unsupported message type {type(message).__name__}")
    return out


# -- tool-call parsing --------------------------------------------------------------
# The scanning pieces come from specfuse.tool_calls. Two LangChain-specific rules
# keep this parser separate: a forced tool also claims a call written under a
# wrong name, and a bare arguments object counts only when it is the whole answer.


@dataclass
class ParsedOutput:
    """The fused text split into the prose left for `content` and the tool calls found."""

    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    invalid_tool_calls: list[InvalidToolCall] = field(default_factory=list)


def _as_call(obj: Any, tool_names: Sequence[str], forced: str | None) -> tuple[str, Any] | None:
    """(name, arguments) when obj looks like a call of a known tool, else None.

    Accepts the Hermes/Qwen shape {"name", "arguments"}, the variants small models
    write ("parameters", "args", OpenAI's {"function": {...}}), and, when a single
    tool is forced, a bare object of that tool's arguments.
    """
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):
        obj = obj["function"]
    name = obj.get("name")
    if isinstance(name, str) and (name in tool_names or not tool_names):
        for key in ("arguments", "parameters", "args", "input"):
            if key in obj:
                return name, obj[key]
        # A call with no arguments key: the remaining keys are the arguments.
        return name, {k: v for k, v in obj.items() if k != "name"}
    if forced is not None and name is None:
        return forced, obj
    if forced is not None and isinstance(obj.get("arguments"), dict):
        # The caller required this one tool; a call-shaped object under another
        # name (small models put a "name" argument there) carries its arguments.
        return forced, obj["arguments"]
    return None


def parse_tool_calls(text: str, tool_names: Sequence[str], forced: str | None = None) -> ParsedOutput:
    """Find tool calls in the fused answer.

    Tried in order, first match wins: `<tool_call>...</tool_call>` tags (Qwen /
    Hermes; an unclosed final tag counts, since max_tokens may cut it), then
    ```json fences, then bare JSON objects in the prose. Tagged calls that do not
    parse, or name an unknown tool, become invalid tool calls; untagged JSON that
    is not a call stays prose. `forced` is the single tool the caller required
    (tool_choice naming it, or "any" with one tool bound).
    """
    calls: list[ToolCall] = []
    invalid: list[InvalidToolCall] = []

    def add(name: str, raw_args: Any, raw_text: str) -> None:
        try:
            args = decode_arguments(raw_args)
        except (ValueError, json.JSONDecodeError) as exc:
            invalid.append(invalid_tool_call(name=name, args=raw_text, id=new_call_id(), error=str(exc)))
            return
        # Small models repeat a call verbatim; running the same call twice in one turn never helps.
        if any(c["name"] == name and c["args"] == args for c in calls):
            return
        calls.append(tool_call(name=name, args=args, id=new_call_id()))

    tagged = list(TAGGED_CALL.finditer(text))
    if tagged:
        for match in tagged:
            body = match.group(1).strip()
            fenced = FENCED_JSON.search(body)
            if fenced:
                body = fenced.group(1).strip()
            try:
                obj = json.loads(body)
            except json.JSONDecodeError as exc:
                invalid.append(
                    invalid_tool_call(name=None, args=body, id=new_call_id(), error=f"not JSON: {exc}")
                )
                continue
            call = _as_call(obj, tool_names, forced)
            if call is None:
                name = obj.get("name") if isinstance(obj, dict) else None
                error = f"unknown tool {name!r}" if name else "no tool name"
                invalid.append(invalid_tool_call(name=name, args=body, id=new_call_id(), error=error))
                continue
            add(call[0], call[1], body)
        content = TAGGED_CALL.sub("", text)
        return ParsedOutput(content.strip(), calls, invalid)

    # Untagged JSON: a bare object counts as the forced tool's arguments only
    # when it is the whole answer, never when it is nested in prose or in a
    # truncated call (whose inner schema-like objects are not arguments).
    spans: list[tuple[int, int]] = []
    for match in FENCED_JSON.finditer(text):
        body = match.group(1)
        for start, end, obj in json_values(body):
            whole = body[start:end].strip() == body.strip()
            for item in obj if isinstance(obj, list) else [obj]:
                call = _as_call(item, tool_names, forced if whole else None)
                if call is not None:
                    add(call[0], call[1], json.dumps(item, ensure_ascii=False))
                    spans.append(match.span())
    if not calls and not invalid:
        for start, end, obj in json_values(text):
            whole = text[start:end].strip() == text.strip()
            for item in obj if isinstance(obj, list) else [obj]:
                call = _as_call(item, tool_names, forced if whole else None)
                if call is not None:
                    add(call[0], call[1], json.dumps(item, ensure_ascii=False))
                    spans.append((start, end))
    content = text
    for start, end in sorted(set(spans), reverse=True):
        content = content[:start] + content[end:]
    return ParsedOutput(content.strip() if spans else text, calls, invalid)


def extract_json(text: str) -> str:
    """The JSON value in an answer that was asked to be JSON only.

    Small models wrap it in fences or prose; hand the parser the value itself so
    a usable answer is not rejected for its wrapping. Text without any JSON is
    returned as is, so the parser's error names what the model wrote.
    """
    fenced = FENCED_JSON.search(text)
    body = fenced.group(1) if fenced else text
    objects = json_values(body)
    if objects:
        start, end, _ = objects[0]
        return body[start:end]
    return text


_PLACEHOLDERS: dict[str, Any] = {"integer": 1, "number": 1.0, "boolean": True, "array": [], "object": {}}


def tool_choice_instruction(tool_choice: str | None, tools: Sequence[dict[str, Any]]) -> str | None:
    """The system instruction that enforces tool_choice through the prompt.

    Small models follow a concrete example far better than a description, so
    the instruction shows the exact call shape with the tool's own argument names.
    """
    names = [t["function"]["name"] for t in tools]
    if tool_choice in (None, "auto", "none") or not names:
        return None
    if tool_choice in ("any", "required"):
        chosen = list(tools)
    else:
        chosen = [t for t in tools if t["function"]["name"] == tool_choice]
    examples = []
    for spec in chosen:
        params = (spec["function"].get("parameters") or {}).get("properties") or {}
        # Placeholders are valid JSON of the right type: a model that copies the
        # example verbatim (tiny ones do) still makes a well-formed call.
        args = {p: _PLACEHOLDERS.get(str((schema or {}).get("type")), "...") for p, schema in params.items()}
        call = {"name": spec["function"]["name"], "arguments": args}
        examples.append(f"<tool_call>{json.dumps(call, ensure_ascii=False)}</tool_call>")
    which = "the tool" if len(chosen) == 1 else "one of the tools"
    return f"You must answer by calling {which} now, with nothing else, in this form:\n" + "\n".join(examples)


def json_instruction(schema: dict[str, Any] | None) -> str:
    """The system instruction for json_mode / json_schema output."""
    if schema is None:
        return "Answer only with one valid JSON object, and no other text."
    return (
        "Answer only with one valid JSON object that matches this JSON schema, and no other text:\n"
        + json.dumps(schema, ensure_ascii=False)
    )


def with_system_instruction(messages: list[CoreMessage], instruction: str) -> list[CoreMessage]:
    """Add an instruction to the leading system message (or a new one).

    Merged rather than added as a second system turn: several templates (Qwen's
    among them) only treat the first message as the system prompt.
    """
    if messages and messages[0]["role"] == "system":
        first = {**messages[0], "content": f"{messages[0]['content']}\n\n{instruction}".strip()}
        return [first, *messages[1:]]
    return [{"role": "system", "content": instruction}, *messages]

"""Tool calls in fused text, framework-free.

The members answer in text; a tool call is whatever shape the winning drafts
wrote. Tool-capable chat templates (Qwen, Hermes) ask for
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``; small models also
write the same object in a ```json fence or bare in their prose, and some
tokenizers drop the tags when decoding. Adapters (LangChain, LlamaIndex) turn
the result into their own message types.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "FENCED_JSON",
    "TAGGED_CALL",
    "InvalidToolCall",
    "ParsedText",
    "ParsedToolCall",
    "decode_arguments",
    "json_values",
    "new_call_id",
    "parse_tool_calls",
]

#: A Hermes/Qwen tool call; an unclosed last tag counts, since max_tokens may cut it.
TAGGED_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
#: A ```json fence (or an unclosed one at the end of the text).
FENCED_JSON = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)(?:```|$)", re.DOTALL)
_ARGUMENT_KEYS = ("arguments", "parameters", "args", "input")


@dataclass(frozen=True)
class ParsedToolCall:
    name: str
    arguments: dict[str, Any]
    id: str


@dataclass(frozen=True)
class InvalidToolCall:
    """Something written as a tool call that cannot be run: kept so callers can report it."""

    name: str | None
    raw: str
    error: str
    id: str


@dataclass
class ParsedText:
    """The fused text split into the calls found and the prose left over.

    Unpacks as ``calls, text = parse_tool_calls(...)``.
    """

    calls: list[ParsedToolCall]
    text: str
    invalid: list[InvalidToolCall] = field(default_factory=list)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter((self.calls, self.text))


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_tool_calls(text: str, tool_names: Sequence[str] = (), forced: str | None = None) -> ParsedText:
    """Find tool calls in text.

    Tried in order, first kind found wins: ``<tool_call>`` tags (an unclosed last
    tag counts, since max_tokens may cut it), then ```json fences, then bare JSON
    objects. ``tool_names`` restricts calls to the tools offered (empty: any
    name); tagged content that does not parse or names an unknown tool becomes an
    invalid call, while untagged JSON that is not a call stays prose, so a JSON
    answer is never mistaken for a call. ``forced`` is the single tool the caller
    required: a bare object of its arguments then counts as its call.
    """
    calls: list[ParsedToolCall] = []
    invalid: list[InvalidToolCall] = []

    def add(name: str, raw_args: Any, raw_text: str) -> None:
        try:
            args = decode_arguments(raw_args)
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            invalid.append(InvalidToolCall(name, raw_text, str(exc), new_call_id()))
            return
        calls.append(ParsedToolCall(name, args, new_call_id()))

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
                invalid.append(InvalidToolCall(None, body, f"not JSON: {exc}", new_call_id()))
                continue
            for item in obj if isinstance(obj, list) else [obj]:
                call = _as_call(item, tool_names, forced)
                if call is None:
                    name = item.get("name") if isinstance(item, dict) else None
                    error = f"unknown tool {name!r}" if name else "no tool name"
                    invalid.append(InvalidToolCall(name, body, error, new_call_id()))
                    continue
                add(call[0], call[1], body)
        return ParsedText(calls, TAGGED_CALL.sub("", text).strip(), invalid)

    spans: list[tuple[int, int]] = []
    for match in FENCED_JSON.finditer(text):
        for _, _, obj in json_values(match.group(1)):
            for item in obj if isinstance(obj, list) else [obj]:
                call = _as_call(item, tool_names, forced)
                if call is not None:
                    add(call[0], call[1], json.dumps(item, ensure_ascii=False))
                    spans.append(match.span())
    if not calls and not invalid:
        for start, end, obj in json_values(text):
            for item in obj if isinstance(obj, list) else [obj]:
                call = _as_call(item, tool_names, forced)
                if call is not None:
                    add(call[0], call[1], json.dumps(item, ensure_ascii=False))
                    spans.append((start, end))
    rest = text
    for start, end in sorted(set(spans), reverse=True):
        rest = rest[:start] + rest[end:]
    return ParsedText(calls, rest.strip() if spans else text, invalid)


def json_values(text: str) -> list[tuple[int, int, Any]]:
    """Every top-level JSON object or array in text, with its span."""
    decoder = json.JSONDecoder()
    found: list[tuple[int, int, Any]] = []
    i = 0
    while i < len(text):
        if text[i] in "{[":
            try:
                value, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError:
                i += 1
                continue
            found.append((i, end, value))
            i = end
        else:
            i += 1
    return found


def _as_call(obj: Any, tool_names: Sequence[str], forced: str | None) -> tuple[str, Any] | None:
    """(name, raw arguments) when obj looks like a call of an offered tool, else None.

    Accepts the Hermes/Qwen shape {"name", "arguments"}, the variants small
    models write ("parameters", "args", "input", OpenAI's {"function": {...}}),
    and, when one tool is forced, a bare object of its arguments.
    """
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict):
        obj = obj["function"]
    name = obj.get("name")
    if isinstance(name, str) and (not tool_names or name in tool_names):
        for key in _ARGUMENT_KEYS:
            if key in obj:
                return name, obj[key]
        # Without an arguments key, the other keys are the arguments.
        return name, {k: v for k, v in obj.items() if k != "name"}
    if forced is not None and name is None:
        return forced, obj
    return None


def decode_arguments(raw: Any) -> dict[str, Any]:
    """Arguments as a dict; models often send them as a JSON string (the OpenAI wire shape)."""
    if isinstance(raw, str):
        raw = json.loads(raw) if raw.strip() else {}
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"tool arguments must be a JSON object, got {type(raw).__name__}")
    return raw

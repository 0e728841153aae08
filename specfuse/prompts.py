"""Chat messages -> each member's prompt text.

Members may use different chat templates and tokenizers; they exchange only
text. Each member renders the conversation with its own template (with the
generation prompt added), and the fused answer is appended to that text.

Two formats:

* :class:`ChatFormat` uses the model's own chat template (through its
  backend: the local tokenizer, or the server's template).
* :class:`PlainFormat` is a completion template for base models that have no
  chat template (e.g. Gemma 3 270M base).

Each format also knows its end-of-turn string: a finished candidate is scored
with it appended, so that "stop here" competes fairly with "go on".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

from specfuse.backends.base import Backend
from specfuse.errors import ConfigError

Message = dict[str, Any]

# A string no tokenizer merges with its neighbours in surprising ways, used to
# find where an assistant turn's content ends in a rendered template.
_SENTINEL = "\u2063SPECFUSE_SENTINEL\u2063"


class PromptFormat(Protocol):
    """Renders messages for one member and knows how its turns end."""

    end_of_turn: str
    #: Stop sequences the format implies (a plain template's next "User:").
    stops: tuple[str, ...]

    async def render(self, messages: Sequence[Message], tools: Sequence[dict[str, Any]] | None) -> str: ...


class FormattedPrompt(str):
    """A prompt already written in the members' own format, sent to each member as is.

    No chat template, generation prompt or special token is added: the text is
    exactly the context every member continues (LlamaIndex's ``formatted=True``).
    Each member reads the same text, so a prompt formatted for one member's
    template reaches the others as plain text; use messages to have each member
    render its own template. Tools need those templates and are refused with it.
    """

    __slots__ = ()


def message_text(message: Message) -> str:
    """The text of a message's content, refusing non-text parts."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if isinstance(part, str):
            parts.append(part)
        elif isinstance(part, dict) and part.get("type") == "text":
            parts.append(str(part.get("text", "")))
        else:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ConfigError(
                f"message content part of type {kind!r} is not supported: specfuse members "
                "read text only; pass text content"
            )
    return "".join(parts)


def check_messages(messages: Sequence[Message]) -> list[Message]:
    """Validate a conversation and normalise content to plain text."""
    if not messages:
        raise ConfigError("no messages: pass at least one message (e.g. a user prompt)")
    normalised = []
    for i, message in enumerate(messages):
        role = message.get("role")
        if role not in {"system", "user", "assistant", "tool"}:
            raise ConfigError(f"message {i} has role {role!r}; use 'system', 'user', 'assistant' or 'tool'")
        normalised.append({**message, "content": message_text(message)})
    last_user = next((m for m in reversed(normalised) if m["role"] == "user"), None)
    if last_user is not None and not last_user["content"].strip():
        raise ConfigError("the prompt is empty (the last user message has no text); pass a question")
    if not any(m["content"].strip() or m.get("tool_calls") for m in normalised):
        raise ConfigError("the prompt is empty (no message has any text); pass a question")
    return normalised


@dataclass
class ChatFormat:
    """The model's own chat template, rendered by its backend."""

    backend: Backend
    end_of_turn: str
    stops: tuple[str, ...] = ()

    @classmethod
    async def probe(cls, backend: Backend) -> ChatFormat | None:
        """Build from the backend's template, or None when it has no chat template."""
        conversation = [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": _SENTINEL},
        ]
        rendered = await backend.render_chat(conversation, add_generation_prompt=False)
        if rendered is None:
            return None
        _, found, after = rendered.partition(_SENTINEL)
        end_of_turn = after.strip() if found else ""
        if not end_of_turn:
            # TGI >= 3.0 cuts a rendering right after a final assistant message (it
            # continues that message), so nothing follows it: ask for a following user
            # turn instead and keep the first marker that ends the assistant's turn.
            end_of_turn = await _end_of_turn_before_next_turn(backend)
        if not end_of_turn:
            raise ConfigError(
                f"cannot find the end-of-turn marker of the chat template of {backend.endpoint}; "
                "set template='plain' for this member"
            )
        return cls(backend=backend, end_of_turn=end_of_turn)

    async def render(self, messages: Sequence[Message], tools: Sequence[dict[str, Any]] | None) -> str:
        rendered = await self.backend.render_chat(messages, tools, add_generation_prompt=True)
        if rendered is None:  # the backend lost its template between calls: a bug, not user input
            raise RuntimeError(f"{self.backend.endpoint} stopped providing a chat template")
        if tools and not any(_tool_name(t) in rendered for t in tools):
            # Some templates (SmolLM2's) silently drop `tools`: tell the model in
            # a system message instead, so every member sees the same tools.
            rendered = await self.backend.render_chat(
                with_system_note(messages, tools_instruction(tools)), None, add_generation_prompt=True
            )
            assert rendered is not None
        return rendered


@dataclass
class PlainFormat:
    """A completion template for base models: `Role: text` turns, then `Assistant:`.

    A base model ends its turn by starting the next one, so "\nUser:" (or any
    other turn marker) is a stop sequence, and "\nUser:" is also the end-of-turn
    string scored after a finished candidate: that is how its drafts end, while
    the model's end-of-sequence token after a chat turn is an unlikely (about
    -5 nats) way to say "stop here".
    """

    bos: str = ""
    eos: str = ""

    _ROLE_NAMES: ClassVar[dict[str, str]] = {
        "system": "System",
        "user": "User",
        "assistant": "Assistant",
        "tool": "Tool",
    }

    @property
    def stops(self) -> tuple[str, ...]:
        # Any new turn marker ends the answer: base models like to open another
        # "Assistant:" turn right away, which would otherwise repeat forever.
        return ("\nUser:", "\nAssistant:", "\nSystem:")

    @property
    def end_of_turn(self) -> str:
        return "\nUser:"

    async def render(self, messages: Sequence[Message], tools: Sequence[dict[str, Any]] | None) -> str:
        lines = []
        if tools:
            lines.append("System: " + tools_instruction(tools))
        for message in messages:
            lines.append(f"{self._ROLE_NAMES[message['role']]}: {message_text(message).strip()}")
        return self.bos + "\n".join(lines) + "\nAssistant:"


#: A turn marker: a special-token-like tag (<|im_end|>, <end_of_turn>, <|eot_id|>) or </s>.
_TURN_MARKER = re.compile(r"^\s*(<[^<>\s]{1,40}>|</s>)")


async def _end_of_turn_before_next_turn(backend: Backend) -> str:
    """The marker between an assistant message and the user turn after it, or ''."""
    after_user = "\u2063SPECFUSE_NEXT\u2063"
    conversation = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": _SENTINEL},
        {"role": "user", "content": after_user},
    ]
    rendered = await backend.render_chat(conversation, add_generation_prompt=True)
    if rendered is None or _SENTINEL not in rendered:
        return ""
    between = rendered.split(_SENTINEL, 1)[1].split(after_user, 1)[0]
    marker = _TURN_MARKER.match(between)
    return marker.group(1) if marker else ""


def _tool_name(tool: dict[str, Any]) -> str:
    function = tool.get("function", tool)
    return str(function.get("name", ""))


def with_system_note(messages: Sequence[Message], note: str) -> list[Message]:
    """messages with note added to the system message (one is created if needed)."""
    out = [dict(m) for m in messages]
    if out and out[0].get("role") == "system":
        out[0]["content"] = f"{message_text(out[0])}\n\n{note}".strip()
    else:
        out.insert(0, {"role": "system", "content": note})
    return out


def tools_instruction(tools: Sequence[dict[str, Any]]) -> str:
    """A generic tool prompt for templates without tool support."""
    import json

    specs = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "You can call these tools:\n"
        f"{specs}\n"
        "To call a tool, answer only with a JSON object "
        '{"name": <tool name>, "arguments": <object of arguments>} inside <tool_call></tool_call> tags.'
    )


async def end_of_turn_tokens(backend: Backend, fmt: PromptFormat) -> int:
    """Tokens the format's end-of-turn marker takes after some text, in the member's tokenizer.

    A finished candidate is scored with this marker appended, and the marker
    counts as one unit (`scoring.candidate_score`). Measured as a difference
    so that a BOS token a tokenizer adds cancels out.
    """
    if not fmt.end_of_turn:
        return 0
    base = "Hi"
    return max(1, await backend.count_tokens(base + fmt.end_of_turn) - await backend.count_tokens(base))

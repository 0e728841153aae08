"""Tool calls and structured output over fused text: the one policy, framework-free.

The members answer in text; there is no constrained decoding across members.
So a required tool or a JSON answer is asked for in the system prompt, and a
tool call is whatever shape the winning drafts wrote. Tool-capable chat
templates (Qwen, Hermes) ask for
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``; small models also
write the same object in a ```json fence or bare in their prose, and some
tokenizers drop the tags when decoding.

:class:`ToolPlan` is everything a request decides about tools and JSON: which
tools are offered, which one is forced, the instruction added to the prompt,
the extra stop sequence, and how the answer is read back. The LangChain and
LlamaIndex adapters build one per call and only map its results to their own
message types, so the same prompt with the same tools gives the same calls
through either framework.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from specfuse.errors import ConfigError

__all__ = [
    "DEFAULT_RULES",
    "FENCED_JSON",
    "TAGGED_CALL",
    "TOOL_RESPONSE_STOP",
    "InvalidToolCall",
    "ParseRules",
    "ParsedText",
    "ParsedToolCall",
    "ToolPlan",
    "decode_arguments",
    "extract_json",
    "json_instruction",
    "json_values",
    "new_call_id",
    "normalize_tool_choice",
    "parse_tool_calls",
    "tool_choice_instruction",
    "unwrap_schema_echo",
    "with_system_instruction",
]

#: A Hermes/Qwen tool call; an unclosed last tag counts, since max_tokens may cut it.
TAGGED_CALL = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)
#: A ```json fence (or an unclosed one at the end of the text).
FENCED_JSON = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)(?:```|$)", re.DOTALL)
#: Where a tool-capable template puts a tool's result. The result comes from the
#: tool; a model that starts writing one itself (small ones mimic the template) is done.
TOOL_RESPONSE_STOP = "<tool_response>"
_ARGUMENT_KEYS = ("arguments", "parameters", "args", "input")
#: tool_choice values that name no tool.
_CHOICE_WORDS = ("auto", "none", "any", "required")


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

    def __iter__(self) -> Iterator[Any]:
        return iter((self.calls, self.text))


@dataclass(frozen=True)
class ParseRules:
    """The parsing rules that go beyond reading the call shapes; all on by default.

    Each exists because small models do the thing it undoes.
    """

    #: Small models repeat a call verbatim; running the same call twice in one turn never helps.
    drop_repeats: bool = True
    #: With a forced tool, a call-shaped object under another name carries the
    #: forced tool's arguments (small models put a "name" argument in the name slot).
    forced_claims_misnamed: bool = True
    #: A bare object counts as the forced tool's arguments only when it is the
    #: whole answer (or the whole fence), never nested in prose or in a cut call,
    #: whose inner schema-like objects are not arguments.
    bare_arguments_whole_only: bool = True
    #: ``{"properties": {...}}`` as the only argument is the schema echoed back:
    #: unwrap it, unless the tool has a parameter called "properties".
    unwrap_schema_echo: bool = True


DEFAULT_RULES = ParseRules()


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_tool_calls(
    text: str,
    tool_names: Sequence[str] = (),
    forced: str | None = None,
    *,
    rules: ParseRules = DEFAULT_RULES,
    parameters: Mapping[str, Mapping[str, Any]] | None = None,
) -> ParsedText:
    """Find tool calls in text.

    Tried in order, first kind found wins: ``<tool_call>`` tags (an unclosed last
    tag counts, since max_tokens may cut it), then ```json fences, then bare JSON
    objects. ``tool_names`` restricts calls to the tools offered (empty: any
    name); tagged content that does not parse or names an unknown tool becomes an
    invalid call, while untagged JSON that is not a call stays prose, so a JSON
    answer is never mistaken for a call. ``forced`` is the single tool the caller
    required: a bare object of its arguments then counts as its call.
    ``parameters`` maps tool names to their JSON-schema parameters, for
    schema-echo unwrapping.
    """
    calls: list[ParsedToolCall] = []
    invalid: list[InvalidToolCall] = []

    def add(name: str, raw_args: Any, raw_text: str) -> None:
        try:
            args = decode_arguments(raw_args)
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            invalid.append(InvalidToolCall(name, raw_text, str(exc), new_call_id()))
            return
        if rules.unwrap_schema_echo:
            args = unwrap_schema_echo(args, (parameters or {}).get(name))
        if rules.drop_repeats and any(c.name == name and c.arguments == args for c in calls):
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
                call = _as_call(item, tool_names, forced, rules)
                if call is None:
                    name = item.get("name") if isinstance(item, dict) else None
                    error = f"unknown tool {name!r}" if name else "no tool name"
                    invalid.append(InvalidToolCall(name, body, error, new_call_id()))
                    continue
                add(call[0], call[1], body)
        return ParsedText(calls, TAGGED_CALL.sub("", text).strip(), invalid)

    spans: list[tuple[int, int]] = []

    def scan(body: str, span: tuple[int, int] | None) -> None:
        for start, end, obj in json_values(body):
            whole = body[start:end].strip() == body.strip()
            bare_ok = forced if whole or not rules.bare_arguments_whole_only else None
            for item in obj if isinstance(obj, list) else [obj]:
                call = _as_call(item, tool_names, bare_ok, rules)
                if call is not None:
                    add(call[0], call[1], json.dumps(item, ensure_ascii=False))
                    spans.append(span or (start, end))

    for match in FENCED_JSON.finditer(text):
        scan(match.group(1), match.span())
    if not calls and not invalid:
        scan(text, None)
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


def _as_call(
    obj: Any, tool_names: Sequence[str], forced: str | None, rules: ParseRules
) -> tuple[str, Any] | None:
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
    if forced is not None and rules.forced_claims_misnamed and isinstance(obj.get("arguments"), dict):
        return forced, obj["arguments"]
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


def unwrap_schema_echo(arguments: dict[str, Any], parameters: Mapping[str, Any] | None) -> dict[str, Any]:
    """Undo a small model's habit of nesting its arguments under the schema's "properties" key.

    ``{"properties": {"name": "Lisbon"}}`` is unwrapped only when the tool has no
    parameter called "properties", so a real argument of that name is kept.
    """
    declared = (parameters or {}).get("properties") or {}
    inner = arguments.get("properties")
    if set(arguments) == {"properties"} and isinstance(inner, dict) and "properties" not in declared:
        return inner
    return arguments


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


# -- what goes into the prompt ---------------------------------------------------------


def _name_of(tool: Mapping[str, Any]) -> str:
    return str(tool["function"]["name"])


def normalize_tool_choice(tool_choice: Any, names: Sequence[str]) -> str | None:
    """tool_choice as None, "auto", "none", "any" or one tool's name.

    Accepts what LangChain and LlamaIndex callers pass: True or "required" (=
    "any"), a name, or OpenAI's ``{"type": "function", "function": {"name": ...}}``.
    """
    if tool_choice is None or tool_choice is False:
        return None
    if tool_choice is True or tool_choice == "required":
        return "any"
    if isinstance(tool_choice, Mapping):
        function = tool_choice.get("function")
        tool_choice = (function.get("name") if isinstance(function, Mapping) else None) or tool_choice.get(
            "name"
        )
    if not isinstance(tool_choice, str):
        raise ConfigError(
            f"tool_choice {tool_choice!r} is not understood; "
            "use 'auto', 'none', 'any', 'required' or a tool name"
        )
    if tool_choice not in _CHOICE_WORDS and tool_choice not in names:
        raise ConfigError(f"tool_choice {tool_choice!r} is not among the tools offered {list(names)}")
    return tool_choice


#: Valid JSON of each schema type: a model that copies the example verbatim
#: (tiny ones do) still makes a well-formed call.
_PLACEHOLDERS: dict[str, Any] = {"integer": 1, "number": 1.0, "boolean": True, "array": [], "object": {}}


def placeholder(schema: Any, defs: Mapping[str, Any], depth: int = 0) -> Any:
    """A valid JSON value of a parameter's schema, nested objects spelled out.

    A nested model's parameter is a `$ref` (or an `allOf`/`anyOf` around one) with
    no `type`; shown as "..." it taught the members to write a string there (an
    `address` object came back as "Lisboa, Portugal"). So references are resolved
    and an object shows its own properties, down to a few levels.
    """
    if not isinstance(schema, Mapping) or depth > 4:
        return "..."
    ref = schema.get("$ref")
    if isinstance(ref, str):
        return placeholder(defs.get(ref.rsplit("/", 1)[-1]), defs, depth + 1)
    if schema.get("enum"):
        return schema["enum"][0]
    for key in ("allOf", "anyOf", "oneOf"):
        options = [o for o in schema.get(key) or [] if isinstance(o, Mapping) and o.get("type") != "null"]
        if options:
            return placeholder(options[0], defs, depth + 1)
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    if kind == "object" and isinstance(schema.get("properties"), Mapping):
        return {name: placeholder(sub, defs, depth + 1) for name, sub in schema["properties"].items()}
    if kind == "array" and isinstance(schema.get("items"), Mapping):
        return [placeholder(schema["items"], defs, depth + 1)]
    return _PLACEHOLDERS.get(str(kind), "...")


def tool_choice_instruction(tool_choice: Any, tools: Sequence[Mapping[str, Any]]) -> str | None:
    """The system instruction that enforces tool_choice through the prompt.

    Small models follow a concrete example far better than a description, so
    the instruction shows the exact call shape with the tool's own argument names.
    """
    names = [_name_of(t) for t in tools]
    choice = normalize_tool_choice(tool_choice, names)
    if choice in (None, "auto", "none") or not names:
        return None
    chosen = list(tools) if choice == "any" else [t for t in tools if _name_of(t) == choice]
    examples = []
    for spec in chosen:
        parameters = spec["function"].get("parameters") or {}
        params = parameters.get("properties") or {}
        defs = {**(parameters.get("definitions") or {}), **(parameters.get("$defs") or {})}
        args = {p: placeholder(schema, defs) for p, schema in params.items()}
        call = {"name": _name_of(spec), "arguments": args}
        examples.append(f"<tool_call>{json.dumps(call, ensure_ascii=False)}</tool_call>")
    which = "the tool" if len(chosen) == 1 else "one of the tools"
    return f"You must answer by calling {which} now, with nothing else, in this form:\n" + "\n".join(examples)


def json_instruction(schema: Mapping[str, Any] | None) -> str:
    """The system instruction for JSON output, with or without a schema."""
    if schema is None:
        return "Answer only with one valid JSON object, and no other text."
    return (
        "Answer only with one valid JSON object that matches this JSON schema, and no other text:\n"
        + json.dumps(schema, ensure_ascii=False)
    )


def with_system_instruction(messages: Sequence[dict[str, Any]], instruction: str) -> list[dict[str, Any]]:
    """Add an instruction to the leading system message (or a new one).

    Merged rather than added as a second system turn: several templates (Qwen's
    among them) only treat the first message as the system prompt.
    """
    if messages and messages[0]["role"] == "system":
        first = {**messages[0], "content": f"{messages[0]['content']}\n\n{instruction}".strip()}
        return [first, *messages[1:]]
    return [{"role": "system", "content": instruction}, *messages]


# -- one request -------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolPlan:
    """What one request offers (tools, a JSON answer) and how its answer is read.

    >>> plan = ToolPlan.build(tools, tool_choice="get_weather")
    >>> result = engine.generate(plan.messages(messages), tools=plan.tools, **plan.overrides(settings))
    >>> parsed = plan.parse(result.text)
    """

    #: OpenAI-style function tools handed to the members; None when none are offered.
    tools: list[dict[str, Any]] | None = None
    #: The one tool the answer must call, when the choice leaves exactly one.
    forced: str | None = None
    #: Added to the leading system message; None when nothing must be enforced.
    instruction: str | None = None
    #: The answer was asked to be JSON only (and no tools are offered).
    json_output: bool = False
    rules: ParseRules = DEFAULT_RULES

    @classmethod
    def build(
        cls,
        tools: Sequence[Mapping[str, Any]] | None = None,
        tool_choice: Any = None,
        *,
        response_format: Mapping[str, Any] | None = None,
        rules: ParseRules = DEFAULT_RULES,
    ) -> ToolPlan:
        """The plan for tools and a tool_choice, and/or a response_format.

        ``response_format`` is ``{"type": "json_object" | "json_schema", "schema":
        <JSON schema or None>}``. tool_choice "none" hides the tools; "any" (or
        "required", True) with one tool, or a tool's name, forces that tool.
        """
        specs = [dict(t) for t in tools or []]
        for spec in specs:
            if spec.get("type", "function") != "function" or not isinstance(spec.get("function"), Mapping):
                raise ConfigError(
                    f"tool {spec!r} is not an OpenAI function tool: expected "
                    '{"type": "function", "function": {"name": ..., "parameters": {...}}}'
                )
        names = [_name_of(t) for t in specs]
        choice = normalize_tool_choice(tool_choice, names)
        if choice == "none":
            specs, names = [], []
        forced = None
        if choice == "any" and len(names) == 1:
            forced = names[0]
        elif choice is not None and choice in names:
            forced = choice
        instructions = [tool_choice_instruction(choice, specs)] if specs else []
        if response_format is not None:
            instructions.append(json_instruction(response_format.get("schema")))
        text = "\n\n".join(i for i in instructions if i)
        return cls(
            tools=specs or None,
            forced=forced,
            instruction=text or None,
            json_output=response_format is not None,
            rules=rules,
        )

    @property
    def tool_names(self) -> list[str]:
        return [_name_of(t) for t in self.tools or []]

    def messages(self, messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """The request's chat messages with the plan's instruction merged in."""
        if self.instruction is None:
            return list(messages)
        return with_system_instruction(messages, self.instruction)

    def overrides(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """Fusion overrides with the plan's stop sequence added when tools are offered."""
        out = dict(overrides)
        if self.tools:
            out["stop"] = list(dict.fromkeys([*(out.get("stop") or []), TOOL_RESPONSE_STOP]))
        return out

    def parse(self, text: str) -> ParsedText:
        """The answer read back: tool calls when tools were offered, the JSON value
        when JSON was asked for, else the text as it is."""
        if self.tools:
            parameters = {_name_of(t): t["function"].get("parameters") or {} for t in self.tools}
            return parse_tool_calls(
                text, self.tool_names, self.forced, rules=self.rules, parameters=parameters
            )
        if self.json_output:
            return ParsedText([], extract_json(text))
        return ParsedText([], text)

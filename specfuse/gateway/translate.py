"""OpenAI requests onto the core's API, and the core's results back into OpenAI shapes.

Like the LangChain adapter, this holds no algorithm: messages become the core's
chat dicts, tools and ``response_format`` become one
:class:`specfuse.tool_calls.ToolPlan` (the policy every adapter shares), and
sampling fields become the engine's per-request overrides.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from specfuse.config import request_overrides
from specfuse.errors import ConfigError
from specfuse.gateway.errors import GatewayError, from_core
from specfuse.gateway.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    FunctionCall,
    SamplingRequest,
    ToolCall,
    UsageInfo,
)
from specfuse.prompts import FormattedPrompt, check_messages
from specfuse.request import FusionResult
from specfuse.tool_calls import ParsedText, ToolPlan, decode_arguments

#: Core finish reasons OpenAI has no word for; the original stays in `specfuse_finish_reason`.
_FINISH = {"stop": "stop", "length": "length", "deadline": "length"}


@dataclass
class CoreCall:
    """One request, ready for ``engine.astream(prompt, tools=plan.tools, **overrides)``."""

    prompt: list[dict[str, Any]] | FormattedPrompt
    plan: ToolPlan
    overrides: dict[str, Any]
    trace: bool

    @property
    def parsed_output(self) -> bool:
        """Whether the answer is read back whole (tool calls or a JSON value) before it is sent."""
        return bool(self.plan.tools) or self.plan.json_output


def _overrides(request: SamplingRequest, max_tokens: int | None) -> dict[str, Any]:
    standard = {
        "temperature": request.temperature,
        "top_p": request.top_p,
        "max_tokens": max_tokens,
        "stop": request.stops,
        "seed": request.seed,
    }
    try:
        extension = request_overrides(request.specfuse_fusion)
    except ConfigError as exc:
        raise from_core(exc, "specfuse_fusion") from None
    # Stops of both layers add up (request_overrides' rule); every other OpenAI field wins.
    return request_overrides(extension, standard)


def _core_message(message: ChatMessage) -> dict[str, Any]:
    """An OpenAI message as the core's chat dict (the HF chat-template shape)."""
    role = {"developer": "system", "function": "tool"}.get(message.role, message.role)
    entry: dict[str, Any] = {"role": role, "content": message.content if message.content is not None else ""}
    if message.tool_calls:
        calls = []
        for call in message.tool_calls:
            function = call.get("function") or {}
            raw = function.get("arguments")
            try:
                # HF templates run arguments through tojson: they want the object, not OpenAI's string.
                arguments: Any = decode_arguments(raw)
            except ValueError:
                arguments = raw
            calls.append(
                {
                    "type": "function",
                    "id": call.get("id"),
                    "function": {"name": function.get("name"), "arguments": arguments},
                }
            )
        entry["tool_calls"] = calls
    if message.tool_call_id is not None:
        entry["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        entry["name"] = message.name
    return entry


def _response_format(request: ChatCompletionRequest) -> dict[str, Any] | None:
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object", "schema": None}
    if fmt.json_schema is None or fmt.json_schema.json_schema is None:
        raise GatewayError(
            400,
            "response_format of type 'json_schema' needs json_schema.schema",
            param="response_format.json_schema",
            code="missing_required_parameter",
        )
    return {"type": "json_schema", "schema": fmt.json_schema.json_schema}


def chat_call(request: ChatCompletionRequest) -> CoreCall:
    try:
        plan = ToolPlan.build(
            [t.model_dump(exclude_none=True) for t in request.tools or []] or None,
            request.tool_choice,
            response_format=_response_format(request),
        )
    except ConfigError as exc:
        raise from_core(exc, "tool_choice" if "tool_choice" in str(exc) else "tools") from None
    messages = plan.messages([_core_message(m) for m in request.messages])
    try:
        # Checked here, so an empty or non-text prompt is a 400 before a stream starts.
        check_messages(messages)
    except ConfigError as exc:
        raise from_core(exc, "messages") from None
    overrides = plan.overrides(_overrides(request, request.max_completion_tokens or request.max_tokens))
    return CoreCall(messages, plan, overrides, request.specfuse_trace)


def completion_call(request: CompletionRequest) -> CoreCall:
    prompt = request.prompt if isinstance(request.prompt, str) else request.prompt[0]
    if not prompt.strip():
        raise GatewayError(400, "the prompt is empty; pass some text", param="prompt", code="invalid_value")
    # A completion prompt is raw text every member continues as is: no chat template.
    return CoreCall(
        FormattedPrompt(prompt), ToolPlan(), _overrides(request, request.max_tokens), request.specfuse_trace
    )


def finish_reason(result: FusionResult, parsed: ParsedText | None = None) -> str:
    if parsed is not None and parsed.calls:
        return "tool_calls"
    return _FINISH.get(result.finish_reason, "stop")


def usage(result: FusionResult) -> UsageInfo:
    summary = result.trace.summary()
    return UsageInfo(
        prompt_tokens=result.usage.input_tokens,
        completion_tokens=result.usage.output_tokens,
        total_tokens=result.usage.total_tokens,
        specfuse={
            "rounds": summary["rounds"],
            "calls": summary["calls"],
            "prompt_tokens_computed": summary["prompt_tokens_computed"],
            "prompt_tokens_unmetered": summary["prompt_tokens_unmetered"],
        },
    )


def tool_calls(parsed: ParsedText) -> list[ToolCall] | None:
    if not parsed.calls:
        return None
    return [
        ToolCall(
            id=c.id, function=FunctionCall(name=c.name, arguments=json.dumps(c.arguments, ensure_ascii=False))
        )
        for c in parsed.calls
    ]


def content(parsed: ParsedText, text: str) -> str | None:
    """The message content: the prose around the calls found; None when calls are all there is.

    A call written but unreadable (bad JSON, an unknown tool) has no OpenAI shape;
    the whole answer is then the content, so the client sees what the model wrote
    instead of an empty message.
    """
    if parsed.invalid and not parsed.calls:
        return text
    return parsed.text if parsed.text or not parsed.calls else None


def chat_completion(
    call: CoreCall, result: FusionResult, model: str, response_id: str, created: int
) -> ChatCompletion:
    parsed = call.plan.parse(result.text)
    calls = tool_calls(parsed)
    message = AssistantMessage(content=content(parsed, result.text), tool_calls=calls)
    return ChatCompletion(
        id=response_id,
        created=created,
        model=model,
        choices=[ChatChoice(message=message, finish_reason=finish_reason(result, parsed))],
        usage=usage(result),
        specfuse_finish_reason=result.finish_reason,
        specfuse_trace=result.trace.to_dict() if call.trace else None,
    )

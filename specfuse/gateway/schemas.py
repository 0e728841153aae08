"""The OpenAI wire shapes the gateway reads and writes, as pydantic models.

Requests keep unknown fields (``extra="allow"``): OpenAI clients send many
optional fields (``user``, ``store``, ``parallel_tool_calls``, ...) that change
nothing here, and refusing them would break those clients. The fields that
*would* change the answer and that the fusion cannot honour (``n > 1``,
``logprobs``, ...) are refused by :func:`unsupported_fields`, by name.

Responses are built as models and dumped with ``exclude_none`` only where the
OpenAI API omits a field; ``specfuse_*`` fields are extensions the official
clients ignore (they keep them as extra attributes).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")


class ChatMessage(_Request):
    # "developer" is what newer OpenAI clients send instead of "system".
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class FunctionSpec(_Request):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"] = "function"
    function: FunctionSpec


class JsonSchemaSpec(_Request):
    name: str | None = None
    # "schema" shadows a BaseModel attribute, hence the alias.
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


class StreamOptions(_Request):
    include_usage: bool = False


class SamplingRequest(_Request):
    """Fields both generation endpoints share."""

    model: str
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(default=None, ge=1)
    logprobs: Any = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    #: Extension: return the fusion trace (every round's candidates, scores, weights, calls).
    specfuse_trace: bool = False
    #: Extension: per-request fusion settings (FusionSettings fields: segment_tokens, tau, ...);
    #: the OpenAI fields above win over the same setting here.
    specfuse_fusion: dict[str, Any] | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def stops(self) -> list[str] | None:
        if self.stop is None:
            return None
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    top_logprobs: int | None = None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


def unsupported_fields(request: SamplingRequest) -> tuple[str, str] | None:
    """(param, message) for the first field set to something the fusion cannot do, else None."""
    if request.n is not None and request.n > 1:
        return "n", "n > 1 is not supported: the fused model returns one answer per request"
    if request.logprobs not in (None, False, 0):
        return "logprobs", "logprobs are not supported: a fused answer has no single model's log-probs"
    if isinstance(request, ChatCompletionRequest) and request.top_logprobs:
        return (
            "top_logprobs",
            "top_logprobs are not supported: a fused answer has no single model's log-probs",
        )
    if request.presence_penalty or request.frequency_penalty:
        param = "presence_penalty" if request.presence_penalty else "frequency_penalty"
        return param, f"{param} is not supported by the fusion; leave it at 0"
    if request.logit_bias:
        return "logit_bias", "logit_bias is not supported by the fusion"
    if isinstance(request, CompletionRequest):
        if request.echo:
            return "echo", "echo is not supported"
        if request.suffix:
            return "suffix", "suffix (insertion) is not supported"
        if request.best_of is not None and request.best_of > 1:
            return "best_of", "best_of > 1 is not supported"
        if isinstance(request.prompt, list) and len(request.prompt) != 1:
            return "prompt", "exactly one prompt per request is supported (a string or a list of one)"
    return None


# -- responses -------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class UsageInfo(BaseModel):
    """OpenAI usage. prompt_tokens: the prompt as the members called read it, summed over
    them (each in its own tokenizer); completion_tokens: the fused answer."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    #: Extension: what the answer cost the members (rounds, calls, prompt tokens the servers computed).
    specfuse: dict[str, Any] | None = None


class FunctionCall(BaseModel):
    name: str
    arguments: str


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolCallDelta(BaseModel):
    index: int
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    specfuse_finish_reason: str | None = None
    specfuse_trace: dict[str, Any] | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None


ChoiceT = TypeVar("ChoiceT", ChunkChoice, CompletionChoice)


class SegmentChunk(BaseModel, Generic[ChoiceT]):
    """What a streamed chunk carries, chat or text: the two differ only in `object` and their choices.

    `Completion` also answers a text request whole: OpenAI uses one shape for both.
    A subclass narrows `object` to its literal; pydantic keeps the field where
    it stands here, so the JSON keys keep OpenAI's order.
    """

    id: str
    object: str
    created: int
    model: str
    choices: list[ChoiceT]
    usage: UsageInfo | None = None
    #: Extension fields of a segment chunk: which member drafted it, in which round.
    specfuse_member: str | None = None
    specfuse_round: int | None = None
    specfuse_finish_reason: str | None = None
    specfuse_trace: dict[str, Any] | None = None


class ChatCompletionChunk(SegmentChunk[ChunkChoice]):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"


class Completion(SegmentChunk[CompletionChoice]):
    object: Literal["text_completion"] = "text_completion"


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "specfuse"
    #: Extension: the members fused under this name.
    specfuse_members: list[str] = Field(default_factory=list)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody

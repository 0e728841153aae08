"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with the right status.

Every failure the gateway reports goes through :class:`GatewayError`, so a
client sees one shape whatever went wrong, and metrics count errors by one
``kind`` label. Core exceptions are mapped by :func:`from_core`; their
messages never carry a member's key (specfuse.errors promises that), and
unexpected exceptions are reported without their text, which could.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from specfuse.errors import (
    AllMembersFailedError,
    BackendError,
    ConfigError,
    ContextWindowError,
    SpecfuseError,
    ToolCallError,
)
from specfuse.gateway.schemas import ErrorBody, ErrorResponse


class GatewayError(Exception):
    """An error the client gets as an OpenAI error body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        #: The metrics label (errors by kind).
        self.kind = kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        error = ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code)
        return ErrorResponse(error=error).model_dump()

    def sse(self) -> str:
        """The stream form: a data event the OpenAI clients raise as an APIError."""
        return f"data: {json.dumps(self.body(), ensure_ascii=False)}\n\n"


def invalid_json(exc: Exception) -> GatewayError:
    return GatewayError(
        400, f"the request body is not valid JSON: {exc}", code="invalid_json", kind="invalid_json"
    )


def from_validation(exc: ValidationError) -> GatewayError:
    """The first pydantic error as an OpenAI invalid_request_error naming the parameter."""
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    count = len(exc.errors())
    more = f" (and {count - 1} more error(s))" if count > 1 else ""
    message = f"invalid value for '{param}': {first['msg']}{more}" if param else first["msg"] + more
    code = "missing_required_parameter" if first["type"] == "missing" else "invalid_type"
    return GatewayError(400, message, param=param, code=code, kind="invalid_request")


def unsupported(param: str, message: str) -> GatewayError:
    return GatewayError(400, message, param=param, code="unsupported_parameter", kind="unsupported")


def unknown_model(requested: str, served: str) -> GatewayError:
    return GatewayError(
        404,
        f"The model '{requested}' does not exist; this gateway serves '{served}'",
        param="model",
        code="model_not_found",
        kind="unknown_model",
    )


def context_too_long(prompt_tokens: int, window: int) -> GatewayError:
    return GatewayError(
        400,
        f"This model's usable context window is {window} tokens, but the prompt is {prompt_tokens} "
        "tokens (as the members read it); shorten the messages",
        param="messages",
        code="context_length_exceeded",
        kind="context_window",
    )


def too_many_requests(limit: int, retry_after: float) -> GatewayError:
    seconds = max(1, round(retry_after))
    return GatewayError(
        429,
        f"This gateway replica is already serving its limit of {limit} requests at once; "
        f"retry after {seconds}s",
        type="rate_limit_error",
        code="rate_limit_exceeded",
        kind="rate_limited",
        headers={"Retry-After": str(seconds)},
    )


def unauthorized() -> GatewayError:
    return GatewayError(
        401,
        "Incorrect or missing API key: send 'Authorization: Bearer <key>' with the gateway's --api-key",
        code="invalid_api_key",
        kind="auth",
        headers={"WWW-Authenticate": "Bearer"},
    )


def not_ready(why: str) -> GatewayError:
    return GatewayError(
        503, f"the ensemble is not ready: {why}", type="server_error", code="not_ready", kind="not_ready"
    )


def from_core(exc: BaseException, param: str | None = None) -> GatewayError:
    """A core exception as the error a client should see."""
    if isinstance(exc, ContextWindowError):
        return GatewayError(
            400, str(exc), param="messages", code="context_length_exceeded", kind="context_window"
        )
    if isinstance(exc, ToolCallError):
        return GatewayError(500, str(exc), type="server_error", code="tool_call_missing", kind="tool_call")
    if isinstance(exc, ConfigError):
        return GatewayError(400, str(exc), param=param, code="invalid_value", kind="invalid_request")
    if isinstance(exc, (AllMembersFailedError, BackendError)):
        return GatewayError(
            502,
            f"the ensemble's members failed: {exc}",
            type="server_error",
            code="members_failed",
            kind="member_failure",
        )
    if isinstance(exc, (SpecfuseError, OSError, TimeoutError)):
        return GatewayError(502, str(exc), type="server_error", code="members_failed", kind="member_failure")
    # Not a failure specfuse names: its text may hold anything, so only its type is told.
    return GatewayError(
        500,
        f"internal error ({type(exc).__name__}); see the gateway's log",
        type="server_error",
        code="internal_error",
        kind="internal",
    )

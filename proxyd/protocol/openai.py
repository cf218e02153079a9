"""OpenAI wire format: error bodies and stream error events as an OpenAI client expects them.

Pure module; renders a ProxydError, never a request or response body.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxyd.errors import ErrorType, ProxydError

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    431: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout",
}

_CODE_BY_TYPE = {
    ErrorType.UNKNOWN_KEY: "invalid_api_key",
    ErrorType.MODEL_NOT_FOUND: "model_not_found",
    ErrorType.RATE_LIMITED: "rate_limit_exceeded",
    ErrorType.CONCURRENCY_LIMITED: "rate_limit_exceeded",
    ErrorType.INSUFFICIENT_QUOTA: "insufficient_quota",
}


def error_json(
    message: str, error_type: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """`{"error": {"message", "type", "param", "code"}}`: an error body in OpenAI's format."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def error_payload(err: ProxydError) -> dict[str, Any]:
    """The OpenAI error body for `err`."""
    if err.error_type is ErrorType.INSUFFICIENT_QUOTA:
        kind = "insufficient_quota"
    elif err.error_type is ErrorType.RATE_LIMITED:
        kind = "tokens" if err.param == "tokens" else "requests"
    else:
        kind = _TYPE_BY_STATUS.get(err.status, "server_error" if err.status >= 500 else "error")
    return error_json(
        err.message,
        kind,
        param=None if err.error_type is ErrorType.RATE_LIMITED else err.param,
        code=_CODE_BY_TYPE.get(err.error_type, err.error_type.value),
    )


def error_body(err: ProxydError) -> bytes:
    """The JSON error body for a non-stream response."""
    return orjson.dumps(error_payload(err))


def error_event(err: ProxydError) -> bytes:
    """An SSE event that ends a stream with an error, as OpenAI streams do."""
    return b"data: " + orjson.dumps(error_payload(err)) + b"\n\n"

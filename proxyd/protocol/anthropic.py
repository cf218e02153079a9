"""Anthropic wire format: error bodies and stream error events as an Anthropic client expects.

Pure module; renders a ProxydError, never a request or response body.
"""

from __future__ import annotations

from typing import Any

import orjson

from proxyd.errors import ErrorType, ProxydError

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    499: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def error_type_for_status(status: int) -> str:
    """Anthropic's error `type` for an HTTP status."""
    return _TYPE_BY_STATUS.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_json(message: str, error_type: str) -> dict[str, Any]:
    """`{"type": "error", "error": {"type", "message"}}`: an error body in Anthropic's format."""
    return {"type": "error", "error": {"type": error_type, "message": message}}


def error_payload(err: ProxydError) -> dict[str, Any]:
    """The Anthropic error body for `err`."""
    if err.error_type is ErrorType.INSUFFICIENT_QUOTA:
        return error_json(err.message, "billing_error")
    return error_json(err.message, error_type_for_status(err.status))


def error_body(err: ProxydError) -> bytes:
    """The JSON error body for a non-stream response."""
    return orjson.dumps(error_payload(err))


def error_event(err: ProxydError) -> bytes:
    """An SSE `error` event that ends a stream, as Anthropic streams do."""
    return b"event: error\ndata: " + orjson.dumps(error_payload(err)) + b"\n\n"

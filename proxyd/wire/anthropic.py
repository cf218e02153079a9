"""Anthropic wire format: error bodies and stream error events as an Anthropic client expects.

Pure module; renders a ProxydError, never a request or response body.
"""

from __future__ import annotations

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


def error_payload(err: ProxydError) -> dict[str, object]:
    """`{"type": "error", "error": {"type", "message"}}` for `err`."""
    if err.error_type is ErrorType.INSUFFICIENT_QUOTA:
        kind = "billing_error"
    else:
        kind = _TYPE_BY_STATUS.get(err.status, "api_error")
    return {"type": "error", "error": {"type": kind, "message": err.message}}


def error_body(err: ProxydError) -> bytes:
    """The JSON error body for a non-stream response."""
    return orjson.dumps(error_payload(err))


def error_event(err: ProxydError) -> bytes:
    """An SSE `error` event that ends a stream, as Anthropic streams do."""
    return b"event: error\ndata: " + orjson.dumps(error_payload(err)) + b"\n\n"

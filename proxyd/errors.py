"""The one error tree of proxyd and its closed vocabulary of what went wrong.

Pure module: no aiohttp, no I/O. An error never carries a request or response body.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorType(StrEnum):
    """What went wrong, in one closed set shared by billing rows, metric labels and logs."""

    INVALID_REQUEST = "invalid_request"
    BODY_TOO_LARGE = "body_too_large"
    UNKNOWN_KEY = "unknown_key"
    KEY_DISABLED = "key_disabled"
    KEY_EXPIRED = "key_expired"
    IP_NOT_ALLOWED = "ip_not_allowed"
    MODEL_NOT_ALLOWED = "model_not_allowed"
    MODEL_NOT_FOUND = "model_not_found"
    RATE_LIMITED = "rate_limited"
    CONCURRENCY_LIMITED = "concurrency_limited"
    INSUFFICIENT_QUOTA = "insufficient_quota"
    RESALE_BLOCKED = "resale_blocked"
    UNSUPPORTED_FEATURE = "unsupported_feature"
    NO_CHANNEL = "no_channel"
    UPSTREAM_CONNECT = "upstream_connect_failure"
    UPSTREAM_TIMEOUT = "upstream_timeout"
    UPSTREAM_ERROR = "upstream_error"
    UPSTREAM_CLIENT_ERROR = "upstream_client_error"
    UPSTREAM_CREDENTIAL = "upstream_credential"  # the operator's upstream key or account refused
    UPSTREAM_RESET = "upstream_reset"
    CLIENT_DISCONNECT = "client_disconnect"
    CLIENT_TIMEOUT = "client_timeout"  # the client sent its request too slowly (408)
    # Errors the server makes before any endpoint is reached (no billing row):
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    HEADER_TOO_LARGE = "header_too_large"
    OVERLOADED = "overloaded"  # the process is at its cap of open client connections
    INTERNAL = "internal_error"


class ProxydError(Exception):
    """A refusal or failure with the HTTP status and error type the client will see.

    `message` is plain English for the client: it never echoes a key or any part of a body.
    """

    status: int = 500
    error_type: ErrorType = ErrorType.INTERNAL

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        error_type: ErrorType | None = None,
        param: str | None = None,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if error_type is not None:
            self.error_type = error_type
        self.param = param
        self.retry_after = retry_after
        self.headers = headers or {}

    @property
    def should_retry(self) -> bool:
        """Whether the same request can succeed later (the `x-should-retry` header's value).

        Rate and concurrency limits and failures of the upstream side can; a refusal about the
        key, its balance or spend window, or the request itself cannot, however often it is sent.
        """
        if self.status == 429:
            return self.error_type is not ErrorType.INSUFFICIENT_QUOTA
        return self.status >= 500 or self.status in (408, 409)


class InvalidRequest(ProxydError):
    """The request body or parameters are malformed (400)."""

    status = 400
    error_type = ErrorType.INVALID_REQUEST


class BodyTooLarge(ProxydError):
    """The request body is over the configured limit (413)."""

    status = 413
    error_type = ErrorType.BODY_TOO_LARGE


class RequestTimeout(ProxydError):
    """The request body did not arrive within the body deadline (408); the connection closes."""

    status = 408
    error_type = ErrorType.CLIENT_TIMEOUT


class UnknownKey(ProxydError):
    """No key, or a key proxyd does not know (401)."""

    status = 401
    error_type = ErrorType.UNKNOWN_KEY


class Forbidden(ProxydError):
    """A known key that may not do this: disabled, expired, model or address not allowed (403)."""

    status = 403
    error_type = ErrorType.KEY_DISABLED


class ModelNotFound(ProxydError):
    """No channel serves the requested model, or it has no price (404)."""

    status = 404
    error_type = ErrorType.MODEL_NOT_FOUND


class RateLimited(ProxydError):
    """A per-key limit refused the request (429 with Retry-After)."""

    status = 429
    error_type = ErrorType.RATE_LIMITED


class InsufficientQuota(ProxydError):
    """The account's balance cannot cover the request's maximum cost (429)."""

    status = 429
    error_type = ErrorType.INSUFFICIENT_QUOTA


class UpstreamFailure(ProxydError):
    """No channel could serve the request (502, 503 or 504 by cause)."""

    status = 502
    error_type = ErrorType.UPSTREAM_ERROR

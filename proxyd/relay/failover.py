"""Failover: the one place deciding, after each upstream attempt, whether to try another channel.

Pure module: plain data in, a decision out; no aiohttp, no clock of its own, no I/O. It never
retries once a byte reached the client, and it never looks at a body.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from proxyd.errors import ErrorType, UpstreamFailure


class AttemptKind(StrEnum):
    """What happened to one attempt on one channel."""

    CONNECT_ERROR = "connect_error"  # no connection (refused, DNS, TLS handshake, proxy)
    TIMEOUT = "timeout"  # connected (or not) but no response headers within the time allowed
    RESPONSE = "response"  # the upstream answered with a status line and headers
    RESET = "reset"  # the connection broke after the response headers
    STALLED = "stalled"  # the body stopped arriving (chunk timeout) after the response headers


class Verdict(StrEnum):
    """What the relay does next."""

    DELIVER = "deliver"  # give this response to the client as it is (2xx/3xx, or 4xx but 429)
    RETRY = "retry"  # release this channel and try the next candidate that grants a permit
    GIVE_UP = "give_up"  # no more attempts: the client gets `final_failure(attempts)`
    ABORT = "abort"  # the response had begun: end it with this attempt's error, never retry


@dataclass(frozen=True, slots=True)
class Attempt:
    """One attempt's outcome: `status` for RESPONSE; `client_started` once any byte was sent."""

    kind: AttemptKind
    status: int | None = None
    client_started: bool = False


@dataclass(frozen=True, slots=True)
class RetryBudget:
    """At most `max_attempts` attempts in all, and a new one only while time is left."""

    max_attempts: int = 3
    min_time_left: float = 0.0  # seconds before the overall deadline below which none starts


DEFAULT_BUDGET = RetryBudget()


def retryable(attempt: Attempt) -> bool:
    """Whether this outcome may move to another channel (ignoring budget and deadline)."""
    if attempt.client_started:
        return False
    kind = attempt.kind
    if kind is AttemptKind.RESPONSE:
        status = attempt.status or 0
        return status == 429 or status >= 500
    return kind is AttemptKind.CONNECT_ERROR or kind is AttemptKind.TIMEOUT


def decide(
    attempt: Attempt, *, attempts: int, time_left: float, budget: RetryBudget = DEFAULT_BUDGET
) -> Verdict:
    """The verdict after an attempt; `attempts` counts attempts made so far, this one included.

    - any byte reached the client: DELIVER if it was a response being relayed, else ABORT;
    - RESET or STALLED (after the headers): ABORT, even with nothing sent yet, because the
      provider accepted and may bill the call;
    - a response below 400, or a 4xx other than 429: DELIVER (passed through, not retried);
    - connect error, timeout before headers, 429 or 5xx: RETRY while `attempts` is below
      `budget.max_attempts` and `time_left` (seconds to the overall deadline) is above
      `budget.min_time_left`; otherwise GIVE_UP.
    """
    kind = attempt.kind
    if kind is AttemptKind.RESET or kind is AttemptKind.STALLED:
        return Verdict.ABORT
    if attempt.client_started:
        return Verdict.DELIVER if kind is AttemptKind.RESPONSE else Verdict.ABORT
    if not retryable(attempt):
        return Verdict.DELIVER
    if attempts < budget.max_attempts and time_left > budget.min_time_left:
        return Verdict.RETRY
    return Verdict.GIVE_UP


def classify(attempt: Attempt) -> ErrorType | None:
    """The error type of an attempt (None for a success), for `Permit.failure`, rows, metrics."""
    kind = attempt.kind
    if kind is AttemptKind.CONNECT_ERROR:
        return ErrorType.UPSTREAM_CONNECT
    if kind is AttemptKind.TIMEOUT or kind is AttemptKind.STALLED:
        return ErrorType.UPSTREAM_TIMEOUT
    if kind is AttemptKind.RESET:
        return ErrorType.UPSTREAM_RESET
    status = attempt.status or 0
    if status == 429 or status >= 500:
        return ErrorType.UPSTREAM_ERROR
    if status >= 400:
        return ErrorType.UPSTREAM_CLIENT_ERROR
    return None


@dataclass(frozen=True, slots=True)
class FinalFailure:
    """What the client gets when no attempt was delivered.

    With `upstream_index` set, the client gets that attempt's upstream status, headers that
    matter (Retry-After) and body, unchanged but for the wire format; `status` is that status.
    Otherwise the client gets `error()`, a proxyd error with `status` and `error_type`.
    """

    status: int
    error_type: ErrorType
    message: str
    upstream_index: int | None = None

    def error(self) -> UpstreamFailure:
        """The error to raise when there is no upstream response to pass through."""
        return UpstreamFailure(self.message, status=self.status, error_type=self.error_type)


def final_failure(attempts: Sequence[Attempt]) -> FinalFailure:
    """The client's answer once every candidate failed or none could be tried.

    - no attempt at all (no channel, or every one cooling down or over its caps): 503 no_channel;
    - some attempt got an upstream response (429 or 5xx): the LAST such response is passed
      through, its status kept, error type upstream_error, even when later attempts failed to
      connect or timed out;
    - otherwise, every attempt timed out: 504 upstream_timeout; every attempt failed to
      connect: 503 upstream_connect_failure; a mix of both: 502 upstream_error.
    """
    if not attempts:
        return FinalFailure(
            503, ErrorType.NO_CHANNEL, "No channel is available for this model right now."
        )
    timeouts = connects = 0
    for i in range(len(attempts) - 1, -1, -1):
        attempt = attempts[i]
        kind = attempt.kind
        if kind is AttemptKind.RESPONSE and attempt.status is not None:
            return FinalFailure(
                attempt.status,
                ErrorType.UPSTREAM_ERROR,
                "The upstream provider returned an error.",
                upstream_index=i,
            )
        if kind is AttemptKind.TIMEOUT or kind is AttemptKind.STALLED:
            timeouts += 1
        elif kind is AttemptKind.CONNECT_ERROR:
            connects += 1
    if timeouts == len(attempts):
        return FinalFailure(
            504, ErrorType.UPSTREAM_TIMEOUT, "The upstream provider did not respond in time."
        )
    if connects == len(attempts):
        return FinalFailure(
            503,
            ErrorType.UPSTREAM_CONNECT,
            "Could not connect to any upstream provider for this model.",
        )
    return FinalFailure(502, ErrorType.UPSTREAM_ERROR, "The upstream providers failed.")

"""Failover: the one place deciding what follows an upstream attempt: try the next channel,
deliver, give up, or end an answer that broke (before the head, after it, or mid-stream).

Pure module: plain data in, a decision out; no aiohttp, no clock of its own, no I/O. It never
retries once a byte reached the client. It never looks at a body: an upstream error answer comes
with its `Fault` (whose problem it is, read by `provider_errors`), and `ON_RESPONSE` maps that to
"move on" or not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from proxyd.errors import ErrorType, UpstreamFailure
from proxyd.relay.provider_errors import MESSAGES, Fault, fault_of
from proxyd.upstream.failures import AttemptKind

__all__ = [
    "Attempt",
    "AttemptKind",
    "FinalFailure",
    "RetryBudget",
    "Verdict",
    "classify",
    "decide",
    "final_failure",
]

# The kinds that can happen after the answer's head (the rest happen before it).
_AFTER_HEAD = frozenset({AttemptKind.RESET, AttemptKind.STALLED, AttemptKind.CLIENT_GONE})


class Verdict(StrEnum):
    """What the relay does next."""

    DELIVER = "deliver"  # give this response to the client as it is (2xx/3xx, or 4xx but 429)
    RETRY = "retry"  # release this channel and try the next candidate that grants a permit
    GIVE_UP = "give_up"  # no more attempts: the client gets `final_failure(attempts)`
    ABORT = "abort"  # the answer broke after its head, before a byte was sent: an error answer
    END_STREAM = "end_stream"  # the stream had begun: end it with an error event, never retry
    STOP = "stop"  # the client left: read no more, write no more


@dataclass(frozen=True, slots=True)
class Attempt:
    """One attempt's outcome: `status` for RESPONSE; `client_started` once any byte was sent.

    `fault` says whose problem an error answer (400 and above) is; without one it is judged
    from the status alone. Only a break after the head (RESET, STALLED) or a client that left
    can happen once bytes were sent: any other kind with `client_started` is refused.
    """

    kind: AttemptKind
    status: int | None = None
    client_started: bool = False
    fault: Fault | None = None

    def __post_init__(self) -> None:
        if self.client_started and self.kind not in _AFTER_HEAD:
            raise ValueError(f"{self.kind} cannot happen once the answer was sent")

    @property
    def judged(self) -> Fault | None:
        """The fault of an error answer (None below 400 or without an answer)."""
        if self.kind is not AttemptKind.RESPONSE or (self.status or 0) < 400:
            return None
        return self.fault if self.fault is not None else fault_of(self.status or 0, b"")


# An upstream error answer, by whose problem it is: whether another channel is tried before
# anything reached the client, and the error type it is recorded under. A rejected or empty
# operator account moves on like a provider failure; the client's own mistake does not.
ON_RESPONSE: dict[Fault, tuple[bool, ErrorType]] = {
    Fault.CREDENTIAL: (True, ErrorType.UPSTREAM_CREDENTIAL),
    Fault.BUSY: (True, ErrorType.UPSTREAM_ERROR),
    Fault.SERVER: (True, ErrorType.UPSTREAM_ERROR),
    Fault.CLIENT: (False, ErrorType.UPSTREAM_CLIENT_ERROR),
    Fault.OTHER: (False, ErrorType.UPSTREAM_CLIENT_ERROR),
}


@dataclass(frozen=True, slots=True)
class RetryBudget:
    """At most `max_attempts` attempts in all, and a new one only while time is left."""

    max_attempts: int = 3
    min_time_left: float = 0.0  # seconds before the overall deadline below which none starts


DEFAULT_BUDGET = RetryBudget()


def decide(
    attempt: Attempt,
    *,
    attempts: int = 1,
    time_left: float = 0.0,
    budget: RetryBudget = DEFAULT_BUDGET,
) -> Verdict:
    """The verdict after an attempt, before the head, after it, or mid-stream; `attempts`
    counts attempts made so far, this one included (they matter only before the head).

    - the client left: STOP;
    - RESET or STALLED (after the head): END_STREAM once bytes reached the client, else ABORT,
      never a retry, because the provider accepted and may bill the call;
    - a response below 400, or an error answer about the client's request (or another 4xx that
      is no channel's fault): DELIVER;
    - connect error, timeout before the head, or an error answer that is the channel's trouble
      (429, 5xx, the operator's credential or account: `ON_RESPONSE`): RETRY while `attempts`
      is below `budget.max_attempts` and `time_left` (seconds to the overall deadline) is
      above `budget.min_time_left`; otherwise GIVE_UP.
    """
    kind = attempt.kind
    if kind is AttemptKind.CLIENT_GONE:
        return Verdict.STOP
    if kind is AttemptKind.RESET or kind is AttemptKind.STALLED:
        return Verdict.END_STREAM if attempt.client_started else Verdict.ABORT
    if kind is AttemptKind.RESPONSE:
        fault = attempt.judged
        if fault is None or not ON_RESPONSE[fault][0]:
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
    if kind is AttemptKind.CLIENT_GONE:
        return ErrorType.CLIENT_DISCONNECT
    fault = attempt.judged
    return None if fault is None else ON_RESPONSE[fault][1]


@dataclass(frozen=True, slots=True)
class FinalFailure:
    """What the client gets when no attempt was delivered: always `error()`, proxyd's own error.

    With `upstream_index` set, it keeps that attempt's upstream status (and its Retry-After);
    the provider's message never reaches the client.
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
    - some attempt got a 429 or 5xx answer: the LAST such answer's status is kept, error type
      upstream_error, even when later attempts failed to connect or timed out;
    - otherwise, some answer rejected the operator's credential or account: 503
      upstream_credential (the client's own key is not at fault, and the status says so);
    - otherwise, every attempt timed out: 504 upstream_timeout; every attempt failed to
      connect: 503 upstream_connect_failure; a mix of both: 502 upstream_error.
    """
    if not attempts:
        return FinalFailure(
            503, ErrorType.NO_CHANNEL, "No channel is available for this model right now."
        )
    timeouts = connects = credentials = 0
    for i in range(len(attempts) - 1, -1, -1):
        attempt = attempts[i]
        kind = attempt.kind
        fault = attempt.judged
        if fault is Fault.CREDENTIAL:
            credentials += 1
        elif fault is not None and attempt.status is not None:
            return FinalFailure(
                attempt.status, ErrorType.UPSTREAM_ERROR, MESSAGES[fault], upstream_index=i
            )
        elif kind is AttemptKind.TIMEOUT or kind is AttemptKind.STALLED:
            timeouts += 1
        elif kind is AttemptKind.CONNECT_ERROR:
            connects += 1
    if credentials:
        return FinalFailure(503, ErrorType.UPSTREAM_CREDENTIAL, MESSAGES[Fault.CREDENTIAL])
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
